// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-ring state on the worker side: the virtio-queue `Queue`, the call eventfd, inflight
//! tracking and resubmission, and used-ring notification with EVENT_IDX suppression.
//!
//! A [`VringHandle`] exists only while its ring runs (between start and stop) and is touched
//! only by its group's worker thread, so it needs no lock.
//!
//! Guest notifications: one per batch, as EVENT_IDX (or NO_INTERRUPT) allows. A notification
//! due while the ring has no call fd (QEMU 10 restarts a ring with SET_VRING_KICK and sends the
//! new call fd after it) is remembered and sent when the call fd arrives: EVENT_IDX would not
//! ask for it again, and a guest waiting for it (an MSI-X vector of its own) would wait forever.
//!
//! Resubmission after reconnect: heads still marked in the inflight region are handed out by
//! [`VringHandle::pop`] before new avail entries. virtio-queue builds a `DescriptorChain` only
//! from an avail ring, so at start the heads are written into a private avail ring in a scratch
//! mapping that only a one-off view of guest memory contains (`memory::with_scratch`), and all
//! of them are popped from a shadow `Queue` at once. The scratch is never part of the memory
//! normal chains and rings use, and the view closes it once the heads are popped, before any
//! chain is handed out: a resubmitted descriptor naming it (even one the guest rewrote after
//! the start) resolves to nothing and gets the device's error status.
//!
//! Broken memory (a file the frontend shrank under a mapping, see `sigbus.rs`): `pop` takes
//! nothing more and `add_used` completes nothing more on a connection whose memory faulted,
//! since part of it now reads as zeros; the connection is being closed, and with an inflight
//! region the requests are resubmitted by the next one.
//!
//! Guest-controlled state is never trusted to make progress. The avail ring, its idx and the
//! heads in it are guest RAM: [`pop`](VringHandle::pop) reads the idx once, and an idx more
//! than the ring size ahead, an unreadable ring or a head beyond the ring marks the ring
//! *broken*. A broken ring pops nothing, reports no new work and does not re-arm
//! notifications, so no device loop can spin on it; the frontend is told through the
//! VRING_ERR eventfd, and the next start (GET_VRING_BASE + restart, reconnect) begins afresh.
//! Inconsistencies visible at start (overlapping rings, a base or inflight region that does
//! not match the avail ring) fail the start instead, which the frontend sees as a NEED_REPLY
//! error.
//!
//! Replay on a restored VM: the same mechanism hands out the heads of a replay record (see
//! `replay.rs`) after checking it against the restored ring; they are marked in the (fresh)
//! inflight region in the record's order, so a later restart of this daemon resubmits them.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::info;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::device::Chain;
use super::inflight::InflightQueue;
use super::memory::{with_scratch, DirtyLog, GuestMem};
use super::replay::RingReplay;
use crate::guest_warn;

/// Everything the connection thread knows about a ring when it starts it.
#[derive(Debug)]
pub struct RingSetup {
    /// Queue index.
    pub index: u16,
    /// Queue size.
    pub size: u16,
    /// Guest-physical addresses of descriptor table, avail ring, used ring.
    pub desc: u64,
    /// Avail ring GPA.
    pub avail: u64,
    /// Used ring GPA.
    pub used: u64,
    /// Base (next avail index) from SET_VRING_BASE or the previous stop.
    pub base: u16,
    /// Call eventfd (None: polling frontend, never signalled).
    pub call: Option<Arc<EventFd>>,
    /// VRING_ERR eventfd, signalled when the ring breaks.
    pub err: Option<Arc<EventFd>>,
    /// Whether RING_EVENT_IDX was negotiated.
    pub event_idx: bool,
    /// Inflight tracking for this queue, if the frontend set an inflight region.
    pub inflight: Option<InflightQueue>,
    /// The replay record for this ring's first start on a restored VM, if one was given.
    pub replay: Option<RingReplay>,
}

