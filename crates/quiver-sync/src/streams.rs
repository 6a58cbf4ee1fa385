//! Streams and connections over either transport: QUIC, or — where UDP
//! does not get through — TLS 1.3 on TCP carrying HTTP/2, one HTTP/2
//! stream for each stream the protocol opens. The protocol above sees
//! bidirectional streams of frames and nothing else; this is the only
//! place that knows which transport carries them.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{Result, SyncError};

/// The transport that carries a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// QUIC over UDP (the default).
    #[default]
    Quic,
    /// TLS 1.3 over TCP, the protocol's streams as HTTP/2 streams.
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which transport a client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// QUIC first; TCP in parallel when QUIC has not answered within
    /// [`crate::client::FALLBACK_DELAY`], the first to complete wins.
    #[default]
    Auto,
    Quic,
    Tcp,
}

impl FromStr for TransportChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(TransportChoice::Auto),
            "quic" => Ok(TransportChoice::Quic),
            "tcp" => Ok(TransportChoice::Tcp),
            other => Err(format!(
                "unknown transport {other:?}: expected auto, quic or tcp"
            )),
        }
    }
}

impl fmt::Display for TransportChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransportChoice::Auto => "auto",
            TransportChoice::Quic => "quic",
            TransportChoice::Tcp => "tcp",
        })
    }
}

/// The sending half of a stream.
pub enum SendHalf {
    Quic(quinn::SendStream),
    H2(h2::SendStream<Bytes>),
}

impl From<quinn::SendStream> for SendHalf {
    fn from(s: quinn::SendStream) -> Self {
        SendHalf::Quic(s)
    }
}

