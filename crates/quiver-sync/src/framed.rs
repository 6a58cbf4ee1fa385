//! Messages over streams (QUIC or HTTP/2): one frame per message, read
//! with the negotiated limit so a hostile length never allocates.

use quiver_core::frame::{open_body, parse_header, HEADER_LEN};
use quiver_core::wire::{ErrorCode, ErrorMsg, Message};

use crate::streams::{RecvHalf, SendHalf};
use crate::{Result, SyncError};

/// Reads messages from a stream.
pub struct FrameReader {
    recv: RecvHalf,
    pub max_frame: usize,
    pub compression: bool,
    pub bytes: u64,
}

impl FrameReader {
    pub fn new(recv: impl Into<RecvHalf>, max_frame: usize, compression: bool) -> Self {
        FrameReader {
            recv: recv.into(),
            max_frame,
            compression,
            bytes: 0,
        }
    }

    /// The next message, or `None` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Message>> {
        let mut h = [0u8; HEADER_LEN];
        match self.recv.read_exact(&mut h).await? {
            0 => return Ok(None),
            n if n < HEADER_LEN => {
                return Err(SyncError::Protocol(format!(
                    "stream ended inside a frame header ({n} bytes)"
                )))
            }
            _ => {}
        }
        let header = parse_header(&h, self.max_frame).map_err(|e| SyncError::Wire(e.into()))?;
        let mut body = vec![0u8; header.len];
        let n = self.recv.read_exact(&mut body).await?;
        if n < header.len {
            return Err(SyncError::Protocol(format!(
                "stream ended inside a frame ({n} of {} bytes)",
                header.len
            )));
        }
        self.bytes += (HEADER_LEN + header.len) as u64;
        let frame = open_body(&header, body, self.max_frame, self.compression)
            .map_err(|e| SyncError::Wire(e.into()))?;
        Ok(Some(Message::decode(&frame)?))
    }

    /// The next message, which must exist.
    pub async fn expect(&mut self, what: &str) -> Result<Message> {
        match self.next().await? {
            Some(Message::Error(e)) | Some(Message::Refused(e)) => Err(peer_error(e)),
            Some(m) => Ok(m),
            None => Err(SyncError::Protocol(format!(
                "stream ended while waiting for {what}"
            ))),
        }
    }

    /// Stops reading, telling the peer why.
    pub fn stop(&mut self, code: u32) {
        self.recv.stop(code);
    }
}

/// Turns an error message from the peer into an error.
pub fn peer_error(e: ErrorMsg) -> SyncError {
    match e.code {
        ErrorCode::Unauthorized | ErrorCode::Protocol | ErrorCode::Forbidden => {
            SyncError::Refused {
                code: e.code,
                message: e.message,
            }
        }
        code => SyncError::Peer {
            code,
            message: e.message,
            retry_after_ms: e.retry_after_ms,
        },
    }
}

/// Writes messages to a stream.
pub struct FrameWriter {
    send: SendHalf,
    pub compression: bool,
    pub bytes: u64,
}

impl FrameWriter {
    pub fn new(send: impl Into<SendHalf>, compression: bool) -> Self {
        FrameWriter {
            send: send.into(),
            compression,
            bytes: 0,
        }
    }

    pub async fn send(&mut self, m: &Message) -> Result<()> {
        let bytes = m.encode(self.compression)?;
        self.bytes += bytes.len() as u64;
        self.send.write_all(bytes).await
    }

    /// Sends raw bytes (tests of misbehaving peers use this).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.send.write_all(bytes.to_vec()).await
    }

    /// Sends an error and ends the stream.
    pub async fn fail(&mut self, code: ErrorCode, message: String) {
        let _ = self
            .send(&Message::Error(ErrorMsg {
                code,
                message,
                retry_after_ms: None,
            }))
            .await;
        let _ = self.send.finish();
    }

    pub fn finish(&mut self) -> Result<()> {
        self.send.finish()
    }
}
