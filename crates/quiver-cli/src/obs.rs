//! The daemon's HTTP endpoint (loopback by default, a port of its own):
//! `/health` says whether it is ready and why not, `/metrics` gives
//! Prometheus text.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use quiver_sync::{CancellationToken, StoreHandle};

/// Installs the Prometheus recorder for this process (once).
pub fn install_recorder() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])?
        .install_recorder()?;
    Ok(handle)
}

/// What `/health` checks.
pub struct Health {
    pub store: StoreHandle,
    pub listening: SocketAddr,
    pub connections: Arc<dyn Fn() -> usize + Send + Sync>,
    pub shutdown: CancellationToken,
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

async fn route(
    req: Request<hyper::body::Incoming>,
    prom: PrometheusHandle,
    h: Arc<Health>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, kind, body) = match req.uri().path() {
        "/health" => {
            let (s, b) = health(&h).await;
            (s, "application/json", b)
        }
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", prom.render()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /health or /metrics\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
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
