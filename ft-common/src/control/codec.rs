// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Framing of control messages on a byte stream.
//!
//! A frame is a 4-byte big-endian length `N`, then `N` bytes: one version byte
//! ([`PROTOCOL_VERSION`]) and the message body, a JSON object (see `message`). JSON because the
//! control plane runs a few messages per checkpoint, so its cost does not matter, and it lets any
//! language (a Python test, `socat` and `jq`) speak and debug the protocol; the version byte
//! keeps the door open for a binary body later.
//!
//! Invariants:
//! - The length is checked against a bound ([`MAX_FRAME_LEN`] by default) as soon as the 4 length
//!   bytes are in, before any memory is reserved for the body: a peer can never make us allocate
//!   more than the bound.
//! - Decoding never panics. Every failure is a [`CodecError`]; [`CodecError::is_fatal`] says
//!   whether the stream lost frame sync (oversized length, truncation, I/O), after which the only
//!   safe move is to close the connection. A bad version byte or a bad body consumes exactly that
//!   frame, and decoding continues with the next one.

use super::message::ErrorCode;
use serde::{de::DeserializeOwned, Serialize};
use std::io::{self, Read, Write};

/// The version byte this implementation speaks.
pub const PROTOCOL_VERSION: u8 = 1;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Largest allowed value of the length prefix (version byte + body).
///
/// The biggest legitimate message is `SEALED`: a JSON head index costs at most 6 bytes
/// (`"32767,"`), so a queue of 32768 held heads is ~192 KiB and 16 such queues ~3 MiB. 4 MiB
/// covers that with room for the rest; anything larger is garbage or an attack.
pub const MAX_FRAME_LEN: usize = 4 << 20;

/// Why bytes could not be turned into a message (or a message into a frame).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The length prefix exceeds the bound. Fatal: the stream cannot be resynchronised.
    #[error("frame length {len} exceeds the maximum of {max} bytes")]
    TooLarge { len: u64, max: usize },
    /// A frame of length 0: it lacks even the version byte.
    #[error("empty frame (no version byte)")]
    Empty,
    /// The frame's version byte is not [`PROTOCOL_VERSION`].
    #[error("unsupported protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    /// The body is not JSON, or not JSON of the expected shape.
    #[error("malformed message body: {0}")]
    Malformed(#[source] serde_json::Error),
    /// A message could not be serialized (cannot happen for the protocol's own types).
    #[error("cannot encode message: {0}")]
    Encode(#[source] serde_json::Error),
    /// The stream ended inside a frame. Fatal.
    #[error("stream ended inside a frame: {have} of {need} bytes")]
    Truncated { have: usize, need: usize },
    /// Reading or writing the stream failed. Fatal.
    #[error("control stream i/o: {0}")]
    Io(#[from] io::Error),
}

impl CodecError {
    /// True when frame sync is lost and the connection must be closed.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            CodecError::TooLarge { .. } | CodecError::Truncated { .. } | CodecError::Io(_)
        )
    }

    /// The protocol error code to answer this decode failure with, if it deserves an answer.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            CodecError::TooLarge { .. } => Some(ErrorCode::TooLarge),
            CodecError::Empty | CodecError::Malformed(_) => Some(ErrorCode::Malformed),
            CodecError::UnsupportedVersion(_) => Some(ErrorCode::UnsupportedVersion),
            CodecError::Encode(_) => Some(ErrorCode::Internal),
            CodecError::Truncated { .. } | CodecError::Io(_) => None,
        }
    }
}

/// Appends one frame holding `msg` to `out`. On error `out` is left as it was.
pub fn encode_into<T: Serialize>(
    msg: &T,
    out: &mut Vec<u8>,
    max_frame: usize,
) -> Result<(), CodecError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    out.push(PROTOCOL_VERSION);
    if let Err(e) = serde_json::to_writer(&mut *out, msg) {
        out.truncate(start);
        return Err(CodecError::Encode(e));
    }
    let len = out.len() - start - HEADER_LEN;
    if len > max_frame {
        out.truncate(start);
        return Err(CodecError::TooLarge {
            len: len as u64,
            max: max_frame,
        });
    }
    // len <= max_frame <= u32::MAX is guaranteed by the check above for any sane bound.
    let len32 = u32::try_from(len).map_err(|_| CodecError::TooLarge {
        len: len as u64,
        max: max_frame,
    })?;
    out[start..start + HEADER_LEN].copy_from_slice(&len32.to_be_bytes());
    Ok(())
}

/// One frame holding `msg`, bounded by [`MAX_FRAME_LEN`].
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    encode_into(msg, &mut out, MAX_FRAME_LEN)?;
    Ok(out)
}

