// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! INFLIGHT_SHMFD: the shared region in which the backend records, per split virtqueue, which
//! descriptor heads it has taken from the avail ring and not yet put on the used ring.
//!
//! Layout (vhost-user spec, "Inflight I/O tracking", split virtqueue), per queue, each queue's
//! area aligned to 64 bytes:
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! struct { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];
//! ```
//! Protocol: on pop, `desc[head].counter = ++counter; desc[head].inflight = 1`. On completion:
//! `last_batch_head = head`, then the used ring entry and used->idx are written, then
//! `desc[head].inflight = 0; used_idx = used->idx`. After a crash, if `used_idx != used->idx` the
//! last completion reached the used ring but not the region: clear `desc[last_batch_head]`.
//! Every head still marked is resubmitted, oldest counter first, and
//! `last_avail_idx = used->idx + number of marked heads`.
//!
//! Invariant: a request is marked from the moment it leaves the avail ring until its used entry
//! is visible, so a daemon killed at any instant loses no request and completes none twice.
//!
//! Fresh and used regions: `version` stays 0 until a ring has run with the region
//! ([`InflightQueue::mark_in_use`]), as in libvhost-user. A version-0 region says nothing about
//! the rings (a new daemon on a VM restored from a checkpoint gets one), so the ring resumes at
//! SET_VRING_BASE; only a used region (same VM, reconnect or restart) is authoritative for what
//! to resubmit.

use super::sigbus::{ConnId, SharedMapping};
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// Alignment of each queue's area, as QEMU and libvhost-user use.
const QUEUE_ALIGN: u64 = 64;
const HEADER_SIZE: u64 = 16;
const DESC_SIZE: u64 = 16;
/// Region format version written by us.
const VERSION: u16 = 1;

/// Size of one queue's area for `queue_size` descriptors.
pub fn queue_region_size(queue_size: u16) -> u64 {
    (HEADER_SIZE + DESC_SIZE * u64::from(queue_size)).div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

/// A mapped inflight region (all queues).
#[derive(Debug)]
pub struct InflightRegion {
    /// Shared with the frontend and accessed through atomics only; each queue's area is
    /// written by one worker thread. Registered for SIGBUS recovery (the frontend holds the
    /// fd and could truncate it).
    map: SharedMapping,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// GET_INFLIGHT_FD: create a zeroed memfd region for `num_queues` queues of `queue_size`.
    /// Its version stays 0 (fresh) until a ring runs with it.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
        conn: ConnId,
    ) -> std::io::Result<(Arc<Self>, File)> {
        if num_queues == 0 || queue_size == 0 {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        let size = queue_region_size(queue_size) * u64::from(num_queues);
        // SAFETY: plain syscall with a static name.
        let fd = unsafe { libc::memfd_create(c"ft-vhost-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned here.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        let region = Self::map(&file, size, 0, num_queues, queue_size, conn)?;
        for q in 0..num_queues {
            // Not the version: that would make the region look used (see the module docs).
            region
                .header(q)
                .desc_num
                .store(queue_size, Ordering::Relaxed);
        }
        Ok((Arc::new(region), file))
    }

    /// SET_INFLIGHT_FD: map a region handed back by the frontend.
    ///
    /// The frontend passes back the `queue_size` it asked for in GET_INFLIGHT_FD, but a region
    /// we created may be laid out for larger rings (see `get_inflight_fd`): the layout is the
    /// `desc_num` of queue 0 when it is a power of two above `queue_size` and the region is
    /// large enough for it, else `queue_size` (regions made by other backends, which write
    /// `desc_num = queue_size`, or zeroed ones the frontend made). The version is not looked
    /// at: a region we created stays at version 0 until a ring runs with it.
    pub fn open(
        file: &File,
        size: u64,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
        conn: ConnId,
    ) -> std::io::Result<Arc<Self>> {
        if num_queues == 0
            || queue_size == 0
            || size < queue_region_size(queue_size) * u64::from(num_queues)
        {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        super::memory::check_file_covers(file, offset, size)?;
        let region = Self::map(file, size, offset, num_queues, queue_size, conn)?;
        let hdr = region.header(0);
        let desc_num = hdr.desc_num.load(Ordering::Relaxed);
        if desc_num > queue_size
            && desc_num.is_power_of_two()
            && size >= queue_region_size(desc_num) * u64::from(num_queues)
        {
            return Ok(Arc::new(InflightRegion {
                queue_size: desc_num,
                ..region
            }));
        }
        Ok(Arc::new(region))
    }

    fn map(
        file: &File,
        size: u64,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
        conn: ConnId,
    ) -> std::io::Result<Self> {
        let len = usize::try_from(size).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let map = SharedMapping::new(file, offset, len, conn)?;
        Ok(InflightRegion {
            map,
            num_queues,
            queue_size,
        })
    }

    /// Number of queues the region covers.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Queue size the region was laid out for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn header(&self, q: u16) -> &QueueHeader {
        assert!(q < self.num_queues);
        let off = queue_region_size(self.queue_size) * u64::from(q);
        // SAFETY: in bounds (checked at map time), 64-byte aligned, only atomics inside.
        unsafe { &*(self.map.as_mut_ptr().add(off as usize) as *const QueueHeader) }
    }

    /// Head `head`'s entry, laid out for `queue_size` descriptors. Never looks at the
    /// frontend-writable `desc_num`: the layout is fixed when the region is mapped.
    fn desc(&self, q: u16, head: u16) -> Option<&DescState> {
        if head >= self.queue_size {
            return None;
        }
        let hdr = self.header(q);
        // SAFETY: head < queue_size, so the entry lies within the queue's area (checked at map
        // time); 16-byte aligned, only atomics inside.
        Some(unsafe {
            &*((hdr as *const QueueHeader as *const u8)
                .add((HEADER_SIZE + DESC_SIZE * u64::from(head)) as usize)
                as *const DescState)
        })
    }
}

#[repr(C)]
struct QueueHeader {
    features: AtomicU64,
    version: AtomicU16,
    desc_num: AtomicU16,
    last_batch_head: AtomicU16,
    used_idx: AtomicU16,
}

#[repr(C)]
struct DescState {
    inflight: AtomicU8,
    padding: [AtomicU8; 5],
    next: AtomicU16,
    counter: AtomicU64,
}

/// Why a queue's inflight state cannot be used: the frontend's region contradicts the ring.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InflightError {
    /// `desc_num` is 0, smaller than the ring or larger than the region's layout.
    #[error(
        "desc_num {desc_num} does not fit a ring of {ring_size} (region laid out for {layout})"
    )]
    DescNum {
        desc_num: u16,
        ring_size: u16,
        layout: u16,
    },
    /// A head at or beyond the ring size is marked in flight.
    #[error("head {head} marked in flight, ring has {ring_size} entries")]
    HeadOutOfRange { head: u16, ring_size: u16 },
    /// An `inflight` byte that is neither 0 nor 1.
    #[error("head {head}: inflight flag {value} is not 0 or 1")]
    Garbage { head: u16, value: u8 },
}

