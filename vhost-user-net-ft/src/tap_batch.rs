// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Batched frame output: many frames to one tap fd with one io_uring submission instead of one
//! write(2) each (the TX path with `--ft off`, and every COMMIT).
//!
//! A tap takes exactly one frame per write, and has no sendmmsg; io_uring is the way to hand
//! it a batch in one syscall. Order is guest order, kept in one of two ways, chosen once per
//! writer from the tap's send buffer ([`Tap::send_buffer`]):
//! - **Unlinked** (the tap's default, unlimited send buffer): the tap never refuses a write for
//!   room, and its fd is non-blocking, so io_uring issues the writes of a submission inline,
//!   one after the other, in ring order. Nothing needs linking.
//! - **Linked** (a send buffer limited with TUNSETSNDBUF, or an fd that is not a tap): a write
//!   may find no room, and io_uring would retry it when there is, after later writes went out.
//!   So the writes are hard-linked (IOSQE_IO_HARDLINK): each starts only after the previous
//!   one finished, and a failed write does not cancel the rest.
//!
//! Links have a price: io_uring issues each linked write from task work once the previous one
//! completed. With 64 B frames that was a third of the writer thread's time; without links the
//! same thread writes 1.3-1.4x the frames (docs/benchmarks.md, "Network packet rate"). A tap
//! whose send buffer is lowered after the writer chose may see a frame refused for room go out
//! after later ones of its batch; it is still written exactly once.
//!
//! If io_uring is unavailable (old kernel, seccomp) the writer falls back to a write(2) loop;
//! the result is the same, only slower.
//!
//! Invariant (output commit depends on it): when [`TapBatch::write_all`] returns, the kernel
//! holds no reference to any frame passed in: every SQE it queued has completed and been
//! reaped, or was never consumed by the kernel and never will be. The caller then frees the
//! arena space, which may next hold frames of a later, unacknowledged epoch; an SQE still in the
//! ring would send those bytes at the next submit. So:
//! - only as many SQEs are queued as the SQ has room for, and the wait is for exactly those;
//! - a transient `io_uring_enter` error (`EINTR`, `EAGAIN`, `EBUSY`) is retried after reaping;
//! - any other error retires the ring for good: the writer waits (polling the ring fd, no
//!   `io_uring_enter`) until every SQE the kernel consumed has completed, drops the ring with
//!   the unconsumed SQEs in it (the kernel never sees them), and writes the rest of the batch,
//!   in order, with write(2). Every frame is still handed to the tap exactly once, in order.

use crate::tap::Tap;
use io_uring::{opcode, squeue, types, IoUring};
use log::{error, warn};
use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// Submission queue size: frames per io_uring_enter.
const BATCH: usize = 256;

pub struct TapBatch {
    ring: Option<IoUring>,
    /// Whether the writes of a batch are linked; decided at the first batch (module docs).
    linked: Option<bool>,
}

/// Outcome of a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchResult {
    pub frames: u64,
    /// Frames the tap refused or wrote short.
    pub errors: u64,
    /// io_uring_enter (or write) calls made.
    pub syscalls: u64,
}

