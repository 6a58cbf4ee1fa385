//! Wire messages of protocol `quiver/1` and their encoding into frames.
//!
//! Bodies are MessagePack in positional form; fields added later carry
//! `#[serde(default)]` so older encodings still decode. The protocol version
//! in the handshake settles everything else.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::frame::{self, Frame, FrameError};
pub use crate::table::ColumnDef;
use crate::{ChangeBatch, Metric, SiteId, SnapshotMark, Strategy, TableKind, VersionVector};

/// The protocol this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The TLS application protocol name.
pub const ALPN: &[u8] = b"quiver/1";
/// The frame limit this build asks for by default.
pub const DEFAULT_MAX_FRAME: u32 = 16 * 1024 * 1024;

/// A shard a node holds, with its schema version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub name: String,
    pub schema_version: u64,
}

/// First message of a connection, from the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub site: SiteId,
    pub node: String,
    pub token: Option<String>,
    pub shards: Vec<ShardInfo>,
    pub max_frame: u32,
    pub compression: bool,
}

/// The server's answer to an accepted [`Hello`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol: u32,
    pub site: SiteId,
    pub node: String,
    pub shards: Vec<ShardInfo>,
    pub max_frame: u32,
    pub compression: bool,
    /// The client's token is read-only: its pushes will be refused.
    #[serde(default)]
    pub read_only: bool,
}

/// Why a connection or a stream was refused or ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    Protocol,
    Unauthorized,
    Forbidden,
    UnknownShard,
    BadFrame,
    BadBatch,
    Internal,
    RateLimited,
    ShuttingDown,
}

/// A refusal or an error, with a message for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorMsg {
    pub code: ErrorCode,
    pub message: String,
    /// For `RateLimited`: when to retry.
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
}

/// A replicated table's definition, so a replica lacking it can create it.
/// The enums travel as the same lowercase names `quiver/1` always sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDef {
    pub name: String,
    pub kind: TableKind,
    pub strategy: Strategy,
    pub pk: Vec<ColumnDef>,
    pub columns: Vec<ColumnDef>,
    pub dim: Option<u32>,
    pub metric: Option<Metric>,
}

/// Opens a shard's stream: what the requester holds, per table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub shard: String,
    /// Tables to sync (empty: the whole shard).
    pub tables: Vec<String>,
    pub versions: Vec<(String, VersionVector)>,
    /// The requester lacks the shard and wants its table definitions.
    pub want_schema: bool,
    /// The requester's table definitions of the shard, so a responder
    /// lacking some can create them.
    #[serde(default)]
    pub schema: Vec<TableDef>,
    /// Snapshots of the shard's tables that the requester took in part and
    /// wants continued (the mark of the last batch it committed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resume: Vec<SnapshotMark>,
}

/// The responder's side of the shard's stream start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncReply {
    pub versions: Vec<(String, VersionVector)>,
    pub schema: Vec<TableDef>,
    /// As [`SyncRequest::resume`], for what the responder receives.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resume: Vec<SnapshotMark>,
}

/// End of one side's batches on a shard stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub batches: u64,
    pub changes: u64,
}

/// What applying changes did: the store's apply report, and what each side
/// tells the other it applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Changes that took effect.
    pub applied: u64,
    /// Changes already held (or replaced by something held): no effect.
    pub duplicates: u64,
    /// Changes to an older life of a row deleted since, or to a column or
    /// table dropped on this replica: no effect.
    pub stale: u64,
    pub conflicts_detected: u64,
    /// Conflicts the strategy resolved on its own.
    pub conflicts_resolved: u64,
    /// Conflicts left open for review (`manual`).
    pub conflicts_open: u64,
    /// Changes for a table or column the receiver does not know yet: kept,
    /// and applied once the schema that explains them arrives. Encoded
    /// only when not zero, so a report without any is the `quiver/1` one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Report {
    /// Adds another report's counts to this one.
    pub fn add(&mut self, o: &Report) {
        self.applied += o.applied;
        self.duplicates += o.duplicates;
        self.stale += o.stale;
        self.conflicts_detected += o.conflicts_detected;
        self.conflicts_resolved += o.conflicts_resolved;
        self.conflicts_open += o.conflicts_open;
        self.held += o.held;
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("unknown message type {0}")]
    UnknownKind(u8),
    #[error("malformed {kind} message: {reason}")]
    Malformed { kind: &'static str, reason: String },
    #[error("could not encode message: {0}")]
    Encode(String),
}

fn body<T: Serialize>(v: &T) -> Result<Vec<u8>, WireError> {
    rmp_serde::to_vec(v).map_err(|e| WireError::Encode(e.to_string()))
}

fn parse<T: DeserializeOwned>(kind: &'static str, b: &[u8]) -> Result<T, WireError> {
    rmp_serde::from_slice(b).map_err(|e| WireError::Malformed {
        kind,
        reason: e.to_string(),
    })
}