/// Writes one frame with a single `write_all` (so that frames of concurrent writers sharing a
/// lock never interleave, and a blocking writer issues one syscall for small messages).
pub fn write_message<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), CodecError> {
    let frame = encode(msg)?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Decodes a frame's version byte and body.
fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = payload.split_first().ok_or(CodecError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(CodecError::UnsupportedVersion(version));
    }
    serde_json::from_slice(body).map_err(CodecError::Malformed)
}

/// Checks a length prefix against the bound.
fn check_len(header: [u8; HEADER_LEN], max_frame: usize) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(header);
    match usize::try_from(len) {
        Ok(l) if l <= max_frame => Ok(l),
        _ => Err(CodecError::TooLarge {
            len: u64::from(len),
            max: max_frame,
        }),
    }
}

/// Reads exactly `buf.len()` bytes; returns how many arrived before EOF (less on EOF).
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Blocking read of one message. `Ok(None)` on a clean end of stream at a frame boundary.
///
/// A read timeout in the middle of a frame loses frame sync (reported as `Io`, fatal); a reader
/// that must survive timeouts uses [`FrameDecoder`] instead.
pub fn read_message<R: Read, T: DeserializeOwned>(
    r: &mut R,
    max_frame: usize,
) -> Result<Option<T>, CodecError> {
    let mut header = [0u8; HEADER_LEN];
    match read_full(r, &mut header)? {
        0 => return Ok(None),
        HEADER_LEN => {}
        have => {
            return Err(CodecError::Truncated {
                have,
                need: HEADER_LEN,
            })
        }
    }
    let len = check_len(header, max_frame)?;
    let mut payload = vec![0u8; len];
    let have = read_full(r, &mut payload)?;
    if have < len {
        return Err(CodecError::Truncated {
            have: HEADER_LEN + have,
            need: HEADER_LEN + len,
        });
    }
    decode_payload(&payload).map(Some)
}

