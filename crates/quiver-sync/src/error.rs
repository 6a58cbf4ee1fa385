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
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the store thread has stopped")]
    StoreGone,
}

impl SyncError {
    /// Whether a retry may succeed (network trouble, not a refusal).
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Connect { .. } | SyncError::Timeout(_) | SyncError::Connection(_) => true,
            SyncError::Peer { code, .. } => matches!(
                code,
                ErrorCode::RateLimited | ErrorCode::ShuttingDown | ErrorCode::Internal
            ),
            _ => false,
        }
    }
}

impl From<quinn::ConnectionError> for SyncError {
    fn from(e: quinn::ConnectionError) -> Self {
        SyncError::Connection(e.to_string())
    }
}

impl From<quinn::WriteError> for SyncError {
    fn from(e: quinn::WriteError) -> Self {
        SyncError::Connection(e.to_string())
    }
}

impl From<quinn::ReadError> for SyncError {
    fn from(e: quinn::ReadError) -> Self {
        SyncError::Connection(e.to_string())
    }
}

impl From<quinn::ClosedStream> for SyncError {
    fn from(e: quinn::ClosedStream) -> Self {
        SyncError::Connection(e.to_string())
    }
}

pub type Result<T, E = SyncError> = std::result::Result<T, E>;