/// The one table of messages: each with its frame type byte, its name and
/// its body. `Message`, its names, its encoding and its decoding all come
/// from it.
macro_rules! messages {
    ($( $(#[$doc:meta])* $kind:literal $name:literal $variant:ident($body:ty), )*) => {
        /// Every message of the protocol.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Message {
            $( $(#[$doc])* $variant($body), )*
        }

        impl Message {
            /// The frame type byte and a name for messages.
            pub fn kind(&self) -> (u8, &'static str) {
                match self {
                    $( Message::$variant(_) => ($kind, $name), )*
                }
            }

            /// Encodes the message as one frame.
            pub fn encode(&self, compress: bool) -> Result<Vec<u8>, WireError> {
                let b = match self {
                    $( Message::$variant(m) => body(m)?, )*
                };
                Ok(frame::encode(self.kind().0, &b, compress))
            }

            /// Decodes a frame's body.
            pub fn decode(f: &Frame) -> Result<Message, WireError> {
                Ok(match f.kind {
                    $( $kind => Message::$variant(parse($name, &f.body)?), )*
                    k => return Err(WireError::UnknownKind(k)),
                })
            }
        }

        /// Every frame type byte in use, with its message's name.
        pub const MESSAGE_KINDS: &[(u8, &str)] = &[$( ($kind, $name), )*];
    };
}

messages! {
    1 "hello" Hello(Hello),
    2 "welcome" Welcome(Welcome),
    3 "refused" Refused(ErrorMsg),
    4 "sync-request" SyncRequest(SyncRequest),
    5 "sync-reply" SyncReply(SyncReply),
    6 "batch" Batch(ChangeBatch),
    7 "done" Done(Done),
    8 "report" Report(Report),
    9 "ping" Ping(u64),
    10 "pong" Pong(u64),
    11 "error" Error(ErrorMsg),
    /// Opens a live stream: notify me when these shards change (empty: all).
    12 "subscribe" Subscribe(Vec<String>),
    /// Sent on a live stream: the sender has changes in these shards.
    13 "notify" Notify(Vec<String>),
    /// Opens a clone stream: send me a consistent copy of the whole store.
    14 "clone-request" CloneRequest(u32),
    /// A piece of that copy, in order.
    15 "clone-chunk" CloneChunk(CloneChunk),
}

/// A piece of a store copy (`quiver clone`): its place in the file and its
/// bytes; the last piece also carries the whole file's length and CRC32C.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloneChunk {
    pub offset: u64,
    #[serde(with = "crate::value::bytes")]
    pub data: Vec<u8>,
    /// On the last piece: (file length, CRC32C of the whole file).
    pub end: Option<(u64, u32)>,
}

/// Compares two secrets in constant time (for the length of the longer).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = (a.len() ^ b.len()) as u8 | ((a.len() ^ b.len()) >> 8) as u8;
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Decoder;
    use crate::{Change, Hlc, Value};

    fn batch() -> ChangeBatch {
        ChangeBatch {
            snapshot: None,
            shard: "default".into(),
            changes: vec![Change {
                table: "docs".into(),
                pk: vec![Value::Text("a".into())],
                column: Some("vector".into()),
                value: Value::Blob(vec![0u8; 1536]),
                hlc: Hlc::new(5, 1),
                site: SiteId([1; 16]),
                db_version: 3,
                cl: 1,
                replaces: [(SiteId([2; 16]), 4)].into_iter().collect(),
            }],
            covered: vec![],
        }
    }

    #[test]
    fn every_message_round_trips() {
        let msgs = vec![
            Message::Hello(Hello {
                protocol: 1,
                site: SiteId([9; 16]),
                node: "a".into(),
                token: Some("t".into()),
                shards: vec![ShardInfo {
                    name: "default".into(),
                    schema_version: 1,
                }],
                max_frame: 1 << 20,
                compression: true,
            }),
            Message::Batch(batch()),
            Message::SyncRequest(SyncRequest {
                resume: Vec::new(),
                shard: "s".into(),
                tables: vec!["docs".into()],
                versions: vec![("docs".into(), VersionVector::new())],
                want_schema: true,
                schema: vec![],
            }),
            Message::Done(Done {
                batches: 1,
                changes: 2,
            }),
            Message::Report(Report::default()),
            Message::Ping(7),
            Message::Subscribe(vec!["default".into()]),
            Message::Notify(vec![]),
            Message::Error(ErrorMsg {
                code: ErrorCode::BadBatch,
                message: "x".into(),
                retry_after_ms: None,
            }),
        ];
        for m in msgs {
            let bytes = m.encode(true).unwrap();
            let frames = Decoder::new(1 << 20, true).push(&bytes).unwrap();
            assert_eq!(Message::decode(&frames[0]).unwrap(), m);
        }
    }

    #[test]
    fn vectors_travel_as_raw_bytes() {
        let m = Message::Batch(batch());
        let bytes = m.encode(false).unwrap();
        // 1,536 bytes of vector plus a little framing, not an array of numbers.
        assert!(bytes.len() < 1536 + 120, "{} bytes", bytes.len());
    }

    #[test]
    fn garbage_bodies_give_errors_not_panics() {
        // Every kind, Notify included: an empty body, a reserved marker, a
        // truncated array, and a run of negative integers are errors.
        for &(kind, _) in MESSAGE_KINDS {
            for body in [vec![], vec![0xc1], vec![0x93, 0x01], vec![0xff; 40]] {
                let decoded = Message::decode(&Frame {
                    kind,
                    body: body.clone(),
                });
                assert!(
                    decoded.is_err(),
                    "kind {kind}, body {body:02x?}: {decoded:?}"
                );
            }
        }
        assert!(matches!(
            Message::decode(&Frame {
                kind: 0,
                body: vec![]
            }),
            Err(WireError::UnknownKind(0))
        ));
        assert!(matches!(
            Message::decode(&Frame {
                kind: 99,
                body: vec![]
            }),
            Err(WireError::UnknownKind(99))
        ));
    }

    #[test]
    fn typed_definitions_travel_as_the_names_quiver_1_sent() {
        // What a quiver/1 peer of the first stage sends: the same fields,
        // with strings where the enums are now.
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct Legacy {
            name: String,
            kind: String,
            strategy: String,
            pk: Vec<ColumnDef>,
            columns: Vec<ColumnDef>,
            dim: Option<u32>,
            metric: Option<String>,
        }
        let col = ColumnDef::plain("id", "TEXT", true);
        let typed = TableDef {
            name: "docs".into(),
            kind: TableKind::Collection,
            strategy: Strategy::LocalWins,
            pk: vec![col.clone()],
            columns: vec![],
            dim: Some(4),
            metric: Some(Metric::L2),
        };
        let legacy = Legacy {
            name: "docs".into(),
            kind: "collection".into(),
            strategy: "local-wins".into(),
            pk: vec![col],
            columns: vec![],
            dim: Some(4),
            metric: Some("l2".into()),
        };
        let bytes = rmp_serde::to_vec(&legacy).unwrap();
        assert_eq!(rmp_serde::to_vec(&typed).unwrap(), bytes);
        assert_eq!(rmp_serde::from_slice::<TableDef>(&bytes).unwrap(), typed);
        // A name this build does not know is an error, not a default.
        let unknown = Legacy {
            strategy: "newest-ever".into(),
            ..legacy
        };
        assert!(rmp_serde::from_slice::<TableDef>(&rmp_serde::to_vec(&unknown).unwrap()).is_err());
    }

    /// A request and a batch without snapshot marks are encoded as before
    /// marks existed, so either decodes the other's; a mark travels.
    #[test]
    fn snapshot_marks_are_encoded_only_when_there() {
        #[derive(Serialize, Deserialize)]
        struct OldBatch {
            shard: String,
            changes: Vec<crate::Change>,
            covered: Vec<crate::Covered>,
        }
        let old = OldBatch {
            shard: "s".into(),
            changes: vec![],
            covered: vec![],
        };
        let bytes = rmp_serde::to_vec(&old).unwrap();
        let batch = ChangeBatch {
            shard: "s".into(),
            ..Default::default()
        };
        assert_eq!(rmp_serde::to_vec(&batch).unwrap(), bytes);
        assert_eq!(rmp_serde::from_slice::<ChangeBatch>(&bytes).unwrap(), batch);
        let marked = ChangeBatch {
            snapshot: Some(Box::new(SnapshotMark {
                table: "docs".into(),
                after: Some(crate::Value::Text("k17".into())),
                versions: VersionVector::new(),
                rows: 40,
                sweep: false,
            })),
            ..batch
        };
        let again = rmp_serde::to_vec(&marked).unwrap();
        // A stage-one decoder refuses a marked batch (the README's limits
        // say so): the length of the positional form is checked.
        assert!(rmp_serde::from_slice::<OldBatch>(&again).is_err());
        assert_eq!(
            rmp_serde::from_slice::<ChangeBatch>(&again).unwrap(),
            marked
        );
    }

    /// A column with a rule or a reference carries them; one without is
    /// encoded as `quiver/1` always encoded it (checked above).
    #[test]
    fn column_extensions_travel() {
        let mut col = ColumnDef::plain("views", "INTEGER", true);
        col.edit_ext(|e| {
            e.default = Some("0".into());
            e.policy = Some(Strategy::Counter);
            e.references = Some(crate::Reference {
                table: "nodes".into(),
                column: "id".into(),
                on_delete: crate::OnDelete::Keep,
            });
            e.added = 42;
        });
        let bytes = rmp_serde::to_vec(&col).unwrap();
        assert_eq!(rmp_serde::from_slice::<ColumnDef>(&bytes).unwrap(), col);
        let json = serde_json::to_string(&ColumnDef::plain("a", "TEXT", false)).unwrap();
        assert_eq!(json, r#"{"name":"a","type":"TEXT","not_null":false}"#);
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}
