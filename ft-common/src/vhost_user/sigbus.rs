// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Surviving a frontend that shrinks a file under our mapping.
//!
//! Guest memory, the inflight region and the dirty log are `MAP_SHARED` mappings of files the
//! frontend also holds. Every mapping is checked against `fstat` when it is made, but a
//! frontend can still truncate the file afterwards (QEMU seals its memfds against that; an
//! unsealed memfd, a plain file or a hostile VMM need not). The daemon's next load or store in
//! the lost range then raises SIGBUS, which would kill the process and every other frontend's
//! service with it.
//!
//! The mechanism (the one systemd's journal uses for truncated journal files):
//! - Every such mapping is registered ([`register`]) in a fixed, lock-free table of address
//!   ranges, each tagged with its connection ([`ConnId`]). The [`Guard`] unregisters it, and
//!   its owner drops the guard before unmapping.
//! - A process-wide SIGBUS handler ([`install`]) looks the fault address (`si_addr`, kernel
//!   faults with `BUS_ADRERR` only) up in that table. If a registered range holds it, the
//!   handler maps a private anonymous zero page over the faulting page (`MAP_FIXED`), records
//!   the connection as broken and returns: the faulting access is retried and reads zeros (or
//!   writes into the private page). Any other SIGBUS goes to the previous handler (Rust's
//!   stack-overflow handler), or the default action: the process dies as before.
//! - The connection thread waits on a [`Watch`] of its connection, closes the connection with
//!   a clear error, and workers stop taking or completing requests over broken memory
//!   (`GuestMem::is_broken`, checked in `VringHandle::pop` and `add_used`).
//!
//! The handler is async-signal-safe: atomics, `mmap(2)` and one `write(2)` to an eventfd that
//! is never closed. A reaper thread reads that eventfd and wakes the watches of broken
//! connections (locks and `Arc`s are not allowed in the handler).
//!
//! What the zero page means for data: a page the daemon faulted on reads as zeros from then
//! on. The kernel's own accesses to a truncated page (io_uring, `pwritev2`, `writev` to the
//! tap) fail with EFAULT instead and never see a zero page unless the daemon's own access put
//! it there first. Completions are refused once the connection is broken, so the guest is never
//! told that a request over zeroed memory succeeded; what remains is described in
//! docs/architecture.md ("Hostile frontends").

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Registered mappings at once: guest regions (at most 509 per connection), inflight regions
/// and log areas, also of connections whose last request is still being drained.
const SLOTS: usize = 2048;
/// Broken connections remembered; older entries are overwritten (a broken connection is
/// closed within one message, long before 64 more break; each is recorded once).
const FAULT_LOG: usize = 64;

/// One registered range. `seq` is odd while the slot is being (un)registered: the handler reads
/// the fields between two equal even `seq` loads (a seqlock), so it never combines one
/// mapping's start with another's end.
struct Slot {
    seq: AtomicU64,
    /// Claimed by a [`Guard`].
    used: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
    conn: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: Slot = Slot {
    seq: AtomicU64::new(0),
    used: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    conn: AtomicU64::new(0),
};
static TABLE: [Slot; SLOTS] = [EMPTY_SLOT; SLOTS];

#[allow(clippy::declare_interior_mutable_const)]
const NO_FAULT: (AtomicU64, AtomicUsize) = (AtomicU64::new(0), AtomicUsize::new(0));
/// (connection, fault address) of recent faults, written round-robin by the handler.
static FAULTS: [(AtomicU64, AtomicUsize); FAULT_LOG] = [NO_FAULT; FAULT_LOG];
/// Connections recorded so far (the next `FAULTS` entry is this modulo `FAULT_LOG`).
static FAULT_COUNT: AtomicU64 = AtomicU64::new(0);
/// Eventfd the handler writes after a fault; read by the reaper thread. Never closed.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// The action SIGBUS had before [`install`] (Rust's stack-overflow handler, or the default).
struct OldAction(libc::sigaction);
// SAFETY: a plain C struct written once before the handler is installed, only read after.
unsafe impl Sync for OldAction {}
// SAFETY: as above.
unsafe impl Send for OldAction {}
static OLD_ACTION: OnceLock<OldAction> = OnceLock::new();
static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

/// Watches to wake, by connection.
type Watches = Mutex<HashMap<u64, Weak<EventFd>>>;
fn watches() -> &'static Watches {
    static W: OnceLock<Watches> = OnceLock::new();
    W.get_or_init(Watches::default)
}

/// Identity of one frontend connection, for the mappings made for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId(u64);

impl ConnId {
    /// A fresh identity, never handed out before in this process.
    pub fn next() -> ConnId {
        ConnId(NEXT_CONN.fetch_add(1, Ordering::Relaxed))
    }

