// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Pooled segment tables: the large part of a request, recycled per thread.
//!
//! A request may carry `MAX_DATA_SEGS` data segments (see `limits.rs`); their host iovecs and
//! guest addresses take 3 KiB. Kept inline, every move of a
//! [`BlkRequest`](crate::request::BlkRequest) (parser to engine slot, slot to completion, into
//! and out of the transaction queue) copied those 3 KiB, about 6% of the CPU at 4k QD32. Here the table lives in a heap block that the request
//! points to, so a request is small to move, and blocks are recycled through a per-thread pool:
//! after warm-up (at most one block per request in flight) the hot path allocates nothing.
//!
//! A table returns to the pool of the thread that drops it. Requests are dropped on their
//! queue's thread (completion), or on the control thread for held requests cancelled there;
//! each pool keeps at most `POOL_CAP` blocks and frees the rest.

use crate::limits::MAX_DATA_SEGS;
use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Blocks kept per thread (3 KiB each): more than a 1024-entry ring can have in flight.
const POOL_CAP: usize = 1024;

/// Host iovecs of a request's data segments and the guest address of each.
pub struct Segments {
    pub iovecs: [libc::iovec; MAX_DATA_SEGS],
    pub gpas: [u64; MAX_DATA_SEGS],
}

thread_local! {
    // Boxed on purpose: blocks move between pool and requests without copying 3 KiB.
    #[allow(clippy::vec_box)]
    static POOL: RefCell<Vec<Box<Segments>>> = const { RefCell::new(Vec::new()) };
}

/// One pooled [`Segments`] block. Its contents are not cleared between uses: readers only look
/// at the entries the owner filled.
pub struct SegTable(Option<Box<Segments>>);

// SAFETY: the iovec pointers are addresses in guest memory, a shared mapping valid from any
// thread (the owning request keeps it mapped); the table is plain data that may move with its
// request between threads (queue thread, transaction queue, commit engine).
unsafe impl Send for SegTable {}

impl SegTable {
    /// A block from this thread's pool, or a new one while the pool is still warming up.
    pub fn take() -> SegTable {
        let pooled = POOL.try_with(|p| p.borrow_mut().pop()).ok().flatten();
        SegTable(Some(pooled.unwrap_or_else(|| {
            Box::new(Segments {
                iovecs: [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; MAX_DATA_SEGS],
                gpas: [0; MAX_DATA_SEGS],
            })
        })))
    }
}

impl Deref for SegTable {
    type Target = Segments;
    fn deref(&self) -> &Segments {
        self.0.as_deref().expect("present until drop")
    }
}

impl DerefMut for SegTable {
    fn deref_mut(&mut self) -> &mut Segments {
        self.0.as_deref_mut().expect("present until drop")
    }
}

impl Drop for SegTable {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            // During thread teardown the pool may be gone: the block is then simply freed.
            let _ = POOL.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_CAP {
                    p.push(b);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_recycled_on_the_dropping_thread() {
        let a = SegTable::take();
        let pa: *const Segments = &*a;
        drop(a);
        let b = SegTable::take();
        assert_eq!(&*b as *const Segments, pa, "the dropped block is reused");
        // A table dropped on another thread goes to that thread's pool, not ours.
        let c = SegTable::take();
        let pc = &*c as *const Segments as usize;
        std::thread::spawn(move || {
            drop(c);
            let d = SegTable::take();
            assert_eq!(&*d as *const Segments as usize, pc);
        })
        .join()
        .unwrap();
        assert_eq!(
            POOL.with(|p| p.borrow().len()),
            0,
            "c did not come back here"
        );
        drop(b);
        assert_eq!(POOL.with(|p| p.borrow().len()), 1);
    }

    #[test]
    fn pool_is_bounded() {
        let many: Vec<SegTable> = (0..POOL_CAP + 10).map(|_| SegTable::take()).collect();
        drop(many);
        assert_eq!(POOL.with(|p| p.borrow().len()), POOL_CAP);
    }
}
