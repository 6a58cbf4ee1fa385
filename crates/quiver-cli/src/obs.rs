//! The daemon's HTTP endpoint (loopback by default, a port of its own):
//! `/health` says whether it is ready and why not, `/metrics` gives
//! Prometheus text, `/connections` lists the live connections (what
//! `quiver status --server` shows), `/events` streams the store's events
//! (what `quiver watch` prints) as server-sent events.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use http_body_util::combinators::BoxBody;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use quiver_sync::{CancellationToken, ConnectionInfo, StoreHandle};

/// Installs the Prometheus recorder for this process (once).
pub fn install_recorder() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])?
        .install_recorder()?;
    zero_series();
    Ok(handle)
}

/// Every series the daemon exports, described and present at zero from the
/// start: Prometheus users expect a counter to exist before it moves, so
/// that rates and alerts work from the first scrape.
fn zero_series() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    let counters = [
        ("quiver_changes_sent_total", "changes sent to peers"),
        (
            "quiver_changes_received_total",
            "changes received from peers",
        ),
        ("quiver_bytes_sent_total", "bytes of change frames sent"),
        (
            "quiver_bytes_received_total",
            "bytes of change frames received",
        ),
        (
            "quiver_conflicts_total",
            "conflicts recorded while applying",
        ),
        (
            "quiver_rate_limited_total",
            "requests refused by a rate limit",
        ),
    ];
    for (name, help) in counters {
        describe_counter!(name, help);
        metrics::counter!(name).absolute(0);
    }
    describe_counter!(
        "quiver_connections_total",
        "connections accepted, by transport (quic, or tcp: TLS over TCP)"
    );
    for transport in ["quic", "tcp"] {
        metrics::counter!("quiver_connections_total", "transport" => transport).absolute(0);
    }
    describe_counter!("quiver_syncs_total", "shard exchanges, by result");
    for result in ["ok", "error"] {
        metrics::counter!("quiver_syncs_total", "result" => result).absolute(0);
    }
    describe_counter!(
        "quiver_refusals_total",
        "connections or requests refused, by code"
    );
    describe_counter!(
        "quiver_errors_total",
        "failed shard exchanges, by error kind"
    );
    describe_counter!(
        "quiver_compaction_purged_total",
        "records purged by compaction (tombstones, older lives, resolved conflicts)"
    );
    metrics::counter!("quiver_compaction_purged_total").absolute(0);
    for (name, help) in CLOCK_GAUGES {
        describe_gauge!(name, help);
    }
    describe_gauge!("quiver_connections_active", "connections being served");
    metrics::gauge!("quiver_connections_active").set(0.0);
    describe_histogram!(
        "quiver_sync_duration_seconds",
        Unit::Seconds,
        "duration of one shard exchange"
    );
    // Registered (empty) so that it is listed before the first sync.
    let _ = metrics::histogram!("quiver_sync_duration_seconds");
}

/// Per-shard gauges of the clock, kept by [`compaction`].
const CLOCK_GAUGES: [(&str, &str); 4] = [
    ("quiver_clock_records", "clock records, by shard"),
    (
        "quiver_tombstones",
        "tombstones (deleted rows' records), by shard",
    ),
    (
        "quiver_compaction_held_back",
        "tombstones some peer within the horizon has not acknowledged, by shard",
    ),
    (
        "quiver_oldest_unacknowledged_version",
        "the oldest version (its origin's db_version) of those, 0 if none, by shard",
    ),
];

/// How often the clock gauges are read between compactions (a scan of
/// the clock on the store's thread).
const CLOCK_STATS_EVERY: Duration = Duration::from_secs(60);

/// Tombstones one call of the daemon's compaction purges.
const COMPACT_PART: usize = 20_000;

/// The daemon's compaction: every `interval` (if any), one pass over every
/// shard, logged when it purges something; the clock gauges on `/metrics`
/// are read at start, after each pass and every minute.
pub async fn compaction(
    store: StoreHandle,
    interval: Option<Duration>,
    shutdown: quiver_sync::CancellationToken,
) {
    let tick = interval.map_or(CLOCK_STATS_EVERY, |i| i.min(CLOCK_STATS_EVERY));
    let mut last = tokio::time::Instant::now();
    loop {
        if interval.is_some_and(|i| last.elapsed() >= i) {
            last = tokio::time::Instant::now();
            // In parts, so that syncs are served between them.
            loop {
                let part = quiver_store::CompactOptions {
                    max_tombstones: Some(COMPACT_PART),
                    ..Default::default()
                };
                let r = store.call(move |s| s.compact(&part)).await;
                let more = matches!(&r, Ok(Ok(r)) if r.shards.iter().map(|s| s.tombstones).sum::<u64>() as usize >= COMPACT_PART);
                match r {
                    Ok(Ok(r)) if r.purged > 0 => {
                        metrics::counter!("quiver_compaction_purged_total").increment(r.purged);
                        tracing::info!(
                            purged = r.purged,
                            clock_records = r.clock_records,
                            bytes_before = r.bytes_before,
                            bytes_after = r.bytes_after,
                            seconds = r.seconds,
                            "compacted"
                        );
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!("compaction failed: {e}"),
                    Err(_) => return,
                }
                if !more || shutdown.is_cancelled() {
                    break;
                }
            }
        }
        match store.call(|s| s.clock_stats()).await {
            Ok(Ok(stats)) => {
                for st in stats {
                    let values = [
                        st.clock_records,
                        st.tombstones,
                        st.held_back,
                        st.oldest_unacknowledged,
                    ];
                    for ((name, _), v) in CLOCK_GAUGES.iter().zip(values) {
                        metrics::gauge!(*name, "shard" => st.shard.clone()).set(v as f64);
                    }
                }
            }
            Ok(Err(e)) => tracing::warn!("reading the clock's counts: {e}"),
            Err(_) => return,
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// What the endpoint reports on.
pub struct Health {
    pub store: StoreHandle,
    pub node: String,
    pub listening: SocketAddr,
    /// Connections being served, the handshake included.
    pub connections: Arc<dyn Fn() -> usize + Send + Sync>,
    /// Connections past the handshake, with their peers and traffic.
    pub list: Arc<dyn Fn() -> Vec<ConnectionInfo> + Send + Sync>,
    pub shutdown: CancellationToken,
    /// The daemon's coordinator: store events, and its peers' and syncs'.
    pub coordinator: quiver_sync::ShardCoordinator,
}

fn connections(h: &Health) -> String {
    serde_json::json!({
        "node": h.node,
        "listening": h.listening.to_string(),
        "connections": (h.list)(),
    })
    .to_string()
}

async fn health(h: &Health) -> (StatusCode, String) {
    if h.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not ready", "reason": "shutting down"}).to_string(),
        );
    }
    let store = tokio::time::timeout(
        Duration::from_secs(2),
        h.store.call(|s| s.sync_state().map(|_| ())),
    )
    .await;
    match store {
        Ok(Ok(Ok(()))) => (
            StatusCode::OK,
            serde_json::json!({
                "status": "ready",
                "listening": h.listening.to_string(),
                "connections": (h.connections)(),
            })
            .to_string(),
        ),
        Ok(Ok(Err(e))) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not ready", "reason": format!("store: {e}")}).to_string(),
        ),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not ready", "reason": format!("store: {e}")}).to_string(),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not ready", "reason": "store busy for over 2 s"})
                .to_string(),
        ),
    }
}