/// One queue's view of the inflight region, owned by the ring's worker.
///
/// Everything read from the region is frontend-controlled: recovery validates it and fails
/// with an [`InflightError`] (the ring then does not start), and the per-request updates
/// never index by anything but heads below the ring size, so no value the frontend writes,
/// before or while the ring runs, can make them panic or touch memory outside the region.
#[derive(Debug)]
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    queue: u16,
    ring_size: u16,
    counter: u64,
    /// The queue's area had version 0 when this view was made: no ring ran with it yet.
    fresh: bool,
}

impl InflightQueue {
    /// View of queue `queue`, or None if the region does not cover it or its ring is larger
    /// than the region's layout.
    pub fn new(region: Arc<InflightRegion>, queue: u16, ring_size: u16) -> Option<Self> {
        if queue >= region.num_queues || ring_size > region.queue_size || ring_size == 0 {
            return None;
        }
        let hdr = region.header(queue);
        let fresh = hdr.version.load(Ordering::Acquire) == 0;
        if fresh {
            // Possibly allocated by the frontend itself: lay it out, but leave it fresh until
            // a ring actually runs with it (a refused start must not make it look used).
            hdr.desc_num.store(region.queue_size, Ordering::Relaxed);
        }
        Some(InflightQueue {
            region,
            queue,
            ring_size,
            counter: 0,
            fresh,
        })
    }