/// A running ring, as seen by a [`QueueWorker`](super::device::QueueWorker).
pub struct VringHandle {
    index: u16,
    queue: Queue,
    mem: Arc<GuestMem>,
    call: Option<Arc<EventFd>>,
    err: Option<Arc<EventFd>>,
    log: Arc<DirtyLog>,
    inflight: Option<InflightQueue>,
    /// Chains left in flight by a previous connection or daemon, oldest first.
    resubmit: VecDeque<Chain>,
    need_signal: bool,
    /// A notification was due while no call fd was set (ring restarted before the frontend
    /// sent its new call fd): sent as soon as one arrives.
    missed_signal: bool,
    /// The guest's ring state is inconsistent: nothing is taken until the next start.
    broken: bool,
}

impl std::fmt::Debug for VringHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VringHandle")
            .field("index", &self.index)
            .field("next_avail", &self.queue.next_avail())
            .field("next_used", &self.queue.next_used())
            .field("broken", &self.broken)
            .finish()
    }
}

fn make_queue(size: u16, desc: u64, avail: u64, used: u64) -> Result<Queue, virtio_queue::Error> {
    let mut q = Queue::new(size)?;
    q.try_set_size(size)?;
    q.try_set_desc_table_address(GuestAddress(desc))?;
    q.try_set_avail_ring_address(GuestAddress(avail))?;
    q.try_set_used_ring_address(GuestAddress(used))?;
    q.set_ready(true);
    Ok(q)
}

impl VringHandle {
    /// Build the running ring. Reads used->idx, recovers inflight state and derives the next
    /// avail index: with a used inflight region (same VM: reconnect or daemon restart) the used
    /// idx plus the heads still marked, whatever SET_VRING_BASE says (after a daemon crash QEMU
    /// sends the used idx there); otherwise (fresh region, or none) `setup.base`.
    ///
    /// A fresh region with `setup.base != used idx` is a VM restored from a checkpoint with
    /// requests popped but not completed at the checkpoint: which ones cannot be told from the
    /// rings (completions need not be in order). With `setup.replay` the record says which
    /// (checked against both numbers, then handed out first); without, the start is refused
    /// rather than guessed.
    ///
    /// Also fails if the rings overlap or lie outside memory, the inflight region contradicts
    /// the ring, or the avail idx is more than the ring size ahead of the next avail index.
    pub(crate) fn start(
        mut setup: RingSetup,
        mem: Arc<GuestMem>,
        log: Arc<DirtyLog>,
    ) -> Result<Self, String> {
        let mut queue = make_queue(setup.size, setup.desc, setup.avail, setup.used)
            .map_err(|e| format!("queue {}: invalid ring: {e:?}", setup.index))?;
        if !queue.is_valid(&*mem) {
            return Err(format!(
                "queue {}: ring addresses outside guest memory",
                setup.index
            ));
        }
        check_layout(&setup)?;
        queue.set_event_idx(setup.event_idx);
        let used_idx = queue
            .used_idx(&*mem, Ordering::Acquire)
            .map_err(|e| format!("queue {}: read used idx: {e:?}", setup.index))?
            .0;
        let mut inflight = setup.inflight.take();
        let replay = setup.replay.take();
        let mut resubmit = VecDeque::new();
        let next_avail = match inflight.as_mut() {
            Some(inf) if !inf.is_fresh() => {
                if replay.is_some() {
                    info!(
                        "queue {}: the inflight region was used before (same VM continuing): it \
                         decides what to resubmit, the replay record is not used",
                        setup.index
                    );
                }
                let heads = inf
                    .recover(used_idx)
                    .map_err(|e| format!("queue {}: inflight region: {e}", setup.index))?;
                let n = heads.len() as u16;
                if n > 0 {
                    info!(
                        "queue {}: resubmitting {n} request(s) left in flight by a previous daemon or connection",
                        setup.index
                    );
                    resubmit = Self::resubmit_chains(&setup, &mem, &heads)?;
                }
                used_idx.wrapping_add(n)
            }
            _ if replay.is_some() => {
                let r = replay.as_ref().expect("checked");
                r.check(setup.index, setup.size, setup.base, used_idx)?;
                let n = r.heads.len() as u16;
                if n > 0 {
                    info!(
                        "queue {}: replaying {n} request(s) outstanding at the checkpoint \
                         (base {}, used idx {used_idx})",
                        setup.index, setup.base
                    );
                    resubmit = Self::resubmit_chains(&setup, &mem, &r.heads)?;
                    if let Some(inf) = inflight.as_mut() {
                        for &h in &r.heads {
                            inf.start(h);
                        }
                    }
                }
                setup.base
            }
            Some(_) if setup.base != used_idx => {
                return Err(format!(
                    "queue {}: SET_VRING_BASE is {} but the used ring's idx is {}: {} request(s) \
                     were taken and not completed before this VM was restored, and no replay \
                     record says which; refusing to start the ring",
                    setup.index,
                    setup.base,
                    used_idx,
                    setup.base.wrapping_sub(used_idx)
                ));
            }
            _ => setup.base,
        };
        let avail_idx = queue
            .avail_idx(&*mem, Ordering::Acquire)
            .map_err(|e| format!("queue {}: read avail idx: {e:?}", setup.index))?
            .0;
        if avail_idx.wrapping_sub(next_avail) > setup.size {
            return Err(format!(
                "queue {}: avail idx {avail_idx} is more than the ring size ({}) ahead of the next entry {next_avail} (base or inflight region does not match the ring)",
                setup.index, setup.size
            ));
        }
        if let Some(inf) = inflight.as_mut() {
            inf.mark_in_use(used_idx);
        }
        queue.set_next_avail(next_avail);
        queue.set_next_used(used_idx);
        Ok(VringHandle {
            index: setup.index,
            queue,
            mem,
            call: setup.call,
            err: setup.err,
            log,
            inflight,
            resubmit,
            need_signal: false,
            missed_signal: false,
            broken: false,
        })
    }