    /// Where the first recorded fault in this connection's mappings was, if any: its memory
    /// is broken (part of it now reads as zeros).
    pub fn fault(self) -> Option<usize> {
        if FAULT_COUNT.load(Ordering::Acquire) == 0 {
            return None;
        }
        FAULTS
            .iter()
            .find(|(c, _)| c.load(Ordering::Acquire) == self.0)
            .map(|(_, a)| a.load(Ordering::Relaxed))
    }

    /// Whether a fault was recorded in this connection's mappings (one load while no fault
    /// ever happened in the process).
    pub fn is_broken(self) -> bool {
        self.fault().is_some()
    }
}

/// A registered mapping; dropping it unregisters it. Drop it before the mapping is unmapped.
#[derive(Debug)]
pub struct Guard {
    slot: usize,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let s = &TABLE[self.slot];
        s.seq.fetch_add(1, Ordering::AcqRel);
        s.start.store(0, Ordering::Relaxed);
        s.end.store(0, Ordering::Relaxed);
        s.conn.store(0, Ordering::Relaxed);
        s.seq.fetch_add(1, Ordering::AcqRel);
        s.used.store(false, Ordering::Release);
    }
}

/// Registers `[addr, addr + len)` as a mapping of `conn` whose file may shrink under it.
/// Fails only when the table is full (the mapping should then be refused).
pub fn register(addr: *const u8, len: usize, conn: ConnId) -> std::io::Result<Guard> {
    let start = addr as usize;
    let end = start
        .checked_add(len)
        .filter(|_| len > 0)
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    for (i, s) in TABLE.iter().enumerate() {
        if s.used
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            s.seq.fetch_add(1, Ordering::AcqRel);
            s.start.store(start, Ordering::Relaxed);
            s.end.store(end, Ordering::Relaxed);
            s.conn.store(conn.0, Ordering::Relaxed);
            s.seq.fetch_add(1, Ordering::AcqRel);
            return Ok(Guard { slot: i });
        }
    }
    Err(std::io::Error::other(format!(
        "more than {SLOTS} shared mappings registered for SIGBUS recovery"
    )))
}

/// The connection whose registered mapping holds `addr`, if any. Async-signal-safe.
fn lookup(addr: usize) -> Option<u64> {
    for s in TABLE.iter() {
        if !s.used.load(Ordering::Acquire) {
            continue;
        }
        for _ in 0..4 {
            let seq = s.seq.load(Ordering::Acquire);
            if seq & 1 == 1 {
                continue;
            }
            let (start, end, conn) = (
                s.start.load(Ordering::Acquire),
                s.end.load(Ordering::Acquire),
                s.conn.load(Ordering::Acquire),
            );
            if s.seq.load(Ordering::Acquire) != seq {
                continue;
            }
            if start <= addr && addr < end && conn != 0 {
                return Some(conn);
            }
            break;
        }
    }
    None
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == libc::BUS_ADRERR {
        if let Some(conn) = lookup(addr) {
            // The connection is recorded broken *before* the zero page goes in: a thread that
            // reads the zero page and then checks `is_broken` (the commit path does, after its
            // copy) must see the flag. The mmap below is a syscall, a full barrier in practice;
            // the fence states the order for the compiler. One entry per connection (its
            // first fault): a frontend faulting on many pages must not push other connections
            // out of the log.
            if !FAULTS
                .iter()
                .any(|(c, _)| c.load(Ordering::Acquire) == conn)
            {
                // The index is reserved first, so two threads faulting at once use two
                // entries.
                let n = FAULT_COUNT.fetch_add(1, Ordering::AcqRel);
                let (c, a) = &FAULTS[(n % FAULT_LOG as u64) as usize];
                a.store(addr, Ordering::Relaxed);
                c.store(conn, Ordering::Release);
            }
            std::sync::atomic::fence(Ordering::SeqCst);
            let page = PAGE_SIZE.load(Ordering::Relaxed);
            let base = addr & !(page - 1);
            // SAFETY: replaces one page of a registered shared mapping (ours, still mapped:
            // the faulting thread is using it) by private anonymous memory.
            let p = unsafe {
                libc::mmap(
                    base as *mut libc::c_void,
                    page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                let fd = WAKE_FD.load(Ordering::Relaxed);
                if fd >= 0 {
                    let one: u64 = 1;
                    // SAFETY: write(2) of 8 bytes from a local to an eventfd that is never
                    // closed.
                    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
                }
                return;
            }
        }
    }
    // Not ours: what would have happened without us.
    if let Some(OldAction(old)) = OLD_ACTION.get() {
        let h = old.sa_sigaction;
        if h != libc::SIG_DFL && h != libc::SIG_IGN {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler, called as it was registered.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: as above, a plain handler.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
            return;
        }
    }
    // SAFETY: restore the default action; a hardware fault then recurs on return and kills
    // the process, a sent signal is re-raised.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
        if code <= 0 {
            libc::raise(libc::SIGBUS);
        }
    }
}