impl SendHalf {
    /// Writes all of `data`, waiting for flow control as it must.
    pub async fn write_all(&mut self, data: Vec<u8>) -> Result<()> {
        match self {
            SendHalf::Quic(s) => Ok(s.write_all(&data).await?),
            SendHalf::H2(s) => {
                let mut data = Bytes::from(data);
                while !data.is_empty() {
                    s.reserve_capacity(data.len());
                    match std::future::poll_fn(|cx| s.poll_capacity(cx)).await {
                        Some(Ok(0)) => {}
                        Some(Ok(n)) => {
                            let chunk = data.split_to(n.min(data.len()));
                            s.send_data(chunk, false).map_err(h2_error)?;
                        }
                        Some(Err(e)) => return Err(h2_error(e)),
                        None => {
                            return Err(SyncError::Connection(
                                "stream ended: the peer stopped reading it".into(),
                            ))
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Ends the stream: the peer reads a clean end after what was sent.
    pub fn finish(&mut self) -> Result<()> {
        match self {
            SendHalf::Quic(s) => Ok(s.finish()?),
            SendHalf::H2(s) => s.send_data(Bytes::new(), true).map_err(h2_error),
        }
    }
}

/// The receiving half of a stream.
pub enum RecvHalf {
    Quic(quinn::RecvStream),
    H2(H2Recv),
}

impl From<quinn::RecvStream> for RecvHalf {
    fn from(s: quinn::RecvStream) -> Self {
        RecvHalf::Quic(s)
    }
}

/// An HTTP/2 stream's body as a byte stream. A client's starts with the
/// response still to come.
pub struct H2Recv {
    state: H2State,
    buf: Bytes,
}

enum H2State {
    Waiting(h2::client::ResponseFuture),
    Body(h2::RecvStream),
    Stopped,
}

impl H2Recv {
    fn response(r: h2::client::ResponseFuture) -> Self {
        H2Recv {
            state: H2State::Waiting(r),
            buf: Bytes::new(),
        }
    }

    pub(crate) fn body(b: h2::RecvStream) -> Self {
        H2Recv {
            state: H2State::Body(b),
            buf: Bytes::new(),
        }
    }

    /// The next piece of the body, or `None` at its end.
    async fn chunk(&mut self) -> Result<Option<Bytes>> {
        loop {
            match &mut self.state {
                H2State::Waiting(r) => {
                    let resp = r.await.map_err(h2_error)?;
                    if resp.status() != http::StatusCode::OK {
                        return Err(SyncError::Protocol(format!(
                            "the server answered a stream with HTTP status {}",
                            resp.status()
                        )));
                    }
                    self.state = H2State::Body(resp.into_body());
                }
                H2State::Body(b) => {
                    return match b.data().await {
                        Some(Ok(bytes)) => {
                            // Taken by the reader: the peer may send as much again.
                            let _ = b.flow_control().release_capacity(bytes.len());
                            Ok(Some(bytes))
                        }
                        Some(Err(e)) => Err(h2_error(e)),
                        None => Ok(None),
                    };
                }
                H2State::Stopped => {
                    return Err(SyncError::Connection("stream stopped by this side".into()))
                }
            }
        }
    }
}

impl RecvHalf {
    /// Fills `buf`; returns how many bytes it got, fewer than asked only
    /// when the stream ended.
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> Result<usize> {
        match self {
            RecvHalf::Quic(s) => match s.read_exact(buf).await {
                Ok(()) => Ok(buf.len()),
                Err(quinn::ReadExactError::FinishedEarly(n)) => Ok(n),
                Err(quinn::ReadExactError::ReadError(e)) => Err(e.into()),
            },
            RecvHalf::H2(h) => {
                let mut filled = 0;
                while filled < buf.len() {
                    if h.buf.is_empty() {
                        match h.chunk().await? {
                            Some(b) => h.buf = b,
                            None => return Ok(filled),
                        }
                        continue;
                    }
                    let n = h.buf.len().min(buf.len() - filled);
                    buf[filled..filled + n].copy_from_slice(&h.buf.split_to(n));
                    filled += n;
                }
                Ok(filled)
            }
        }
    }

    /// Stops reading, telling the peer (QUIC: with `code`; HTTP/2: the
    /// stream is dropped, which resets it).
    pub fn stop(&mut self, code: u32) {
        match self {
            RecvHalf::Quic(s) => {
                let _ = s.stop(code.into());
            }
            RecvHalf::H2(h) => h.state = H2State::Stopped,
        }
    }
}

/// An HTTP/2 error in words, as a lost connection (retrying may help).
pub(crate) fn h2_error(e: h2::Error) -> SyncError {
    if let Some(io) = e.get_io() {
        return SyncError::Connection(format!("the TCP connection failed: {io}"));
    }
    if e.is_go_away() {
        return SyncError::Connection(
            "closed by the peer (it is shutting down, or ended the connection)".into(),
        );
    }
    if e.is_reset() {
        return SyncError::Connection(format!(
            "stream ended: the peer reset it ({})",
            e.reason().map(|r| r.to_string()).unwrap_or_default()
        ));
    }
    SyncError::Connection(format!("HTTP/2: {e}"))
}

/// What a TCP connection's driver shares with its users: traffic, the
/// round trip its keep-alive pings measure, the TLS alert the peer sent
/// (if any), and whether it has ended.
#[derive(Default)]
pub(crate) struct TcpShared {
    pub rx: AtomicU64,
    pub tx: AtomicU64,
    pub rtt_us: AtomicU64,
    pub alert: Mutex<Option<u8>>,
    pub closed: AtomicBool,
    pub ended: CancellationToken,
}

/// A transport's round trip and bytes so far.
pub(crate) struct ConnStats {
    pub rtt: Duration,
    pub tx: u64,
    pub rx: u64,
}

impl TcpShared {
    fn stats(&self) -> ConnStats {
        ConnStats {
            rtt: Duration::from_micros(self.rtt_us.load(Ordering::Relaxed)),
            tx: self.tx.load(Ordering::Relaxed),
            rx: self.rx.load(Ordering::Relaxed),
        }
    }
}

/// A client's connection.
#[derive(Clone)]
pub(crate) enum Conn {
    Quic(quinn::Connection),
    Tcp(Arc<TcpConn>),
}

pub(crate) struct TcpConn {
    pub send: h2::client::SendRequest<Bytes>,
    pub shared: Arc<TcpShared>,
    pub close: CancellationToken,
}

/// The last user gone, the connection ends (an attempt that lost the race
/// of `auto`, or a dropped client).
impl Drop for TcpConn {
    fn drop(&mut self) {
        self.close.cancel();
    }
}

impl Conn {
    pub fn transport(&self) -> Transport {
        match self {
            Conn::Quic(_) => Transport::Quic,
            Conn::Tcp(_) => Transport::Tcp,
        }
    }

    pub async fn open_bi(&self) -> Result<(SendHalf, RecvHalf)> {
        match self {
            Conn::Quic(c) => {
                let (s, r) = c.open_bi().await?;
                Ok((SendHalf::Quic(s), RecvHalf::Quic(r)))
            }
            Conn::Tcp(t) => {
                // A connection the server has sent GOAWAY on (or that
                // failed) is not reused.
                let gone = |e: h2::Error| {
                    t.shared.closed.store(true, Ordering::SeqCst);
                    h2_error(e)
                };
                let mut ready = t.send.clone().ready().await.map_err(gone)?;
                let req = http::Request::post(crate::tcp::STREAM_URI)
                    .body(())
                    .map_err(|e| SyncError::Protocol(e.to_string()))?;
                let (resp, send) = ready.send_request(req, false).map_err(gone)?;
                Ok((SendHalf::H2(send), RecvHalf::H2(H2Recv::response(resp))))
            }
        }
    }

    pub fn is_open(&self) -> bool {
        match self {
            Conn::Quic(c) => c.close_reason().is_none(),
            Conn::Tcp(t) => !t.shared.closed.load(Ordering::SeqCst),
        }
    }

    /// Datagrams (QUIC) or bytes (TCP) received so far: whether anything
    /// arrived lately.
    pub fn received(&self) -> u64 {
        match self {
            Conn::Quic(c) => c.stats().udp_rx.datagrams,
            Conn::Tcp(t) => t.shared.rx.load(Ordering::Relaxed),
        }
    }

    pub fn rtt(&self) -> Duration {
        match self {
            Conn::Quic(c) => c.rtt(),
            Conn::Tcp(t) => t.shared.stats().rtt,
        }
    }

    pub fn close(&self) {
        match self {
            Conn::Quic(c) => c.close(0u32.into(), b"done"),
            Conn::Tcp(t) => t.close.cancel(),
        }
    }
}

/// A connection a server serves.
#[derive(Clone)]
pub(crate) enum ServerConn {
    Quic(quinn::Connection),
    Tcp(Arc<TcpServerConn>),
}

pub(crate) struct TcpServerConn {
    pub streams: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<(SendHalf, RecvHalf)>>,
    pub remote: SocketAddr,
    pub id: usize,
    pub client_cert: Option<String>,
    pub shared: Arc<TcpShared>,
    pub close: CancellationToken,
}

/// However its handler ends (a handshake timeout, a refusal, shutdown),
/// the connection ends with it: a client answering keep-alive pings must
/// not keep it (and its socket) past the connection limit's count.
impl Drop for TcpServerConn {
    fn drop(&mut self) {
        self.close.cancel();
    }
}

impl ServerConn {
    /// The next stream the client opens.
    pub async fn accept_bi(&self) -> Result<(SendHalf, RecvHalf)> {
        match self {
            ServerConn::Quic(c) => {
                let (s, r) = c.accept_bi().await?;
                Ok((SendHalf::Quic(s), RecvHalf::Quic(r)))
            }
            ServerConn::Tcp(t) => t.streams.lock().await.recv().await.ok_or_else(|| {
                SyncError::Connection("the client closed the TCP connection".into())
            }),
        }
    }

    /// Closes the connection (QUIC: with `code` and `reason`; TCP: an
    /// HTTP/2 GOAWAY, then the socket).
    pub fn close(&self, code: u32, reason: &[u8]) {
        match self {
            ServerConn::Quic(c) => c.close(code.into(), reason),
            ServerConn::Tcp(t) => t.close.cancel(),
        }
    }

    /// Resolves once the connection has ended.
    pub async fn closed(&self) {
        match self {
            ServerConn::Quic(c) => {
                c.closed().await;
            }
            ServerConn::Tcp(t) => t.shared.ended.cancelled().await,
        }
    }

    pub fn stable_id(&self) -> usize {
        match self {
            ServerConn::Quic(c) => c.stable_id(),
            ServerConn::Tcp(t) => t.id,
        }
    }

    pub fn remote_address(&self) -> SocketAddr {
        match self {
            ServerConn::Quic(c) => c.remote_address(),
            ServerConn::Tcp(t) => t.remote,
        }
    }

    /// The SHA-256 of the certificate the client presented, if any.
    pub fn client_cert(&self) -> Option<String> {
        match self {
            ServerConn::Quic(c) => {
                let certs = c
                    .peer_identity()?
                    .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()?;
                certs.first().map(|c| crate::tls::fingerprint(c))
            }
            ServerConn::Tcp(t) => t.client_cert.clone(),
        }
    }

    pub fn stats(&self) -> ConnStats {
        match self {
            ServerConn::Quic(c) => {
                let s = c.stats();
                ConnStats {
                    rtt: s.path.rtt,
                    tx: s.udp_tx.bytes,
                    rx: s.udp_rx.bytes,
                }
            }
            ServerConn::Tcp(t) => t.shared.stats(),
        }
    }
}