    /// Pops the chains of `heads` (all below the ring size) through a shadow queue over a
    /// private scratch view (see the module docs).
    fn resubmit_chains(
        setup: &RingSetup,
        mem: &GuestMem,
        heads: &[u16],
    ) -> Result<VecDeque<Chain>, String> {
        let q = setup.index;
        let (view, avail) =
            with_scratch(mem, heads).map_err(|e| format!("queue {q}: resubmission: {e}"))?;
        let view = Arc::new(view);
        // The used address is never touched by pops; it only has to be valid for the queue.
        let mut shadow = make_queue(setup.size, setup.desc, avail, avail)
            .map_err(|e| format!("queue {q}: shadow ring: {e:?}"))?;
        let mut out = VecDeque::with_capacity(heads.len());
        for _ in heads {
            let chain = shadow
                .iter(view.clone())
                .ok()
                .and_then(|mut it| it.next())
                .ok_or_else(|| format!("queue {q}: resubmission ring unreadable"))?;
            out.push_back(chain);
        }
        // From here on the chains resolve descriptors in guest memory only: one naming the
        // scratch gets the device's error status like any address outside guest memory.
        view.close_scratch();
        Ok(out)
    }

    /// Queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Queue size negotiated for this ring.
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// The guest memory chains of this ring refer to.
    pub fn memory(&self) -> &Arc<GuestMem> {
        &self.mem
    }

    /// Next avail index (what GET_VRING_BASE reports once stopped).
    pub fn next_avail(&self) -> u16 {
        self.queue.next_avail()
    }

    /// The used ring's idx as this ring last wrote it.
    pub fn next_used(&self) -> u16 {
        self.queue.next_used()
    }

    /// Whether this ring records in-flight requests in an INFLIGHT_SHMFD region. If it does, a
    /// stop may abandon popped requests (they are resubmitted on the next start); if not,
    /// abandoned requests are lost to the guest, so `stop_queue` must complete them.
    pub fn inflight_tracked(&self) -> bool {
        self.inflight.is_some()
    }

    /// Number of heads from a previous connection or daemon still to be resubmitted.
    pub fn resubmit_pending(&self) -> u16 {
        self.resubmit.len() as u16
    }

