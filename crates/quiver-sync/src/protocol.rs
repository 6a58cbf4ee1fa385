//! The pump of one shard's exchange on its own bidirectional stream. The
//! order of the protocol lives in the sans-IO sessions of
//! `quiver_core::session`; this drives one over a QUIC stream and the store:
//! a task reads the peer's messages (one ahead, only as the session takes
//! them), a task writes what the session sends, the store thread applies
//! and answers, and a read-only connection streams the changes the peer
//! lacks (so sending never waits for applying).

use std::collections::BTreeMap;
use std::sync::Arc;

use quiver_core::session::{Action, Failure, Input, StreamSession};
use quiver_core::wire::{ErrorCode, ErrorMsg, Message, Report};
use quiver_core::{SiteId, SnapshotMark, VersionVector};
use quiver_store::{ApplyReport, StoreError, StreamLimits};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::actor::{Request, StoreHandle};
use crate::framed::{peer_error, FrameReader, FrameWriter};
use crate::{Result, SyncError};

/// What one shard's exchange did, from this side's point of view.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShardResult {
    pub shard: String,
    pub changes_sent: u64,
    pub changes_received: u64,
    pub batches_sent: u64,
    pub batches_received: u64,
    /// What this side applied of the peer's changes.
    pub local: ApplyReport,
    /// What the peer reported it applied of ours.
    pub remote: Report,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Tables this side created from the peer's definitions.
    pub tables_created: Vec<String>,
    /// Tables the peer sent as snapshots (current rows, not history), and
    /// the rows received of them.
    pub snapshot_tables: Vec<String>,
    pub snapshot_rows: u64,
}

/// Progress of a sync, reported as it happens.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Progress {
    Connecting {
        addr: String,
    },
    Handshaking,
    /// `versions_done` of `versions_total`: how far the received batches
    /// reach into the version ranges the peer said it would send (origin
    /// transactions, so an estimate of the share of the work, for a bar and
    /// a time left); `versions_total` is 0 when unknown.
    ///
    /// While the peer sends snapshots, `snapshot_rows_done` of
    /// `snapshot_rows_total` rows (both `None` otherwise); `bytes` received.
    Pulling {
        shard: String,
        changes: u64,
        versions_done: u64,
        versions_total: u64,
        snapshot_rows_done: Option<u64>,
        snapshot_rows_total: Option<u64>,
        bytes: u64,
    },
    Pushing {
        shard: String,
        changes: u64,
    },
    Applying {
        shard: String,
        applied: u64,
    },
    Done,
}

/// How long a peer may stay silent while it streams its changes.
pub const STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Receives progress reports.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// How the exchange treats the peer.
#[derive(Clone)]
pub(crate) struct Peer {
    pub name: String,
    /// Its site id, as its hello or welcome gave it.
    pub site: SiteId,
    /// Whether the peer may write (read-only tokens may not).
    pub may_push: bool,
    /// Shards the peer may see (`None`: all).
    pub scope: Option<Vec<String>>,
    /// Counts bytes received from the peer; `Err(ms)` when over its limit.
    pub bytes_limit: Option<BytesLimit>,
}

/// A per-peer byte budget check.
pub(crate) type BytesLimit = Arc<dyn Fn(usize) -> std::result::Result<(), u64> + Send + Sync>;

/// What the pump of a shard's stream works with: the store, the peer, the
/// batch limits, and progress reports (a client's).
pub(crate) struct Pump<'a> {
    pub handle: &'a StoreHandle,
    pub peer: Peer,
    pub limits: StreamLimits,
    pub progress: Option<ProgressFn>,
}

/// Runs a shard's session over its stream and records its metrics.
pub(crate) async fn exchange<S: StreamSession>(
    session: S,
    pump: Pump<'_>,
    reader: FrameReader,
    writer: FrameWriter,
) -> Result<ShardResult> {
    let started = std::time::Instant::now();
    let r = run(session, pump, reader, writer).await;
    record_metrics(&r, started.elapsed());
    r
}

