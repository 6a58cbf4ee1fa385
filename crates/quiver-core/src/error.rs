use thiserror::Error;

/// Errors of the pure domain logic.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// A remote clock stamp is further ahead of our wall clock than allowed.
    #[error(
        "remote clock is {ahead_ms} ms ahead of the local wall clock (limit {limit_ms} ms); \
         check the clocks of both machines (NTP) or raise the drift limit"
    )]
    ClockDrift { ahead_ms: u64, limit_ms: u64 },
    /// A site id was not 32 hex characters.
    #[error("invalid site id {0:?}: expected 32 hexadecimal characters")]
    InvalidSiteId(String),
    /// An unknown conflict strategy name.
    #[error("unknown conflict strategy {0:?}: expected one of lww, fww, max, min, counter, merge, manual, local-wins, remote-wins")]
    UnknownStrategy(String),
    /// A value that does not name what it should.
    #[error("{0}")]
    Invalid(String),
    /// An unknown distance metric name.
    #[error("unknown metric {0:?}: expected cosine, l2 or dot")]
    UnknownMetric(String),
}
