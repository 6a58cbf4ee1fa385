//! The shard coordinator: a peer registry kept in the store, syncs with
//! every peer, a shard's peers or one peer with at most
//! `max_concurrent_syncs` running at once, periodic auto-sync with jitter,
//! health checks, statistics and events. A peer that is down is marked
//! offline and retried with exponential backoff, not hammered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quiver_store::{PeerRecord, StoreEvent};
use serde::Serialize;
use tokio::sync::{broadcast, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{
    Client, ClientOptions, PingResult, Request, Result, StoreHandle, SyncError, SyncResult,
    SyncSpec, Trust,
};

/// Something that happened, for subscribers (`quiver watch`, applications).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A change in the store (local commit, remote change, conflict).
    Store {
        change: StoreEvent,
    },
    PeerConnected {
        node: String,
    },
    PeerDisconnected {
        node: String,
        error: String,
    },
    SyncStarted {
        node: String,
    },
    SyncCompleted {
        node: String,
        changes_sent: u64,
        changes_received: u64,
        conflicts: u64,
        duration_ms: u64,
        /// `quic`, or `tcp` where the peer's UDP is blocked.
        transport: crate::Transport,
    },
    SyncFailed {
        node: String,
        error: String,
    },
    /// A peer holds a shard at another schema version.
    SchemaOutdated {
        node: String,
        shard: String,
    },
}

/// How the coordinator works.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    pub max_concurrent_syncs: usize,
    /// Options for each peer's client; trust and token come from the registry.
    pub client: ClientOptions,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        CoordinatorOptions {
            max_concurrent_syncs: 4,
            client: ClientOptions {
                retries: 0,
                connect_timeout: Duration::from_secs(3),
                ..Default::default()
            },
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// Totals over the coordinator's life.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CoordinatorStats {
    pub total_syncs: u64,
    pub failures: u64,
    pub avg_duration_ms: f64,
    pub p95_duration_ms: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub conflicts: u64,
    /// The most syncs that ran at once.
    pub max_in_flight: usize,
    /// Connection attempts per peer (retries included).
    pub attempts: HashMap<String, u64>,
}

#[derive(Default)]
struct Backoff {
    failures: u32,
    next: Option<Instant>,
}

struct Inner {
    handle: StoreHandle,
    opts: CoordinatorOptions,
    permits: Semaphore,
    in_flight: AtomicUsize,
    clients: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Client>>>>,
    backoff: Mutex<HashMap<String, Backoff>>,
    stats: Mutex<(CoordinatorStats, Vec<f64>)>,
    events: broadcast::Sender<Event>,
    auto: Mutex<Option<CancellationToken>>,
    /// When the statistics were last kept in the store.
    saved: Mutex<Option<Instant>>,
}

/// Sync durations kept for the average and p95 (the latest ones).
const DURATIONS_KEPT: usize = 1000;

