use std::fmt;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::CoreError;

/// The identity of one replica: 16 random bytes made when a store is created.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
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

/// Hex text in human-readable formats (JSON, where it can be a map key),
/// 16 raw bytes on the wire.
impl Serialize for SiteId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_hex())
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for SiteId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = SiteId;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a site id (16 bytes or 32 hex characters)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SiteId, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<SiteId, E> {
                SiteId::from_slice(v).ok_or_else(|| E::invalid_length(v.len(), &self))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<SiteId, A::Error> {
                let mut out = [0u8; 16];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = a
                        .next_element()?
                        .ok_or_else(|| de::Error::invalid_length(i, &self))?;
                }
                if a.next_element::<u8>()?.is_some() {
                    return Err(de::Error::invalid_length(17, &self));
                }
                Ok(SiteId(out))
            }
        }
        if d.is_human_readable() {
            d.deserialize_str(V)
        } else {
            d.deserialize_bytes(V)
        }
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
    fn serializes_as_hex_in_json_and_bytes_in_msgpack() {
        let id = SiteId([0x0f; 16]);
        let j = serde_json::to_string(&id).unwrap();
        assert_eq!(j, format!("\"{}\"", "0f".repeat(16)));
        assert_eq!(serde_json::from_str::<SiteId>(&j).unwrap(), id);
        let m = rmp_serde::to_vec(&id).unwrap();
        assert_eq!(m.len(), 18, "bin8 header + 16 bytes");
        assert_eq!(rmp_serde::from_slice::<SiteId>(&m).unwrap(), id);
    }

    #[test]
    fn bad_hex_is_refused() {
        assert!("xyz".parse::<SiteId>().is_err());
        assert!("zz".repeat(16).parse::<SiteId>().is_err());
        assert!("é".repeat(16).parse::<SiteId>().is_err());
    }
}
