//! A peer that passes the handshake and then misbehaves: a corrupt frame,
//! an oversize frame, a batch for an unknown table. Each gets a clear error
//! on its stream, nothing is applied, and the server keeps serving.

mod common;

use common::Node;
use quiver_core::frame::encode;
use quiver_core::wire::{ErrorCode, Hello, Message, SyncRequest, PROTOCOL_VERSION};
use quiver_core::{Change, ChangeBatch, Hlc, SiteId, Value};
use quiver_sync::framed::{FrameReader, FrameWriter};
use quiver_sync::transport::{client_endpoint, TransportLimits};
use quiver_sync::Trust;

enum Attack {
    CorruptFrame,
    OversizeFrame,
    UnknownTable,
    /// A well-formed push (refused for a read-only token).
    Push,
}

/// Handshakes, opens the shard stream, attacks, and returns the error code
/// the server answered with.
async fn attack(addr: &str, how: Attack) -> ErrorCode {
    attack_with(addr, how, None).await
}

/// A stream's reader and writer (a handshake stream stays open while held).
type Control = (FrameReader, FrameWriter);

/// Connects and sends a hello; returns the connection, what the server
/// answered on the handshake stream, and that stream.
async fn hello(
    addr: &str,
    protocol: u32,
    token: Option<String>,
) -> (quinn::Connection, Option<Message>, Control) {
    let sock: std::net::SocketAddr = addr.parse().unwrap();
    let (ep, _) =
        client_endpoint(sock, &Trust::Insecure, None, &TransportLimits::default()).unwrap();
    let conn = ep.connect(sock, "localhost").unwrap().await.unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    let (mut r, mut w) = (
        FrameReader::new(recv, 1 << 20, false),
        FrameWriter::new(send, false),
    );
    w.send(&Message::Hello(Hello {
        protocol,
        site: SiteId([7; 16]),
        node: "mallory".into(),
        token,
        shards: vec![],
        max_frame: 1 << 20,
        compression: false,
    }))
    .await
    .unwrap();
    let answer = r.next().await.unwrap();
    (conn, answer, (r, w))
}

/// Opens a stream and sends a sync request for `shard` from an empty replica.
async fn sync_stream(conn: &quinn::Connection, shard: &str) -> Control {
    let (send, recv) = conn.open_bi().await.unwrap();
    let (r, mut w) = (
        FrameReader::new(recv, 1 << 20, false),
        FrameWriter::new(send, false),
    );
    w.send(&Message::SyncRequest(SyncRequest {
        resume: Vec::new(),
        shard: shard.into(),
        tables: vec![],
        versions: vec![],
        want_schema: false,
        schema: vec![],
    }))
    .await
    .unwrap();
    (r, w)
}

async fn attack_with(addr: &str, how: Attack, token: Option<String>) -> ErrorCode {
    let (conn, answer, _control) = hello(addr, PROTOCOL_VERSION, token).await;
    assert!(matches!(answer, Some(Message::Welcome(_))));
    let (mut r, mut w) = sync_stream(&conn, "default").await;
    match how {
        Attack::CorruptFrame => {
            let mut f = encode(6, &[0x90, 0x91, 0x92], false);
            let n = f.len();
            f[n - 1] ^= 0x55;
            w.send_raw(&f).await.unwrap();
        }
        Attack::OversizeFrame => {
            let mut h = (512u32 << 20).to_be_bytes().to_vec();
            h.extend([6, 0, 0, 0, 0, 0]);
            w.send_raw(&h).await.unwrap();
        }
        Attack::Push => {
            let row = |col: Option<&str>, value: Value| Change {
                table: "docs".into(),
                pk: vec![Value::Text("pushed".into())],
                column: col.map(Into::into),
                value,
                hlc: Hlc::new(1, 0),
                site: SiteId([7; 16]),
                db_version: 1,
                cl: 1,
                replaces: Default::default(),
            };
            let batch = ChangeBatch {
                snapshot: None,
                shard: "default".into(),
                changes: vec![
                    row(None, Value::Null),
                    row(Some("vector"), Value::Blob(vec![0; 8])),
                ],
                covered: vec![],
            };
            w.send(&Message::Batch(batch)).await.unwrap();
        }
        Attack::UnknownTable => {
            let change = |col: Option<&str>| Change {
                table: if col.is_some() {
                    "docs".into()
                } else {
                    "nope".into()
                },
                pk: vec![Value::Text("evil".into())],
                column: col.map(Into::into),
                value: if col.is_some() {
                    Value::Blob(vec![0; 8])
                } else {
                    Value::Null
                },
                hlc: Hlc::new(1, 0),
                site: SiteId([7; 16]),
                db_version: 1,
                cl: 1,
                replaces: Default::default(),
            };
            // A valid row for docs, then a change for a table that does not exist.
            let mut good = change(Some("vector"));
            good.column = None;
            good.value = Value::Null;
            let batch = ChangeBatch {
                snapshot: None,
                shard: "default".into(),
                changes: vec![good, change(Some("vector")), change(None)],
                covered: vec![],
            };
            w.send(&Message::Batch(batch)).await.unwrap();
        }
    }
    // Read what the server says until its error (its own batches may come first).
    loop {
        match r.next().await {
            Ok(Some(Message::Error(e))) => {
                assert!(!e.message.is_empty());
                return e.code;
            }
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the server closed the stream without saying why"),
            Err(e) => panic!("reading the server's answer: {e}"),
        }
    }
}