    /// Whether the queue's area was fresh (version 0) when this view was made: it records
    /// nothing about the ring, whose position is then SET_VRING_BASE.
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// The ring now runs with this region, its used ring at `used_idx`: from here on it is
    /// authoritative for resubmission (version set), also for a later daemon or connection of
    /// the same VM.
    ///
    /// The region's own copy of the used idx is set too. A fresh region says 0, which is right
    /// only for a ring that starts at 0; on a VM restored from a checkpoint the ring starts
    /// anywhere, and a later [`recover`](Self::recover) would take the difference for a
    /// half-recorded completion and drop a head still in flight (its entry then popped twice).
    pub fn mark_in_use(&mut self, used_idx: u16) {
        let hdr = self.region.header(self.queue);
        hdr.desc_num
            .store(self.region.queue_size, Ordering::Relaxed);
        hdr.used_idx.store(used_idx, Ordering::Release);
        hdr.version.store(VERSION, Ordering::Release);
        self.fresh = false;
    }

    fn desc(&self, head: u16) -> Option<&DescState> {
        if head >= self.ring_size {
            return None;
        }
        self.region.desc(self.queue, head)
    }

    /// Recover after (re)connect: repair a half-recorded completion and return the heads to
    /// resubmit, oldest first (at most the ring size, each below it). `used_idx` is the used
    /// ring's current idx. Fails if the region contradicts the ring (see [`InflightError`]).
    pub fn recover(&mut self, used_idx: u16) -> Result<Vec<u16>, InflightError> {
        let hdr = self.region.header(self.queue);
        let layout = self.region.queue_size;
        let desc_num = hdr.desc_num.load(Ordering::Relaxed);
        if desc_num < self.ring_size || desc_num > layout {
            return Err(InflightError::DescNum {
                desc_num,
                ring_size: self.ring_size,
                layout,
            });
        }
        let mut heads: Vec<(u64, u16)> = Vec::new();
        for h in 0..layout {
            let Some(d) = self.region.desc(self.queue, h) else {
                break;
            };
            match d.inflight.load(Ordering::Acquire) {
                0 => {}
                1 if h < self.ring_size => heads.push((d.counter.load(Ordering::Relaxed), h)),
                1 => {
                    return Err(InflightError::HeadOutOfRange {
                        head: h,
                        ring_size: self.ring_size,
                    })
                }
                value => return Err(InflightError::Garbage { head: h, value }),
            }
        }
        if hdr.used_idx.load(Ordering::Acquire) != used_idx {
            // The last completion reached the used ring but not the region.
            let last = hdr.last_batch_head.load(Ordering::Relaxed);
            if let Some(d) = self.desc(last) {
                d.inflight.store(0, Ordering::Relaxed);
            }
            heads.retain(|&(_, h)| h != last);
            fence(Ordering::Release);
            hdr.used_idx.store(used_idx, Ordering::Release);
        }
        heads.sort_unstable();
        self.counter = heads.last().map_or(0, |&(c, _)| c);
        Ok(heads.into_iter().map(|(_, h)| h).collect())
    }

    /// Record that `head` left the avail ring.
    pub fn start(&mut self, head: u16) {
        // Counters come from the frontend's region: wrap rather than overflow.
        self.counter = self.counter.wrapping_add(1);
        if let Some(d) = self.desc(head) {
            d.counter.store(self.counter, Ordering::Relaxed);
            fence(Ordering::Release);
            d.inflight.store(1, Ordering::Release);
        }
    }

