//! The server: accepts connections (QUIC, and TLS over TCP for clients
//! whose UDP is blocked), checks the handshake (nothing else is read
//! before the token passes), then serves one shard per stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quiver_core::frame::{HANDSHAKE_MAX_FRAME, MAX_FRAME_LIMIT};
use quiver_core::wire::{
    ErrorCode, ErrorMsg, Message, ShardInfo, Welcome, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
use quiver_store::StreamLimits;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::actor::{Request, StoreHandle};
use crate::auth::authorize;
use crate::framed::{FrameReader, FrameWriter};
use crate::protocol::{exchange, Peer, Pump};
use crate::schema::shard_infos;
use crate::streams::{ServerConn, Transport};
use crate::tls::Identity;
use crate::transport::TransportLimits;
use crate::{Result, SyncError};
use quiver_core::session::{Input, ServerConfig, ServerSession, StreamSession};

/// Where a server takes TLS over TCP (HTTP/2), beside QUIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcpListen {
    /// The QUIC address's IP and port, on TCP (the default).
    #[default]
    Same,
    /// No TCP: QUIC only.
    Off,
    At(SocketAddr),
}

impl std::str::FromStr for TcpListen {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "off" => Ok(TcpListen::Off),
            "same" => Ok(TcpListen::Same),
            other => other.parse().map(TcpListen::At).map_err(|_| {
                format!(
                    "{other:?} is not a TCP listen address: expected HOST:PORT (e.g. \
                     0.0.0.0:4433), `same` (the QUIC address on TCP) or `off`"
                )
            }),
        }
    }
}

impl std::fmt::Display for TcpListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TcpListen::Same => f.write_str("same"),
            TcpListen::Off => f.write_str("off"),
            TcpListen::At(a) => write!(f, "{a}"),
        }
    }
}

/// How a server runs.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub listen: SocketAddr,
    /// TLS over TCP beside QUIC, for clients whose UDP is blocked.
    pub tcp_listen: TcpListen,
    /// Required from clients when set.
    pub token: Option<String>,
    pub node: String,
    pub limits: TransportLimits,
    pub max_frame: u32,
    pub compression: bool,
    pub stream: StreamLimits,
    /// How long a client may take to complete the handshake.
    pub handshake_timeout: Duration,
    /// Connections served at once; the next is refused with a retry hint.
    pub max_connections: usize,
    /// Per-client (IP) limits on requests and bytes per minute.
    pub rate: crate::limits::RateLimits,
    /// Mutual TLS: clients must present a certificate that chains to one
    /// in this PEM file.
    pub client_ca: Option<PathBuf>,
    /// Refuse clients while the server has no token at all (neither
    /// `token` nor scoped tokens in the store), instead of letting everyone
    /// in: for a daemon on the network whose last token was revoked.
    pub require_token: bool,
    /// At shutdown, how long exchanges in flight may take to finish before
    /// their connections are closed.
    pub shutdown_grace: Duration,
    /// The QUIC endpoint's UDP socket, when not the machine's (a simulated
    /// network in tests; TCP is then off).
    pub udp: Option<crate::transport::UdpSocketFactory>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            tcp_listen: TcpListen::Same,
            token: None,
            node: "quiver".into(),
            limits: TransportLimits::default(),
            max_frame: DEFAULT_MAX_FRAME,
            compression: true,
            stream: StreamLimits::default(),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 1024,
            rate: Default::default(),
            client_ca: None,
            require_token: false,
            shutdown_grace: Duration::from_secs(10),
            udp: None,
        }
    }
}

/// A bound server.
pub struct Server {
    endpoint: quinn::Endpoint,
    tcp: Option<(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)>,
    ctx: Arc<Ctx>,
}

struct Ctx {
    handle: StoreHandle,
    opts: ServerOptions,
    shutdown: CancellationToken,
    active: std::sync::atomic::AtomicUsize,
    limiters: crate::limits::Limiters,
    /// Connections past the handshake, by quinn's stable connection id.
    live: Mutex<HashMap<usize, LiveConn>>,
}