/// Prometheus-style metrics of one shard exchange (the binary installs
/// the exporter; without one these are no-ops).
fn record_metrics(r: &Result<ShardResult>, took: std::time::Duration) {
    match r {
        Ok(s) => {
            metrics::counter!("quiver_syncs_total", "result" => "ok").increment(1);
            metrics::counter!("quiver_changes_sent_total").increment(s.changes_sent);
            metrics::counter!("quiver_changes_received_total").increment(s.changes_received);
            metrics::counter!("quiver_bytes_sent_total").increment(s.bytes_sent);
            metrics::counter!("quiver_bytes_received_total").increment(s.bytes_received);
            metrics::counter!("quiver_conflicts_total").increment(s.local.conflicts_detected);
            metrics::histogram!("quiver_sync_duration_seconds").record(took.as_secs_f64());
        }
        Err(e) => {
            metrics::counter!("quiver_syncs_total", "result" => "error").increment(1);
            metrics::counter!("quiver_errors_total", "kind" => format!("{:?}", error_code(e)))
                .increment(1);
        }
    }
}

/// What the pump's helpers report back: an input for the session, or a
/// failure on this side (told to the peer as `msg`, returned as `error`).
enum Event {
    Input(Input),
    Failed {
        msg: ErrorMsg,
        error: SyncError,
    },
    /// The stream no longer takes what we send (the peer stopped reading,
    /// or the connection is gone).
    WriteFailed(SyncError),
}

impl Event {
    fn failed(error: SyncError, context: &str) -> Event {
        Event::Failed {
            msg: failure_msg(&error, context),
            error,
        }
    }
}

/// Keeps a local failure to return and gives the session its input.
fn fail(kept: &mut Option<SyncError>, e: Option<SyncError>) -> Input {
    let e = e.unwrap_or_else(|| SyncError::Protocol("the stream failed".into()));
    let msg = failure_msg(&e, "");
    kept.get_or_insert(e);
    Input::Failed(msg)
}

/// What the peer is told of a local failure.
fn failure_msg(error: &SyncError, context: &str) -> ErrorMsg {
    ErrorMsg {
        code: error_code(error),
        message: format!("{context}{error}"),
        retry_after_ms: match error {
            SyncError::Rejected { retry_after_ms, .. } => *retry_after_ms,
            _ => None,
        },
    }
}

/// What the writer task is asked to do, in order.
enum Out {
    Send(Message),
    Finish,
}

/// Reads the peer's messages one ahead of the session. Each message comes
/// with the bytes read so far.
async fn read_messages(mut reader: FrameReader, tx: mpsc::Sender<Result<Option<(Message, u64)>>>) {
    loop {
        let next = reader.next().await.map(|m| m.map(|m| (m, reader.bytes)));
        let end = !matches!(next, Ok(Some(_)));
        if tx.send(next).await.is_err() || end {
            return;
        }
    }
}

/// Writes what the session sends, telling it each batch that went out.
async fn write_messages(
    mut writer: FrameWriter,
    mut rx: mpsc::UnboundedReceiver<Out>,
    events: mpsc::UnboundedSender<Event>,
    shard: String,
    progress: Option<ProgressFn>,
) -> u64 {
    let mut changes = 0u64;
    while let Some(out) = rx.recv().await {
        match out {
            Out::Send(m) => {
                let batch = match &m {
                    Message::Batch(b) => Some(b.changes.len() as u64),
                    _ => None,
                };
                if let Err(e) = writer.send(&m).await {
                    let _ = events.send(Event::WriteFailed(e));
                    break;
                }
                if let Some(n) = batch {
                    changes += n;
                    let _ = events.send(Event::Input(Input::BatchSent));
                    if let Some(p) = &progress {
                        p(Progress::Pushing {
                            shard: shard.clone(),
                            changes,
                        });
                    }
                }
            }
            Out::Finish => break,
        }
    }
    let _ = writer.finish();
    writer.bytes
}

/// Streams the changes a peer holding `since` lacks, one batch per credit:
/// the store thread (the one writer) first seals what other connections
/// wrote and folds the insert log, then a read-only connection reads.
/// What a stream of changes reads: the shard, what the peer holds of each
/// table, the snapshots it took in part (continued), and the batch limits.
struct Read {
    shard: String,
    since: BTreeMap<String, VersionVector>,
    resume: Vec<SnapshotMark>,
    limits: StreamLimits,
}

