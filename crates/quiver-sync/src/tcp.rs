//! The TCP transport: TLS 1.3 (tokio-rustls, the same certificates,
//! pinning and client CA as QUIC) with ALPN `h2`, and HTTP/2 (the `h2`
//! crate) carrying one protocol stream per HTTP/2 stream. Windows and the
//! stream limit follow the QUIC transport's; keep-alive pings measure the
//! round trip and notice a peer gone silent within the idle timeout.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::streams::{h2_error, Conn, H2Recv, RecvHalf, SendHalf, ServerConn, TcpConn};
use crate::streams::{TcpServerConn, TcpShared};
use crate::tls::{self, Identity, SeenFingerprint, Trust};
use crate::transport::TransportLimits;
use crate::{Result, SyncError};

/// The ALPN protocol of the TCP transport.
pub const ALPN_H2: &[u8] = b"h2";
/// The path each protocol stream is opened on.
pub(crate) const STREAM_URI: &str = "https://quiver/stream";
/// A stream's receive window (as QUIC's).
const STREAM_WINDOW: u32 = 8 << 20;
/// The connection's receive window (as QUIC's).
const CONN_WINDOW: u32 = 32 << 20;
/// The largest HTTP/2 frame the peer may send us.
const MAX_H2_FRAME: u32 = 256 << 10;
/// Headers of a stream, at most (ours are a few dozen bytes; h2's default
/// would take 16 MiB per request before the token is checked).
const MAX_HEADERS: u32 = 8 << 10;