/// Coordinates syncs with many peers. Cheap to clone.
#[derive(Clone)]
pub struct ShardCoordinator {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind;
    // carry on with it rather than poisoning the coordinator.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ShardCoordinator {
    /// A coordinator over a store (inside a tokio runtime).
    pub fn new(handle: StoreHandle, opts: CoordinatorOptions) -> Self {
        let (events, _) = broadcast::channel(1024);
        let permits = Semaphore::new(opts.max_concurrent_syncs.max(1));
        let inner = Arc::new(Inner {
            handle: handle.clone(),
            opts,
            permits,
            in_flight: AtomicUsize::new(0),
            clients: Mutex::default(),
            backoff: Mutex::default(),
            stats: Mutex::default(),
            events: events.clone(),
            auto: Mutex::default(),
            saved: Mutex::default(),
        });
        // Forward the store's own events.
        let mut store_events = handle.events();
        tokio::spawn(async move {
            loop {
                match store_events.recv().await {
                    Ok(change) => {
                        let _ = events.send(Event::Store { change });
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        ShardCoordinator { inner }
    }

    /// Receives every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    pub async fn register_peer(&self, peer: PeerRecord) -> Result<()> {
        self.inner
            .handle
            .request(|reply| Request::RegisterPeer { peer, reply })
            .await
    }

    pub async fn unregister_peer(&self, node: &str) -> Result<bool> {
        let node = node.to_string();
        lock(&self.inner.clients).remove(&node);
        self.inner
            .handle
            .request(|reply| Request::UnregisterPeer { node, reply })
            .await
    }

    pub async fn peers(&self) -> Result<Vec<PeerRecord>> {
        Ok(self.inner.handle.call(|s| s.peers()).await??)
    }

    fn client_for(&self, p: &PeerRecord) -> Arc<tokio::sync::Mutex<Client>> {
        let mut clients = lock(&self.inner.clients);
        clients
            .entry(p.node.clone())
            .or_insert_with(|| {
                let mut opts = self.inner.opts.client.clone();
                if let Some(pin) = &p.pin {
                    opts.trust = Trust::Pin(pin.clone());
                }
                if p.token.is_some() {
                    opts.token = p.token.clone();
                }
                Arc::new(tokio::sync::Mutex::new(Client::new(
                    self.inner.handle.clone(),
                    opts,
                )))
            })
            .clone()
    }

    /// Whether a peer is waiting out its backoff.
    fn backing_off(&self, node: &str) -> bool {
        lock(&self.inner.backoff)
            .get(node)
            .and_then(|b| b.next)
            .is_some_and(|t| Instant::now() < t)
    }

    async fn record(&self, p: &PeerRecord, outcome: &Result<SyncResult>) {
        let (status, error) = match outcome {
            Ok(_) => ("online", None),
            Err(e) if e.is_transient() => ("offline", Some(e.to_string())),
            Err(e) => ("degraded", Some(e.to_string())),
        };
        let previous = p.status.clone();
        {
            let mut b = lock(&self.inner.backoff);
            let entry = b.entry(p.node.clone()).or_default();
            if outcome.is_ok() {
                *entry = Backoff::default();
            } else {
                entry.failures += 1;
                let exp = self
                    .inner
                    .opts
                    .backoff_base
                    .saturating_mul(1 << entry.failures.min(16));
                let jitter = 0.75 + rand::random::<f64>() * 0.5;
                entry.next =
                    Some(Instant::now() + exp.min(self.inner.opts.backoff_max).mul_f64(jitter));
            }
        }
        let (node, err) = (p.node.clone(), error.clone());
        let _ = self
            .inner
            .handle
            .request(|reply| Request::SetPeerStatus {
                node,
                status: status.to_string(),
                error: err,
                reply,
            })
            .await;
        let ev = match (previous.as_str(), status) {
            (old, "online") if old != "online" => Some(Event::PeerConnected {
                node: p.node.clone(),
            }),
            ("online", _) if status != "online" => Some(Event::PeerDisconnected {
                node: p.node.clone(),
                error: error.clone().unwrap_or_default(),
            }),
            _ => None,
        };
        if let Some(ev) = ev {
            let _ = self.inner.events.send(ev);
        }
    }

    async fn sync_peer(&self, p: PeerRecord, shards: Vec<String>) -> Result<SyncResult> {
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| SyncError::StoreGone)?;
        let now = self.inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        {
            let mut st = lock(&self.inner.stats);
            st.0.max_in_flight = st.0.max_in_flight.max(now);
            *st.0.attempts.entry(p.node.clone()).or_default() += 1;
        }
        let _ = self.inner.events.send(Event::SyncStarted {
            node: p.node.clone(),
        });
        let started = Instant::now();
        let client = self.client_for(&p);
        let outcome = client
            .lock()
            .await
            .sync(
                &p.addr,
                &SyncSpec {
                    shards,
                    tables: vec![],
                },
                None,
            )
            .await;
        self.inner.in_flight.fetch_sub(1, Ordering::SeqCst);
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        self.count(ms, &outcome);
        self.report(&p, &outcome).await;
        outcome
    }

    /// Adds a sync (or a live round) to the statistics.
    fn count(&self, ms: f64, outcome: &Result<SyncResult>) {
        let mut st = lock(&self.inner.stats);
        st.0.total_syncs += 1;
        match outcome {
            Ok(r) => {
                // Durations of the latest syncs only, for a daemon that
                // runs for months.
                if st.1.len() >= 2 * DURATIONS_KEPT {
                    st.1.drain(..DURATIONS_KEPT);
                }
                st.1.push(ms);
                st.0.bytes_sent += r.bytes_sent;
                st.0.bytes_received += r.bytes_received;
                st.0.conflicts += r.conflicts_detected;
            }
            Err(_) => st.0.failures += 1,
        }
    }

    /// Tells subscribers how a sync with `p` went, and records the peer's
    /// state.
    async fn report(&self, p: &PeerRecord, outcome: &Result<SyncResult>) {
        if let Ok(r) = outcome {
            for shard in &r.schema_outdated {
                let _ = self.inner.events.send(Event::SchemaOutdated {
                    node: p.node.clone(),
                    shard: shard.clone(),
                });
            }
        }
        let _ = self.inner.events.send(match &outcome {
            Ok(r) => Event::SyncCompleted {
                node: p.node.clone(),
                changes_sent: r.changes_sent,
                changes_received: r.changes_received,
                conflicts: r.conflicts_detected,
                duration_ms: r.duration_ms,
                transport: r.transport,
            },
            Err(e) => Event::SyncFailed {
                node: p.node.clone(),
                error: e.to_string(),
            },
        });
        self.record(p, outcome).await;
        self.save_stats().await;
    }

    /// Keeps the statistics in the store, so that `quiver status` on the
    /// store of a running daemon shows them.
    async fn save_stats(&self) {
        {
            // At most once a second: a busy live link reports many rounds.
            let mut last = lock(&self.inner.saved);
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(Instant::now());
        }
        let value = serde_json::to_string(&self.stats()).unwrap_or_default();
        if let Err(e @ SyncError::Store(_)) = self
            .inner
            .handle
            .request(|reply| Request::SetMeta {
                key: "coordinator_stats".into(),
                value,
                reply,
            })
            .await
        {
            tracing::warn!("keeping the coordinator's statistics: {e}");
        }
    }

    /// Keeps a live link to each of `peers` until `stop` is cancelled. A
    /// peer's state follows its link: online from its first round (with a
    /// `PeerConnected` event), degraded with the reason when refused (a
    /// token, a certificate); each round that moved changes counts in the
    /// statistics and sends `SyncCompleted`. Peers need not be registered
    /// (the daemon's `--peer` ones are not); registered ones keep their
    /// state in the registry.
    pub fn keep_live_links(&self, peers: Vec<PeerRecord>, stop: CancellationToken) {
        for p in peers {
            let stop = stop.clone();
            let mut opts = self.inner.opts.client.clone();
            if let Some(pin) = &p.pin {
                opts.trust = Trust::Pin(pin.clone());
            }
            if p.token.is_some() {
                opts.token = p.token.clone();
            }
            // A live link retries an absent peer until stopped.
            opts.retry_no_answer = true;
            let mut client = Client::new(self.inner.handle.clone(), opts);
            let spec = SyncSpec {
                shards: p.shards.clone(),
                tables: vec![],
            };
            // Rounds and the link's end go through one channel to one
            // reporter, in order, which keeps the peer's state.
            let (news_tx, mut news) = tokio::sync::mpsc::unbounded_channel::<Result<SyncResult>>();
            let rounds_tx = news_tx.clone();
            let on_round: crate::RoundFn = Arc::new(move |r: &SyncResult| {
                let _ = rounds_tx.send(Ok(r.clone()));
            });
            let (reporter, mut peer) = (self.clone(), p.clone());
            // Whatever an earlier run left in the registry, this link has
            // not connected yet.
            peer.status = "offline".into();
            tokio::spawn(async move {
                let mut first = true;
                while let Some(r) = news.recv().await {
                    match r {
                        Ok(r) if first || r.changes_sent + r.changes_received > 0 => {
                            reporter.count(r.duration_ms as f64, &Ok(r.clone()));
                            reporter.report(&peer, &Ok(r)).await;
                            peer.status = "online".into();
                        }
                        Ok(_) => {}
                        Err(e) => {
                            reporter.count(0.0, &Err(SyncError::Connection(e.to_string())));
                            reporter.report(&peer, &Err(e)).await;
                            peer.status = "degraded".into();
                        }
                    }
                    first = false;
                }
            });
            tokio::spawn(async move {
                tracing::info!(addr = %p.addr, node = %p.node, "keeping a live link");
                let ended = client.live(&p.addr, &spec, stop, Some(on_round)).await;
                client.close().await;
                if let Err(e) = ended {
                    tracing::error!(addr = %p.addr, "live link ended: {e}");
                    let _ = news_tx.send(Err(e));
                }
            });
        }
    }

    async fn sync_many(
        &self,
        peers: Vec<(PeerRecord, Vec<String>)>,
    ) -> Vec<(String, Result<SyncResult>)> {
        let mut tasks = tokio::task::JoinSet::new();
        let mut out = Vec::new();
        for (p, shards) in peers {
            if self.backing_off(&p.node) {
                out.push((
                    p.node.clone(),
                    Err(SyncError::Timeout(format!(
                        "peer {} is backing off after failures",
                        p.node
                    ))),
                ));
                continue;
            }
            let me = self.clone();
            tasks.spawn(async move { (p.node.clone(), me.sync_peer(p, shards).await) });
        }
        while let Some(j) = tasks.join_next().await {
            if let Ok(r) = j {
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Syncs every registered peer's shards (skipping peers in backoff).
    pub async fn sync_all(&self) -> Result<Vec<(String, Result<SyncResult>)>> {
        let peers = self.peers().await?;
        Ok(self
            .sync_many(
                peers
                    .into_iter()
                    .map(|p| {
                        let s = p.shards.clone();
                        (p, s)
                    })
                    .collect(),
            )
            .await)
    }

    /// Syncs one shard with every peer that holds it.
    pub async fn sync_shard(&self, shard: &str) -> Result<Vec<(String, Result<SyncResult>)>> {
        let peers = self.peers().await?;
        let wanted: Vec<_> = peers
            .into_iter()
            .filter(|p| p.shards.is_empty() || p.shards.iter().any(|s| s == shard))
            .map(|p| (p, vec![shard.to_string()]))
            .collect();
        Ok(self.sync_many(wanted).await)
    }

    /// Syncs with one peer, by node name or address (backoff does not apply).
    pub async fn sync_with_peer(&self, node_or_addr: &str) -> Result<SyncResult> {
        let peers = self.peers().await?;
        let p = peers
            .into_iter()
            .find(|p| p.node == node_or_addr || p.addr == node_or_addr)
            .ok_or_else(|| SyncError::Connect {
                addr: node_or_addr.to_string(),
                reason: "not a registered peer".into(),
            })?;
        let shards = p.shards.clone();
        self.sync_peer(p, shards).await
    }

    /// Syncs with every peer every `interval` (with ±20% jitter) until stopped.
    pub fn start_auto_sync_all(&self, interval: Duration) {
        let stop = CancellationToken::new();
        if let Some(old) = lock(&self.inner.auto).replace(stop.clone()) {
            old.cancel();
        }
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let wait = interval.mul_f64(0.8 + rand::random::<f64>() * 0.4);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                if let Err(e) = me.sync_all().await {
                    tracing::warn!("auto-sync: {e}");
                }
            }
        });
    }

    pub fn stop_auto_sync_all(&self) {
        if let Some(stop) = lock(&self.inner.auto).take() {
            stop.cancel();
        }
    }

    /// Pings every peer and records who answers.
    pub async fn health_check(&self) -> Result<Vec<(String, Result<PingResult>)>> {
        let mut out = Vec::new();
        for p in self.peers().await? {
            let client = self.client_for(&p);
            let r = client.lock().await.ping(&p.addr).await;
            let as_sync: Result<SyncResult> = match &r {
                Ok(_) => Ok(SyncResult::default()),
                Err(e) => Err(SyncError::Connection(e.to_string())),
            };
            self.record(&p, &as_sync).await;
            out.push((p.node.clone(), r));
        }
        Ok(out)
    }

    pub fn stats(&self) -> CoordinatorStats {
        let st = lock(&self.inner.stats);
        let mut s = st.0.clone();
        let mut d = st.1.clone();
        d.sort_by(f64::total_cmp);
        if !d.is_empty() {
            s.avg_duration_ms = d.iter().sum::<f64>() / d.len() as f64;
            s.p95_duration_ms = percentile(&d, 0.95);
        }
        s
    }
}

/// The `q` quantile of sorted, non-empty samples (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

#[cfg(test)]
mod tests {
    #[test]
    fn p95_is_the_nearest_rank() {
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(super::percentile(&hundred, 0.95), 95.0);
        assert_eq!(super::percentile(&[1.0, 2.0, 3.0, 40.0], 0.95), 40.0);
        assert_eq!(super::percentile(&[7.0], 0.95), 7.0);
        assert_eq!(super::percentile(&hundred, 0.5), 51.0);
    }
}
