//! The client: connects (reusing a live connection, with 0-RTT on
//! reconnect; over QUIC, or TLS on TCP where UDP does not get through),
//! handshakes, syncs shards concurrently, retries transient
//! failures with exponential backoff and jitter, and pings.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_core::frame::{HANDSHAKE_MAX_FRAME, MAX_FRAME_LIMIT};
use quiver_core::session::{ClientConfig, ClientSession};
use quiver_core::wire::{
    ErrorCode, Hello, Message, ShardInfo, Welcome, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
use quiver_store::StreamLimits;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::actor::StoreHandle;
use crate::framed::{FrameReader, FrameWriter};
use crate::protocol::{exchange, Peer, Progress, ProgressFn, Pump, ShardResult};
use crate::schema::shard_infos;
use crate::streams::{Conn, Transport, TransportChoice};
use crate::tls::{Identity, SeenFingerprint, Trust};
use crate::transport::{client_endpoint_on, TransportLimits};
use crate::{Result, SyncError};

/// How a client connects and retries.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub trust: Trust,
    /// Certificate and key PEM files presented when a server asks for a
    /// client certificate (mutual TLS).
    pub client_identity: Option<(PathBuf, PathBuf)>,
    pub token: Option<String>,
    pub node: String,
    /// How long the QUIC handshake may take before the server counts as
    /// not answering.
    pub connect_timeout: Duration,
    /// Retries after the first attempt, for transient failures only.
    pub retries: u32,
    /// Whether a one-shot sync retries a server that never answered
    /// (live links always keep trying). A person at a terminal would rather
    /// hear at once that nothing is there.
    pub retry_no_answer: bool,
    pub limits: TransportLimits,
    pub max_frame: u32,
    pub compression: bool,
    pub stream: StreamLimits,
    /// QUIC, TCP, or QUIC with a fallback to TCP (`auto`, the default).
    pub transport: TransportChoice,
    /// The QUIC endpoint's UDP socket, when not the machine's (a simulated
    /// network in tests).
    pub udp: Option<crate::transport::UdpSocketFactory>,
}

/// How long `auto` gives QUIC before starting TCP beside it; the first
/// connection to complete its handshake is taken.
pub const FALLBACK_DELAY: Duration = Duration::from_millis(300);
/// How long a server reached only over TCP is reached over TCP first;
/// after that `auto` tries QUIC again.
const REMEMBER_TCP: Duration = Duration::from_secs(600);

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            trust: Trust::Verify,
            client_identity: None,
            token: None,
            node: "quiver".into(),
            connect_timeout: Duration::from_secs(5),
            retries: 4,
            retry_no_answer: true,
            limits: TransportLimits::client(),
            max_frame: DEFAULT_MAX_FRAME,
            compression: true,
            stream: StreamLimits::default(),
            transport: TransportChoice::Auto,
            udp: None,
        }
    }
}

/// What to sync.
#[derive(Debug, Clone, Default)]
pub struct SyncSpec {
    /// Shards to sync (empty: every shard either side holds).
    pub shards: Vec<String>,
    /// Tables to limit the sync to (empty: whole shards).
    pub tables: Vec<String>,
}

/// The outcome of a sync.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncResult {
    pub peer_node: String,
    pub peer_site: String,
    pub shards: Vec<ShardResult>,
    pub changes_sent: u64,
    pub changes_received: u64,
    /// Rows received as snapshots (a table this replica held nothing of
    /// comes as its current rows, not as history), and those tables as
    /// `shard.table`.
    pub snapshot_rows: u64,
    pub snapshot_tables: Vec<String>,
    pub applied: u64,
    /// Conflicts this replica recorded while applying what it received
    /// (each concurrent cell once); what `quiver conflicts list` shows here.
    pub conflicts_detected: u64,
    pub conflicts_resolved: u64,
    pub conflicts_open: u64,
    /// Changes received for a table or column this replica does not know
    /// yet: kept, and applied once the schema that explains them arrives.
    pub held: u64,
    /// Conflicts the server recorded on its side while applying what this
    /// replica pushed (the same concurrent writes seen from there).
    pub peer_conflicts_detected: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The whole sync, every attempt and the waits between them included.
    pub duration_ms: u64,
    pub attempts: u32,
    /// Whether the connection was resumed with 0-RTT.
    pub zero_rtt: bool,
    /// Whether an open connection from an earlier sync was reused.
    pub connection_reused: bool,
    /// The transport that carried the sync: `quic` or `tcp`.
    pub transport: Transport,
    /// Shards both sides hold at different schema versions.
    pub schema_outdated: Vec<String>,
    /// The token was read-only: nothing was pushed.
    pub read_only: bool,
    /// Shards only this side holds that the server would not take.
    pub skipped_shards: Vec<String>,
}

/// How long closing waits for the endpoint to send its close frames.
const CLOSE_FLUSH: Duration = Duration::from_millis(5);

/// Called with the result of every round of a live link.
pub type RoundFn = Arc<dyn Fn(&SyncResult) + Send + Sync>;

/// A live link's failures in a row, and since when it has been down.
#[derive(Default)]
struct LinkHealth {
    failures: u32,
    lost: Option<std::time::Instant>,
}

/// The outcome of a clone.
#[derive(Debug, Clone, Serialize)]
pub struct CloneResult {
    pub peer_node: String,
    /// The new replica's own site id.
    pub site_id: String,
    /// Bytes of the store copy received.
    pub bytes: u64,
    pub duration_ms: u64,
    /// Replicated tables and collections in the new replica.
    pub tables: usize,
}

/// The outcome of a ping.
#[derive(Debug, Clone, Serialize)]
pub struct PingResult {
    pub peer_node: String,
    pub rtt_ms: f64,
    pub connect_ms: f64,
    /// The transport's own round-trip estimate (QUIC's, or over TCP the
    /// last HTTP/2 keep-alive ping's).
    pub quic_rtt_ms: f64,
    pub transport: Transport,
}