    /// Whether the ring was found broken (see the module docs); it takes nothing until it is
    /// started again.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Whether the connection's memory faulted (see `sigbus.rs`); marks the ring broken if so.
    /// One atomic load while no fault ever happened in the process.
    pub fn memory_broken(&mut self) -> bool {
        if !self.mem.is_broken() {
            return false;
        }
        self.set_broken(format_args!(
            "the frontend shrank a file under this connection's memory"
        ));
        true
    }

    /// Mark the ring broken: log (rate limited), signal VRING_ERR, never retry.
    fn set_broken(&mut self, why: std::fmt::Arguments<'_>) {
        if self.broken {
            return;
        }
        self.broken = true;
        guest_warn!(
            "queue {}: ring broken: {why}; nothing more is taken from it until it restarts",
            self.index
        );
        if let Some(err) = &self.err {
            let _ = err.write(1);
        }
    }

    pub(crate) fn set_memory(&mut self, mem: Arc<GuestMem>) {
        self.mem = mem;
        if !self.queue.is_valid(&*self.mem) {
            self.set_broken(format_args!("rings are not in the new memory table"));
        }
    }

    pub(crate) fn set_call(&mut self, call: Option<Arc<EventFd>>) {
        self.call = call;
        if self.missed_signal && self.call.is_some() {
            self.missed_signal = false;
            self.write_call();
        }
    }

