//! One shard's exchange on its own bidirectional stream, the same for both
//! ends once the request and reply are through: each side streams the
//! batches the other lacks (read from its own read-only connection, so
//! sending never waits for applying) while it applies the other's batches
//! one transaction each, then both report what they applied.

use std::collections::BTreeMap;
use std::sync::Arc;

use quiver_core::wire::{Done, ErrorCode, ErrorMsg, Message, Report};
use quiver_core::{ChangeBatch, VersionVector};
use quiver_store::{ApplyReport, StoreError, StreamLimits};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::actor::StoreHandle;
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
    Pulling {
        shard: String,
        changes: u64,
        versions_done: u64,
        versions_total: u64,
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

/// What a puller expects of one shard: per table and origin site, the
/// version range (held, offered] the peer will send. The `covered` claims
/// of arriving batches say how far into each range they reach.
#[derive(Debug, Clone, Default)]
pub(crate) struct PullPlan {
    ranges: BTreeMap<(String, quiver_core::SiteId), (u64, u64)>,
    reached: BTreeMap<(String, quiver_core::SiteId), u64>,
    total: u64,
}

impl PullPlan {
    /// From the versions this side stated and those the peer replied with.
    pub(crate) fn new(
        mine: &[(String, VersionVector)],
        theirs: &[(String, VersionVector)],
    ) -> Self {
        let empty = VersionVector::new();
        let mut plan = PullPlan::default();
        for (table, offered) in theirs {
            let held = mine
                .iter()
                .find(|(t, _)| t == table)
                .map_or(&empty, |(_, v)| v);
            for (site, from, to) in offered.ahead_of(held) {
                plan.total += to - from;
                plan.ranges.insert((table.clone(), site), (from, to));
            }
        }
        plan
    }

    /// Takes in a batch's claims; gives the versions reached so far.
    fn advance(&mut self, covered: &[quiver_core::Covered]) -> u64 {
        for c in covered {
            let key = (c.table.clone(), c.site);
            if let Some((from, to)) = self.ranges.get(&key) {
                let reached = c.version.clamp(*from, *to) - from;
                let slot = self.reached.entry(key).or_default();
                *slot = (*slot).max(reached);
            }
        }
        self.reached.values().sum()
    }
}

/// Progress reports of one shard exchange, with what the pull expects.
#[derive(Clone)]
pub(crate) struct ShardProgress {
    pub report: ProgressFn,
    pub plan: PullPlan,
}

/// How the exchange treats the peer.
#[derive(Clone)]
pub(crate) struct Peer {
    pub name: String,
    /// Whether the peer may write (read-only tokens may not).
    pub may_push: bool,
    /// Shards the peer may see (`None`: all).
    pub scope: Option<Vec<String>>,
    /// Counts bytes received from the peer; `Err(ms)` when over its limit.
    pub bytes_limit: Option<BytesLimit>,
}

/// A per-peer byte budget check.
pub(crate) type BytesLimit = Arc<dyn Fn(usize) -> std::result::Result<(), u64> + Send + Sync>;

/// The last message a side sends on a shard stream.
enum Final {
    Report(Report),
    Error(ErrorMsg),
}

/// The versions the peer holds of each table to send, restricted to the
/// table filter; tables the peer did not list start from nothing.
pub(crate) fn their_versions(
    mine: &[String],
    theirs: &[(String, VersionVector)],
    filter: &[String],
) -> BTreeMap<String, VersionVector> {
    mine.iter()
        .filter(|t| filter.is_empty() || filter.contains(t))
        .map(|t| {
            let vv = theirs
                .iter()
                .find(|(n, _)| n == t)
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            (t.clone(), vv)
        })
        .collect()
}

/// Checks an incoming batch against the stream it arrived on.
fn check_batch(
    b: &ChangeBatch,
    shard: &str,
    filter: &[String],
    peer: &Peer,
) -> std::result::Result<(), ErrorMsg> {
    let bad = |code, message| {
        Err(ErrorMsg {
            code,
            message,
            retry_after_ms: None,
        })
    };
    if b.shard != shard {
        return bad(
            ErrorCode::BadBatch,
            format!(
                "batch for shard {:?} on the stream of shard {shard:?}",
                b.shard
            ),
        );
    }
    if !peer.may_push && !b.changes.is_empty() {
        return bad(
            ErrorCode::Forbidden,
            "this token is read-only: pushed changes are refused".into(),
        );
    }
    if !filter.is_empty() {
        if let Some(c) = b.changes.iter().find(|c| !filter.contains(&c.table)) {
            return bad(
                ErrorCode::BadBatch,
                format!("batch names table {:?} outside this sync's tables", c.table),
            );
        }
    }
    Ok(())
}

/// What one shard exchange works on, either side: the store, the peer,
/// the shard and its table filter (empty: every table), what the peer holds
/// per table, the batch limits, and progress reports (a client's).
pub(crate) struct ShardExchange<'a> {
    pub handle: &'a StoreHandle,
    pub peer: Peer,
    pub shard: &'a str,
    pub filter: &'a [String],
    pub theirs: BTreeMap<String, VersionVector>,
    pub limits: StreamLimits,
    pub progress: Option<ShardProgress>,
}

