use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// The identity of one replica: 16 random bytes made when a store is created.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SiteId(pub [u8; 16]);

impl SiteId {
    /// Builds a site id from 16 bytes taken from a random source.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        SiteId(bytes)
    }

    /// Builds a site id from a slice, which must be exactly 16 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; 16] = bytes.try_into().ok()?;
        Some(SiteId(arr))
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Lower-case hexadecimal form (32 characters).
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        for b in self.0 {
            s.push(char::from_digit((b >> 4) as u32, 16).unwrap_or('0'));
            s.push(char::from_digit((b & 0xf) as u32, 16).unwrap_or('0'));
        }
        s
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SiteId({})", self.to_hex())
    }
}

impl FromStr for SiteId {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CoreError::InvalidSiteId(s.to_string());
        if s.len() != 32 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hi = (chunk[0] as char).to_digit(16).ok_or_else(bad)?;
            let lo = (chunk[1] as char).to_digit(16).ok_or_else(bad)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Ok(SiteId(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = SiteId([0xab; 16]);
        assert_eq!(id.to_string(), "ab".repeat(16));
        assert_eq!(id.to_string().parse::<SiteId>().unwrap(), id);
    }

    #[test]
    fn bad_hex_is_refused() {
        assert!("xyz".parse::<SiteId>().is_err());
        assert!("zz".repeat(16).parse::<SiteId>().is_err());
        assert!("é".repeat(16).parse::<SiteId>().is_err());
    }
}
