//! Per-client rate limits (requests and bytes per minute), keyed by the
//! client's IP address, with the time to wait when one is exceeded.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Rate limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default)]
pub struct RateLimits {
    pub requests_per_min: Option<NonZeroU32>,
    pub bytes_per_min: Option<NonZeroU32>,
}

/// The limiters of a server, shared by all its connections.
#[derive(Clone, Default)]
pub(crate) struct Limiters {
    requests: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
    bytes: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
}

impl Limiters {
    pub fn new(l: RateLimits) -> Self {
        Limiters {
            requests: l
                .requests_per_min
                .map(|n| Arc::new(RateLimiter::keyed(Quota::per_minute(n)))),
            bytes: l
                .bytes_per_min
                .map(|n| Arc::new(RateLimiter::keyed(Quota::per_minute(n)))),
        }
    }

    /// One request (a stream); `Err(ms)` is how long to wait.
    pub fn request(&self, ip: IpAddr) -> Result<(), u64> {
        match &self.requests {
            None => Ok(()),
            Some(l) => l
                .check_key(&ip)
                .map_err(|nu| wait_ms(nu.wait_time_from(DefaultClock::default().now()))),
        }
    }

    /// `n` bytes received; `Err(ms)` is how long to wait.
    pub fn bytes(&self, ip: IpAddr, n: usize) -> Result<(), u64> {
        let Some(l) = &self.bytes else { return Ok(()) };
        let n = NonZeroU32::new(n.clamp(1, u32::MAX as usize) as u32).unwrap_or(NonZeroU32::MIN);
        match l.check_key_n(&ip, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(nu)) => Err(wait_ms(nu.wait_time_from(DefaultClock::default().now()))),
            // More than a whole minute's allowance in one go.
            Err(_) => Err(60_000),
        }
    }
}

fn wait_ms(d: std::time::Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}