/// A connection being served, as `quiver status --server` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ConnectionInfo {
    pub remote: String,
    pub node: String,
    pub site: String,
    pub read_only: bool,
    /// `quic`, or `tcp` (TLS over TCP, where the client's UDP is blocked).
    #[serde(default)]
    pub transport: Transport,
    /// SHA-256 of the client's certificate, when it presented one.
    pub client_cert: Option<String>,
    /// Shards synced (or syncing) on this connection.
    pub shards: Vec<String>,
    /// Whether the peer subscribed to live change notifications.
    pub live: bool,
    /// When the handshake passed, in Unix milliseconds.
    pub since_ms: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub rtt_ms: f64,
}

struct LiveConn {
    conn: ServerConn,
    info: ConnectionInfo,
}

impl Ctx {
    fn with_live(&self, id: usize, f: impl FnOnce(&mut ConnectionInfo)) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = live.get_mut(&id) {
            f(&mut c.info);
        }
    }

    fn connections(&self) -> Vec<ConnectionInfo> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<ConnectionInfo> = live
            .values()
            .map(|c| {
                let stats = c.conn.stats();
                ConnectionInfo {
                    bytes_sent: stats.tx,
                    bytes_received: stats.rx,
                    rtt_ms: stats.rtt.as_secs_f64() * 1000.0,
                    ..c.info.clone()
                }
            })
            .collect();
        out.sort_by(|a, b| (a.since_ms, &a.remote).cmp(&(b.since_ms, &b.remote)));
        out
    }
}

/// Keeps a connection listed for as long as it is served.
struct Listed<'a>(&'a Ctx, usize);

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        let mut live = self.0.live.lock().unwrap_or_else(|e| e.into_inner());
        live.remove(&self.1);
    }
}

impl Ctx {
    /// Runs a read on one of the store's read-only connections (on a
    /// blocking thread), so a handshake never waits behind an apply.
    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&quiver_store::Store) -> quiver_store::Result<R> + Send + 'static,
    ) -> Result<R> {
        self.handle.readers().read(f).await
    }
}

/// Counts a connection as active for as long as it lives.
struct ActiveGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        let now = self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) - 1;
        metrics::gauge!("quiver_connections_active").set(now as f64);
    }
}

/// Codes a connection is closed with.
pub(crate) const CLOSE_REFUSED: u32 = 1;
pub(crate) const CLOSE_SHUTDOWN: u32 = 2;

impl Server {
    /// Binds the endpoint (inside a tokio runtime).
    pub fn bind(handle: StoreHandle, id: &Identity, opts: ServerOptions) -> Result<Server> {
        let ca = opts.client_ca.as_deref();
        let server_endpoint = |at, id, ca, limits: &TransportLimits| {
            crate::transport::server_endpoint_on(at, id, ca, limits, opts.udp.as_ref())
        };
        let tcp_listen = match opts.udp {
            Some(_) => TcpListen::Off,
            None => opts.tcp_listen,
        };
        let (endpoint, tcp) = match tcp_listen {
            TcpListen::Off => (server_endpoint(opts.listen, id, ca, &opts.limits)?, None),
            TcpListen::At(at) => (
                server_endpoint(opts.listen, id, ca, &opts.limits)?,
                Some(bind_tcp(at)?),
            ),
            // An ephemeral port is taken where both UDP and TCP have it free.
            TcpListen::Same if opts.listen.port() == 0 => {
                let mut tries = 0;
                loop {
                    let ep = server_endpoint(opts.listen, id, ca, &opts.limits)?;
                    match bind_tcp(ep.local_addr()?) {
                        Ok(l) => break (ep, Some(l)),
                        Err(e) if tries >= 20 => return Err(e),
                        Err(_) => tries += 1,
                    }
                }
            }
            TcpListen::Same => {
                let ep = server_endpoint(opts.listen, id, ca, &opts.limits)?;
                (ep, Some(bind_tcp(opts.listen)?))
            }
        };
        let tcp = match tcp {
            Some(l) => Some((l, crate::tcp::acceptor(id, ca)?)),
            None => None,
        };
        let rate = opts.rate;
        Ok(Server {
            endpoint,
            tcp,
            ctx: Arc::new(Ctx {
                handle,
                opts,
                shutdown: CancellationToken::new(),
                active: std::sync::atomic::AtomicUsize::new(0),
                limiters: crate::limits::Limiters::new(rate),
                live: Mutex::default(),
            }),
        })
    }

