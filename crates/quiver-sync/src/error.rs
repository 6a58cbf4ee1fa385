use quiver_core::wire::{ErrorCode, WireError};
use thiserror::Error;

/// Errors of the networked engine. [`SyncError::is_transient`] says whether
/// retrying can help.
#[derive(Debug, Error)]
pub enum SyncError {
    #[error("could not connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("timed out {0}")]
    Timeout(String),
    /// Nothing answered the QUIC handshake: no server there, or UDP is
    /// blocked on the way.
    #[error(
        "no QUIC server answered at {addr} within {waited_ms} ms{also}: is `quiver serve` \
         running there, and can UDP reach it?"
    )]
    NoAnswer {
        addr: String,
        waited_ms: u64,
        /// What TCP said, when `auto` tried it too.
        also: String,
    },
    /// The server did not take this client's 0-RTT data (it restarted and
    /// no longer knows the session ticket): the hello is said again once
    /// the handshake completes.
    #[error("the server did not take the 0-RTT data (it restarted?)")]
    ZeroRttRejected,
    /// Nothing listens on TCP there (the connection was refused).
    #[error(
        "nothing listens on TCP at {addr} (connection refused): is `quiver serve` running there \
         with TCP on (tcp_listen)?"
    )]
    NoTcpListener { addr: String },
    #[error(
        "the pin {0:?} is not a SHA-256 fingerprint: expected 64 hex digits (colons, dashes \
         or spaces between bytes allowed), as `quiver init` and `quiver serve` print it"
    )]
    BadPin(String),
    /// An address that cannot be right, whatever the network does.
    #[error("bad address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: String },
    #[error("{0}")]
    Untrusted(String),
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("refused by the server ({code:?}): {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("peer reported an error ({code:?}): {message}")]
    Peer {
        code: ErrorCode,
        message: String,
        retry_after_ms: Option<u64>,
    },
    /// This side refused what the peer sent (and told it so).
    #[error("{message}")]
    Rejected {
        code: ErrorCode,
        message: String,
        retry_after_ms: Option<u64>,
    },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("connection lost: {0}")]
    Connection(String),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Store(#[from] quiver_store::StoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The server's socket could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("the store thread has stopped")]
    StoreGone,
}

impl SyncError {
    /// Whether a retry may succeed (network trouble, not a refusal).
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Connect { .. }
            | SyncError::Timeout(_)
            | SyncError::NoAnswer { .. }
            | SyncError::NoTcpListener { .. }
            | SyncError::ZeroRttRejected
            | SyncError::Connection(_) => true,
            SyncError::Peer { code, .. } => matches!(
                code,
                ErrorCode::RateLimited | ErrorCode::ShuttingDown | ErrorCode::Internal
            ),
            _ => false,
        }
    }
}

/// Why a connection ended, in words: once, and saying which end or what
/// (quinn's own texts are terse: "timed out", "reset by peer").
pub(crate) fn connection_reason(e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as C;
    match e {
        C::TimedOut => "the peer went silent (idle timeout)".into(),
        C::Reset => "reset by the peer (it restarted or forgot the connection)".into(),
        C::ApplicationClosed(c) => {
            let why = String::from_utf8_lossy(&c.reason);
            if why.is_empty() {
                "closed by the peer".into()
            } else {
                format!("closed by the peer ({why})")
            }
        }
        C::ConnectionClosed(c) => format!("closed by the peer's QUIC stack: {c}"),
        C::LocallyClosed => "closed by this side".into(),
        other => other.to_string(),
    }
}

impl From<quinn::ConnectionError> for SyncError {
    fn from(e: quinn::ConnectionError) -> Self {
        SyncError::Connection(connection_reason(&e))
    }
}

impl From<quinn::WriteError> for SyncError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => c.into(),
            quinn::WriteError::ZeroRttRejected => SyncError::ZeroRttRejected,
            other => SyncError::Connection(format!("stream ended: {other}")),
        }
    }
}

impl From<quinn::ReadError> for SyncError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => c.into(),
            quinn::ReadError::ZeroRttRejected => SyncError::ZeroRttRejected,
            other => SyncError::Connection(format!("stream ended: {other}")),
        }
    }
}

impl From<quinn::ClosedStream> for SyncError {
    fn from(e: quinn::ClosedStream) -> Self {
        SyncError::Connection(e.to_string())
    }
}

pub type Result<T, E = SyncError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A lost connection is said once, with why, whichever quinn type
    /// carried it.
    #[test]
    fn a_lost_connection_says_why_once() {
        let lost = |e: SyncError| e.to_string();
        let timed_out =
            lost(quinn::ReadError::ConnectionLost(quinn::ConnectionError::TimedOut).into());
        assert_eq!(
            timed_out,
            "connection lost: the peer went silent (idle timeout)"
        );
        let reset = lost(quinn::WriteError::ConnectionLost(quinn::ConnectionError::Reset).into());
        assert!(
            reset.starts_with("connection lost: reset by the peer"),
            "{reset}"
        );
        for text in [timed_out, reset] {
            assert_eq!(text.matches("connection lost").count(), 1, "{text}");
        }
        let local = lost(quinn::ConnectionError::LocallyClosed.into());
        assert_eq!(local, "connection lost: closed by this side");
    }

    #[test]
    fn a_silent_server_is_transient_for_live_links_and_a_bad_address_never() {
        let silent = SyncError::NoAnswer {
            addr: "127.0.0.1:9".into(),
            waited_ms: 2500,
            also: String::new(),
        };
        assert!(silent.is_transient());
        assert!(silent.to_string().contains("can UDP reach it"));
        let bad = SyncError::BadAddress {
            addr: "x".into(),
            reason: "no port".into(),
        };
        assert!(!bad.is_transient());
        assert!(!SyncError::BadPin("xyz".into()).is_transient());
    }
}
