// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The replication wire format: the primary's block daemon ships each committed epoch's writes
//! to the replica service, which answers with the epoch's acknowledgement.
//!
//! Binary, little-endian, because an epoch carries up to the held-bytes limit of data (64 MiB by
//! default) and JSON would copy and inflate every byte. A frame is a 24-byte header
//! (`"FTRP"`, version, type, body length, CRC-32C of the body) and the body:
//!
//! | type | sender | body |
//! |---|---|---|
//! | `HELLO` | primary | session u64, image size u64, flags u64 (optional; bit 0: send `DIRTY`) |
//! | `WELCOME` | replica | image size u64, last applied epoch u64 (`u64::MAX`: none) |
//! | `EPOCH` | primary | session u64, epoch u64, op count u32, 0 u32, then the ops |
//! | `ACK` | replica | epoch u64, duplicate u8 (1: already applied, not applied again) |
//! | `REFUSED` | replica | the reason, UTF-8; the replica closes the connection after it |
//! | `DIRTY` | replica | block size u64, image size u64, lineage u64, run count u64, runs (first block u64, blocks u64) |
//!
//! `DIRTY` follows `WELCOME` when the `HELLO` asked for it (a failback with `--replica-resync
//! dirty`): the blocks of the replica's image that its own dirty log says may differ from the
//! primary's ([`super::dirty`]); the primary copies them besides its own dirty blocks.
//!
//! The session is a random number the primary's daemon draws at start: epochs are ordered within
//! a session (a restarted daemon starts a new one and numbers its epochs again).
//!
//! An op is a 24-byte head (kind u8: 1 WRITE, 2 DISCARD, 3 WRITE_ZEROES, 4 WRITE_ZEROES with
//! unmap, 5 FLUSH, 6 SYNC_START, 7 SYNC_DONE (its offset: the new lineage); 7 bytes 0; offset u64;
//! length u64), followed by
//! `length` data bytes for WRITE only. SYNC_START and SYNC_DONE bracket an initial sync: the
//! replica's image is not a usable copy between them. Ops are in guest order (the order the commit takes them).
//!
//! Invariants: a body length is checked against the receiver's bound before anything is
//! allocated for it; a body whose CRC does not match is never decoded; every op of an epoch is
//! decoded and range-checked ([`EpochView::validate`]) before the first one is applied, so a
//! malformed epoch changes nothing.

use crate::epoch::Epoch;
use std::io::{self, Read, Write};

pub const MAGIC: [u8; 4] = *b"FTRP";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 24;
const OP_HEAD_LEN: usize = 24;
const EPOCH_HEAD_LEN: usize = 24;

/// Frame types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MsgType {
    Hello = 1,
    Welcome = 2,
    Epoch = 3,
    Ack = 4,
    Refused = 5,
    Dirty = 6,
}

impl MsgType {
    fn from_u8(v: u8) -> Option<MsgType> {
        Some(match v {
            1 => MsgType::Hello,
            2 => MsgType::Welcome,
            3 => MsgType::Epoch,
            4 => MsgType::Ack,
            5 => MsgType::Refused,
            6 => MsgType::Dirty,
            _ => return None,
        })
    }
}

/// Why bytes are not a valid replication message.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("replication stream i/o: {0}")]
    Io(#[from] io::Error),
    #[error("not a replication frame (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("unsupported replication protocol version {0} (this side speaks {VERSION})")]
    Version(u8),
    #[error("unknown frame type {0}")]
    BadType(u8),
    #[error("frame body of {len} bytes exceeds the bound of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("frame body CRC mismatch (corrupt or torn frame)")]
    BadCrc,
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("op {index}: range {offset}+{len} beyond the image ({size} bytes)")]
    OutOfRange {
        index: u32,
        offset: u64,
        len: u64,
        size: u64,
    },
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: MsgType,
    pub body_len: u64,
    pub crc: u32,
}

fn header_bytes(kind: MsgType, body: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[5] = kind as u8;
    h[8..16].copy_from_slice(&(body.len() as u64).to_le_bytes());
    h[16..20].copy_from_slice(&crc32c::crc32c(body).to_le_bytes());
    h
}

/// Writes one frame (header, then body).
pub fn write_frame<W: Write>(w: &mut W, kind: MsgType, body: &[u8]) -> io::Result<()> {
    w.write_all(&header_bytes(kind, body))?;
    w.write_all(body)?;
    w.flush()
}