impl Default for TapBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl TapBatch {
    pub fn new() -> TapBatch {
        let ring = match IoUring::new(BATCH as u32) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!("io_uring unavailable ({e}); commits use one write per frame");
                None
            }
        };
        TapBatch { ring, linked: None }
    }

    /// A writer that always uses write(2) (tests of the fallback).
    pub fn without_io_uring() -> TapBatch {
        TapBatch {
            ring: None,
            linked: None,
        }
    }

    pub fn uses_io_uring(&self) -> bool {
        self.ring.is_some()
    }

    /// Writes every frame (virtio-net header included) to `tap`, in order.
    ///
    /// # Safety
    /// Each iovec must describe memory valid for reads until this returns.
    pub unsafe fn write_all(&mut self, tap: &Tap, frames: &[libc::iovec]) -> BatchResult {
        let linked = *self.linked.get_or_insert_with(|| {
            let linked = needs_links(tap.send_buffer());
            if linked {
                log::info!(
                    "tap {}: send buffer limited, batched writes are linked to keep their order",
                    tap.name()
                );
            }
            linked
        });
        self.write_all_fd(tap.as_raw_fd(), frames, linked)
    }

    /// Whether this writer links its writes (None before its first batch).
    pub fn links_writes(&self) -> Option<bool> {
        self.linked
    }

    /// [`TapBatch::write_all`] on any fd that takes one message per write.
    ///
    /// # Safety
    /// As for [`TapBatch::write_all`]; `fd` must stay open until this returns.
    unsafe fn write_all_fd(
        &mut self,
        fd: RawFd,
        frames: &[libc::iovec],
        linked: bool,
    ) -> BatchResult {
        let mut r = BatchResult::default();
        let mut next = 0;
        if let Some(ring) = self.ring.as_mut() {
            match write_ring(ring, fd, frames, linked, &mut r) {
                Ok(()) => return r,
                Err((e, resume)) => {
                    // Everything the kernel took has completed; the SQEs it did not take go
                    // away with the ring. Never submit on this ring again.
                    error!(
                        "io_uring_enter: {e}; {} of {} frames left for write(2), which every \
                         later commit uses too",
                        frames.len() - resume,
                        frames.len()
                    );
                    self.ring = None;
                    next = resume;
                }
            }
        }
        for f in &frames[next..] {
            r.syscalls += 1;
            r.frames += 1;
            let n = libc::write(fd, f.iov_base, f.iov_len);
            if n < 0 || n as usize != f.iov_len {
                r.errors += 1;
            }
        }
        r
    }
}

/// Whether writes to a tap with this send buffer must be linked to keep their order: unless
/// the buffer is unlimited, a write can be refused for room and retried after later ones.
fn needs_links(send_buffer: io::Result<i32>) -> bool {
    !matches!(send_buffer, Ok(i32::MAX))
}

// Test hook: the next `io_uring_enter` calls on this thread fail with these errnos (0 = let it
// through), without reaching the kernel, as a seccomp or strace fault injection would.
#[cfg(test)]
thread_local! {
    static INJECT: std::cell::RefCell<std::collections::VecDeque<i32>> =
        const { std::cell::RefCell::new(std::collections::VecDeque::new()) };
}

fn enter(ring: &IoUring, want: usize) -> io::Result<usize> {
    #[cfg(test)]
    if let Some(errno) = INJECT.with(|q| q.borrow_mut().pop_front()) {
        if errno != 0 {
            return Err(io::Error::from_raw_os_error(errno));
        }
    }
    ring.submit_and_wait(want)
}

/// Reaps every available completion into `r`; returns how many.
fn reap(ring: &mut IoUring, r: &mut BatchResult) -> usize {
    let mut n = 0;
    for cqe in ring.completion() {
        n += 1;
        r.frames += 1;
        if cqe.result() < 0 || cqe.result() as u64 != cqe.user_data() {
            r.errors += 1;
        }
    }
    n
}

/// Transient `io_uring_enter` retries in a row before the ring is given up.
const MAX_RETRIES: u32 = 1000;