    /// Before `head` is written to the used ring: remember it as the completion in progress,
    /// so recovery can tell whether it reached the used ring.
    pub fn pre_complete(&mut self, head: u16) {
        if head >= self.ring_size {
            return;
        }
        let hdr = self.region.header(self.queue);
        hdr.last_batch_head.store(head, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Record that `head` is on the used ring, whose idx is now `used_idx`.
    pub fn complete(&mut self, head: u16, used_idx: u16) {
        let Some(d) = self.desc(head) else {
            return;
        };
        fence(Ordering::SeqCst);
        d.inflight.store(0, Ordering::Release);
        fence(Ordering::Release);
        self.region
            .header(self.queue)
            .used_idx
            .store(used_idx, Ordering::Release);
    }

    /// Forget `head` again (it was put back on the avail ring before being processed).
    pub fn abandon(&mut self, head: u16) {
        if let Some(d) = self.desc(head) {
            d.inflight.store(0, Ordering::Release);
        }
    }

    /// Whether `head` is currently marked in flight.
    pub fn is_inflight(&self, head: u16) -> bool {
        self.desc(head)
            .is_some_and(|d| d.inflight.load(Ordering::Acquire) == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the sequence of pops and completions, and wherever the daemon dies inside
        /// the last completion, recovery resubmits exactly the heads whose used entry is not
        /// visible, oldest first.
        #[test]
        fn recovery_resubmits_exactly_the_unfinished(
            ops in proptest::collection::vec(any::<bool>(), 1..200),
            pick in any::<prop::sample::Index>(),
            crash in 0u8..3,
        ) {
            let (region, _f) = InflightRegion::create(1, 16, ConnId::next()).unwrap();
            let mut q = InflightQueue::new(region.clone(), 0, 16).unwrap();
            let mut free: Vec<u16> = (0..16).rev().collect();
            let mut outstanding: Vec<u16> = Vec::new(); // in pop order
            let mut used_idx: u16 = 0;
            for start in ops {
                if start && !free.is_empty() {
                    let h = free.pop().unwrap();
                    q.start(h);
                    outstanding.push(h);
                } else if !outstanding.is_empty() {
                    let h = outstanding.remove(outstanding.len() / 2);
                    q.pre_complete(h);
                    used_idx = used_idx.wrapping_add(1);
                    q.complete(h, used_idx);
                    free.insert(0, h);
                }
            }
            // Die inside one more completion: 0 = not at all, 1 = before the used entry is
            // visible, 2 = after it is visible but before the region noted it.
            if crash > 0 && !outstanding.is_empty() {
                let i = pick.index(outstanding.len());
                let h = outstanding[i];
                q.pre_complete(h);
                if crash == 2 {
                    used_idx = used_idx.wrapping_add(1);
                    outstanding.remove(i);
                }
            }
            let mut r = InflightQueue::new(region, 0, 16).unwrap();
            prop_assert_eq!(r.recover(used_idx).unwrap(), outstanding);
        }
    }

    /// A region laid out for larger rings than the frontend asked for (QEMU asks for its
    /// `queue-size` but runs rings of 1024) keeps that layout when handed back with the
    /// smaller size, so heads above the asked size are tracked across a reconnect.
    #[test]
    fn reopened_region_keeps_larger_layout() {
        let (region, file) = InflightRegion::create(2, 1024, ConnId::next()).unwrap();
        let mut q = InflightQueue::new(region.clone(), 1, 1024).unwrap();
        q.recover(0).unwrap();
        q.start(700);
        let size = queue_region_size(1024) * 2;
        let again = InflightRegion::open(&file, size, 0, 2, 128, ConnId::next()).unwrap();
        assert_eq!(again.queue_size(), 1024);
        let mut q2 = InflightQueue::new(again, 1, 1024).unwrap();
        assert_eq!(q2.recover(0).unwrap(), vec![700]);
        // A region really laid out for 128 stays at 128 and cannot track a ring of 1024.
        let (small, file) = InflightRegion::create(2, 128, ConnId::next()).unwrap();
        drop(small);
        let reopened =
            InflightRegion::open(&file, queue_region_size(128) * 2, 0, 2, 128, ConnId::next())
                .unwrap();
        assert_eq!(reopened.queue_size(), 128);
        assert!(InflightQueue::new(reopened, 0, 1024).is_none());
    }

    /// A region the daemon just created is fresh until a ring runs with it; the frontend
    /// hands the same memory back on reconnect, and then it is used.
    #[test]
    fn created_region_is_fresh_until_a_ring_runs() {
        let (region, _file) = InflightRegion::create(2, 8, ConnId::next()).unwrap();
        let mut q = InflightQueue::new(region.clone(), 0, 8).unwrap();
        assert!(q.is_fresh());
        // A refused start leaves it fresh.
        assert!(InflightQueue::new(region.clone(), 0, 8).unwrap().is_fresh());
        q.mark_in_use(0);
        assert!(!InflightQueue::new(region.clone(), 0, 8).unwrap().is_fresh());
        assert!(InflightQueue::new(region, 1, 8).unwrap().is_fresh());
    }

    /// A restored VM: the fresh region meets a ring whose used idx is far from 0, requests are
    /// replayed (marked in flight), and the ring restarts (the next checkpoint) before any of
    /// them completes. All of them are still in flight: none is dropped as a "half-recorded
    /// completion" (which made the daemon pop an avail entry twice after a takeover).
    #[test]
    fn a_restored_ring_restarting_before_any_completion_keeps_every_head() {
        let (region, _file) = InflightRegion::create(1, 8, ConnId::next()).unwrap();
        let mut q = InflightQueue::new(region.clone(), 0, 8).unwrap();
        assert!(q.is_fresh());
        for h in [0, 5, 3] {
            q.start(h);
        }
        q.mark_in_use(1591);
        let mut again = InflightQueue::new(region, 0, 8).unwrap();
        assert_eq!(again.recover(1591).unwrap(), vec![0, 5, 3]);
    }

    #[test]
    fn start_complete_recover() {
        let (region, _file) = InflightRegion::create(2, 8, ConnId::next()).unwrap();
        let mut q = InflightQueue::new(region.clone(), 1, 8).unwrap();
        assert!(q.recover(0).unwrap().is_empty());
        q.start(3);
        q.start(5);
        q.start(1);
        q.pre_complete(5);
        q.complete(5, 1);
        // Crash before head 1's used entry was written: both 3 and 1 are resubmitted.
        let mut q2 = InflightQueue::new(region.clone(), 1, 8).unwrap();
        assert_eq!(q2.recover(1).unwrap(), vec![3, 1]);
        // Crash after head 1 reached the used ring (used idx 2) but before the region noted it.
        q2.pre_complete(1);
        let mut q3 = InflightQueue::new(region, 1, 8).unwrap();
        assert_eq!(q3.recover(2).unwrap(), vec![3]);
    }

    /// Raw pointer to queue `q`'s header bytes, to play a hostile frontend.
    fn raw(region: &InflightRegion, q: u16) -> *mut u8 {
        region.header(q) as *const QueueHeader as *mut u8
    }

    #[test]
    fn hostile_regions_are_errors_not_panics() {
        let (region, _file) = InflightRegion::create(1, 8, ConnId::next()).unwrap();
        let p = raw(&region, 0);
        let hdr = region.header(0);
        // A ring ran with it: from now on its contents are trusted as far as they check out.
        InflightQueue::new(region.clone(), 0, 8)
            .unwrap()
            .mark_in_use(0);
        // desc_num 0, or smaller than the ring.
        for bad in [0u16, 4] {
            hdr.desc_num.store(bad, Ordering::Relaxed);
            let mut q = InflightQueue::new(region.clone(), 0, 8).unwrap();
            assert!(matches!(q.recover(0), Err(InflightError::DescNum { .. })));
        }
        hdr.desc_num.store(8, Ordering::Relaxed);
        // A head beyond a smaller ring is marked: error, not a silent skip.
        let mut q = InflightQueue::new(region.clone(), 0, 4).unwrap();
        hdr.desc_num.store(4, Ordering::Relaxed);
        q.start(6); // ignored: beyond this ring
        assert!(!q.is_inflight(6));
        region
            .desc(0, 6)
            .unwrap()
            .inflight
            .store(1, Ordering::Relaxed);
        assert_eq!(
            q.recover(0),
            Err(InflightError::HeadOutOfRange {
                head: 6,
                ring_size: 4
            })
        );
        region
            .desc(0, 6)
            .unwrap()
            .inflight
            .store(7, Ordering::Relaxed);
        let mut q = InflightQueue::new(region.clone(), 0, 8).unwrap();
        hdr.desc_num.store(8, Ordering::Relaxed);
        assert_eq!(
            q.recover(0),
            Err(InflightError::Garbage { head: 6, value: 7 })
        );
        region
            .desc(0, 6)
            .unwrap()
            .inflight
            .store(0, Ordering::Relaxed);
        // Garbage counters: sorted, and the next counter wraps instead of overflowing.
        region
            .desc(0, 2)
            .unwrap()
            .counter
            .store(u64::MAX, Ordering::Relaxed);
        region
            .desc(0, 2)
            .unwrap()
            .inflight
            .store(1, Ordering::Relaxed);
        region
            .desc(0, 5)
            .unwrap()
            .counter
            .store(u64::MAX, Ordering::Relaxed);
        region
            .desc(0, 5)
            .unwrap()
            .inflight
            .store(1, Ordering::Relaxed);
        let mut q = InflightQueue::new(region.clone(), 0, 8).unwrap();
        assert_eq!(q.recover(0).unwrap(), vec![2, 5]);
        q.start(1);
        // The frontend zeroes the whole region while the ring runs: nothing panics.
        // SAFETY: in bounds of the mapped queue area; a frontend does exactly this.
        unsafe { std::ptr::write_bytes(p, 0, queue_region_size(8) as usize) };
        q.start(3);
        q.pre_complete(3);
        q.complete(3, 1);
        q.abandon(1);
        assert!(!q.is_inflight(3));
        // And a region of 0xff bytes.
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(p, 0xff, queue_region_size(8) as usize) };
        q.start(4);
        q.pre_complete(4);
        q.complete(4, 2);
        let mut q = InflightQueue::new(region, 0, 8).unwrap();
        assert!(q.recover(0).is_err());
    }
}
