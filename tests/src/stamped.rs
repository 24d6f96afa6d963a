// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A VM-less writer of stamped blocks for the arbitration tests: block `i` carries a magic
//! number, its sequence number and its submit time (`CLOCK_MONOTONIC`), so that reading the
//! image tells which writes reached it and when they were submitted (nothing submitted after a
//! commit deadline may be on disk).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ft_common::control::deadline::MonotonicTime;

use crate::blk_client::{BlkClient, ClientError};

const MAGIC: u64 = 0x4654_5041_5254_4954; // "FTPARTIT"
/// Size of one stamped block.
pub const BLOCK: usize = 4096;
/// Most writes the writer submits (one buffer each, never reused): the image needs
/// `MAX_WRITES * BLOCK` bytes.
pub const MAX_WRITES: usize = 1024;

/// What the writer wrote: submit time of each sequence number.
pub struct Written {
    pub submitted: Vec<MonotonicTime>,
    pub completed_ok: usize,
}

/// Writes block `i` (at offset `i * BLOCK`) every `pace` until `stop`, keeping as many in
/// flight as the ring allows.
pub fn writer(sock: PathBuf, stop: Arc<AtomicBool>, pace: Duration) -> Written {
    let mut c = BlkClient::connect(sock.to_str().expect("socket path"), 1, 256).expect("client");
    let buf = c.alloc_buffer(MAX_WRITES * BLOCK).expect("buffer");
    let mut w = Written {
        submitted: Vec::with_capacity(MAX_WRITES),
        completed_ok: 0,
    };
    let mut next = Instant::now();
    while !stop.load(Ordering::Acquire) && w.submitted.len() < MAX_WRITES {
        c.drain_completions(0, |done| {
            if done.is_ok() {
                w.completed_ok += 1;
            }
        });
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        next += pace;
        let i = w.submitted.len();
        let at = MonotonicTime::now();
        let b = &mut c.buf_mut(buf)[i * BLOCK..(i + 1) * BLOCK];
        b.fill(0x77);
        b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        b[8..16].copy_from_slice(&(i as u64).to_le_bytes());
        b[16..24].copy_from_slice(&at.0.to_le_bytes());
        match c.submit_write(0, (i * BLOCK) as u64, buf.slice(i * BLOCK, BLOCK), i as u64) {
            Ok(()) => {
                w.submitted.push(at);
                c.kick(0).expect("kick");
            }
            // The ring is full of held writes: wait for completions (or the end).
            Err(ClientError::QueueFull { .. }) => {}
            Err(e) => panic!("submit: {e}"),
        }
    }
    w
}

/// The stamped blocks of the image: (sequence number, submit time) of each.
pub fn blocks_in_image(image: &Path) -> Vec<(u64, MonotonicTime)> {
    let data = std::fs::read(image).expect("read image");
    data.chunks(BLOCK)
        .filter(|b| b.len() >= 24 && u64::from_le_bytes(b[0..8].try_into().unwrap()) == MAGIC)
        .map(|b| {
            (
                u64::from_le_bytes(b[8..16].try_into().unwrap()),
                MonotonicTime(u64::from_le_bytes(b[16..24].try_into().unwrap())),
            )
        })
        .collect()
}