struct Link {
    conn: Conn,
    welcome: Welcome,
    /// Our shards as stated in the hello.
    ours: Vec<ShardInfo>,
    control: (FrameReader, FrameWriter),
    zero_rtt: bool,
    connect_ms: f64,
}

/// A sync client over one store.
pub struct Client {
    handle: StoreHandle,
    opts: ClientOptions,
    endpoint: Option<(quinn::Endpoint, SeenFingerprint)>,
    tcp: Option<(tokio_rustls::TlsConnector, SeenFingerprint)>,
    links: HashMap<SocketAddr, Link>,
    /// Servers `auto` last reached over TCP only, and when.
    tcp_since: HashMap<SocketAddr, Instant>,
    /// A live link is trying to get back: each QUIC attempt waits at most
    /// [`LIVE_PROBE_TIMEOUT`], so that attempts follow each other closely.
    probing: bool,
}

/// A live link that hears nothing at all (not even the answers to its
/// keep-alives) for this long tries a fresh connection beside the silent
/// one, and takes it if it gets through: after a partition, a connection's
/// own probes may be seconds apart (their timer doubles each time), a new
/// connection's first packets are not.
const LIVE_SILENCE: Duration = Duration::from_millis(1500);
/// How long each attempt of a live link getting back waits for QUIC.
const LIVE_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long after losing the network a live link retries fast (every
/// 100–300 ms, with short attempts); past it, it backs off as before.
const LIVE_FAST_RETRIES: Duration = Duration::from_secs(60);
/// A live link's round with nothing notified, at the longest.
const LIVE_SAFETY_NET: Duration = Duration::from_secs(30);

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a handshake on a new connection gives.
type Handshaken = (Welcome, FrameReader, FrameWriter, Vec<ShardInfo>);

/// Where a connection goes: the address as given, resolved, and the TLS
/// server name.
struct Target<'a> {
    addr: &'a str,
    sock: SocketAddr,
    name: &'a str,
}

/// Resolves `host:port` and gives the TLS server name.
async fn resolve(addr: &str) -> Result<(SocketAddr, String)> {
    let malformed = |reason: &str| SyncError::BadAddress {
        addr: addr.to_string(),
        reason: reason.to_string(),
    };
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| malformed("expected HOST:PORT, e.g. 127.0.0.1:4433"))?;
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(malformed("the port must be a number from 1 to 65535"));
    }
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(malformed("expected HOST:PORT, e.g. 127.0.0.1:4433"));
    }
    // A failed lookup may be the network (offline, DNS down): transient.
    let lookup_failed = |reason: String| SyncError::Connect {
        addr: addr.to_string(),
        reason,
    };
    let sock = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| lookup_failed(format!("looking up {host}: {e}")))?
        .next()
        .ok_or_else(|| lookup_failed("the name resolved to no address".into()))?;
    Ok((sock, host))
}

fn backoff(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.min(5)).min(5_000);
    let jitter = rand::random::<f64>() + 0.5;
    Duration::from_millis((base as f64 * jitter) as u64)
}

impl Client {
    pub fn new(handle: StoreHandle, opts: ClientOptions) -> Client {
        Client {
            handle,
            opts,
            endpoint: None,
            tcp: None,
            links: HashMap::new(),
            tcp_since: HashMap::new(),
            probing: false,
        }
    }

    /// Why a server closed the handshake over this client's certificate
    /// (mutual TLS), by the TLS alert it sent.
    fn certificate_refused(&self, alert: impl Fn(u8) -> bool) -> Option<String> {
        let ours = self.opts.client_identity.as_ref().map(|(cert, _)| cert);
        let refused = |why: &str| {
            let which = ours
                .map(|p| format!(" ({})", p.display()))
                .unwrap_or_default();
            Some(format!(
                "the server refused this client's certificate{which}: {why}"
            ))
        };
        // TLS alert numbers (RFC 8446).
        if alert(116) {
            return Some(match ours {
                None => "the server requires a client certificate (mutual TLS); give one \
                         (quiver: --client-cert FILE --client-key FILE)"
                    .into(),
                Some(p) => format!(
                    "the server requires a client certificate (mutual TLS) and got no usable \
                     one from {}",
                    p.display()
                ),
            });
        }
        if alert(45) {
            refused("it has expired or is not valid yet")
        } else if alert(44) {
            refused("it has been revoked")
        } else if alert(43) {
            refused("it is not meant for client authentication (its extended key usage lacks clientAuth)")
        } else if [42, 46, 48, 49, 51].into_iter().any(alert) {
            // Bad or unknown certificate, unknown CA, access denied, or a
            // signature that does not verify.
            refused(
                "it is not issued by (or equal to) a certificate in the server's client_ca file",
            )
        } else {
            None
        }
    }

    /// A TLS failure in words: the server refusing this client's
    /// certificate (mutual TLS), or this client not trusting the server's.
    fn untrusted_quic(
        &self,
        seen: &SeenFingerprint,
        e: &quinn::ConnectionError,
    ) -> Option<SyncError> {
        if let quinn::ConnectionError::ConnectionClosed(c) = e {
            let alert = |a: u8| c.error_code == quinn::TransportErrorCode::crypto(a);
            if let Some(why) = self.certificate_refused(alert) {
                return Some(SyncError::Untrusted(format!(
                    "{why} (server: {})",
                    c.reason.escape_ascii()
                )));
            }
        }
        self.untrusted(seen, &e.to_string())
    }

