//! Framing: `len u32 | type u8 | flags u8 | crc32c u32 | body`, all
//! big-endian. The body is MessagePack, zstd-compressed when flag bit 0 is
//! set. Decoding never panics and never allocates more than the frame limit,
//! whatever the input.

use thiserror::Error;

/// Bytes before the body.
pub const HEADER_LEN: usize = 10;
/// The frame limit before the handshake has negotiated one.
pub const HANDSHAKE_MAX_FRAME: usize = 64 * 1024;

/// Extends a CRC32C (the frames' checksum) over more bytes; start from 0.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}
/// The largest frame limit either side may ask for.
pub const MAX_FRAME_LIMIT: usize = 64 * 1024 * 1024;
/// Bodies at least this large are worth trying to compress.
pub const COMPRESS_MIN: usize = 4096;

const FLAG_ZSTD: u8 = 1;

/// Why a frame was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error(
        "frame checksum mismatch (expected {expected:08x}, computed {computed:08x}): corrupt data"
    )]
    Checksum { expected: u32, computed: u32 },
    #[error("unknown frame flags {0:#04x}")]
    Flags(u8),
    #[error("compressed frame does not decompress within the limit: {0}")]
    Decompress(String),
    #[error("peer compressed a frame although compression was not agreed")]
    CompressionNotAgreed,
}

/// One decoded frame: its type and its (decompressed) body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub body: Vec<u8>,
}

/// Encodes a frame, compressing the body when allowed and it pays.
pub fn encode(kind: u8, body: &[u8], compress: bool) -> Vec<u8> {
    let mut flags = 0;
    let mut payload = std::borrow::Cow::Borrowed(body);
    if compress && body.len() >= COMPRESS_MIN {
        if let Ok(z) = zstd::bulk::compress(body, 1) {
            // Keep it only when it saves at least a tenth.
            if z.len() * 10 <= body.len() * 9 {
                payload = std::borrow::Cow::Owned(z);
                flags |= FLAG_ZSTD;
            }
        }
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&crc32c::crc32c(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// The parsed header: body length, kind, flags, checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub crc: u32,
}

/// Parses a header, refusing a body longer than `max` before anything is allocated.
pub fn parse_header(h: &[u8; HEADER_LEN], max: usize) -> Result<Header, FrameError> {
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let flags = h[5];
    if flags & !FLAG_ZSTD != 0 {
        return Err(FrameError::Flags(flags));
    }
    Ok(Header {
        len,
        kind: h[4],
        flags,
        crc: u32::from_be_bytes([h[6], h[7], h[8], h[9]]),
    })
}

/// Checks and unpacks a body read for `header`.
pub fn open_body(
    header: &Header,
    payload: Vec<u8>,
    max: usize,
    compression_agreed: bool,
) -> Result<Frame, FrameError> {
    let computed = crc32c::crc32c(&payload);
    if computed != header.crc {
        return Err(FrameError::Checksum {
            expected: header.crc,
            computed,
        });
    }
    let body = if header.flags & FLAG_ZSTD != 0 {
        if !compression_agreed {
            return Err(FrameError::CompressionNotAgreed);
        }
        zstd::bulk::decompress(&payload, max).map_err(|e| FrameError::Decompress(e.to_string()))?
    } else {
        payload
    };
    Ok(Frame {
        kind: header.kind,
        body,
    })
}

/// A push decoder over a byte stream, for use without an async runtime
/// (tests, fuzzing). Holds at most one frame's bytes.
#[derive(Debug)]
pub struct Decoder {
    max: usize,
    compression_agreed: bool,
    buf: Vec<u8>,
}

impl Decoder {
    pub fn new(max: usize, compression_agreed: bool) -> Self {
        Decoder {
            max,
            compression_agreed,
            buf: Vec::new(),
        }
    }

    /// Feeds bytes; returns the frames completed by them. After an error
    /// the stream is unusable (the caller closes it).
    pub fn push(&mut self, mut data: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut out = Vec::new();
        loop {
            if self.buf.len() < HEADER_LEN {
                let take = (HEADER_LEN - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.buf.len() < HEADER_LEN {
                    return Ok(out);
                }
            }
            let mut h = [0u8; HEADER_LEN];
            h.copy_from_slice(&self.buf[..HEADER_LEN]);
            let header = parse_header(&h, self.max)?;
            let need = HEADER_LEN + header.len;
            let take = (need - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() < need {
                return Ok(out);
            }
            let payload = self.buf.split_off(HEADER_LEN);
            self.buf.clear();
            out.push(open_body(
                &header,
                payload,
                self.max,
                self.compression_agreed,
            )?);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_plain_and_compressed_in_pieces() {
        let small = b"hello".to_vec();
        let big = vec![7u8; 100_000];
        let mut stream = encode(3, &small, true);
        stream.extend(encode(4, &big, true));
        assert!(stream.len() < 50_000, "the repetitive body was compressed");
        let mut d = Decoder::new(1 << 20, true);
        let mut frames = Vec::new();
        for chunk in stream.chunks(7) {
            frames.extend(d.push(chunk).unwrap());
        }
        assert_eq!(
            frames,
            vec![
                Frame {
                    kind: 3,
                    body: small
                },
                Frame { kind: 4, body: big }
            ]
        );
    }

    #[test]
    fn oversize_is_refused_before_allocating() {
        let mut d = Decoder::new(1024, false);
        let mut hostile = (u32::MAX).to_be_bytes().to_vec();
        hostile.extend([1, 0, 0, 0, 0, 0]);
        assert!(matches!(d.push(&hostile), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn corrupt_body_is_refused() {
        let mut f = encode(1, b"payload", false);
        let last = f.len() - 1;
        f[last] ^= 0xff;
        assert!(matches!(
            Decoder::new(1024, false).push(&f),
            Err(FrameError::Checksum { .. })
        ));
    }

    #[test]
    fn compressed_bomb_is_capped() {
        let body = vec![0u8; 1 << 20];
        let f = encode(1, &body, true);
        let err = Decoder::new(64 * 1024, true).push(&f).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { .. } | FrameError::Decompress(_)),
            "{err}"
        );
        // Compression that was not agreed is refused too.
        let err = Decoder::new(2 << 20, false).push(&f).unwrap_err();
        assert_eq!(err, FrameError::CompressionNotAgreed);
    }

    #[test]
    fn unknown_flags_are_refused() {
        let mut f = encode(1, b"x", false);
        f[5] = 0x80;
        assert!(matches!(
            Decoder::new(1024, false).push(&f),
            Err(FrameError::Flags(0x80))
        ));
    }
}