    fn write_call(&mut self) {
        match &self.call {
            Some(call) => {
                // Non-blocking eventfd (checked when it was set): EAGAIN means the frontend
                // has 2^64-2 unread notifications, so one more changes nothing.
                if let Err(e) = call.write(1) {
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        guest_warn!("queue {}: signal call fd: {e}", self.index);
                    }
                }
            }
            None => self.missed_signal = true,
        }
    }

    /// Take the next request: first heads left in flight by a previous connection, then new
    /// avail entries. Each new head is marked in flight before it is returned. None when the
    /// ring is empty or broken, or the connection's memory is (see the module docs).
    pub fn pop(&mut self) -> Option<Chain> {
        if self.broken || self.memory_broken() {
            return None;
        }
        if let Some(c) = self.resubmit.pop_front() {
            return Some(c);
        }
        let next = self.queue.next_avail();
        let size = self.queue.size();
        let idx = match self.queue.avail_idx(&*self.mem, Ordering::Acquire) {
            Ok(i) => i.0,
            Err(e) => {
                self.set_broken(format_args!("avail idx unreadable: {e:?}"));
                return None;
            }
        };
        if idx == next {
            return None;
        }
        if idx.wrapping_sub(next) > size {
            self.set_broken(format_args!(
                "avail idx {idx} is more than the ring size ({size}) ahead of {next}"
            ));
            return None;
        }
        // iter() reads the idx again; an honest guest only moves it forward.
        let chain = match self.queue.iter(self.mem.clone()) {
            Ok(mut it) => it.next(),
            Err(e) => {
                self.set_broken(format_args!("{e}"));
                return None;
            }
        };
        let Some(chain) = chain else {
            self.set_broken(format_args!(
                "avail entry {next} unreadable or idx moved back"
            ));
            return None;
        };
        if chain.head_index() >= size {
            self.set_broken(format_args!(
                "avail entry {next} names head {} of a {size}-entry ring",
                chain.head_index()
            ));
            return None;
        }
        if let Some(inf) = self.inflight.as_mut() {
            inf.start(chain.head_index());
        }
        Some(chain)
    }

    /// Whether [`pop`](Self::pop) would return a chain: heads to resubmit, or avail entries
    /// not taken yet (false once the ring or the connection's memory is broken). One load from
    /// the avail ring; for polling.
    pub fn has_avail(&self) -> bool {
        !self.broken
            && !self.mem.is_broken()
            && (!self.resubmit.is_empty()
                || self
                    .queue
                    .avail_idx(&*self.mem, Ordering::Acquire)
                    .is_ok_and(|idx| idx.0 != self.queue.next_avail()))
    }

    /// Put back the last chain returned by [`pop`](Self::pop) from the avail ring (the device
    /// could not take it now, e.g. TX backpressure). Not for resubmitted heads.
    pub fn unpop(&mut self, head: u16) {
        if let Some(inf) = self.inflight.as_mut() {
            inf.abandon(head);
        }
        self.queue.go_to_previous_position();
    }

    /// Complete `head` with `len` bytes written, and record the completion in the inflight
    /// region. Call [`signal_used`](Self::signal_used) once per batch afterwards.
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), virtio_queue::Error> {
        if head >= self.queue.size() {
            // Checked here: virtio-queue would log an unlimited ERROR line per call.
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        if self.memory_broken() {
            // What the request read may be zeros, not the guest's data: never report it done.
            // It stays in flight (resubmitted by the next connection if a region tracks it).
            return Err(virtio_queue::Error::InvalidChain);
        }
        if let Some(inf) = self.inflight.as_mut() {
            inf.pre_complete(head);
        }
        if let Err(e) = self.queue.add_used(&*self.mem, head, len) {
            self.set_broken(format_args!("used ring write failed: {e:?}"));
            return Err(e);
        }
        if let Some(inf) = self.inflight.as_mut() {
            inf.complete(head, self.queue.next_used());
        }
        self.need_signal = true;
        Ok(())
    }

    /// Notify the guest if anything was added since the last call and EVENT_IDX (or the
    /// NO_INTERRUPT flag) does not suppress it.
    pub fn signal_used(&mut self) {
        if !self.need_signal {
            return;
        }
        self.need_signal = false;
        let needed = match self.queue.needs_notification(&*self.mem) {
            Ok(n) => n,
            Err(e) => {
                guest_warn!("queue {}: needs_notification: {e:?}", self.index);
                true
            }
        };
        if needed {
            self.write_call();
        }
    }

    /// Re-enable guest kicks; returns true if new avail entries arrived meanwhile (process
    /// them before sleeping). Use with [`disable_notification`](Self::disable_notification)
    /// for the usual EVENT_IDX loop. False on a broken ring (nothing it could yield), so
    /// the loop ends.
    pub fn enable_notification(&mut self) -> bool {
        if self.broken {
            return false;
        }
        match self.queue.enable_notification(&*self.mem) {
            Ok(more) => more,
            Err(e) => {
                self.set_broken(format_args!("enable notification: {e:?}"));
                false
            }
        }
    }

    /// Suppress guest kicks while the worker is busy with this ring.
    pub fn disable_notification(&mut self) {
        if self.broken {
            return;
        }
        if let Err(e) = self.queue.disable_notification(&*self.mem) {
            self.set_broken(format_args!("disable notification: {e:?}"));
        }
    }

    /// Mark a guest-physical range dirty (writes that bypass vm-memory, e.g. io_uring).
    pub fn mark_dirty(&self, gpa: u64, len: u64) {
        self.log.mark(gpa, len);
    }
}

/// Refuses rings whose areas overlap: the device writes the used ring, so a used ring over the
/// avail ring or descriptor table lets completions rewrite the guest's requests.
fn check_layout(s: &RingSetup) -> Result<(), String> {
    let n = u64::from(s.size);
    // Sizes with the EVENT_IDX words included (virtio 1.x 2.7).
    let areas = [
        ("descriptor table", s.desc, 16 * n),
        ("avail ring", s.avail, 6 + 2 * n),
        ("used ring", s.used, 6 + 8 * n),
    ];
    for i in 0..areas.len() {
        for j in i + 1..areas.len() {
            let (a, b) = (areas[i], areas[j]);
            if a.1 < b.1.saturating_add(b.2) && b.1 < a.1.saturating_add(a.2) {
                return Err(format!(
                    "queue {}: {} at {:#x} overlaps {} at {:#x}",
                    s.index, a.0, a.1, b.0, b.1
                ));
            }
        }
    }
    Ok(())
}