/// Writes `frames` through `ring`. On a hard error returns it with the index of the first frame
/// the kernel never saw, after every frame it did see has completed (see the module doc).
fn write_ring(
    ring: &mut IoUring,
    fd: RawFd,
    frames: &[libc::iovec],
    linked: bool,
    r: &mut BatchResult,
) -> Result<(), (io::Error, usize)> {
    let fd = types::Fd(fd);
    let mut start = 0;
    while start < frames.len() {
        // Every earlier SQE has been reaped, so the SQ is empty; queue what fits (linked: all
        // but the last, so the chunk goes out in order).
        let room = {
            let sq = ring.submission();
            sq.capacity() - sq.len()
        };
        let chunk = &frames[start..frames.len().min(start + room)];
        let mut queued = 0;
        {
            let mut sq = ring.submission();
            for (i, f) in chunk.iter().enumerate() {
                let mut e = opcode::Write::new(fd, f.iov_base as *const u8, f.iov_len as u32)
                    .offset(u64::MAX)
                    .build()
                    .user_data(f.iov_len as u64);
                if linked && i + 1 < chunk.len() {
                    e = e.flags(squeue::Flags::IO_HARDLINK);
                }
                // SAFETY: the buffer outlives the wait below (caller's contract).
                if unsafe { sq.push(&e) }.is_err() {
                    // Cannot happen (room was checked); wait for what is queued, no more.
                    break;
                }
                queued += 1;
            }
        }
        let mut done = 0usize;
        let mut retries = 0;
        while done < queued {
            r.syscalls += 1;
            match enter(ring, queued - done) {
                Ok(_) => retries = 0,
                Err(e) => {
                    let transient = matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    );
                    retries += 1;
                    if !transient || retries > MAX_RETRIES {
                        let unconsumed = ring.submission().len();
                        let consumed = queued - unconsumed;
                        done += wait_consumed(ring, consumed - done, r);
                        debug_assert_eq!(done, consumed);
                        return Err((e, start + consumed));
                    }
                    if e.raw_os_error() == Some(libc::EAGAIN) {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
            done += reap(ring, r);
        }
        start += queued;
    }
    Ok(())
}

/// Waits, without `io_uring_enter`, for `n` more completions of SQEs the kernel has consumed,
/// and reaps them. The ring fd polls readable when the CQ has entries, and returning from
/// poll(2) runs the task work that posts completions. Returns how many were reaped.
fn wait_consumed(ring: &mut IoUring, n: usize, r: &mut BatchResult) -> usize {
    let mut got = 0;
    let mut last_log = std::time::Instant::now();
    while got < n {
        got += reap(ring, r);
        if got >= n {
            break;
        }
        let mut p = libc::pollfd {
            fd: ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 100) };
        if last_log.elapsed() >= std::time::Duration::from_secs(10) {
            // Freeing the frames now could send a later epoch's bytes: keep waiting.
            warn!("still waiting for {} tap writes in flight", n - got);
            last_log = std::time::Instant::now();
        }
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};

    /// A SOCK_SEQPACKET pair: one message per write, like a tap.
    fn pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two fds into the array.
        let rc =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: fresh fds we own.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn frames(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("frame {i:05}").into_bytes().repeat(1 + i % 5))
            .collect()
    }

    /// Writes `data` through `b` (links as a tap with a limited send buffer gets them) while a
    /// reader thread collects what arrives.
    fn run(b: &mut TapBatch, data: &[Vec<u8>], inject: &[i32]) -> (BatchResult, Vec<Vec<u8>>) {
        run_with(b, data, inject, Socket::DEFAULT)
    }

    /// How [`run_with`] writes and what the socket does.
    #[derive(Clone, Copy)]
    struct Socket {
        linked: bool,
        /// SO_SNDBUF to ask for (0: the default).
        send_buffer: libc::c_int,
        /// How long the reader waits before it reads anything.
        reader_delay: std::time::Duration,
    }

    impl Socket {
        const DEFAULT: Socket = Socket {
            linked: true,
            send_buffer: 0,
            reader_delay: std::time::Duration::ZERO,
        };
    }

    fn run_with(
        b: &mut TapBatch,
        data: &[Vec<u8>],
        inject: &[i32],
        sock: Socket,
    ) -> (BatchResult, Vec<Vec<u8>>) {
        let (tx, rx) = pair();
        if sock.send_buffer > 0 {
            // SAFETY: SO_SNDBUF reads one c_int from the pointer, which outlives the call.
            let rc = unsafe {
                libc::setsockopt(
                    tx.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&sock.send_buffer as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0);
        }
        let want = data.len();
        let reader = std::thread::spawn(move || {
            std::thread::sleep(sock.reader_delay);
            let mut got = Vec::new();
            let mut buf = vec![0u8; 4096];
            while got.len() < want {
                let mut p = libc::pollfd {
                    fd: rx.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut p, 1, 2000) } <= 0 {
                    break;
                }
                // SAFETY: reads into a buffer we own.
                let n = unsafe { libc::read(rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                assert!(n > 0);
                got.push(buf[..n as usize].to_vec());
            }
            // Nothing more may arrive: a duplicate would show up here.
            let mut p = libc::pollfd {
                fd: rx.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            assert_eq!(unsafe { libc::poll(&mut p, 1, 200) }, 0, "extra frames");
            got
        });
        let iov: Vec<libc::iovec> = data
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        INJECT.with(|q| q.borrow_mut().extend(inject.iter().copied()));
        // SAFETY: `data` and `tx` outlive the call.
        let r = unsafe { b.write_all_fd(tx.as_raw_fd(), &iov, sock.linked) };
        INJECT.with(|q| q.borrow_mut().clear());
        (r, reader.join().unwrap())
    }

    #[test]
    fn batches_go_out_in_order_once() {
        let mut b = TapBatch::new();
        assert!(b.uses_io_uring());
        let data = frames(600);
        let (r, got) = run(&mut b, &data, &[]);
        assert_eq!((r.frames, r.errors), (600, 0));
        assert_eq!(r.syscalls, 3, "600 frames: three chunks of at most 256");
        assert_eq!(got, data);
    }

    /// Unlinked writes keep their order where none waits for room, as on a tap with its
    /// unlimited default send buffer: the socket gets room for a whole chunk (the kernel caps
    /// the request at twice net.core.wmem_max, 416 KiB by default).
    const UNLINKED: Socket = Socket {
        linked: false,
        send_buffer: 1 << 20,
        reader_delay: std::time::Duration::ZERO,
    };

    #[test]
    fn unlinked_batches_go_out_in_order_once() {
        let mut b = TapBatch::new();
        let data = frames(600);
        let (r, got) = run_with(&mut b, &data, &[], UNLINKED);
        assert_eq!((r.frames, r.errors), (600, 0));
        assert_eq!(r.syscalls, 3, "600 frames: three chunks of at most 256");
        assert_eq!(got, data);
    }

    #[test]
    fn linked_writes_wait_for_room_in_order() {
        // A full socket (small buffer, reader not reading yet) refuses writes for room: io_uring
        // retries each when there is room, and the links keep the order meanwhile.
        let mut b = TapBatch::new();
        let data = frames(600);
        let sock = Socket {
            linked: true,
            send_buffer: 4096,
            reader_delay: std::time::Duration::from_millis(100),
        };
        let (r, got) = run_with(&mut b, &data, &[], sock);
        assert_eq!((r.frames, r.errors), (600, 0));
        assert_eq!(got, data);
        assert!(b.uses_io_uring());
    }

    #[test]
    fn only_an_unlimited_send_buffer_goes_unlinked() {
        assert!(!needs_links(Ok(i32::MAX)));
        assert!(needs_links(Ok(212_992)));
        assert!(needs_links(Err(io::Error::from_raw_os_error(libc::ENOTTY))));
    }

    #[test]
    fn a_failed_enter_retires_the_ring_after_reaping_and_loses_nothing() {
        // The first enter fails before reaching the kernel: nothing was consumed. The old code
        // returned with the SQEs still queued (they went out with the next batch, from freed
        // memory) and counted the frames as errors. Output commit depends on this in both
        // modes: a stale SQE would send bytes of a later, unacknowledged epoch.
        for sock in [Socket::DEFAULT, UNLINKED] {
            let mut b = TapBatch::new();
            let data = frames(10);
            let (r, got) = run_with(&mut b, &data, &[libc::EIO], sock);
            assert_eq!(got, data, "every frame exactly once, in order");
            assert_eq!((r.frames, r.errors), (10, 0));
            assert!(
                !b.uses_io_uring(),
                "a ring with unconsumed SQEs must never submit again"
            );
            let later = frames(3);
            let (_, got) = run_with(&mut b, &later, &[], sock);
            assert_eq!(got, later, "no stale SQE resurfaces in a later batch");
        }
    }

    #[test]
    fn a_failure_in_a_later_chunk_keeps_order() {
        for sock in [Socket::DEFAULT, UNLINKED] {
            let mut b = TapBatch::new();
            let data = frames(600);
            // First chunk through the ring, the second chunk's enter fails hard.
            let (r, got) = run_with(&mut b, &data, &[0, libc::EBADF], sock);
            assert_eq!(got, data);
            assert_eq!((r.frames, r.errors), (600, 0));
            assert!(!b.uses_io_uring());
        }
    }

    #[test]
    fn transient_errors_are_retried_on_the_ring() {
        let mut b = TapBatch::new();
        let data = frames(20);
        let (r, got) = run(&mut b, &data, &[libc::EAGAIN, libc::EINTR, libc::EBUSY]);
        assert_eq!(got, data);
        assert_eq!((r.frames, r.errors), (20, 0));
        assert!(b.uses_io_uring());
    }
}