    /// Connections being served now.
    pub fn active_connections(&self) -> Arc<impl Fn() -> usize + Send + Sync> {
        let ctx = self.ctx.clone();
        Arc::new(move || ctx.active.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// The connections being served now, with their traffic so far.
    pub fn connections(&self) -> Arc<dyn Fn() -> Vec<ConnectionInfo> + Send + Sync> {
        let ctx = self.ctx.clone();
        Arc::new(move || ctx.connections())
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Where TLS over TCP is taken, unless off.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Cancelling it stops the server.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.ctx.shutdown.clone()
    }

    /// Serves until the shutdown token is cancelled.
    pub async fn run(mut self) -> Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        // A connection takes a permit as it is accepted and holds it for its
        // life; one accepted without a permit is told to retry.
        let permits = Arc::new(tokio::sync::Semaphore::new(self.ctx.opts.max_connections));
        loop {
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => break,
                // Finished connections leave the set as they end.
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => {
                        let ctx = self.ctx.clone();
                        let remote = incoming.remote_address();
                        let permit = permits.clone().try_acquire_owned().ok();
                        let mutual = ctx.opts.client_ca.is_some();
                        let accept = async move {
                            let conn = match incoming.accept()?.into_0rtt() {
                                Ok((conn, _)) => conn,
                                Err(connecting) => connecting.await?,
                            };
                            // The TLS handshake ends as the first stream
                            // comes (or fails).
                            let conn = ServerConn::Quic(conn);
                            Ok::<_, SyncError>(conn)
                        };
                        tasks.spawn(async move {
                            let quic = Transport::Quic;
                            if let Err(e) = serve_connection(accept, quic, ctx, permit, mutual).await {
                                debug!(%remote, "connection ended: {e}");
                            }
                        }.instrument(tracing::info_span!("conn", %remote)));
                    }
                    None => break,
                },
                accepted = accept_tcp(&self.tcp) => match accepted {
                    Ok((tcp, remote)) => {
                        let ctx = self.ctx.clone();
                        let permit = permits.clone().try_acquire_owned().ok();
                        let tls = self.tcp.as_ref().map(|(_, a)| a.clone());
                        let (limits, timeout) = (ctx.opts.limits.clone(), ctx.opts.handshake_timeout);
                        let mutual = ctx.opts.client_ca.is_some();
                        let accept = async move {
                            let tls = tls.ok_or_else(|| SyncError::Tls("no TLS acceptor".into()))?;
                            tokio::time::timeout(timeout, crate::tcp::accept(tcp, remote, tls, limits))
                                .await
                                .map_err(|_| SyncError::Timeout("waiting for the TLS handshake over TCP".into()))?
                                .inspect_err(|e| tcp_tls_failure(e, mutual))
                        };
                        tasks.spawn(async move {
                            let tcp = Transport::Tcp;
                            if let Err(e) = serve_connection(accept, tcp, ctx, permit, mutual).await {
                                debug!(%remote, "TCP connection ended: {e}");
                            }
                        }.instrument(tracing::info_span!("conn", %remote, transport = "tcp")));
                    }
                    Err(e) => {
                        // Out of file descriptors, say: the connection stays
                        // in the backlog, so wait a moment rather than spin.
                        warn!("accepting a TCP connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        // No more TCP connections are taken.
        drop(self.tcp.take());
        // Shutdown: the tripwire is tripped. Each connection stops taking
        // streams and waits for its exchanges in flight, which commit their
        // batches and report; meanwhile new connections are refused. Past
        // the grace, whatever is left is closed.
        let deadline = tokio::time::Instant::now() + self.ctx.opts.shutdown_grace;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                joined = tasks.join_next() => if joined.is_none() { break },
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => incoming.refuse(),
                    None => break,
                },
            }
        }
        tasks.abort_all();
        self.endpoint
            .close(CLOSE_SHUTDOWN.into(), b"server shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        Ok(())
    }
}

/// Binds a TCP listener (inside a tokio runtime).
fn bind_tcp(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let listen_err = |e: std::io::Error| SyncError::Listen {
        addr: format!("{addr} (TCP)"),
        reason: match e.kind() {
            std::io::ErrorKind::AddrInUse => "the address is already in use on TCP (pick another \
                 with --tcp-listen, or `off` for QUIC only)"
                .into(),
            _ => e.to_string(),
        },
    };
    let l = std::net::TcpListener::bind(addr).map_err(listen_err)?;
    l.set_nonblocking(true).map_err(listen_err)?;
    tokio::net::TcpListener::from_std(l).map_err(listen_err)
}

/// The next TCP connection, or never when TCP is off.
async fn accept_tcp(
    tcp: &Option<(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match tcp {
        Some((l, _)) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Counts a failed TLS handshake over TCP, as [`tls_failure`] does for QUIC.
fn tcp_tls_failure(e: &SyncError, mutual: bool) {
    if let SyncError::Tls(reason) = e {
        if mutual {
            warn!("{reason}");
        } else {
            debug!("{reason}");
        }
        metrics::counter!("quiver_refusals_total", "code" => "Tls").increment(1);
    }
}

async fn refuse(
    writer: &mut FrameWriter,
    conn: &ServerConn,
    code: ErrorCode,
    message: String,
) -> SyncError {
    refuse_after(writer, conn, code, message, None).await
}

async fn refuse_after(
    writer: &mut FrameWriter,
    conn: &ServerConn,
    code: ErrorCode,
    message: String,
    retry_after_ms: Option<u64>,
) -> SyncError {
    warn!("refusing connection: {message}");
    metrics::counter!("quiver_refusals_total", "code" => format!("{code:?}")).increment(1);
    if code == ErrorCode::RateLimited {
        metrics::counter!("quiver_rate_limited_total").increment(1);
    }
    let _ = writer
        .send(&Message::Refused(ErrorMsg {
            code,
            message: message.clone(),
            retry_after_ms,
        }))
        .await;
    let _ = writer.finish();
    // Give the refusal time to arrive before closing.
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(CLOSE_REFUSED, b"refused");
    SyncError::Refused { code, message }
}

/// Counts a failed TLS handshake, and under mutual TLS (where it is
/// usually a client certificate missing or refused) logs it as a warning.
fn tls_failure(e: &quinn::ConnectionError, mutual: bool) {
    if let quinn::ConnectionError::TransportError(t) = e {
        if u64::from(t.code) & !0xff == 0x100 {
            if mutual {
                warn!("TLS handshake failed: {}", t.reason);
            } else {
                debug!("TLS handshake failed: {}", t.reason);
            }
            metrics::counter!("quiver_refusals_total", "code" => "Tls").increment(1);
        }
    }
}

/// Serves a connection once `accept` has taken it through its transport's
/// handshake.
async fn serve_connection(
    accept: impl std::future::Future<Output = Result<ServerConn>>,
    transport: Transport,
    ctx: Arc<Ctx>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    mutual: bool,
) -> Result<()> {
    let active = ctx.active.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    metrics::counter!("quiver_connections_total", "transport" => transport.as_str()).increment(1);
    metrics::gauge!("quiver_connections_active").set(active as f64);
    let _active = ActiveGuard(&ctx.active);
    let conn = accept.await?;
    let (send, recv) = tokio::time::timeout(ctx.opts.handshake_timeout, conn.accept_bi())
        .await
        .map_err(|_| SyncError::Timeout("waiting for the handshake".into()))?
        .inspect_err(|e| {
            if let ServerConn::Quic(c) = &conn {
                if let Some(e) = c.close_reason() {
                    tls_failure(&e, mutual)
                }
            }
            debug!("no handshake stream: {e}");
        })?;
    let mut reader = FrameReader::new(recv, HANDSHAKE_MAX_FRAME, false);
    let mut writer = FrameWriter::new(send, false);
    let hello = match tokio::time::timeout(ctx.opts.handshake_timeout, reader.next()).await {
        Ok(Ok(Some(Message::Hello(h)))) => h,
        Ok(Ok(Some(other))) => {
            return Err(refuse(
                &mut writer,
                &conn,
                ErrorCode::Protocol,
                format!("expected hello, got {}", other.kind().1),
            )
            .await)
        }
        Ok(Ok(None)) => return Err(SyncError::Protocol("client closed before hello".into())),
        Ok(Err(e)) => {
            return Err(refuse(
                &mut writer,
                &conn,
                ErrorCode::Protocol,
                format!("bad hello: {e}"),
            )
            .await)
        }
        Err(_) => {
            return Err(refuse(
                &mut writer,
                &conn,
                ErrorCode::Protocol,
                "no hello in time".into(),
            )
            .await)
        }
    };
    if hello.protocol != PROTOCOL_VERSION {
        let m = format!(
            "protocol version {} is not supported: this server speaks version {PROTOCOL_VERSION}",
            hello.protocol
        );
        return Err(refuse(&mut writer, &conn, ErrorCode::Protocol, m).await);
    }
    // Accepted without a permit: over the connection limit.
    if permit.is_none() {
        let m = format!(
            "the server is at its connection limit ({}); retry in a second",
            ctx.opts.max_connections
        );
        return Err(refuse_after(&mut writer, &conn, ErrorCode::RateLimited, m, Some(1000)).await);
    }
    let tokens = ctx.read(|s| s.tokens()).await?;
    if ctx.opts.require_token && ctx.opts.token.is_none() && tokens.is_empty() {
        let m = "this server takes only clients with a token, and it has none now (the last \
                 one was revoked); its operator can make one with `quiver token create`";
        return Err(refuse(&mut writer, &conn, ErrorCode::Unauthorized, m.into()).await);
    }
    let access = match authorize(hello.token.as_deref(), ctx.opts.token.as_deref(), &tokens) {
        Ok(a) => a,
        Err(m) => return Err(refuse(&mut writer, &conn, ErrorCode::Unauthorized, m.into()).await),
    };
    let max_frame = hello
        .max_frame
        .min(ctx.opts.max_frame)
        .clamp(HANDSHAKE_MAX_FRAME as u32, MAX_FRAME_LIMIT as u32) as usize;
    let compression = hello.compression && ctx.opts.compression;
    let shards = match ctx.read(|s| Ok(shard_infos(s))).await.and_then(|r| r) {
        Ok(s) => s,
        // Said to the client, not just dropped: it would only see a
        // closed connection.
        Err(e) => {
            warn!("handshake: reading the store's shards failed: {e}");
            let m = format!("the server could not read its store: {e}");
            return Err(refuse(&mut writer, &conn, ErrorCode::Internal, m).await);
        }
    };
    // Shards outside the token's scope are not even listed.
    let shards: Vec<ShardInfo> = shards
        .into_iter()
        .filter(|s| access.allows(&s.name))
        .collect();
    writer
        .send(&Message::Welcome(Welcome {
            protocol: PROTOCOL_VERSION,
            site: ctx.handle.site_id(),
            node: ctx.opts.node.clone(),
            shards,
            max_frame: max_frame as u32,
            compression,
            read_only: access.read_only,
        }))
        .await?;
    let id = conn.stable_id();
    let since_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    ctx.live.lock().unwrap_or_else(|e| e.into_inner()).insert(
        id,
        LiveConn {
            conn: conn.clone(),
            info: ConnectionInfo {
                remote: conn.remote_address().to_string(),
                node: hello.node.clone(),
                site: hello.site.to_hex(),
                read_only: access.read_only,
                transport,
                client_cert: conn.client_cert(),
                shards: Vec::new(),
                live: false,
                since_ms,
                bytes_sent: 0,
                bytes_received: 0,
                rtt_ms: 0.0,
            },
        },
    );
    let _listed = Listed(&ctx, id);
    info!(node = %hello.node, site = %hello.site, read_only = access.read_only, %transport, "peer connected");
    let ip = conn.remote_address().ip();
    let limiters = ctx.limiters.clone();
    let peer = Peer {
        name: hello.node.clone(),
        site: hello.site,
        may_push: !access.read_only,
        scope: access.shards.clone(),
        bytes_limit: Some(Arc::new(move |n| limiters.bytes(ip, n))),
    };
    // The handshake stream stays open for pings, as long as the connection
    // is served (the set aborts it when dropped).
    let mut control = tokio::task::JoinSet::new();
    control.spawn(
        async move {
            while let Ok(Some(Message::Ping(n))) = reader.next().await {
                if writer.send(&Message::Pong(n)).await.is_err() {
                    break;
                }
            }
        }
        .in_current_span(),
    );
    // Every stream's task belongs to the connection (and runs in its span):
    // at shutdown the connection waits for them, so an exchange in flight
    // commits or rolls back its batch before the connection closes.
    let mut streams = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => {
                let _ = tokio::time::timeout(ctx.opts.shutdown_grace, async {
                    while streams.join_next().await.is_some() {}
                })
                .await;
                control.abort_all();
                conn.close(CLOSE_SHUTDOWN, b"server shutting down");
                return Ok(());
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            stream = conn.accept_bi() => {
                let (send, recv) = stream?;
                let ctx = ctx.clone();
                let peer = peer.clone();
                streams.spawn(async move {
                    let reader = FrameReader::new(recv, max_frame, compression);
                    let mut writer = FrameWriter::new(send, compression);
                    if let Err(ms) = ctx.limiters.request(ip) {
                        metrics::counter!("quiver_rate_limited_total").increment(1);
                        let _ = writer
                            .send(&Message::Error(ErrorMsg {
                                code: ErrorCode::RateLimited,
                                message: format!("rate limit on requests per minute reached; retry in {ms} ms"),
                                retry_after_ms: Some(ms),
                            }))
                            .await;
                        let _ = writer.finish();
                        return;
                    }
                    match serve_stream(ctx, id, peer, reader, writer, max_frame).await {
                        Ok(Some(r)) => info!(
                            shard = %r.shard,
                            sent = r.changes_sent,
                            received = r.changes_received,
                            "shard synced"
                        ),
                        Ok(None) => debug!("live stream ended"),
                        Err(e) => warn!("stream failed: {e}"),
                    }
                }.in_current_span());
            }
        }
    }
}

/// A stream opens with a sync request (one shard's exchange) or a
/// subscription (live notifications).
async fn serve_stream(
    ctx: Arc<Ctx>,
    conn_id: usize,
    peer: Peer,
    mut reader: FrameReader,
    mut writer: FrameWriter,
    max_frame: usize,
) -> Result<Option<crate::ShardResult>> {
    match reader.expect("a sync request").await? {
        Message::Subscribe(_) => {
            ctx.with_live(conn_id, |c| c.live = true);
            notify_changes(&ctx, &mut reader, &mut writer).await;
            ctx.with_live(conn_id, |c| c.live = false);
            Ok(None)
        }
        Message::CloneRequest(_) => {
            serve_clone(&ctx, &peer, writer, max_frame).await?;
            Ok(None)
        }
        first => serve_shard(ctx, conn_id, peer, first, reader, writer)
            .await
            .map(Some),
    }
}

/// Bytes of the store copy per frame, at most (and below the connection's
/// frame limit, with room for the frame's own fields).
pub(crate) const CLONE_CHUNK: usize = 1 << 20;

/// One clone at a time per process: each one makes a whole copy.
static CLONING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Clears [`CLONING`] and removes the copy's folder however the clone ends
/// (an error, the client going away, shutdown).
struct CloneGuard(std::path::PathBuf);

impl Drop for CloneGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        CLONING.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Sends a consistent copy of the whole store (`quiver clone`), made from
/// one read snapshot on a read-only connection once other connections'
/// writes are sealed, without the store's secrets (tokens, peers), in
/// order, with the whole file's length and CRC32C on the last piece. Only
/// a read-write peer that may see every shard gets it.
async fn serve_clone(
    ctx: &Ctx,
    peer: &Peer,
    mut writer: FrameWriter,
    max_frame: usize,
) -> Result<()> {
    let refuse = |code, message: &str, retry_after_ms| {
        Message::Error(ErrorMsg {
            code,
            message: message.into(),
            retry_after_ms,
        })
    };
    if peer.scope.is_some() || !peer.may_push {
        let m = refuse(
            ErrorCode::Forbidden,
            "a clone copies the whole store, so it takes a read-write token for every shard; this \
             token is scoped to some shards or read-only: use `quiver sync` for the shards it may see",
            None,
        );
        writer.send(&m).await?;
        let _ = writer.finish();
        return Ok(());
    }
    if CLONING.swap(true, std::sync::atomic::Ordering::SeqCst) {
        let m = refuse(
            ErrorCode::RateLimited,
            "another clone is being sent; retry shortly",
            Some(2000),
        );
        writer.send(&m).await?;
        let _ = writer.finish();
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("quiver-clone-{:016x}", rand::random::<u64>()));
    let _guard = CloneGuard(dir.clone());
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    }
    let path = dir.join("copy.db");
    let sent = async {
        // Writes by other connections in the open version are sealed
        // first; one that lands between the seal and the snapshot makes
        // the copy unusable, and it is taken again.
        let mut ready = false;
        for _ in 0..5 {
            ctx.handle.request(|reply| Request::Seal { reply }).await?;
            let p = path.clone();
            ctx.read(move |s| s.backup_into(&p)).await?;
            let p = path.clone();
            ready = tokio::task::spawn_blocking(move || quiver_store::Store::prepare_copy(&p))
                .await
                .map_err(|e| SyncError::Protocol(format!("preparing the copy: {e}")))??;
            if ready {
                break;
            }
            std::fs::remove_file(&path)?;
        }
        if !ready {
            return Err(SyncError::Protocol(
                "the store is written too fast to take a sealed copy; retry the clone".into(),
            ));
        }
        // Reads of at most 1 MiB from a file just written come from the
        // page cache: short enough for an async task.
        let mut file = std::fs::File::open(&path)?;
        let (mut offset, mut crc) = (0u64, 0u32);
        let mut buf = vec![0u8; CLONE_CHUNK.min(max_frame.saturating_sub(1024)).max(4096)];
        // Pages of vectors do not compress; trying costs more than it saves.
        writer.compression = false;
        loop {
            use std::io::Read;
            let n = file.read(&mut buf)?;
            let data = buf[..n].to_vec();
            crc = quiver_core::frame::crc32c_append(crc, &data);
            let end = (n == 0).then_some((offset, crc));
            writer
                .send(&Message::CloneChunk(quiver_core::wire::CloneChunk {
                    offset,
                    data,
                    end,
                }))
                .await?;
            offset += n as u64;
            if n == 0 {
                break;
            }
        }
        info!(bytes = offset, node = %peer.name, "store copy sent for a clone");
        Ok::<_, SyncError>(())
    }
    .await;
    if let Err(e) = &sent {
        let _ = writer
            .send(&Message::Error(ErrorMsg {
                code: ErrorCode::Internal,
                message: format!("copying the store failed: {e}"),
                retry_after_ms: None,
            }))
            .await;
    }
    let _ = writer.finish();
    sent
}

/// Tells a live peer each time this store gains changes, until the peer
/// goes away or the server shuts down.
async fn notify_changes(ctx: &Ctx, reader: &mut FrameReader, writer: &mut FrameWriter) {
    let mut changes = ctx.handle.subscribe_changes();
    changes.borrow_and_update();
    // One notification at once: a change made after the subscriber's
    // first round but before this subscription was taken moved the counter
    // unseen, and would otherwise wait for the next change (or the link's
    // 30 s safety net). The round this asks for catches it.
    if writer.send(&Message::Notify(Vec::new())).await.is_err() {
        let _ = writer.finish();
        return;
    }
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            // The peer closing its side ends the subscription.
            end = reader.next() => if !matches!(end, Ok(Some(_))) { break },
            moved = changes.changed() => {
                if moved.is_err() || writer.send(&Message::Notify(Vec::new())).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = writer.finish();
}

async fn serve_shard(
    ctx: Arc<Ctx>,
    conn_id: usize,
    peer: Peer,
    first: Message,
    reader: FrameReader,
    writer: FrameWriter,
) -> Result<crate::ShardResult> {
    let mut session = ServerSession::new(ServerConfig {
        may_push: peer.may_push,
        scope: peer.scope.clone(),
    });
    session.handle(Input::Received(first));
    if let Some(shard) = session.shard() {
        ctx.with_live(conn_id, |c| {
            if !c.shards.iter().any(|s| s == shard) {
                c.shards.push(shard.to_string());
            }
        });
    }
    let pump = Pump {
        handle: &ctx.handle,
        peer,
        limits: ctx.opts.stream,
        progress: None,
    };
    let r = exchange(session, pump, reader, writer).await;
    // The served side counts its exchanges too, so that `quiver status` on
    // a daemon's store agrees with its `quiver_syncs_total`.
    let (sent, received, error) = match &r {
        Ok(s) => (s.changes_sent, s.changes_received, None),
        Err(e) => (0, 0, Some(e.to_string())),
    };
    if let Err(e @ SyncError::Store(_)) = ctx.handle.record_syncs(1, sent, received, error).await {
        tracing::warn!("recording a served sync: {e}");
    }
    r
}
