use std::fmt;

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// Default bound on how far ahead of our wall clock a remote stamp may be.
pub const DEFAULT_MAX_DRIFT_MS: u64 = 60_000;

/// A hybrid logical clock timestamp: wall-clock milliseconds and a logical
/// counter that orders events within one millisecond.
///
/// It packs into one `i64` (`ms << 16 | logical`) so SQLite can store and
/// compare it as an integer, and SQL triggers can mint one from the wall clock.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Hlc(u64);

impl Hlc {
    pub const ZERO: Hlc = Hlc(0);

    pub fn new(ms: u64, logical: u16) -> Self {
        Hlc((ms << 16) | logical as u64)
    }

    pub fn ms(self) -> u64 {
        self.0 >> 16
    }

    pub fn logical(self) -> u16 {
        (self.0 & 0xffff) as u16
    }

    /// The packed form stored in SQLite.
    pub fn as_i64(self) -> i64 {
        self.0 as i64
    }

    /// Reads the packed form; negative values (never written) map to zero.
    pub fn from_i64(v: i64) -> Self {
        Hlc(v.max(0) as u64)
    }

    /// The smallest stamp strictly greater than this one.
    pub fn successor(self) -> Self {
        Hlc(self.0 + 1)
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hlc({}.{})", self.ms(), self.logical())
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.ms(), self.logical())
    }
}

/// A hybrid logical clock. Time comes in as an argument (`wall_ms`), so the
/// clock is deterministic under test.
#[derive(Debug, Clone)]
pub struct HlcClock {
    last: Hlc,
    max_drift_ms: u64,
}

impl HlcClock {
    pub fn new(last: Hlc, max_drift_ms: u64) -> Self {
        HlcClock { last, max_drift_ms }
    }

    pub fn last(&self) -> Hlc {
        self.last
    }

    pub fn max_drift_ms(&self) -> u64 {
        self.max_drift_ms
    }

    /// A new stamp for a local event: never below the wall clock, always
    /// above every stamp issued or observed before.
    pub fn now(&mut self, wall_ms: u64) -> Hlc {
        let wall = Hlc::new(wall_ms, 0);
        self.last = if wall > self.last {
            wall
        } else {
            self.last.successor()
        };
        self.last
    }

    /// Advances past a remote stamp, refusing one that is further ahead of
    /// the local wall clock than the drift bound instead of being dragged
    /// forward by it.
    pub fn observe(&mut self, remote: Hlc, wall_ms: u64) -> Result<(), CoreError> {
        if remote.ms() > wall_ms.saturating_add(self.max_drift_ms) {
            return Err(CoreError::ClockDrift {
                ahead_ms: remote.ms() - wall_ms,
                limit_ms: self.max_drift_ms,
            });
        }
        if remote > self.last {
            self.last = remote;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_and_unpacks() {
        let h = Hlc::new(1_700_000_000_000, 7);
        assert_eq!(h.ms(), 1_700_000_000_000);
        assert_eq!(h.logical(), 7);
        assert_eq!(Hlc::from_i64(h.as_i64()), h);
    }

    #[test]
    fn monotonic_when_wall_clock_stalls_or_goes_back() {
        let mut c = HlcClock::new(Hlc::ZERO, 1000);
        let a = c.now(100);
        let b = c.now(100);
        let d = c.now(50);
        assert!(a < b && b < d);
        assert_eq!(d.ms(), 100);
        let e = c.now(200);
        assert_eq!(e, Hlc::new(200, 0));
    }

    #[test]
    fn observe_advances_past_remote() {
        let mut c = HlcClock::new(Hlc::ZERO, 1000);
        c.observe(Hlc::new(500, 3), 400).unwrap();
        let next = c.now(400);
        assert!(next > Hlc::new(500, 3));
    }

    #[test]
    fn observe_refuses_far_future() {
        let mut c = HlcClock::new(Hlc::ZERO, 1000);
        let err = c.observe(Hlc::new(5000, 0), 1000).unwrap_err();
        assert_eq!(
            err,
            CoreError::ClockDrift {
                ahead_ms: 4000,
                limit_ms: 1000
            }
        );
        assert_eq!(
            c.last(),
            Hlc::ZERO,
            "a refused stamp must not move the clock"
        );
    }
}