#[test]
fn a_read_only_token_cannot_push_even_by_ignoring_the_welcome() {
    let a = Node::new("a");
    a.q(&["collection", "create", "docs", "--dim", "2"]);
    let out = a.q(&["--json", "token", "create", "--read-only"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ro = v["token"].as_str().unwrap().to_string();
    let s = a.serve(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(
        rt.block_on(attack_with(&s.addr, Attack::Push, Some(ro))),
        ErrorCode::Forbidden
    );
    assert_eq!(a.export("docs"), "", "nothing was applied");
}

/// A client speaking another protocol version is refused with both named.
async fn future_client(addr: &str) -> String {
    match hello(addr, 99, None).await.1 {
        Some(Message::Refused(e)) => {
            assert_eq!(e.code, ErrorCode::Protocol);
            e.message
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn misbehaving_peers_get_clear_errors_and_change_nothing() {
    let a = Node::new("a");
    a.q(&["collection", "create", "docs", "--dim", "2"]);
    a.q(&["put", "docs", "x", "--vector", "[1,2]"]);
    let before = a.export("docs");
    let s = a.serve(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(
        rt.block_on(attack(&s.addr, Attack::CorruptFrame)),
        ErrorCode::BadFrame
    );
    assert_eq!(
        rt.block_on(attack(&s.addr, Attack::OversizeFrame)),
        ErrorCode::BadFrame
    );
    assert_eq!(
        rt.block_on(attack(&s.addr, Attack::UnknownTable)),
        ErrorCode::BadBatch
    );
    let m = rt.block_on(future_client(&s.addr));
    assert!(
        m.contains("99") && m.contains(&PROTOCOL_VERSION.to_string()),
        "{m}"
    );
    assert_eq!(
        a.export("docs"),
        before,
        "nothing of the hostile batches was applied"
    );
    // The server still serves honest peers.
    let b = Node::new("b");
    b.q(&["sync", &s.addr, "--pin", &s.fp]);
    assert_eq!(b.export("docs"), before);
}

/// Opens a stream, asks for a shard the server does not hold, and reads
/// the answer to the end, which gives the stream's slot back.
async fn short_stream(conn: &quinn::Connection) -> Message {
    let (mut r, mut w) = sync_stream(conn, "absent").await;
    w.finish().unwrap();
    let answer = r.next().await.unwrap().unwrap();
    while let Ok(Some(_)) = r.next().await {}
    answer
}

#[test]
fn streams_beyond_the_limit_wait_for_a_free_slot() {
    let a = Node::new("a");
    a.q(&["collection", "create", "docs", "--dim", "2"]);
    // The handshake stream stays open, so three leave two for syncing.
    let s = a.serve(&["--max-streams", "3"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (conn, answer, _control) = hello(&s.addr, PROTOCOL_VERSION, None).await;
        assert!(matches!(answer, Some(Message::Welcome(_))));
        let wait = std::time::Duration::from_millis(500);
        let (send, recv) = tokio::time::timeout(wait, conn.open_bi())
            .await
            .expect("a second stream is within the limit")
            .unwrap();
        let _third = tokio::time::timeout(wait, conn.open_bi())
            .await
            .expect("a third stream is within the limit")
            .unwrap();
        assert!(
            tokio::time::timeout(wait, conn.open_bi()).await.is_err(),
            "a fourth concurrent stream must wait for credit"
        );
        // Closing the second stream gives its slot to the next.
        drop((send, recv));
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), short_stream(&conn))
            .await
            .expect("a slot is given back when a stream ends");
        assert!(
            matches!(&next, Message::Error(e) if e.code == ErrorCode::UnknownShard),
            "{next:?}"
        );
        // One at a time, streams keep being served on the same connection.
        for _ in 0..5 {
            assert!(matches!(short_stream(&conn).await, Message::Error(_)));
        }
    });
    // A real sync through the same limit still works.
    let b = Node::new("b");
    let out = b.q(&["--json", "sync", &s.addr, "--pin", &s.fp]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["shards"][0]["shard"], "default", "{out}");
}