/// A response body fed by a channel: the lines of an event stream.
struct EventStream(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// `/events[?shard=S]`: the store's events (what `quiver watch` prints) and
/// the coordinator's peer and sync events, as server-sent events with one
/// `data:` line of JSON each, until the client goes or the daemon stops. A
/// comment every 15 s keeps proxies from closing a quiet stream and tells a
/// gone client from a quiet one.
fn events(h: &Health, query: Option<&str>) -> Response<BoxBody<Bytes, Infallible>> {
    let shard = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("shard="))
        .map(str::to_string);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let mut all_events = h.coordinator.subscribe();
    let stop = h.shutdown.clone();
    tokio::spawn(async move {
        if tx
            .send(Bytes::from_static(b": quiver events\n\n"))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let line = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(15)) => Bytes::from_static(b": keep-alive\n\n"),
                e = all_events.recv() => match e {
                    Ok(e) => {
                        // A store event as `quiver watch` prints it; the
                        // coordinator's own as they are.
                        let json = match e {
                            quiver_sync::Event::Store { change } => {
                                let Some(change) = (match &shard {
                                    Some(s) => change.in_shard(s),
                                    None => Some(change),
                                }) else { continue };
                                serde_json::to_value(&change)
                            }
                            other => serde_json::to_value(&other),
                        }
                        .unwrap_or_default();
                        let name = json["event"].as_str().unwrap_or("event").to_string();
                        Bytes::from(format!("event: {name}\ndata: {json}\n\n"))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        Bytes::from(format!(": {n} events skipped\n\n"))
                    }
                    Err(_) => return,
                },
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    let mut resp = Response::new(BoxBody::new(EventStream(rx)));
    let headers = resp.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    resp
}

async fn route(
    req: Request<hyper::body::Incoming>,
    prom: PrometheusHandle,
    h: Arc<Health>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    if req.uri().path() == "/events" {
        return Ok(events(&h, req.uri().query()));
    }
    let (status, kind, body) = match req.uri().path() {
        "/health" => {
            let (s, b) = health(&h).await;
            (s, "application/json", b)
        }
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", prom.render()),
        "/connections" => (StatusCode::OK, "application/json", connections(&h)),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /health, /metrics, /connections or /events\n".to_string(),
        ),
    };
    let mut resp = Response::new(BoxBody::new(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    Ok(resp)
}

/// Serves the endpoint until shutdown; returns the bound address.
pub async fn serve(addr: SocketAddr, prom: PrometheusHandle, health: Health) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let stop = health.shutdown.clone();
    let health = Arc::new(health);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            let Ok((stream, _)) = accepted else { continue };
            let (prom, health) = (prom.clone(), health.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req| route(req, prom.clone(), health.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(local)
}

/// GETs `path` from a daemon's HTTP endpoint and returns the body (at most
/// 16 MiB, all within 10 seconds).
pub async fn get(addr: &str, path: &str) -> Result<String> {
    use http_body_util::BodyExt;
    let hint = "give the daemon's HTTP address, printed by `quiver serve` as \
                \"health and metrics on http://ADDR/health\" (set with --http or http_listen)";
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| anyhow::anyhow!("could not reach {addr}: {e}; {hint}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| anyhow::anyhow!("{addr}: {e}; {hint}"))?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(hyper::header::HOST, addr)
            .body(http_body_util::Empty::<Bytes>::new())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| anyhow::anyhow!("{addr}: {e}; {hint}"))?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), 16 << 20)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("{addr}{path}: {e}"))?
            .to_bytes();
        Ok::<_, anyhow::Error>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .map_err(|_| anyhow::anyhow!("{addr} did not answer within 10 s; {hint}"))??;
    if !status.is_success() {
        anyhow::bail!("{addr}{path} answered {status}: {}", body.trim());
    }
    Ok(body)
}