/// Reads and checks one frame header.
pub fn read_header<R: Read>(r: &mut R) -> Result<Header, ProtoError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)?;
    let magic: [u8; 4] = h[..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(ProtoError::BadMagic(magic));
    }
    if h[4] != VERSION {
        return Err(ProtoError::Version(h[4]));
    }
    let kind = MsgType::from_u8(h[5]).ok_or(ProtoError::BadType(h[5]))?;
    Ok(Header {
        kind,
        body_len: u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")),
        crc: u32::from_le_bytes(h[16..20].try_into().expect("4 bytes")),
    })
}

/// Reads the body of `h` into `buf` (reused), bounded by `max`, and checks its CRC.
pub fn read_body<R: Read>(
    r: &mut R,
    h: &Header,
    max: u64,
    buf: &mut Vec<u8>,
) -> Result<(), ProtoError> {
    if h.body_len > max {
        return Err(ProtoError::TooLarge {
            len: h.body_len,
            max,
        });
    }
    buf.clear();
    buf.resize(h.body_len as usize, 0);
    r.read_exact(buf)?;
    if crc32c::crc32c(buf) != h.crc {
        return Err(ProtoError::BadCrc);
    }
    Ok(())
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, ProtoError> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .ok_or(ProtoError::Malformed("short body"))
}

/// `HELLO` flag: answer `WELCOME` with a `DIRTY` frame.
pub const HELLO_WANT_DIRTY: u64 = 1;

/// `HELLO` body.
pub fn hello(session: u64, image_size: u64, flags: u64) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&session.to_le_bytes());
    b[8..16].copy_from_slice(&image_size.to_le_bytes());
    b[16..].copy_from_slice(&flags.to_le_bytes());
    b
}

/// (session, image size, flags); a 16-byte `HELLO` (no flags) is accepted.
pub fn parse_hello(b: &[u8]) -> Result<(u64, u64, u64), ProtoError> {
    let flags = if b.len() >= 24 { u64_at(b, 16)? } else { 0 };
    Ok((u64_at(b, 0)?, u64_at(b, 8)?, flags))
}

/// The largest `DIRTY` body for an image of `image_size` bytes (every other block dirty).
pub fn max_dirty_body(image_size: u64) -> u64 {
    32 + 16 * (image_size.div_ceil(super::dirty::BLOCK_SIZE) / 2 + 1)
}

/// `DIRTY` body: the dirty runs (first block, blocks) of an image of `image_size` bytes whose log
/// has `lineage` ([`super::dirty::DirtyLog::lineage`]).
pub fn dirty_set(image_size: u64, lineage: u64, runs: &[(u64, u64)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(32 + runs.len() * 16);
    b.extend_from_slice(&super::dirty::BLOCK_SIZE.to_le_bytes());
    b.extend_from_slice(&image_size.to_le_bytes());
    b.extend_from_slice(&lineage.to_le_bytes());
    b.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    for (s, n) in runs {
        b.extend_from_slice(&s.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
    }
    b
}

/// Parses a `DIRTY` body for an image of `image_size` bytes: its lineage and its runs, each
/// checked to lie in the image.
pub fn parse_dirty_set(b: &[u8], image_size: u64) -> Result<(u64, Vec<(u64, u64)>), ProtoError> {
    let bs = u64_at(b, 0)?;
    if bs != super::dirty::BLOCK_SIZE {
        return Err(ProtoError::Malformed("DIRTY block size"));
    }
    if u64_at(b, 8)? != image_size {
        return Err(ProtoError::Malformed("DIRTY for another image size"));
    }
    let lineage = u64_at(b, 16)?;
    let n = u64_at(b, 24)?;
    if b.len() as u64 != 32 + n.saturating_mul(16) {
        return Err(ProtoError::Malformed("DIRTY length"));
    }
    let nblocks = image_size.div_ceil(bs);
    let runs = (0..n as usize)
        .map(|i| {
            let (s, len) = (u64_at(b, 32 + i * 16)?, u64_at(b, 40 + i * 16)?);
            if s.checked_add(len).is_none_or(|e| e > nblocks) {
                return Err(ProtoError::OutOfRange {
                    index: i as u32,
                    offset: s.saturating_mul(bs),
                    len: len.saturating_mul(bs),
                    size: image_size,
                });
            }
            Ok((s, len))
        })
        .collect::<Result<_, _>>()?;
    Ok((lineage, runs))
}

/// `WELCOME` body.
pub fn welcome(image_size: u64, last_applied: Option<Epoch>) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&image_size.to_le_bytes());
    b[8..].copy_from_slice(&last_applied.map_or(u64::MAX, |e| e.0).to_le_bytes());
    b
}