    /// A TLS failure described by `text`, in words when it is this client
    /// not trusting the server's certificate.
    fn untrusted(&self, seen: &SeenFingerprint, text: &str) -> Option<SyncError> {
        let fp = seen.lock().ok()?.clone()?;
        // Trusted by pin or on purpose: the failure lies elsewhere.
        let pinned =
            matches!(&self.opts.trust, Trust::Pin(p) if crate::tls::same_fingerprint(p, &fp));
        if pinned || self.opts.trust == Trust::Insecure {
            return None;
        }
        if !(text.contains("certificate")
            || text.contains("UnknownIssuer")
            || text.contains("crypto"))
        {
            return None;
        }
        Some(SyncError::Untrusted(match &self.opts.trust {
            Trust::Pin(p) => format!(
                "the server's certificate (SHA-256 {fp}) does not match the pinned fingerprint {p}; \
                 check the address, or pin the new certificate if it was replaced on purpose"
            ),
            _ => format!(
                "the server's certificate is not trusted (SHA-256 fingerprint {fp}). If this is the \
                 server you expect, trust it with --pin {fp} (or --ca FILE holding its certificate); \
                 --insecure skips verification"
            ),
        }))
    }

    /// Connects (or reuses a live connection); returns the address and
    /// whether the connection was reused.
    async fn connect(
        &mut self,
        addr: &str,
        progress: &Option<ProgressFn>,
    ) -> Result<(SocketAddr, bool)> {
        let (sock, server_name) = resolve(addr).await?;
        if let Some(link) = self.links.get(&sock) {
            if link.conn.is_open() {
                return Ok((sock, true));
            }
            self.links.remove(&sock);
        }
        if let Some(p) = progress {
            p(Progress::Connecting {
                addr: addr.to_string(),
            });
        }
        let remembered = self
            .tcp_since
            .get(&sock)
            .is_some_and(|t| t.elapsed() < REMEMBER_TCP);
        let mut choice = self.opts.transport;
        if choice != TransportChoice::Tcp {
            if let Err(e) = self.quic_endpoint(sock) {
                // No UDP socket to be had (a sandbox that forbids it):
                // `auto` goes over TCP, `quic` says why it cannot.
                if choice == TransportChoice::Quic {
                    return Err(e);
                }
                tracing::info!("no QUIC endpoint ({e}); using TLS over TCP");
                choice = TransportChoice::Tcp;
            }
        }
        if choice != TransportChoice::Quic {
            self.tcp_connector()?;
        }
        let target = Target {
            addr,
            sock,
            name: &server_name,
        };
        let started = Instant::now();
        let (conn, zero_rtt, seen) = match choice {
            // Getting a live link back, a connection counts once its
            // handshake completed (0-RTT would hand it over at once).
            TransportChoice::Quic => self.quic_connect(&target, self.probing).await?,
            TransportChoice::Tcp => self.tcp_connect(&target).await?,
            // Reached over TCP lately: straight there (QUIC is tried again
            // once the memory is old, or if TCP fails for the network).
            TransportChoice::Auto if remembered => match self.tcp_connect(&target).await {
                Ok(c) => c,
                Err(e) if !e.is_transient() => return Err(e),
                Err(_) => {
                    self.tcp_since.remove(&sock);
                    self.race(&target).await?
                }
            },
            TransportChoice::Auto => {
                let c = self.race(&target).await?;
                if c.0.transport() == Transport::Tcp {
                    tracing::info!("QUIC did not get through to {addr}; using TLS over TCP");
                    // Not remembered when the network itself was down a
                    // moment ago: UDP need not be blocked.
                    if !self.probing {
                        self.tcp_since.insert(sock, Instant::now());
                    }
                } else {
                    self.tcp_since.remove(&sock);
                }
                c
            }
        };
        if let Some(p) = progress {
            p(Progress::Handshaking);
        }
        let link = self.handshake(conn, zero_rtt, &seen, addr, started).await?;
        self.links.insert(sock, link);
        Ok((sock, false))
    }

    /// Makes the QUIC endpoint, once.
    fn quic_endpoint(&mut self, sock: SocketAddr) -> Result<()> {
        if self.endpoint.is_none() {
            let id = match &self.opts.client_identity {
                Some((cert, key)) => Some(Identity::load(cert, key)?),
                None => None,
            };
            self.endpoint = Some(client_endpoint_on(
                sock,
                &self.opts.trust,
                id.as_ref(),
                &self.opts.limits,
                self.opts.udp.as_ref(),
            )?);
        }
        Ok(())
    }

    /// Makes the TLS-over-TCP connector, once.
    fn tcp_connector(&mut self) -> Result<()> {
        if self.tcp.is_none() {
            let id = match &self.opts.client_identity {
                Some((cert, key)) => Some(Identity::load(cert, key)?),
                None => None,
            };
            self.tcp = Some(crate::tcp::connector(&self.opts.trust, id.as_ref())?);
        }
        Ok(())
    }

    /// The transports' handshakes race: QUIC first, TCP beside it once
    /// QUIC has not completed within [`FALLBACK_DELAY`] (or has failed).
    /// The first to complete wins and the other is dropped. A failure that
    /// is not the network's (an untrusted certificate) is told when the
    /// other has failed too: the two may not reach the same thing (a TLS
    /// middlebox on TCP, say), and QUIC's failure is told first.
    async fn race(&self, target: &Target<'_>) -> Result<(Conn, bool, SeenFingerprint)> {
        // In a race a QUIC connection counts once its handshake completed
        // (not at once with 0-RTT): a ticket from before UDP was blocked
        // would otherwise win every race and never get through.
        let quic = self.quic_connect(target, true);
        let quic_failed = tokio::sync::Notify::new();
        let tcp = async {
            tokio::select! {
                _ = tokio::time::sleep(FALLBACK_DELAY) => {}
                _ = quic_failed.notified() => {}
            }
            self.tcp_connect(target).await
        };
        tokio::pin!(quic, tcp);
        let (mut quic_err, mut tcp_err) = (None, None);
        loop {
            tokio::select! {
                r = &mut quic, if quic_err.is_none() => match r {
                    Ok(c) => return Ok(c),
                    Err(e) => {
                        quic_failed.notify_one();
                        quic_err = Some(e);
                    }
                },
                r = &mut tcp, if tcp_err.is_none() => match r {
                    Ok(c) => return Ok(c),
                    Err(e) => tcp_err = Some(e),
                },
            }
            if quic_err.is_some() && tcp_err.is_some() {
                if let (Some(mut q), Some(t)) = (quic_err.take(), tcp_err.take()) {
                    tracing::debug!("over TCP: {t}");
                    return Err(match (&mut q, t) {
                        // QUIC's failure is the one to tell, with TCP's beside it.
                        (SyncError::NoAnswer { also, .. }, SyncError::NoTcpListener { .. }) => {
                            *also = ", and nothing listens on TCP there".into();
                            q
                        }
                        // TCP reached something that said no: that says more.
                        (SyncError::NoAnswer { .. }, t) if !t.is_transient() => t,
                        (SyncError::NoAnswer { also, .. }, t) => {
                            *also = format!(" (nor over TCP: {t})");
                            q
                        }
                        _ => q,
                    });
                }
            }
        }
    }