/// Installs the SIGBUS handler and its reaper thread, once per process (later calls return
/// the first call's result).
pub fn install() -> std::io::Result<()> {
    INSTALLED
        .get_or_init(|| do_install().map_err(|e| e.to_string()))
        .clone()
        .map_err(std::io::Error::other)
}

fn do_install() -> std::io::Result<()> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        PAGE_SIZE.store(page as usize, Ordering::Relaxed);
    }
    let wake = EventFd::new(0)?;
    // The reaper owns a duplicate; the handler's fd is leaked on purpose (never closed, so
    // the handler can never write into an fd number reused by something else).
    let reaper = wake.try_clone()?;
    WAKE_FD.store(wake.as_raw_fd(), Ordering::Relaxed);
    std::mem::forget(wake);
    std::thread::Builder::new()
        .name("ft-sigbus".into())
        .spawn(move || reap(reaper))?;
    // SAFETY: querying and setting the process's SIGBUS action with valid structs; the old
    // action is stored before ours can run.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let _ = OLD_ACTION.set(OldAction(old));
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigbus as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reaper thread: after each fault, wakes the watches of broken connections.
fn reap(wake: EventFd) {
    loop {
        if wake.read().is_err() {
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        let w = watches().lock().unwrap_or_else(|e| e.into_inner());
        for (&conn, evt) in w.iter() {
            if ConnId(conn).is_broken() {
                if let Some(evt) = evt.upgrade() {
                    let _ = evt.write(1);
                }
            }
        }
    }
}

/// An eventfd that becomes readable once `conn`'s memory breaks; for the connection thread's
/// poll. Unregistered on drop.
#[derive(Debug)]
pub struct Watch {
    conn: ConnId,
    evt: Arc<EventFd>,
}

impl Watch {
    /// Watch `conn` (call [`install`] first, or nothing ever wakes it).
    pub fn new(conn: ConnId) -> std::io::Result<Watch> {
        let evt = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        watches()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn.0, Arc::downgrade(&evt));
        // A fault before the registration has no wakeup of its own.
        if conn.is_broken() {
            let _ = evt.write(1);
        }
        Ok(Watch { conn, evt })
    }

    /// The fd to poll for readability.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.evt.as_raw_fd()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        watches()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.conn.0);
    }
}

/// Maps `len` bytes of `file` at `offset` shared and registers the mapping for `conn`: for
/// the inflight region and dirty log areas (guest regions go through vm-memory).
pub struct SharedMapping {
    // Declared first: unregistered before the mapping goes.
    _guard: Guard,
    map: memmap2::MmapRaw,
}

impl std::fmt::Debug for SharedMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMapping")
            .field("len", &self.map.len())
            .finish()
    }
}

impl SharedMapping {
    /// Map and register.
    pub fn new(
        file: &std::fs::File,
        offset: u64,
        len: usize,
        conn: ConnId,
    ) -> std::io::Result<SharedMapping> {
        let map = memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map_raw(file)?;
        let guard = register(map.as_ptr(), map.len(), conn)?;
        Ok(SharedMapping { _guard: guard, map })
    }

    /// Start of the mapping.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the mapping is empty (never: zero-length mappings are refused).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn memfd(size: u64) -> std::fs::File {
        // SAFETY: plain syscall; the fd is checked and then owned by the File.
        let fd = unsafe { libc::memfd_create(c"sigbus-t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd.
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    #[test]
    fn truncated_mapping_reads_zeros_and_breaks_its_connection_only() {
        install().unwrap();
        let conn = ConnId::next();
        let other = ConnId::next();
        let watch = Watch::new(conn).unwrap();
        let f = memfd(0x4000);
        std::os::unix::fs::FileExt::write_at(&f, &[7u8; 0x4000], 0).unwrap();
        let m = SharedMapping::new(&f, 0, 0x4000, conn).unwrap();
        let _o = SharedMapping::new(&memfd(0x1000), 0, 0x1000, other).unwrap();
        // SAFETY: reading our own mapping.
        assert_eq!(unsafe { m.as_mut_ptr().add(0x3000).read_volatile() }, 7);
        assert!(!conn.is_broken());
        f.set_len(0x2000).unwrap();
        // SAFETY: as above; the page is gone from the file: SIGBUS, handled.
        let v = unsafe { m.as_mut_ptr().add(0x3008).read_volatile() };
        assert_eq!(v, 0);
        // SAFETY: the page below the new end is still the file's.
        assert_eq!(unsafe { m.as_mut_ptr().add(0x1000).read_volatile() }, 7);
        assert_eq!(conn.fault(), Some(m.as_mut_ptr() as usize + 0x3008));
        assert!(!other.is_broken());
        let mut pfd = libc::pollfd {
            fd: watch.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the reaper wakes the watch.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 10_000) }, 1);
        // A watch made after the fault is readable at once.
        let late = Watch::new(conn).unwrap();
        let mut pfd = libc::pollfd {
            fd: late.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 1);
    }
}