pub fn parse_welcome(b: &[u8]) -> Result<(u64, Option<Epoch>), ProtoError> {
    let last = u64_at(b, 8)?;
    Ok((u64_at(b, 0)?, (last != u64::MAX).then_some(Epoch(last))))
}

/// `ACK` body.
pub fn ack(epoch: Epoch, duplicate: bool) -> [u8; 9] {
    let mut b = [0u8; 9];
    b[..8].copy_from_slice(&epoch.0.to_le_bytes());
    b[8] = duplicate as u8;
    b
}

pub fn parse_ack(b: &[u8]) -> Result<(Epoch, bool), ProtoError> {
    let dup = *b.get(8).ok_or(ProtoError::Malformed("short ACK"))?;
    Ok((Epoch(u64_at(b, 0)?), dup == 1))
}

/// One change to the image, as shipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op<'a> {
    Write {
        offset: u64,
        data: &'a [u8],
    },
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    /// A guest FLUSH: a barrier in guest order. The epoch's one `fdatasync` answers it.
    Flush,
    /// An initial sync starts: the image is not a copy of the primary's until SYNC_DONE.
    SyncStart,
    /// The initial sync's last chunk is in this epoch: once applied, the image is a copy. The
    /// lineage both sides' dirty logs record from then on.
    SyncDone {
        lineage: u64,
    },
}

const OP_WRITE: u8 = 1;
const OP_DISCARD: u8 = 2;
const OP_WRITE_ZEROES: u8 = 3;
const OP_WRITE_ZEROES_UNMAP: u8 = 4;
const OP_FLUSH: u8 = 5;
const OP_SYNC_START: u8 = 6;
const OP_SYNC_DONE: u8 = 7;

/// A position in an [`EpochFrame`] ([`EpochFrame::mark`]).
#[derive(Clone, Copy, Debug)]
pub struct FrameMark {
    len: usize,
    nops: u32,
    data_bytes: u64,
}

/// Builds one `EPOCH` frame (header included) in a reused buffer, op by op: what the primary
/// keeps until the replica acknowledges it (and re-sends after a reconnect).
#[derive(Debug, Default)]
pub struct EpochFrame {
    buf: Vec<u8>,
    nops: u32,
    data_bytes: u64,
    epoch: Option<Epoch>,
}

impl EpochFrame {
    /// Starts a new frame for `epoch` (the previous contents are dropped; capacity is kept).
    pub fn begin(&mut self, session: u64, epoch: Epoch) {
        self.buf.clear();
        self.buf.resize(HEADER_LEN + EPOCH_HEAD_LEN, 0);
        self.buf[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&session.to_le_bytes());
        self.buf[HEADER_LEN + 8..HEADER_LEN + 16].copy_from_slice(&epoch.0.to_le_bytes());
        self.nops = 0;
        self.data_bytes = 0;
        self.epoch = Some(epoch);
    }

    fn op_head(&mut self, kind: u8, offset: u64, len: u64) {
        let mut h = [0u8; OP_HEAD_LEN];
        h[0] = kind;
        h[8..16].copy_from_slice(&offset.to_le_bytes());
        h[16..24].copy_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(&h);
        self.nops += 1;
    }

    /// Where the frame ends now, for [`EpochFrame::truncate`].
    pub fn mark(&self) -> FrameMark {
        FrameMark {
            len: self.buf.len(),
            nops: self.nops,
            data_bytes: self.data_bytes,
        }
    }

    /// Drops every op added since `mark` (an op whose data turned out to be unusable).
    pub fn truncate(&mut self, mark: FrameMark) {
        if mark.len <= self.buf.len() && mark.nops <= self.nops {
            self.buf.truncate(mark.len);
            self.nops = mark.nops;
            self.data_bytes = mark.data_bytes;
        }
    }

