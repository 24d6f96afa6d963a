// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Host-side reading of a guest's raw disk image: which blocks the guest wrote.

use std::io::{self, Read};
use std::path::Path;

/// The block size [`nonzero_blocks`] counts in.
const BLOCK: usize = 4096;

/// Counts the 4 KiB blocks of the raw image `path` that are not all zero, in `[0, split)` and
/// `[split, end)` (a trailing partial block is not counted).
pub fn nonzero_blocks(path: &Path, split: u64) -> io::Result<(u64, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; BLOCK];
    let (mut before, mut after, mut offset) = (0, 0, 0u64);
    loop {
        match file.read_exact(&mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        if buf.iter().any(|&b| b != 0) {
            if offset < split {
                before += 1;
            } else {
                after += 1;
            }
        }
        offset += BLOCK as u64;
    }
    Ok((before, after))
}