async fn read_changes(
    handle: StoreHandle,
    read: Read,
    credits: std::sync::mpsc::Receiver<()>,
    events: mpsc::UnboundedSender<Event>,
) {
    // Sealing other connections' writes here reports them too.
    let prepared = handle.request(|reply| Request::PrepareRead { reply }).await;
    if let Err(e) = prepared {
        let _ = events.send(Event::failed(e, "preparing changes: "));
        return;
    }
    let readers = handle.readers().clone();
    let read = tokio::task::spawn_blocking(move || {
        let fail = |e: SyncError| {
            let _ = events.send(Event::failed(e, "reading changes: "));
        };
        let store = match readers.take() {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        let mut stream = match store.changes_since_tables(&read.shard, &read.since, read.limits) {
            Ok(s) => s.resume_snapshots(&read.resume),
            Err(e) => return fail(e.into()),
        };
        // Each credit is a read the session asked for; the session gone,
        // the credits end.
        while credits.recv().is_ok() {
            let ev = match stream.next() {
                Some(Ok(b)) => Event::Input(Input::ChangesRead(b)),
                Some(Err(e)) => return fail(e.into()),
                None => Event::Input(Input::ChangesEnd),
            };
            let end = matches!(ev, Event::Input(Input::ChangesEnd));
            if events.send(ev).is_err() || end {
                return;
            }
        }
    });
    let _ = read.await;
}

/// Records what the peer holds of `shard` after a completed exchange: per
/// table, and their meet (what it holds of every table). An
/// exchange of some of the shard's tables (`--tables`, or a peer lacking
/// some) says nothing of the others, so it records nothing. A failure to
/// record is logged; it only makes the acknowledgement older.
async fn record_ack(
    handle: &StoreHandle,
    peer: &Peer,
    shard: &str,
    acked: BTreeMap<String, VersionVector>,
) {
    let (site, node, shard) = (peer.site, peer.name.clone(), shard.to_string());
    let r = handle
        .call(move |s| {
            let whole = s
                .shard_tables(&shard)?
                .iter()
                .all(|t| acked.contains_key(&t.name));
            match acked.values().cloned().reduce(|a, b| a.meet(&b)) {
                Some(vv) if whole => s.record_ack_tables(&site, &node, &shard, &vv, &acked),
                _ => Ok(()),
            }
        })
        .await;
    if let Err(e) = r
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
    {
        tracing::warn!("recording {}'s acknowledgement: {e}", peer.name);
    }
}

/// Pumps a session: messages from the stream and answers of the store in,
/// its actions out, until it has a result.
async fn run<S: StreamSession>(
    mut session: S,
    pump: Pump<'_>,
    reader: FrameReader,
    writer: FrameWriter,
) -> Result<ShardResult> {
    let Pump {
        handle,
        peer,
        limits,
        progress,
    } = pump;
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let (msgs_tx, mut msgs) = mpsc::channel(1);
    let (out, out_rx) = mpsc::unbounded_channel::<Out>();
    let mut tasks = tokio::task::JoinSet::new();
    let reading = tokio::spawn(read_messages(reader, msgs_tx).in_current_span());
    let shard_label = session.shard().unwrap_or_default().to_string();
    let writing = tokio::spawn(
        write_messages(
            writer,
            out_rx,
            events_tx.clone(),
            shard_label,
            progress.clone(),
        )
        .in_current_span(),
    );
    let mut credits: Option<std::sync::mpsc::Sender<()>> = None;
    let mut reader_open = true;
    // The first local failure, kept to be returned as it was.
    let mut failure: Option<SyncError> = None;
    let (mut bytes_received, mut bytes_counted) = (0u64, 0u64);
    let (mut pulled, mut applied) = (0u64, 0u64);
    let mut stall_at = tokio::time::Instant::now() + STALL_TIMEOUT;
    let mut write_failed: Option<SyncError> = None;
    let mut write_failed_at = tokio::time::Instant::now();
    // What the peer holds, per table: what it stated, then every version
    // our batches claimed to cover; recorded once its report confirms it.
    let mut acked: Option<BTreeMap<String, VersionVector>> = None;
    loop {
        while let Some(action) = session.poll_action() {
            match action {
                Action::Send(m) => {
                    let _ = out.send(Out::Send(m));
                }
                Action::FinishSending => {
                    let _ = out.send(Out::Finish);
                }
                Action::StopReceiving => {
                    reading.abort();
                    reader_open = false;
                }
                Action::ReadNext => {
                    if let Some(c) = &credits {
                        let _ = c.send(());
                    }
                }
                Action::ReadChanges {
                    shard,
                    since,
                    resume,
                } => {
                    acked = Some(since.clone());
                    let (tx, rx) = std::sync::mpsc::channel();
                    credits = Some(tx);
                    let read = Read {
                        shard,
                        since,
                        resume,
                        limits,
                    };
                    tasks.spawn(
                        read_changes(handle.clone(), read, rx, events_tx.clone()).in_current_span(),
                    );
                }
                Action::Apply(b) => {
                    let (h, ev, name) = (handle.clone(), events_tx.clone(), peer.name.clone());
                    tasks.spawn(async move {
                        let _ = ev.send(match h.apply(b, &name).await {
                            Ok(r) => Event::Input(Input::Applied(r)),
                            Err(e) => Event::failed(e, ""),
                        });
                    });
                }
                Action::ReadShardState { shard } => {
                    let (h, ev) = (handle.clone(), events_tx.clone());
                    tasks.spawn(async move {
                        let r = h
                            .request(|reply| Request::ShardState { shard, reply })
                            .await;
                        let _ = ev.send(match r {
                            Ok(st) => Event::Input(Input::ShardState {
                                versions: st.versions.into_iter().collect(),
                                schema: st.defs,
                                resume: st.resume,
                            }),
                            Err(e) => Event::failed(e, ""),
                        });
                    });
                }
                Action::CreateTables { shard, defs } => {
                    let (h, ev, name) = (handle.clone(), events_tx.clone(), peer.name.clone());
                    tasks.spawn(async move {
                        let r = h
                            .request(|reply| Request::EnsureTables {
                                shard,
                                defs,
                                peer: name,
                                reply,
                            })
                            .await;
                        let _ = ev.send(match r {
                            Ok(created) => Event::Input(Input::TablesCreated(created)),
                            Err(e) => Event::failed(e, ""),
                        });
                    });
                }
                Action::Admit { shard, schema } => {
                    let (h, ev, name) = (handle.clone(), events_tx.clone(), peer.name.clone());
                    tasks.spawn(async move {
                        let r = h
                            .request(|reply| Request::Admit {
                                shard,
                                schema,
                                peer: name,
                                reply,
                            })
                            .await;
                        let _ = ev.send(match r {
                            Ok(st) => Event::Input(Input::Admitted {
                                schema: st.defs,
                                versions: st.versions.into_iter().collect(),
                                resume: st.resume,
                            }),
                            Err(e) => Event::Failed {
                                msg: ErrorMsg {
                                    code: ErrorCode::Protocol,
                                    message: e.to_string(),
                                    retry_after_ms: None,
                                },
                                error: e,
                            },
                        });
                    });
                }
            }
        }
        if session.result().is_some() {
            break;
        }
        // A peer silent for STALL_TIMEOUT while we wait for its changes is
        // given up on (keep-alives would otherwise hold a stalled exchange
        // open forever); only the time spent waiting on it counts.
        let waiting = reader_open && session.awaits_changes() && session.wants_message();
        if !waiting {
            stall_at = tokio::time::Instant::now() + STALL_TIMEOUT;
        }
        let input = tokio::select! {
            m = msgs.recv(), if reader_open && session.wants_message() => match m {
                Some(Ok(Some((m, bytes)))) => {
                    stall_at = tokio::time::Instant::now() + STALL_TIMEOUT;
                    bytes_received = bytes;
                    let batch = match &m {
                        Message::Batch(b) => Some(b.changes.len() as u64),
                        _ => None,
                    };
                    if batch.is_some() {
                        let over = peer.bytes_limit.as_ref().and_then(|limit| {
                            limit((bytes - bytes_counted) as usize).err()
                        });
                        bytes_counted = bytes;
                        if let Some(ms) = over {
                            metrics::counter!("quiver_rate_limited_total").increment(1);
                            let e = SyncError::Rejected {
                                code: ErrorCode::RateLimited,
                                message: format!(
                                    "rate limit on bytes per minute reached; retry in {ms} ms"
                                ),
                                retry_after_ms: Some(ms),
                            };
                            session.handle(Input::Failed(failure_msg(&e, "")));
                            failure.get_or_insert(e);
                            continue;
                        }
                    }
                    session.handle(Input::Received(m));
                    if let (Some(n), None, Some(p), Some(shard)) =
                        (batch, session.result(), &progress, session.shard())
                    {
                        pulled += n;
                        let (versions_done, versions_total) = session.pull_progress();
                        let snap = session.snapshot_progress();
                        p(Progress::Pulling {
                            shard: shard.to_string(),
                            changes: pulled,
                            versions_done,
                            versions_total,
                            snapshot_rows_done: snap.map(|s| s.0),
                            snapshot_rows_total: snap.map(|s| s.1),
                            bytes: bytes_received,
                        });
                    }
                    continue;
                }
                // Our writes failed before the peer's stream ended: the
                // peer stopped reading without a word, or the link is gone.
                Some(end) if write_failed.is_some() && !matches!(end, Ok(Some(_))) => {
                    reader_open = false;
                    fail(&mut failure, write_failed.take())
                }
                Some(Ok(None)) => {
                    reader_open = false;
                    Input::PeerFinished
                }
                Some(Err(e)) => {
                    reader_open = false;
                    fail(&mut failure, Some(e))
                }
                None => {
                    reader_open = false;
                    Input::Failed(ErrorMsg {
                        code: ErrorCode::Internal,
                        message: "the stream's reader stopped".into(),
                        retry_after_ms: None,
                    })
                }
            },
            Some(ev) = events.recv() => match ev {
                Event::Input(i) => i,
                Event::Failed { msg, error } => {
                    failure.get_or_insert(error);
                    Input::Failed(msg)
                }
                // The peer's own word on why (an error message before its
                // stream ends) is worth more than "stopped": wait for it.
                Event::WriteFailed(e) if reader_open => {
                    write_failed.get_or_insert(e);
                    write_failed_at = tokio::time::Instant::now() + WRITE_GRACE;
                    continue;
                }
                Event::WriteFailed(e) => fail(&mut failure, Some(e)),
            },
            _ = tokio::time::sleep_until(stall_at), if waiting => {
                let e = SyncError::Timeout(format!(
                    "waiting for the peer's changes on shard {:?} ({STALL_TIMEOUT:?} without a message)",
                    session.shard().unwrap_or_default()
                ));
                fail(&mut failure, Some(e))
            }
            _ = tokio::time::sleep_until(write_failed_at), if write_failed.is_some() => {
                fail(&mut failure, write_failed.take())
            }
            Some(Err(e)) = tasks.join_next(), if !tasks.is_empty() => {
                if !e.is_panic() {
                    continue;
                }
                Input::Failed(ErrorMsg {
                    code: ErrorCode::Internal,
                    message: format!("a store task failed: {e}"),
                    retry_after_ms: None,
                })
            }
        };
        if let (Input::ChangesRead(b), Some(acked)) = (&input, acked.as_mut()) {
            for c in &b.covered {
                if let Some(vv) = acked.get_mut(&c.table) {
                    vv.advance(c.site, c.version);
                }
            }
        }
        if let (Input::Applied(r), Some(p), Some(shard)) = (&input, &progress, session.shard()) {
            applied += r.applied;
            p(Progress::Applying {
                shard: shard.to_string(),
                applied,
            });
        }
        session.handle(input);
    }
    // The session is over: the writer sends what is left (a report, or why
    // we stopped) and ends the stream; a peer that no longer reads does not
    // hold us.
    drop(out);
    drop(credits);
    reading.abort();
    let stop_writing = writing.abort_handle();
    let bytes_sent = match tokio::time::timeout(WRITE_GRACE, writing).await {
        Ok(Ok(n)) => n,
        _ => {
            stop_writing.abort();
            0
        }
    };
    tasks.abort_all();
    if let (Some(Ok(o)), Some(acked)) = (session.result(), acked) {
        record_ack(handle, &peer, &o.shard, acked).await;
    }
    match session.result() {
        Some(Ok(o)) => Ok(ShardResult {
            shard: o.shard.clone(),
            changes_sent: o.changes_sent,
            changes_received: o.changes_received,
            batches_sent: o.batches_sent,
            batches_received: o.batches_received,
            local: o.local,
            remote: o.remote,
            bytes_sent,
            bytes_received,
            tables_created: o.tables_created.clone(),
            snapshot_tables: o.snapshot_tables.clone(),
            snapshot_rows: o.snapshot_rows,
        }),
        Some(Err(Failure::Peer(e))) => Err(peer_error(e.clone())),
        Some(Err(Failure::Local(e))) => Err(failure.unwrap_or_else(|| match e.code {
            ErrorCode::Protocol => SyncError::Protocol(e.message.clone()),
            code => SyncError::Rejected {
                code,
                message: e.message.clone(),
                retry_after_ms: e.retry_after_ms,
            },
        })),
        None => Err(SyncError::Protocol(
            "the session ended without a result".into(),
        )),
    }
}

/// How long the writer may take to send the last messages of a session.
const WRITE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The wire code for a local failure.
fn error_code(e: &SyncError) -> ErrorCode {
    match e {
        SyncError::Wire(_) => ErrorCode::BadFrame,
        SyncError::Protocol(_) => ErrorCode::Protocol,
        SyncError::Store(StoreError::BatchRefused(_) | StoreError::Core(_)) => ErrorCode::BadBatch,
        SyncError::Rejected { code, .. } => *code,
        SyncError::Refused { code, .. } | SyncError::Peer { code, .. } => *code,
        _ => ErrorCode::Internal,
    }
}
