//! QUIC endpoints with deliberate transport settings.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::tls::{self, Identity, SeenFingerprint, Trust};
use crate::{Result, SyncError};

/// Transport limits shared by both ends.
#[derive(Debug, Clone)]
pub struct TransportLimits {
    /// A silent connection is closed after this long.
    pub idle_timeout: Duration,
    /// Keep-alive pings keep a quiet link open (well under the idle timeout).
    pub keep_alive: Duration,
    /// Concurrent bidirectional streams a peer may open (one per shard, plus control).
    pub max_streams: u32,
}

impl TransportLimits {
    /// A client's: a peer that stops answering (killed, unplugged) is
    /// noticed within 6 s, mid-transfer too, rather than the server's 30 s;
    /// keep-alives every half second keep a healthy quiet link open. (QUIC uses
    /// the smaller idle timeout of the two ends.)
    pub fn client() -> Self {
        TransportLimits {
            idle_timeout: Duration::from_secs(6),
            keep_alive: Duration::from_millis(500),
            ..TransportLimits::default()
        }
    }
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            max_streams: 64,
        }
    }
}

/// Packets acknowledged after one before it is declared lost (RFC 9002's
/// default is 3, which jitter's reordering trips all the time).
pub const LOSS_PACKET_THRESHOLD: u32 = 1000;
/// How long after a later packet's acknowledgement, in RTTs, a packet is
/// declared lost (quinn's default 9/8).
pub const LOSS_TIME_THRESHOLD: f32 = 2.0;

/// A client's first guess of the round trip (see [`client_endpoint`]).
pub const CLIENT_INITIAL_RTT: Duration = Duration::from_millis(100);

fn transport(limits: &TransportLimits) -> Result<Arc<quinn::TransportConfig>> {
    Ok(Arc::new(transport_config(limits)?))
}

fn transport_config(limits: &TransportLimits) -> Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        limits
            .idle_timeout
            .try_into()
            .map_err(|_| SyncError::Tls("idle timeout too large".into()))?,
    ));
    t.keep_alive_interval(Some(limits.keep_alive));
    t.max_concurrent_bidi_streams(limits.max_streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Room for a few large batches in flight per stream and connection.
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((32u32 << 20).into());
    t.send_window(32 << 20);
    // Links that lose, delay and reorder datagrams (Wi-Fi, mobile, long
    // paths): BBR paces by the bandwidth it measures rather than halving
    // its window at every loss, and loss is declared by time only (2 RTTs,
    // against 9/8 by default, and no packet-count threshold in practice),
    // so that jitter's reordering is not taken for loss. Measured with
    // `scripts/netbench.py` (README, "Networks that misbehave").
    t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    t.packet_threshold(LOSS_PACKET_THRESHOLD);
    t.time_threshold(LOSS_TIME_THRESHOLD);
    Ok(t)
}

/// Makes an endpoint's UDP socket for an address: by default the
/// machine's; a test may give sockets of its own (a simulated network, see
/// `crates/quiver-sync/tests/simulation.rs`).
#[derive(Clone)]
pub struct UdpSocketFactory(
    #[allow(clippy::type_complexity)]
    pub  Arc<dyn Fn(SocketAddr) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> + Send + Sync>,
);

impl std::fmt::Debug for UdpSocketFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UdpSocketFactory")
    }
}

/// An endpoint on `bind`: on a socket of the machine, or of `udp`.
fn endpoint(
    bind: SocketAddr,
    server: Option<quinn::ServerConfig>,
    udp: Option<&UdpSocketFactory>,
) -> std::io::Result<quinn::Endpoint> {
    match (udp, server) {
        (None, Some(cfg)) => quinn::Endpoint::server(cfg, bind),
        (None, None) => quinn::Endpoint::client(bind),
        (Some(f), server) => quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            server,
            (f.0)(bind)?,
            Arc::new(quinn::TokioRuntime),
        ),
    }
}

/// A server endpoint bound to `addr`.
pub fn server_endpoint(
    addr: SocketAddr,
    id: &Identity,
    client_ca: Option<&Path>,
    limits: &TransportLimits,
) -> Result<quinn::Endpoint> {
    server_endpoint_on(addr, id, client_ca, limits, None)
}

/// A server endpoint bound to `addr`, on a socket `udp` makes if given.
pub fn server_endpoint_on(
    addr: SocketAddr,
    id: &Identity,
    client_ca: Option<&Path>,
    limits: &TransportLimits,
    udp: Option<&UdpSocketFactory>,
) -> Result<quinn::Endpoint> {
    let crypto = QuicServerConfig::try_from(tls::server_crypto(id, client_ca)?)
        .map_err(|e| SyncError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(limits)?);
    endpoint(addr, Some(cfg), udp).map_err(|e| SyncError::Listen {
        addr: addr.to_string(),
        reason: match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "the address is already in use (another `quiver serve`, or another program, \
                 listens there; pick another port with --listen)"
                    .into()
            }
            std::io::ErrorKind::AddrNotAvailable => {
                "no interface of this machine has that address".into()
            }
            std::io::ErrorKind::PermissionDenied => {
                "permission denied (ports below 1024 need privileges)".into()
            }
            _ => e.to_string(),
        },
    })
}

/// A client endpoint on an ephemeral port of the right address family.
pub fn client_endpoint(
    for_addr: SocketAddr,
    trust: &Trust,
    client: Option<&Identity>,
    limits: &TransportLimits,
) -> Result<(quinn::Endpoint, SeenFingerprint)> {
    client_endpoint_on(for_addr, trust, client, limits, None)
}

/// A client endpoint, on a socket `udp` makes if given.
pub fn client_endpoint_on(
    for_addr: SocketAddr,
    trust: &Trust,
    client: Option<&Identity>,
    limits: &TransportLimits,
    udp: Option<&UdpSocketFactory>,
) -> Result<(quinn::Endpoint, SeenFingerprint)> {
    let (crypto, seen) = tls::client_crypto(trust, client)?;
    let crypto = QuicClientConfig::try_from(crypto).map_err(|e| SyncError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = transport_config(limits)?;
    // The first round trip's guess, before any is measured (quinn's is
    // 333 ms): a lost Initial is sent again after about 0.3 s rather than
    // 1 s, so a connection attempt under way when a partition heals gets
    // through soon after. A long path only sends an Initial twice.
    t.initial_rtt(CLIENT_INITIAL_RTT);
    cfg.transport_config(Arc::new(t));
    let bind: SocketAddr = if for_addr.is_ipv6() {
        "[::]:0".parse()
    } else {
        "0.0.0.0:0".parse()
    }
    .map_err(|_| SyncError::Tls("bad bind address".into()))?;
    let mut ep = endpoint(bind, None, udp)?;
    ep.set_default_client_config(cfg);
    Ok((ep, seen))
}