    /// A write of the concatenation of `segments` at `offset`.
    pub fn write<'a>(&mut self, offset: u64, segments: impl Iterator<Item = &'a [u8]> + Clone) {
        let len: u64 = segments.clone().map(|s| s.len() as u64).sum();
        self.op_head(OP_WRITE, offset, len);
        for s in segments {
            self.buf.extend_from_slice(s);
        }
        self.data_bytes += len;
    }

    pub fn discard(&mut self, offset: u64, len: u64) {
        self.op_head(OP_DISCARD, offset, len);
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) {
        let kind = if unmap {
            OP_WRITE_ZEROES_UNMAP
        } else {
            OP_WRITE_ZEROES
        };
        self.op_head(kind, offset, len);
    }

    pub fn flush(&mut self) {
        self.op_head(OP_FLUSH, 0, 0);
    }

    pub fn sync_start(&mut self) {
        self.op_head(OP_SYNC_START, 0, 0);
    }

    /// The end of a sync; `lineage` goes into both sides' dirty logs.
    pub fn sync_done(&mut self, lineage: u64) {
        self.op_head(OP_SYNC_DONE, lineage, 0);
    }

    /// Fills in the headers; the frame is then ready to send ([`EpochFrame::bytes`]).
    pub fn finish(&mut self) {
        let nops = self.nops.to_le_bytes();
        self.buf[HEADER_LEN + 16..HEADER_LEN + 20].copy_from_slice(&nops);
        let (head, body) = self.buf.split_at_mut(HEADER_LEN);
        head.copy_from_slice(&header_bytes(MsgType::Epoch, body));
    }

    /// The finished frame.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn epoch(&self) -> Option<Epoch> {
        self.epoch
    }

    pub fn ops(&self) -> u32 {
        self.nops
    }

    /// Bytes of WRITE data in the frame.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Forgets the frame (after its acknowledgement).
    pub fn clear(&mut self) {
        self.epoch = None;
        self.nops = 0;
        self.data_bytes = 0;
        self.buf.clear();
    }
}

/// A received `EPOCH` body.
#[derive(Clone, Copy, Debug)]
pub struct EpochView<'a> {
    pub session: u64,
    pub epoch: Epoch,
    pub nops: u32,
    ops: &'a [u8],
}

impl<'a> EpochView<'a> {
    pub fn parse(body: &'a [u8]) -> Result<EpochView<'a>, ProtoError> {
        if body.len() < EPOCH_HEAD_LEN {
            return Err(ProtoError::Malformed("short EPOCH"));
        }
        Ok(EpochView {
            session: u64_at(body, 0)?,
            epoch: Epoch(u64_at(body, 8)?),
            nops: u32::from_le_bytes(body[16..20].try_into().expect("4 bytes")),
            ops: &body[EPOCH_HEAD_LEN..],
        })
    }

    /// The ops in guest order; each item is an error if the bytes are malformed.
    pub fn ops(&self) -> OpIter<'a> {
        OpIter {
            rest: self.ops,
            left: self.nops,
        }
    }

    /// Decodes every op and checks that it lies inside an image of `size` bytes and that the
    /// op count and the body agree: nothing may be applied from an epoch that fails this.
    pub fn validate(&self, size: u64) -> Result<(), ProtoError> {
        let mut it = self.ops();
        for index in 0..self.nops {
            let op = it.next().ok_or(ProtoError::Malformed("missing op"))??;
            let (offset, len) = match op {
                Op::Write { offset, data } => (offset, data.len() as u64),
                Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => (offset, len),
                Op::Flush | Op::SyncStart | Op::SyncDone { .. } => continue,
            };
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(ProtoError::OutOfRange {
                    index,
                    offset,
                    len,
                    size,
                });
            }
        }
        if !it.rest.is_empty() {
            return Err(ProtoError::Malformed("bytes after the last op"));
        }
        Ok(())
    }
}

/// Iterator over an epoch's ops.
pub struct OpIter<'a> {
    rest: &'a [u8],
    left: u32,
}