/// A socket that counts its traffic.
struct Counted<T> {
    io: T,
    shared: Arc<TcpShared>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let n = (buf.filled().len() - before) as u64;
            self.shared.rx.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.shared.tx.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.shared.tx.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The TLS alert in an I/O error from rustls, as its number (RFC 8446).
/// HTTP/2 keeps only the text of the errors it passes on, so the alert is
/// also found by its name there.
pub(crate) fn tls_alert(e: &io::Error) -> Option<u8> {
    if let Some(rustls::Error::AlertReceived(a)) =
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
    {
        return Some(u8::from(*a));
    }
    let text = e.to_string();
    let name = text.strip_prefix("received fatal alert: ")?;
    (0..=u8::MAX).find(|n| format!("{:?}", rustls::AlertDescription::from(*n)) == name)
}

/// Keeps the TLS alert that ended a connection, if one did: in TLS 1.3 a
/// server refusing a client certificate says so after the client's side of
/// the handshake is done, on the first read.
fn keep_alert(shared: &TcpShared, e: &h2::Error) {
    if let Some(a) = e.get_io().and_then(tls_alert) {
        if let Ok(mut slot) = shared.alert.lock() {
            slot.get_or_insert(a);
        }
    }
}

/// Pings the peer every keep-alive interval, keeping the round trip; ends
/// when nothing at all has arrived for the idle timeout (the peer is
/// gone). Bytes arriving count as life, as on QUIC: a pong may queue
/// behind a large transfer on a slow link.
async fn keep_alive(pp: Option<h2::PingPong>, limits: TransportLimits, shared: Arc<TcpShared>) {
    let Some(mut pp) = pp else {
        return std::future::pending().await;
    };
    let mut seen = shared.rx.load(Ordering::Relaxed);
    let mut heard = Instant::now();
    loop {
        let started = Instant::now();
        // One ping in flight at a time (HTTP/2's rule here): the same
        // future is polled until its pong comes.
        let ping = pp.ping(h2::Ping::opaque());
        tokio::pin!(ping);
        loop {
            tokio::select! {
                pong = &mut ping => {
                    if pong.is_err() {
                        // The connection failed; its driver ends.
                        return std::future::pending().await;
                    }
                    let us = started.elapsed().as_micros() as u64;
                    shared.rtt_us.store(us.max(1), Ordering::Relaxed);
                    heard = Instant::now();
                    break;
                }
                _ = tokio::time::sleep(limits.keep_alive) => {
                    let rx = shared.rx.load(Ordering::Relaxed);
                    if rx != seen {
                        seen = rx;
                        heard = Instant::now();
                    }
                    if heard.elapsed() >= limits.idle_timeout {
                        tracing::warn!(
                            "nothing heard from the peer for {:?}; closing the TCP connection",
                            limits.idle_timeout
                        );
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(limits.keep_alive).await;
    }
}

/// A TLS client configuration for TCP: the QUIC one's trust and client
/// certificate, ALPN `h2`, no early data.
pub(crate) fn connector(
    trust: &Trust,
    client: Option<&Identity>,
) -> Result<(tokio_rustls::TlsConnector, SeenFingerprint)> {
    let (mut cfg, seen) = tls::client_crypto(trust, client)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_early_data = false;
    Ok((tokio_rustls::TlsConnector::from(Arc::new(cfg)), seen))
}

/// A TLS server configuration for TCP: the QUIC one's certificate and
/// client CA, ALPN `h2`, no early data.
pub(crate) fn acceptor(
    id: &Identity,
    client_ca: Option<&std::path::Path>,
) -> Result<tokio_rustls::TlsAcceptor> {
    let mut cfg = tls::server_crypto(id, client_ca)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.max_early_data_size = 0;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Why a TCP-level step failed, as the client error to return.
pub(crate) enum TcpFailure {
    /// The TCP connection itself (refused, unreachable, no answer).
    Connect(SyncError),
    /// The TLS handshake, with the I/O error's text.
    Tls(String),
}

/// Opens a TCP connection, TLS and HTTP/2 to `sock`.
pub(crate) async fn connect(
    sock: SocketAddr,
    server_name: &str,
    addr: &str,
    tls: &tokio_rustls::TlsConnector,
    limits: &TransportLimits,
    timeout: std::time::Duration,
) -> std::result::Result<Conn, TcpFailure> {
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(sock)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(TcpFailure::Connect(SyncError::NoTcpListener {
                addr: addr.to_string(),
            }))
        }
        Ok(Err(e)) => {
            return Err(TcpFailure::Connect(SyncError::Connect {
                addr: addr.to_string(),
                reason: format!("over TCP: {e}"),
            }))
        }
        Err(_) => {
            return Err(TcpFailure::Connect(SyncError::Connect {
                addr: addr.to_string(),
                reason: format!("over TCP: no answer within {} ms", timeout.as_millis()),
            }))
        }
    };
    let _ = tcp.set_nodelay(true);
    let shared = Arc::new(TcpShared::default());
    let io = Counted {
        io: tcp,
        shared: shared.clone(),
    };
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| TcpFailure::Tls(format!("bad server name {server_name:?}: {e}")))?;
    let tls_stream = match tokio::time::timeout(timeout, tls.connect(name, io)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(TcpFailure::Tls(e.to_string())),
        Err(_) => return Err(TcpFailure::Tls("the TLS handshake timed out".into())),
    };
    if tls_stream.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
        return Err(TcpFailure::Connect(SyncError::Protocol(format!(
            "the server at {addr} does not speak quiverdb over TCP (no ALPN h2)"
        ))));
    }
    let (send, mut connection) = h2::client::Builder::new()
        .max_header_list_size(MAX_HEADERS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_H2_FRAME)
        .enable_push(false)
        .handshake::<_, Bytes>(tls_stream)
        .await
        .map_err(|e| TcpFailure::Connect(h2_error(e)))?;
    let close = CancellationToken::new();
    let pp = connection.ping_pong();
    let (l, sh, cl) = (limits.clone(), shared.clone(), close.clone());
    tokio::spawn(async move {
        tokio::select! {
            r = &mut connection => if let Err(e) = r {
                keep_alert(&sh, &e);
                tracing::debug!("TCP connection ended: {e}");
            },
            _ = keep_alive(pp, l, sh.clone()) => {}
            _ = cl.cancelled() => {}
        }
        sh.closed.store(true, Ordering::SeqCst);
        sh.ended.cancel();
    });
    Ok(Conn::Tcp(Arc::new(TcpConn {
        send,
        shared,
        close,
    })))
}

/// Connection ids of TCP connections, counting down from the top so they
/// never meet quinn's.
static NEXT_ID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(usize::MAX);

/// Takes a TCP connection through TLS and the HTTP/2 handshake; its
/// streams are then taken with [`ServerConn::accept_bi`].
pub(crate) async fn accept(
    tcp: TcpStream,
    remote: SocketAddr,
    tls: tokio_rustls::TlsAcceptor,
    limits: TransportLimits,
) -> Result<ServerConn> {
    let _ = tcp.set_nodelay(true);
    let shared = Arc::new(TcpShared::default());
    let io = Counted {
        io: tcp,
        shared: shared.clone(),
    };
    let tls_stream = match tls.accept(io).into_fallible().await {
        Ok(s) => s,
        Err((e, mut io)) => {
            // The alert (a refused client certificate, say) is sent; the
            // socket is then shut for writing and drained a moment, so the
            // client reads the alert rather than a reset that would
            // discard it.
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = io.shutdown().await;
            let drain = async {
                let mut buf = [0u8; 4096];
                while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
            // A TLS failure, or a client gone before the handshake ended
            // (a lost race of `auto`, a port probe): only the first counts
            // as a refusal.
            let tls = e.kind() == io::ErrorKind::InvalidData
                || e.get_ref().is_some_and(|i| i.is::<rustls::Error>());
            return Err(match tls {
                true => SyncError::Tls(format!("TLS handshake over TCP failed: {e}")),
                false => {
                    SyncError::Connection(format!("the client left during the TLS handshake: {e}"))
                }
            });
        }
    };
    let client_cert = tls_stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| tls::fingerprint(c));
    let mut conn = h2::server::Builder::new()
        .max_header_list_size(MAX_HEADERS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_H2_FRAME)
        .max_concurrent_streams(limits.max_streams)
        .handshake::<_, Bytes>(tls_stream)
        .await
        .map_err(h2_error)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let close = CancellationToken::new();
    let pp = conn.ping_pong();
    let (sh, cl) = (shared.clone(), close.clone());
    tokio::spawn(async move {
        let ka = keep_alive(pp, limits, sh.clone());
        tokio::pin!(ka);
        loop {
            tokio::select! {
                _ = cl.cancelled() => {
                    conn.graceful_shutdown();
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        std::future::poll_fn(|cx| conn.poll_closed(cx)),
                    )
                    .await;
                    break;
                }
                _ = &mut ka => break,
                // The handler is gone and takes no more streams.
                _ = tx.closed() => break,
                next = conn.accept() => match next {
                    Some(Ok((req, mut respond))) => {
                        let body = req.into_body();
                        match respond.send_response(http::Response::new(()), false) {
                            Ok(send) => {
                                let _ = tx.send((SendHalf::H2(send), RecvHalf::H2(H2Recv::body(body))));
                            }
                            Err(e) => tracing::debug!("answering a stream failed: {e}"),
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!("TCP connection ended: {e}");
                        break;
                    }
                    None => break,
                },
            }
        }
        sh.closed.store(true, Ordering::SeqCst);
        sh.ended.cancel();
    });
    Ok(ServerConn::Tcp(Arc::new(TcpServerConn {
        streams: tokio::sync::Mutex::new(rx),
        remote,
        id: NEXT_ID.fetch_sub(1, Ordering::SeqCst),
        client_cert,
        shared,
        close,
    })))
}