    /// Says hello on a new connection and makes it a link.
    async fn handshake(
        &self,
        conn: Conn,
        zero_rtt: bool,
        seen: &SeenFingerprint,
        addr: &str,
        started: Instant,
    ) -> Result<Link> {
        // The transport's handshake is done: the server is there, so give
        // its welcome (which reads its store) more time than that.
        let wait = self.opts.connect_timeout.max(Duration::from_secs(5));
        let mut said = tokio::time::timeout(wait, self.hello(&conn)).await;
        let mut zero_rtt = zero_rtt;
        if matches!(said, Ok(Err(SyncError::ZeroRttRejected))) {
            // A server that restarted does not take the old ticket's 0-RTT
            // data; once the handshake completes, the hello goes again.
            zero_rtt = false;
            said = tokio::time::timeout(wait, self.hello(&conn)).await;
        }
        let (welcome, reader, writer, ours) = match said {
            Ok(Ok(x)) => x,
            Ok(Err(SyncError::Connection(c))) => {
                return Err(self
                    .lost_in_handshake(&conn, seen)
                    .await
                    .unwrap_or(SyncError::Connection(c)))
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(SyncError::Timeout(format!("handshaking with {addr}"))),
        };
        if welcome.protocol != PROTOCOL_VERSION {
            return Err(SyncError::Protocol(format!(
                "server speaks protocol {}, this client speaks {PROTOCOL_VERSION}",
                welcome.protocol
            )));
        }
        Ok(Link {
            conn,
            welcome,
            ours,
            control: (reader, writer),
            zero_rtt,
            connect_ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }

    /// Why a connection was lost during the hello: a TLS refusal of this
    /// client's certificate, or its own distrust of the server's.
    async fn lost_in_handshake(&self, conn: &Conn, seen: &SeenFingerprint) -> Option<SyncError> {
        match conn {
            Conn::Quic(c) => {
                let e = c
                    .close_reason()
                    .unwrap_or(quinn::ConnectionError::LocallyClosed);
                self.untrusted_quic(seen, &e)
            }
            Conn::Tcp(t) => {
                // The alert is read as the connection ends, which a failed
                // write may precede.
                let ended = t.shared.ended.cancelled();
                let _ = tokio::time::timeout(Duration::from_secs(1), ended).await;
                let alert = (*t.shared.alert.lock().ok()?)?;
                let why = self.certificate_refused(|a| a == alert)?;
                Some(SyncError::Untrusted(why))
            }
        }
    }

    /// A QUIC connection; with `complete`, only once its handshake has
    /// completed (0-RTT otherwise hands it over at once).
    async fn quic_connect(
        &self,
        t: &Target<'_>,
        complete: bool,
    ) -> Result<(Conn, bool, SeenFingerprint)> {
        let Some((endpoint, seen)) = &self.endpoint else {
            return Err(SyncError::Tls("no client endpoint".into()));
        };
        let seen = seen.clone();
        let connecting = endpoint
            .connect(t.sock, t.name)
            .map_err(|e| SyncError::Connect {
                addr: t.addr.to_string(),
                reason: e.to_string(),
            })?;
        let no_answer = || SyncError::NoAnswer {
            addr: t.addr.to_string(),
            waited_ms: self.quic_timeout().as_millis() as u64,
            also: String::new(),
        };
        // 0-RTT when a session ticket allows it: the hello is idempotent.
        let (conn, zero_rtt) = match connecting.into_0rtt() {
            Ok((conn, accepted)) => {
                if complete
                    && tokio::time::timeout(self.quic_timeout(), accepted)
                        .await
                        .is_err()
                {
                    return Err(no_answer());
                }
                if let Some(e) = conn.close_reason() {
                    return Err(self
                        .untrusted_quic(&seen, &e)
                        .unwrap_or(SyncError::Connect {
                            addr: t.addr.to_string(),
                            reason: crate::error::connection_reason(&e),
                        }));
                }
                (conn, true)
            }
            Err(connecting) => match tokio::time::timeout(self.quic_timeout(), connecting).await {
                Ok(Ok(c)) => (c, false),
                Ok(Err(e)) => {
                    return Err(self
                        .untrusted_quic(&seen, &e)
                        .unwrap_or(SyncError::Connect {
                            addr: t.addr.to_string(),
                            reason: crate::error::connection_reason(&e),
                        }))
                }
                Err(_) => return Err(no_answer()),
            },
        };
        Ok((Conn::Quic(conn), zero_rtt, seen))
    }

    /// How long a transport's handshake may take now: short while a live
    /// link gets back (for a minute at most), else `connect_timeout`.
    fn quic_timeout(&self) -> Duration {
        match self.probing {
            true => self.opts.connect_timeout.min(LIVE_PROBE_TIMEOUT),
            false => self.opts.connect_timeout,
        }
    }

    async fn tcp_connect(&self, t: &Target<'_>) -> Result<(Conn, bool, SeenFingerprint)> {
        let Some((tls, seen)) = &self.tcp else {
            return Err(SyncError::Tls("no TCP connector".into()));
        };
        let limits = &self.opts.limits;
        let timeout = self.quic_timeout();
        match crate::tcp::connect(t.sock, t.name, t.addr, tls, limits, timeout).await {
            Ok(c) => Ok((c, false, seen.clone())),
            Err(crate::tcp::TcpFailure::Connect(e)) => Err(e),
            Err(crate::tcp::TcpFailure::Tls(text)) => Err(self
                .untrusted(seen, &text)
                .unwrap_or_else(|| SyncError::Connect {
                    addr: t.addr.to_string(),
                    reason: format!("TLS over TCP failed: {text}"),
                })),
        }
    }

    /// Says hello on a new connection and takes the server's welcome.
    async fn hello(&self, conn: &Conn) -> Result<Handshaken> {
        let (send, recv) = conn.open_bi().await?;
        let mut reader = FrameReader::new(recv, HANDSHAKE_MAX_FRAME, false);
        let mut writer = FrameWriter::new(send, false);
        let shards = self.handle.call(|s| shard_infos(s)).await??;
        writer
            .send(&Message::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                site: self.handle.site_id(),
                node: self.opts.node.clone(),
                token: self.opts.token.clone(),
                shards: shards.clone(),
                max_frame: self.opts.max_frame,
                compression: self.opts.compression,
            }))
            .await?;
        match reader.expect("the server's welcome").await? {
            Message::Welcome(w) => Ok((w, reader, writer, shards)),
            other => Err(SyncError::Protocol(format!(
                "expected welcome, got {}",
                other.kind().1
            ))),
        }
    }

    /// Counts each shard exchanged in the store's sync state, as the server
    /// does on its side and as `quiver_syncs_total` counts them.
    async fn record_exchanges(&self, r: &SyncResult) -> Result<()> {
        let (count, sent, received) = (r.shards.len() as u64, r.changes_sent, r.changes_received);
        self.handle.record_syncs(count, sent, received, None).await
    }

    /// Keeps the error in the store's sync state (last error, count).
    async fn record_failure(&self, e: &SyncError) {
        let _ = self.handle.record_syncs(1, 0, 0, Some(e.to_string())).await;
    }

    /// Syncs with the server at `addr`, retrying transient failures.
    pub async fn sync(
        &mut self,
        addr: &str,
        spec: &SyncSpec,
        progress: Option<ProgressFn>,
    ) -> Result<SyncResult> {
        let mut attempt = 0;
        let started = std::time::Instant::now();
        loop {
            attempt += 1;
            match self.sync_once(addr, spec, &progress).await {
                Ok(mut r) => {
                    r.attempts = attempt;
                    // The whole sync, retries and their waits included.
                    r.duration_ms = started.elapsed().as_millis() as u64;
                    self.record_exchanges(&r).await?;
                    if let Some(p) = &progress {
                        p(Progress::Done);
                    }
                    return Ok(r);
                }
                Err(e)
                    if e.is_transient()
                        && attempt <= self.opts.retries
                        && (self.opts.retry_no_answer
                            || !matches!(
                                e,
                                SyncError::NoAnswer { .. } | SyncError::NoTcpListener { .. }
                            )) =>
                {
                    let wait = match &e {
                        SyncError::Peer {
                            retry_after_ms: Some(ms),
                            ..
                        } => Duration::from_millis(*ms),
                        _ => backoff(attempt - 1),
                    };
                    tracing::warn!("sync with {addr} failed ({e}); retrying in {wait:?}");
                    if let Ok((sock, _)) = resolve(addr).await {
                        self.links.remove(&sock);
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    self.record_failure(&e).await;
                    return Err(e);
                }
            }
        }
    }

    async fn sync_once(
        &mut self,
        addr: &str,
        spec: &SyncSpec,
        progress: &Option<ProgressFn>,
    ) -> Result<SyncResult> {
        let started = Instant::now();
        let (sock, reused) = self.connect(addr, progress).await?;
        let link = self
            .links
            .get(&sock)
            .ok_or_else(|| SyncError::Connection("link vanished".into()))?;
        let (max_frame, compression) = (link.welcome.max_frame as usize, link.welcome.compression);
        let max_frame = max_frame.clamp(HANDSHAKE_MAX_FRAME, MAX_FRAME_LIMIT);
        let shards: Vec<String> = if spec.shards.is_empty() {
            let mine = self.handle.call(|s| s.shards()).await??;
            let mut all: Vec<String> = mine
                .into_iter()
                .chain(link.welcome.shards.iter().map(|s| s.name.clone()))
                .collect();
            all.sort();
            all.dedup();
            all
        } else {
            spec.shards.clone()
        };
        let peer = Peer {
            name: link.welcome.node.clone(),
            site: link.welcome.site,
            may_push: true,
            scope: None,
            bytes_limit: None,
        };
        // With a read-only token there is no point pushing: pull only.
        let pull_only = link.welcome.read_only;
        let mut tasks = tokio::task::JoinSet::new();
        for shard in shards {
            let shard_name = shard.clone();
            let conn = link.conn.clone();
            let handle = self.handle.clone();
            let peer = peer.clone();
            let tables = spec.tables.clone();
            let progress = progress.clone();
            let stream = self.opts.stream;
            tasks.spawn(async move {
                let outcome = async {
                    let (send, recv) = conn.open_bi().await?;
                    let reader = FrameReader::new(recv, max_frame, compression);
                    let writer = FrameWriter::new(send, compression);
                    let session = ClientSession::new(ClientConfig {
                        shard,
                        tables,
                        pull_only,
                    });
                    let pump = Pump {
                        handle: &handle,
                        peer,
                        limits: stream,
                        progress,
                    };
                    exchange(session, pump, reader, writer).await
                }
                .await;
                (shard_name, outcome)
            });
        }
        let mut result = SyncResult {
            peer_node: link.welcome.node.clone(),
            peer_site: link.welcome.site.to_hex(),
            zero_rtt: link.zero_rtt && !reused,
            schema_outdated: link
                .ours
                .iter()
                .filter(|o| {
                    link.welcome
                        .shards
                        .iter()
                        .any(|t| t.name == o.name && t.schema_version != o.schema_version)
                })
                .map(|o| o.name.clone())
                .collect(),
            connection_reused: reused,
            transport: link.conn.transport(),
            read_only: link.welcome.read_only,
            ..Default::default()
        };
        let mut first_error = None;
        let explicit = !spec.shards.is_empty();
        while let Some(joined) = tasks.join_next().await {
            match joined.map_err(|e| SyncError::Protocol(e.to_string()))? {
                (_, Ok(r)) => result.shards.push(r),
                // A shard only we hold, which the server will not take
                // (outside the token's scope): skipped unless asked for.
                (
                    shard,
                    Err(SyncError::Peer {
                        code: ErrorCode::UnknownShard,
                        ..
                    }),
                ) if !explicit => result.skipped_shards.push(shard),
                (_, Err(e)) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        result.skipped_shards.sort();
        if let Some(e) = first_error {
            return Err(e);
        }
        result.shards.sort_by(|a, b| a.shard.cmp(&b.shard));
        for s in &result.shards {
            result.changes_sent += s.changes_sent;
            result.changes_received += s.changes_received;
            result.snapshot_rows += s.snapshot_rows;
            result
                .snapshot_tables
                .extend(s.snapshot_tables.iter().map(|t| format!("{}.{t}", s.shard)));
            result.applied += s.local.applied;
            result.conflicts_detected += s.local.conflicts_detected;
            result.conflicts_resolved += s.local.conflicts_resolved;
            result.conflicts_open += s.local.conflicts_open;
            result.held += s.local.held;
            result.peer_conflicts_detected += s.remote.conflicts_detected;
            result.bytes_sent += s.bytes_sent;
            result.bytes_received += s.bytes_received;
        }
        result.duration_ms = started.elapsed().as_millis() as u64;
        Ok(result)
    }

    /// Keeps a live link with the server at `addr` until `stop` is
    /// cancelled: syncs, subscribes to the server's changes, and syncs again
    /// whenever either side changes (the server's notification or this
    /// store's change counter), so a write shows on the other side within
    /// milliseconds. A dropped link reconnects with backoff and resumes from
    /// the persisted cursor; refusals end the link with an error.
    ///
    /// After a partition a QUIC link is back within about a second of the
    /// network: a link that hears nothing at all (not even the answers to
    /// its keep-alives) for a while tries fresh connections beside the
    /// silent one, a round on a silent connection is given up, and for the
    /// first minute after a loss of the network the link retries every few
    /// hundred milliseconds with short attempts (then backs off as before).
    pub async fn live(
        &mut self,
        addr: &str,
        spec: &SyncSpec,
        stop: CancellationToken,
        on_round: Option<RoundFn>,
    ) -> Result<()> {
        let r = self.live_loop(addr, spec, stop, on_round).await;
        // Short attempts are for a live link getting back only.
        self.probing = false;
        r
    }

    async fn live_loop(
        &mut self,
        addr: &str,
        spec: &SyncSpec,
        stop: CancellationToken,
        on_round: Option<RoundFn>,
    ) -> Result<()> {
        let mut health = LinkHealth::default();
        let mut local = self.handle.subscribe_changes();
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            match self
                .live_session(addr, spec, &stop, &mut local, &on_round, &mut health)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if !e.is_transient() => {
                    self.record_failure(&e).await;
                    return Err(e);
                }
                Err(e) => {
                    health.failures += 1;
                    let reported = health.lost.is_some();
                    let since = *health.lost.get_or_insert_with(Instant::now);
                    let mut wait = backoff(health.failures.min(6));
                    // The network failed (no answer, a lost connection), and
                    // not long ago: try again soon, each attempt short, so
                    // that the link is back within about a second of the
                    // network. A refusal, a busy or slow server, or a long
                    // outage back off as before.
                    let network = matches!(
                        e,
                        SyncError::NoAnswer { .. }
                            | SyncError::NoTcpListener { .. }
                            | SyncError::Connection(_)
                    );
                    self.probing = network && since.elapsed() < LIVE_FAST_RETRIES;
                    if self.probing {
                        let ms = rand::random::<u64>() % 200 + 100;
                        wait = wait.min(Duration::from_millis(ms));
                    }
                    if !reported {
                        tracing::warn!("live link to {addr} lost ({e}); reconnecting in {wait:?}");
                    } else {
                        tracing::debug!("live link to {addr} still down ({e}); again in {wait:?}");
                    }
                    if let Ok((sock, _)) = resolve(addr).await {
                        if let Some(old) = self.links.remove(&sock) {
                            old.conn.close();
                        }
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn live_round(
        &mut self,
        addr: &str,
        spec: &SyncSpec,
        on_round: &Option<RoundFn>,
    ) -> Result<()> {
        let r = self.sync_once(addr, spec, &None).await?;
        self.record_exchanges(&r).await?;
        if let Some(f) = on_round {
            f(&r);
        }
        Ok(())
    }

    async fn live_session(
        &mut self,
        addr: &str,
        spec: &SyncSpec,
        stop: &CancellationToken,
        local: &mut tokio::sync::watch::Receiver<u64>,
        on_round: &Option<RoundFn>,
        health: &mut LinkHealth,
    ) -> Result<()> {
        'fresh: loop {
            local.borrow_and_update();
            let sock = self.watched_round(addr, spec, on_round).await?;
            health.failures = 0;
            self.probing = false;
            if let Some(since) = health.lost.take() {
                // Said at the level of "lost", so that whoever saw one sees the other.
                tracing::warn!(
                    "live link to {addr} back after {:.1} s",
                    since.elapsed().as_secs_f64()
                );
            }
            let (reader, mut writer, _) = self.open_stream(addr).await?;
            writer
                .send(&Message::Subscribe(spec.shards.clone()))
                .await?;
            // The subscription is read by a task of its own: a frame read
            // half-way must not be cut by the loop's other events.
            let (tx, mut notices) = tokio::sync::mpsc::channel(4);
            let reading = AbortOnDrop(tokio::spawn(async move {
                let mut reader = reader;
                loop {
                    let m = reader.next().await;
                    let end = !matches!(m, Ok(Some(_)));
                    if tx.send(m).await.is_err() || end {
                        return;
                    }
                }
            }));
            let silence = self.silence(sock);
            let mut heard = (self.received(sock), Instant::now());
            let mut watch = tokio::time::interval(silence / 10);
            watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_try: Option<Instant> = None;
            let mut fresh_refused = false;
            // A slow safety net; changes normally arrive by notification.
            let net = tokio::time::sleep(LIVE_SAFETY_NET);
            tokio::pin!(net);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        let _ = writer.finish();
                        return Ok(());
                    }
                    m = notices.recv() => match m {
                        Some(Ok(Some(Message::Notify(_)))) => {}
                        Some(Ok(Some(Message::Error(e)))) => return Err(crate::framed::peer_error(e)),
                        Some(Ok(Some(other))) => {
                            return Err(SyncError::Protocol(format!("unexpected {} on a live stream", other.kind().1)))
                        }
                        Some(Err(e)) => return Err(e),
                        Some(Ok(None)) | None => {
                            return Err(SyncError::Connection("the server ended the live stream".into()))
                        }
                    },
                    moved = local.changed() => if moved.is_err() { return Err(SyncError::StoreGone) },
                    _ = watch.tick() => {
                        let now = self.received(sock);
                        if now != heard.0 {
                            heard = (now, Instant::now());
                            // Silent a while, then heard again without a
                            // new connection: back.
                            if let Some(since) = health.lost.take() {
                                tracing::warn!(
                                    "live link to {addr} back after {:.1} s",
                                    since.elapsed().as_secs_f64()
                                );
                            }
                        } else if heard.1.elapsed() >= silence && self.is_quic(sock) && !fresh_refused {
                            if health.lost.is_none() {
                                health.lost = Some(heard.1);
                                tracing::warn!(
                                    "live link to {addr} lost (nothing heard for {:.1} s); trying a fresh connection",
                                    heard.1.elapsed().as_secs_f64()
                                );
                            }
                            // One attempt at a time, a probe's length apart.
                            if last_try.is_none_or(|t| t.elapsed() >= LIVE_PROBE_TIMEOUT) {
                                last_try = Some(Instant::now());
                                let fresh = tokio::select! {
                                    _ = stop.cancelled() => return Ok(()),
                                    f = self.fresh_link(addr, sock) => f,
                                };
                                match fresh {
                                    Ok(true) => {
                                        drop(reading);
                                        continue 'fresh;
                                    }
                                    Ok(false) => {}
                                    // Refused (a limit, a token): the old
                                    // connection is left to its fate.
                                    Err(()) => fresh_refused = true,
                                }
                            }
                        }
                        continue;
                    }
                    _ = &mut net => {}
                }
                local.borrow_and_update();
                self.watched_round(addr, spec, on_round).await?;
                net.as_mut()
                    .reset(tokio::time::Instant::now() + LIVE_SAFETY_NET);
            }
        }
    }

    /// How long a live link on `sock` may hear nothing before it counts as
    /// lost: the answers to its keep-alives come well within it, whatever
    /// their pace and the path's round trip.
    fn silence(&self, sock: SocketAddr) -> Duration {
        let rtt = self
            .links
            .get(&sock)
            .map_or(Duration::ZERO, |l| l.conn.rtt());
        LIVE_SILENCE
            .max(self.opts.limits.keep_alive * 5 / 2)
            .max(self.opts.limits.keep_alive + rtt * 12)
    }

    /// What the link to `sock` has received so far (0 without one).
    fn received(&self, sock: SocketAddr) -> u64 {
        self.links.get(&sock).map_or(0, |l| l.conn.received())
    }

    fn is_quic(&self, sock: SocketAddr) -> bool {
        self.links
            .get(&sock)
            .is_some_and(|l| l.conn.transport() == Transport::Quic)
    }

    /// A live link's round on its connection (made first if needed),
    /// given up as lost when a QUIC connection hears nothing at all for
    /// the link's silence, rather than waiting out the idle timeout. (Over
    /// TCP the server may rightly say nothing while it takes a long push,
    /// and its idle timeout stands.) Returns the connection's address.
    async fn watched_round(
        &mut self,
        addr: &str,
        spec: &SyncSpec,
        on_round: &Option<RoundFn>,
    ) -> Result<SocketAddr> {
        let (sock, _) = self.connect(addr, &None).await?;
        let silence = self.silence(sock);
        let conn = self
            .links
            .get(&sock)
            .map(|l| l.conn.clone())
            .filter(|c| c.transport() == Transport::Quic);
        let quiet = async move {
            let Some(conn) = conn else {
                return std::future::pending().await;
            };
            let mut heard = (conn.received(), Instant::now());
            let mut tick = tokio::time::interval(silence / 10);
            loop {
                tick.tick().await;
                let now = conn.received();
                if now != heard.0 {
                    heard = (now, Instant::now());
                } else if heard.1.elapsed() >= silence {
                    conn.close();
                    return heard.1.elapsed();
                }
            }
        };
        tokio::select! {
            r = self.live_round(addr, spec, on_round) => r.map(|_| sock),
            quiet_for = quiet => Err(SyncError::Connection(format!(
                "nothing heard for {:.1} s during a round",
                quiet_for.as_secs_f64()
            ))),
        }
    }

    /// One short attempt at a new QUIC connection to `sock`, beside the
    /// silent one; on success it replaces the old one, which is closed.
    /// `Err` when the server refused it (a limit, a token).
    async fn fresh_link(&mut self, addr: &str, sock: SocketAddr) -> std::result::Result<bool, ()> {
        if !self.is_quic(sock) || self.endpoint.is_none() {
            return Ok(false);
        }
        let Ok((_, name)) = resolve(addr).await else {
            return Ok(false);
        };
        self.probing = true;
        let target = Target {
            addr,
            sock,
            name: &name,
        };
        let started = Instant::now();
        let attempt = async {
            let (conn, zero_rtt, seen) = self.quic_connect(&target, true).await?;
            self.handshake(conn, zero_rtt, &seen, addr, started).await
        };
        let r = attempt.await;
        self.probing = false;
        match r {
            Ok(link) => {
                if let Some(old) = self.links.insert(sock, link) {
                    old.conn.close();
                }
                Ok(true)
            }
            Err(e) if !e.is_transient() || matches!(e, SyncError::Peer { .. }) => {
                tracing::debug!("a fresh connection to {addr} was refused: {e}");
                Err(())
            }
            Err(e) => {
                tracing::debug!("a fresh connection to {addr} did not get through: {e}");
                Ok(false)
            }
        }
    }

    /// Measures the round trip of a ping over the handshaken connection.
    /// Opens a stream of its own on the (pooled) connection to `addr`,
    /// framed as the server agreed; returns it with the server's node name.
    async fn open_stream(&mut self, addr: &str) -> Result<(FrameReader, FrameWriter, String)> {
        let (sock, _) = self.connect(addr, &None).await?;
        let link = self
            .links
            .get(&sock)
            .ok_or_else(|| SyncError::Connection("link vanished".into()))?;
        let max_frame =
            (link.welcome.max_frame as usize).clamp(HANDSHAKE_MAX_FRAME, MAX_FRAME_LIMIT);
        let compression = link.welcome.compression;
        let (send, recv) = link.conn.open_bi().await?;
        Ok((
            FrameReader::new(recv, max_frame, compression),
            FrameWriter::new(send, compression),
            link.welcome.node.clone(),
        ))
    }

    /// Makes a new replica at `dest` from a consistent copy of the
    /// server's whole store, streamed over the connection and checked
    /// (order, length, CRC32C), then given a site id of its own (see
    /// [`quiver_store::Store::adopt_clone`]). `dest` must not exist; a
    /// failed clone leaves nothing there. The server refuses a token
    /// scoped to some shards.
    pub async fn clone_store(&mut self, addr: &str, dest: &std::path::Path) -> Result<CloneResult> {
        if dest.exists() {
            return Err(SyncError::Store(
                quiver_store::StoreError::AlreadyInitialised {
                    path: dest.to_path_buf(),
                },
            ));
        }
        let started = Instant::now();
        let (mut reader, mut writer, peer_node) = self.open_stream(addr).await?;
        writer.send(&Message::CloneRequest(0)).await?;
        let partial = std::path::PathBuf::from(format!("{}.clone-partial", dest.display()));
        let received = async {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&partial)?;
            let (mut offset, mut crc) = (0u64, 0u32);
            loop {
                match reader.expect("a piece of the store copy").await? {
                    Message::CloneChunk(c) if c.offset != offset => {
                        return Err(SyncError::Protocol(format!(
                            "store copy piece at {} where {offset} was expected",
                            c.offset
                        )))
                    }
                    Message::CloneChunk(c) => {
                        if let Some((len, sum)) = c.end {
                            if len != offset || sum != crc {
                                return Err(SyncError::Protocol(format!(
                                    "the store copy does not check out: {offset} bytes with CRC32C \
                                     {crc:08x} received, {len} bytes with {sum:08x} sent"
                                )));
                            }
                            break;
                        }
                        crc = quiver_core::frame::crc32c_append(crc, &c.data);
                        file.write_all(&c.data)?;
                        offset += c.data.len() as u64;
                    }
                    other => {
                        return Err(SyncError::Protocol(format!(
                            "expected a piece of the store copy, got {}",
                            other.kind().1
                        )))
                    }
                }
            }
            file.sync_all()?;
            Ok(offset)
        }
        .await;
        let _ = writer.finish();
        let bytes = match received {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        let (p, d) = (partial.clone(), dest.to_path_buf());
        let adopted = tokio::task::spawn_blocking(move || quiver_store::Store::adopt_clone(&p, &d))
            .await
            .map_err(|e| SyncError::Protocol(format!("adopting the copy: {e}")))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&partial);
            })?;
        let store = match adopted {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e.into());
            }
        };
        Ok(CloneResult {
            peer_node,
            site_id: store.site_id().to_hex(),
            bytes,
            duration_ms: started.elapsed().as_millis() as u64,
            tables: store.tables()?.len(),
        })
    }

    pub async fn ping(&mut self, addr: &str) -> Result<PingResult> {
        let (sock, _) = self.connect(addr, &None).await?;
        let link = self
            .links
            .get_mut(&sock)
            .ok_or_else(|| SyncError::Connection("link vanished".into()))?;
        let nonce: u64 = rand::random();
        let started = Instant::now();
        link.control.1.send(&Message::Ping(nonce)).await?;
        match link.control.0.expect("pong").await? {
            Message::Pong(n) if n == nonce => {}
            other => {
                return Err(SyncError::Protocol(format!(
                    "expected pong, got {}",
                    other.kind().1
                )))
            }
        }
        Ok(PingResult {
            peer_node: link.welcome.node.clone(),
            rtt_ms: started.elapsed().as_secs_f64() * 1000.0,
            connect_ms: link.connect_ms,
            quic_rtt_ms: link.conn.rtt().as_secs_f64() * 1000.0,
            transport: link.conn.transport(),
        })
    }

    /// Closes every connection politely.
    pub async fn close(&mut self) {
        let had_links = !self.links.is_empty();
        for (_, link) in self.links.drain() {
            link.conn.close();
        }
        if let Some((ep, _)) = &self.endpoint {
            if !had_links {
                // No open link: at most a dropped one's close to send.
                ep.close(0u32.into(), b"done");
            }
            // Long enough for the endpoint to send the closes, so servers
            // free the connection now instead of at their idle timeout;
            // not the whole draining period (three probe timeouts, about
            // 80 ms on loopback), which only absorbs stray packets. The
            // endpoint stays usable for a later connection.
            let _ = tokio::time::timeout(CLOSE_FLUSH, ep.wait_idle()).await;
        }
    }
}