/// Runs the exchange of one shard over its stream and records its metrics.
pub(crate) async fn exchange(
    x: ShardExchange<'_>,
    reader: FrameReader,
    writer: FrameWriter,
) -> Result<ShardResult> {
    let started = std::time::Instant::now();
    let r = exchange_inner(x, reader, writer).await;
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

async fn exchange_inner(
    x: ShardExchange<'_>,
    mut reader: FrameReader,
    mut writer: FrameWriter,
) -> Result<ShardResult> {
    let ShardExchange {
        handle,
        peer,
        shard,
        filter,
        theirs,
        limits,
        mut progress,
    } = x;
    let mut result = ShardResult {
        shard: shard.to_string(),
        ..Default::default()
    };
    // The store thread, the one writer, seals what other connections wrote
    // and folds the insert log; then a read-only connection streams what
    // the peer lacks.
    let prepared = handle
        .call(|s| -> quiver_store::Result<()> {
            // Sealing other connections' writes here reports them too.
            s.notice_external_changes()?;
            s.fold_pending()?;
            Ok(())
        })
        .await
        .and_then(|r| r.map_err(SyncError::from));
    if let Err(e) = prepared {
        writer
            .fail(ErrorCode::Internal, format!("preparing changes: {e}"))
            .await;
        return Err(e);
    }
    let (batch_tx, mut batch_rx) = mpsc::channel::<Result<ChangeBatch>>(2);
    let readers = handle.readers().clone();
    let shard_name = shard.to_string();
    let producer = tokio::task::spawn_blocking(move || {
        let store = match readers.take() {
            Ok(s) => s,
            Err(e) => {
                let _ = batch_tx.blocking_send(Err(e));
                return;
            }
        };
        let stream = match store.changes_since_tables(&shard_name, &theirs, limits) {
            Ok(s) => s,
            Err(e) => {
                let _ = batch_tx.blocking_send(Err(e.into()));
                return;
            }
        };
        for b in stream {
            if batch_tx.blocking_send(b.map_err(SyncError::from)).is_err() {
                return;
            }
        }
    });
    // Sender: batches, then Done, then the final report (or an error).
    let (final_tx, mut final_rx) = oneshot::channel::<Final>();
    let send_progress = progress.as_ref().map(|p| p.report.clone());
    let send_shard = shard.to_string();
    let sender = tokio::spawn(async move {
        let (mut batches, mut changes) = (0u64, 0u64);
        // A report that arrives while batches are still going out waits
        // for them; an error cuts the stream short.
        let mut held: Option<Final> = None;
        let mut final_seen = false;
        loop {
            tokio::select! {
                biased;
                f = &mut final_rx, if !final_seen => {
                    final_seen = true;
                    match f {
                        Ok(Final::Error(e)) => {
                            writer.send(&Message::Error(e)).await?;
                            let _ = writer.finish();
                            return Ok::<_, SyncError>((batches, changes, writer.bytes, false));
                        }
                        Ok(report) => held = Some(report),
                        Err(_) => {
                            let _ = writer.finish();
                            return Ok((batches, changes, writer.bytes, false));
                        }
                    }
                }
                b = batch_rx.recv() => match b {
                    Some(Ok(b)) => {
                        batches += 1;
                        changes += b.changes.len() as u64;
                        writer.send(&Message::Batch(b)).await?;
                        if let Some(p) = &send_progress {
                            p(Progress::Pushing { shard: send_shard.clone(), changes });
                        }
                    }
                    Some(Err(e)) => {
                        writer.fail(ErrorCode::Internal, format!("reading changes: {e}")).await;
                        return Err(e);
                    }
                    None => break,
                }
            }
        }
        writer
            .send(&Message::Done(Done { batches, changes }))
            .await?;
        let last = match held {
            Some(f) => Some(f),
            None if !final_seen => final_rx.await.ok(),
            None => None,
        };
        match last {
            Some(Final::Report(r)) => writer.send(&Message::Report(r)).await?,
            Some(Final::Error(e)) => writer.send(&Message::Error(e)).await?,
            None => {}
        }
        let _ = writer.finish();
        Ok((batches, changes, writer.bytes, true))
    });
    // Receiver: apply each batch in its own transaction as it arrives. A
    // peer that sends nothing for too long is given up on (keep-alives would
    // otherwise hold a stalled exchange open forever).
    let outcome: Result<()> = async {
        loop {
            let next = tokio::time::timeout(STALL_TIMEOUT, reader.next())
                .await
                .map_err(|_| SyncError::Timeout(format!("waiting for the peer's changes on shard {shard:?} ({STALL_TIMEOUT:?} without a message)")))?;
            match next? {
                Some(Message::Batch(b)) => {
                    if let Err(e) = check_batch(&b, shard, filter, &peer) {
                        return Err(SyncError::Rejected {
                            code: e.code,
                            message: e.message,
                            retry_after_ms: None,
                        });
                    }
                    if let Some(limit) = &peer.bytes_limit {
                        if let Err(ms) =
                            limit(reader.bytes.saturating_sub(result.bytes_received) as usize)
                        {
                            metrics::counter!("quiver_rate_limited_total").increment(1);
                            return Err(SyncError::Rejected {
                                code: ErrorCode::RateLimited,
                                message: format!(
                                    "rate limit on bytes per minute reached; retry in {ms} ms"
                                ),
                                retry_after_ms: Some(ms),
                            });
                        }
                        result.bytes_received = reader.bytes;
                    }
                    result.batches_received += 1;
                    result.changes_received += b.changes.len() as u64;
                    if let Some(p) = &mut progress {
                        let versions_done = p.plan.advance(&b.covered);
                        (p.report)(Progress::Pulling {
                            shard: shard.to_string(),
                            changes: result.changes_received,
                            versions_done,
                            versions_total: p.plan.total,
                        });
                    }
                    let name = peer.name.clone();
                    let applied = handle.call(move |s| s.apply_from(&b, Some(&name))).await?;
                    match applied {
                        Ok(r) => {
                            result.local.add(&r);
                            if let Some(p) = &progress {
                                (p.report)(Progress::Applying {
                                    shard: shard.to_string(),
                                    applied: result.local.applied,
                                });
                            }
                        }
                        Err(e) => return Err(SyncError::Store(e)),
                    }
                }
                Some(Message::Done(_)) => return Ok(()),
                Some(Message::Error(e)) => return Err(peer_error(e)),
                Some(other) => {
                    return Err(SyncError::Protocol(format!(
                        "unexpected {} message on a shard stream",
                        other.kind().1
                    )))
                }
                None => {
                    return Err(SyncError::Protocol(
                        "the peer ended the shard stream before it was done".into(),
                    ))
                }
            }
        }
    }
    .await;
    match outcome {
        Ok(()) => {
            let _ = final_tx.send(Final::Report(result.local));
        }
        Err(e) => {
            let msg = match &e {
                SyncError::Peer { .. } | SyncError::Refused { .. } => None,
                other => Some(ErrorMsg {
                    code: error_code(other),
                    message: other.to_string(),
                    retry_after_ms: match other {
                        SyncError::Rejected { retry_after_ms, .. } => *retry_after_ms,
                        _ => None,
                    },
                }),
            };
            match msg {
                Some(m) => {
                    let _ = final_tx.send(Final::Error(m));
                }
                // The peer already knows why: just let our sender finish.
                None => drop(final_tx),
            }
            reader.stop(1);
            let _ = sender.await;
            producer.abort();
            return Err(e);
        }
    }
    let remote = match reader.next().await? {
        Some(Message::Report(r)) => r,
        Some(Message::Error(e)) => return Err(peer_error(e)),
        Some(other) => {
            return Err(SyncError::Protocol(format!(
                "expected the peer's report, got {}",
                other.kind().1
            )))
        }
        None => {
            return Err(SyncError::Protocol(
                "the peer ended the shard stream without its report".into(),
            ))
        }
    };
    let (batches, changes, bytes_sent, _) = sender
        .await
        .map_err(|e| SyncError::Protocol(e.to_string()))??;
    let _ = producer.await;
    result.remote = remote;
    result.batches_sent = batches;
    result.changes_sent = changes;
    result.bytes_sent = bytes_sent;
    result.bytes_received = reader.bytes;
    Ok(result)
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_core::{Covered, SiteId};

    #[test]
    fn a_pull_plan_counts_the_offered_ranges_and_how_far_batches_reach() {
        let (a, b) = (SiteId::from_bytes([1; 16]), SiteId::from_bytes([2; 16]));
        let vv = |pairs: &[(SiteId, u64)]| {
            let mut v = VersionVector::new();
            for (s, n) in pairs {
                v.set(*s, *n);
            }
            v
        };
        let mine = vec![("docs".to_string(), vv(&[(a, 2)]))];
        let theirs = vec![
            ("docs".to_string(), vv(&[(a, 10), (b, 5)])),
            ("notes".to_string(), vv(&[(a, 3)])),
        ];
        let mut plan = PullPlan::new(&mine, &theirs);
        assert_eq!(plan.total, 8 + 5 + 3);
        let cov = |t: &str, s: SiteId, v: u64| Covered {
            table: t.into(),
            site: s,
            version: v,
        };
        assert_eq!(plan.advance(&[cov("docs", a, 6)]), 4);
        // A claim below what was reached, or of a range not offered, moves nothing.
        assert_eq!(plan.advance(&[cov("docs", a, 3), cov("other", a, 9)]), 4);
        assert_eq!(
            plan.advance(&[cov("docs", b, 5), cov("notes", a, 99)]),
            4 + 5 + 3
        );
        assert_eq!(plan.advance(&[cov("docs", a, 10)]), plan.total);
    }
}