impl<'a> Iterator for OpIter<'a> {
    type Item = Result<Op<'a>, ProtoError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        if self.rest.len() < OP_HEAD_LEN {
            self.left = 0;
            return Some(Err(ProtoError::Malformed("short op")));
        }
        let kind = self.rest[0];
        let offset = u64::from_le_bytes(self.rest[8..16].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(self.rest[16..24].try_into().expect("8 bytes"));
        self.rest = &self.rest[OP_HEAD_LEN..];
        let op = match kind {
            OP_WRITE => {
                let Some(data) = usize::try_from(len).ok().and_then(|l| self.rest.get(..l)) else {
                    self.left = 0;
                    return Some(Err(ProtoError::Malformed("WRITE data beyond the body")));
                };
                self.rest = &self.rest[data.len()..];
                Op::Write { offset, data }
            }
            OP_DISCARD => Op::Discard { offset, len },
            OP_WRITE_ZEROES | OP_WRITE_ZEROES_UNMAP => Op::WriteZeroes {
                offset,
                len,
                unmap: kind == OP_WRITE_ZEROES_UNMAP,
            },
            OP_FLUSH => Op::Flush,
            OP_SYNC_START => Op::SyncStart,
            OP_SYNC_DONE => Op::SyncDone { lineage: offset },
            _ => {
                self.left = 0;
                return Some(Err(ProtoError::Malformed("unknown op kind")));
            }
        };
        Some(Ok(op))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_drops_exactly_the_ops_after_the_mark() {
        let mut f = EpochFrame::default();
        f.begin(3, Epoch(7));
        f.write(4096, [&b"abc"[..], &b"de"[..]].into_iter());
        f.discard(8192, 512);
        let mark = f.mark();
        f.write(0, [&[0u8; 4096][..]].into_iter());
        f.truncate(mark);
        f.flush();
        f.write_zeroes(0, 1024, true);
        f.finish();
        assert_eq!(f.bytes(), frame().bytes());
        assert_eq!((f.ops(), f.data_bytes()), (4, 5));
    }

    fn frame() -> EpochFrame {
        let mut f = EpochFrame::default();
        f.begin(3, Epoch(7));
        f.write(4096, [&b"abc"[..], &b"de"[..]].into_iter());
        f.discard(8192, 512);
        f.flush();
        f.write_zeroes(0, 1024, true);
        f.finish();
        f
    }

    #[test]
    fn an_epoch_round_trips_in_guest_order() {
        let f = frame();
        let mut r = f.bytes();
        let h = read_header(&mut r).unwrap();
        assert_eq!(h.kind, MsgType::Epoch);
        let mut body = Vec::new();
        read_body(&mut r, &h, 1 << 20, &mut body).unwrap();
        let v = EpochView::parse(&body).unwrap();
        assert_eq!((v.session, v.epoch, v.nops), (3, Epoch(7), 4));
        v.validate(1 << 20).unwrap();
        let ops: Vec<Op> = v.ops().map(Result::unwrap).collect();
        assert_eq!(
            ops,
            vec![
                Op::Write {
                    offset: 4096,
                    data: b"abcde"
                },
                Op::Discard {
                    offset: 8192,
                    len: 512
                },
                Op::Flush,
                Op::WriteZeroes {
                    offset: 0,
                    len: 1024,
                    unmap: true
                },
            ]
        );
        assert_eq!(f.data_bytes(), 5);
    }

    #[test]
    fn bad_frames_are_refused_before_anything_is_applied() {
        let f = frame();
        // A flipped data byte: the CRC catches it.
        let mut bad = f.bytes().to_vec();
        bad[HEADER_LEN + EPOCH_HEAD_LEN + OP_HEAD_LEN] ^= 1;
        let mut r = &bad[..];
        let h = read_header(&mut r).unwrap();
        let mut body = Vec::new();
        assert!(matches!(
            read_body(&mut r, &h, 1 << 20, &mut body),
            Err(ProtoError::BadCrc)
        ));
        // Over the bound: refused before reading the body.
        let mut r = f.bytes();
        let h = read_header(&mut r).unwrap();
        assert!(matches!(
            read_body(&mut r, &h, 16, &mut body),
            Err(ProtoError::TooLarge { .. })
        ));
        // Out of the image.
        let mut r = f.bytes();
        let h = read_header(&mut r).unwrap();
        read_body(&mut r, &h, 1 << 20, &mut body).unwrap();
        let v = EpochView::parse(&body).unwrap();
        assert!(matches!(
            v.validate(8192),
            Err(ProtoError::OutOfRange { index: 1, .. })
        ));
        // An op count larger than the body, and garbage magic.
        let mut short = body.clone();
        short[16] = 9;
        assert!(EpochView::parse(&short).unwrap().validate(1 << 20).is_err());
        assert!(matches!(
            read_header(&mut &[0u8; HEADER_LEN][..]),
            Err(ProtoError::BadMagic(_))
        ));
    }

    #[test]
    fn small_messages_round_trip() {
        assert_eq!(parse_hello(&hello(2, 99, 1)).unwrap(), (2, 99, 1));
        assert_eq!(parse_hello(&hello(2, 99, 1)[..16]).unwrap(), (2, 99, 0));
        let runs = [(0, 3), (10, 1)];
        assert_eq!(
            parse_dirty_set(&dirty_set(1 << 20, 9, &runs), 1 << 20).unwrap(),
            (9, runs.to_vec())
        );
        assert!(parse_dirty_set(&dirty_set(1 << 20, 0, &[(255, 2)]), 1 << 20).is_err());
        assert!(parse_dirty_set(&dirty_set(1 << 20, 0, &runs), 2 << 20).is_err());
        assert_eq!(parse_welcome(&welcome(5, None)).unwrap(), (5, None));
        assert_eq!(
            parse_welcome(&welcome(5, Some(Epoch(4)))).unwrap(),
            (5, Some(Epoch(4)))
        );
        assert_eq!(parse_ack(&ack(Epoch(9), true)).unwrap(), (Epoch(9), true));
    }
}
