// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Request size limits: what the device advertises in its config space (`config.rs`) is what
//! the request parser (`request.rs`) enforces, because both read these constants and nothing
//! else. A limit changed here changes the advertisement and the check together.

/// Most data segments one request may carry (advertised as `seg_max`; also the size of the
/// pooled segment tables in `segments.rs`).
pub const MAX_DATA_SEGS: usize = 128;

/// Largest DISCARD / WRITE_ZEROES range, in sectors (2 GiB): keeps one fallocate bounded.
/// Advertised as `max_discard_sectors` and `max_write_zeroes_sectors`.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;

/// Segments per DISCARD / WRITE_ZEROES request. One: each request is one fallocate SQE.
/// Advertised as `max_discard_seg` and `max_write_zeroes_seg`.
pub const MAX_DISCARD_SEGS: u32 = 1;