/// Incremental decoder for non-blocking readers: feed bytes as they arrive, take messages out.
///
/// Memory is bounded by what the caller feeds; [`FrameDecoder::read_from`] never buffers more
/// than one maximal frame, so a loop of `read_from` + `decode` stays within
/// `HEADER_LEN + max_frame` bytes.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of undecoded data in `buf`; consumed bytes are compacted away lazily.
    start: usize,
    max_frame: usize,
    /// Set once an oversized length was seen: frame sync is lost for good.
    lost_sync: Option<u64>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// A decoder bounded by [`MAX_FRAME_LEN`].
    pub fn new() -> Self {
        Self::with_max_frame(MAX_FRAME_LEN)
    }

    /// A decoder with a custom frame bound (at most `u32::MAX` is meaningful).
    pub fn with_max_frame(max_frame: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            max_frame,
            lost_sync: None,
        }
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Appends received bytes. Ignored once frame sync is lost.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.lost_sync.is_none() {
            self.compact();
            self.buf.extend_from_slice(bytes);
        }
    }

    /// One `read` from `r` into the buffer, never past one maximal frame of undecoded data.
    /// Returns the byte count (0 = end of stream). Errors (including `WouldBlock`) are the
    /// reader's, unchanged. Decode between calls or the buffer fills up and this reads 0 bytes
    /// into a full buffer: it then returns an `InvalidData` error instead of a false EOF.
    pub fn read_from<R: Read>(&mut self, r: &mut R) -> io::Result<usize> {
        const CHUNK: usize = 64 * 1024;
        if self.lost_sync.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "control stream lost frame sync",
            ));
        }
        self.compact();
        let room = (HEADER_LEN + self.max_frame).saturating_sub(self.buffered());
        if room == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "decoder buffer full: decode frames before reading more",
            ));
        }
        let mut chunk = [0u8; CHUNK];
        let want = room.min(CHUNK);
        let n = loop {
            match r.read(&mut chunk[..want]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    ///
    /// A non-fatal error consumed its frame: call again for the next. After a fatal error every
    /// call fails the same way.
    pub fn decode<T: DeserializeOwned>(&mut self) -> Result<Option<T>, CodecError> {
        if let Some(len) = self.lost_sync {
            return Err(CodecError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        let data = &self.buf[self.start..];
        let Some(header) = data.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = match check_len(*header, self.max_frame) {
            Ok(len) => len,
            Err(e) => {
                if let CodecError::TooLarge { len, .. } = e {
                    self.lost_sync = Some(len);
                }
                // Nothing after a bad length is trustworthy; free it now.
                self.buf = Vec::new();
                self.start = 0;
                return Err(e);
            }
        };
        if data.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let result = decode_payload(&data[HEADER_LEN..HEADER_LEN + len]);
        self.start += HEADER_LEN + len;
        result.map(Some)
    }

    /// Checks the end of stream: an error if it cut a frame short.
    pub fn finish(&self) -> Result<(), CodecError> {
        let have = self.buffered();
        if have == 0 || self.lost_sync.is_some() {
            return Ok(());
        }
        let need = match self.buf[self.start..].first_chunk::<HEADER_LEN>() {
            Some(h) => HEADER_LEN + u32::from_be_bytes(*h) as usize,
            None => HEADER_LEN,
        };
        Err(CodecError::Truncated { have, need })
    }

    /// Drops consumed bytes once they dominate the buffer, so compaction is amortised O(1).
    fn compact(&mut self) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::message::{Notification, Request};
    use crate::epoch::{Epoch, Generation};

    fn seal(e: u64) -> Request {
        Request::Seal {
            generation: Generation(1),
            epoch: Epoch(e),
        }
    }

    #[test]
    fn frame_layout() {
        let f = encode(&Request::Status).unwrap();
        let body = br#"{"type":"STATUS"}"#;
        assert_eq!(&f[..4], &((body.len() + 1) as u32).to_be_bytes());
        assert_eq!(f[4], PROTOCOL_VERSION);
        assert_eq!(&f[5..], body);
    }

    #[test]
    fn byte_by_byte_feeding_yields_each_frame_once() {
        let mut stream = Vec::new();
        for e in 1..=5 {
            encode_into(&seal(e), &mut stream, MAX_FRAME_LEN).unwrap();
        }
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &stream {
            d.feed(std::slice::from_ref(b));
            while let Some(m) = d.decode::<Request>().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, (1..=5).map(seal).collect::<Vec<_>>());
        assert_eq!(d.buffered(), 0);
        d.finish().unwrap();
    }

    #[test]
    fn oversized_length_is_fatal_and_sticky() {
        let mut d = FrameDecoder::with_max_frame(100);
        d.feed(&101u32.to_be_bytes());
        assert!(matches!(
            d.decode::<Request>(),
            Err(CodecError::TooLarge { len: 101, max: 100 })
        ));
        d.feed(&encode(&Request::Status).unwrap());
        let e = d.decode::<Request>().unwrap_err();
        assert!(e.is_fatal());
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn bad_version_and_bad_body_skip_one_frame() {
        let mut bytes = vec![0, 0, 0, 3, 2, b'{', b'}'];
        bytes.extend_from_slice(&[0, 0, 0, 0]);
        bytes.extend_from_slice(&[0, 0, 0, 3, 1, b'{', b'}']);
        bytes.extend_from_slice(&encode(&Request::Status).unwrap());
        let mut d = FrameDecoder::new();
        d.feed(&bytes);
        let e1 = d.decode::<Request>().unwrap_err();
        assert!(matches!(e1, CodecError::UnsupportedVersion(2)) && !e1.is_fatal());
        assert!(matches!(d.decode::<Request>(), Err(CodecError::Empty)));
        assert!(matches!(
            d.decode::<Request>(),
            Err(CodecError::Malformed(_))
        ));
        assert_eq!(d.decode::<Request>().unwrap(), Some(Request::Status));
    }

    #[test]
    fn encoder_refuses_oversized_messages() {
        let mut out = vec![9];
        let big = Notification::OutputPending { epoch: Epoch(1) };
        assert!(matches!(
            encode_into(&big, &mut out, 5),
            Err(CodecError::TooLarge { .. })
        ));
        assert_eq!(out, vec![9]);
    }

    #[test]
    fn read_message_stops_at_eof_and_detects_truncation() {
        let f = encode(&seal(3)).unwrap();
        let mut r = &f[..];
        assert_eq!(
            read_message::<_, Request>(&mut r, MAX_FRAME_LEN).unwrap(),
            Some(seal(3))
        );
        assert!(read_message::<_, Request>(&mut r, MAX_FRAME_LEN)
            .unwrap()
            .is_none());
        let mut cut = &f[..f.len() - 1];
        let e = read_message::<_, Request>(&mut cut, MAX_FRAME_LEN).unwrap_err();
        assert!(matches!(e, CodecError::Truncated { .. }) && e.is_fatal());
    }

    #[test]
    fn read_from_never_buffers_past_one_frame() {
        let mut d = FrameDecoder::with_max_frame(10);
        let src = [0u8; 100];
        let mut r = &src[..];
        let mut total = 0;
        loop {
            match d.read_from(&mut r) {
                Ok(n) => total += n,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                    break;
                }
            }
        }
        assert_eq!(total, HEADER_LEN + 10);
    }
}
