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
//! from an avail ring, so the heads are written into a private avail ring in the scratch region
//! of the memory map (see `memory::SCRATCH_GPA`) and popped from a shadow `Queue` that shares
//! the real descriptor table.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{error, info, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::device::Chain;
use super::inflight::InflightQueue;
use super::memory::{scratch_ring_gpa, DirtyLog, GuestMem};

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
    /// Whether RING_EVENT_IDX was negotiated.
    pub event_idx: bool,
    /// Inflight tracking for this queue, if the frontend set an inflight region.
    pub inflight: Option<InflightQueue>,
}

/// A running ring, as seen by a [`QueueWorker`](super::device::QueueWorker).
pub struct VringHandle {
    index: u16,
    queue: Queue,
    mem: Arc<GuestMem>,
    call: Option<Arc<EventFd>>,
    log: Arc<DirtyLog>,
    inflight: Option<InflightQueue>,
    shadow: Option<Queue>,
    resubmit_left: u16,
    need_signal: bool,
    /// A notification was due while no call fd was set (ring restarted before the frontend
    /// sent its new call fd): sent as soon as one arrives.
    missed_signal: bool,
}

impl std::fmt::Debug for VringHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VringHandle")
            .field("index", &self.index)
            .field("next_avail", &self.queue.next_avail())
            .field("next_used", &self.queue.next_used())
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
    /// rings (completions need not be in order), so the start is refused rather than guessed.
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
        queue.set_event_idx(setup.event_idx);
        let used_idx = queue
            .used_idx(&*mem, Ordering::Acquire)
            .map_err(|e| format!("queue {}: read used idx: {e:?}", setup.index))?
            .0;
        let mut inflight = setup.inflight.take();
        let mut shadow = None;
        let mut resubmit_left = 0;
        let next_avail = match inflight.as_mut() {
            Some(inf) if !inf.is_fresh() => {
                let heads = inf.recover(used_idx);
                let n = heads.len() as u16;
                if n > 0 {
                    info!(
                        "queue {}: resubmitting {n} request(s) left in flight by a previous daemon or connection",
                        setup.index
                    );
                    shadow = Some(Self::shadow_queue(&setup, &mem, &heads)?);
                    resubmit_left = n;
                }
                used_idx.wrapping_add(n)
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
        if let Some(inf) = inflight.as_mut() {
            inf.mark_in_use();
        }
        queue.set_next_avail(next_avail);
        queue.set_next_used(used_idx);
        Ok(VringHandle {
            index: setup.index,
            queue,
            mem,
            call: setup.call,
            log,
            inflight,
            shadow,
            resubmit_left,
            need_signal: false,
            missed_signal: false,
        })
    }

    fn shadow_queue(setup: &RingSetup, mem: &GuestMem, heads: &[u16]) -> Result<Queue, String> {
        let (avail, used) = scratch_ring_gpa(setup.index, setup.size);
        let err = |e: vm_memory::GuestMemoryError| format!("queue {}: scratch: {e}", setup.index);
        mem.write_obj(0u16, GuestAddress(avail)).map_err(err)?;
        mem.write_obj(heads.len() as u16, GuestAddress(avail + 2))
            .map_err(err)?;
        for (i, h) in heads.iter().enumerate() {
            mem.write_obj(*h, GuestAddress(avail + 4 + 2 * i as u64))
                .map_err(err)?;
        }
        make_queue(setup.size, setup.desc, avail, used)
            .map_err(|e| format!("queue {}: shadow ring: {e:?}", setup.index))
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

    /// Whether this ring records in-flight requests in an INFLIGHT_SHMFD region. If it does, a
    /// stop may abandon popped requests (they are resubmitted on the next start); if not,
    /// abandoned requests are lost to the guest, so `stop_queue` must complete them.
    pub fn inflight_tracked(&self) -> bool {
        self.inflight.is_some()
    }

    /// Number of heads from a previous connection or daemon still to be resubmitted.
    pub fn resubmit_pending(&self) -> u16 {
        self.resubmit_left
    }

    pub(crate) fn set_memory(&mut self, mem: Arc<GuestMem>) {
        self.mem = mem;
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
                if let Err(e) = call.write(1) {
                    warn!("queue {}: signal call fd: {e}", self.index);
                }
            }
            None => self.missed_signal = true,
        }
    }

    /// Take the next request: first heads left in flight by a previous connection, then new
    /// avail entries. Each new head is marked in flight before it is returned.
    pub fn pop(&mut self) -> Option<Chain> {
        if self.resubmit_left > 0 {
            if let Some(shadow) = self.shadow.as_mut() {
                self.resubmit_left -= 1;
                if self.resubmit_left == 0 {
                    let chain = shadow.pop_descriptor_chain(self.mem.clone());
                    self.shadow = None;
                    return chain.or_else(|| self.pop());
                }
                match shadow.pop_descriptor_chain(self.mem.clone()) {
                    Some(c) => return Some(c),
                    None => {
                        error!("queue {}: resubmission ring unreadable", self.index);
                        self.resubmit_left = 0;
                        self.shadow = None;
                    }
                }
            }
        }
        let chain = self.queue.pop_descriptor_chain(self.mem.clone())?;
        if let Some(inf) = self.inflight.as_mut() {
            inf.start(chain.head_index());
        }
        Some(chain)
    }

    /// Whether [`pop`](Self::pop) would return a chain: heads to resubmit, or avail entries
    /// not taken yet. One load from the avail ring; for polling.
    pub fn has_avail(&self) -> bool {
        self.resubmit_left > 0
            || self
                .queue
                .avail_idx(&*self.mem, Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != self.queue.next_avail())
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
        if let Some(inf) = self.inflight.as_mut() {
            inf.pre_complete(head);
        }
        self.queue.add_used(&*self.mem, head, len)?;
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
                warn!("queue {}: needs_notification: {e:?}", self.index);
                true
            }
        };
        if needed {
            self.write_call();
        }
    }

    /// Re-enable guest kicks; returns true if new avail entries arrived meanwhile (process
    /// them before sleeping). Use with [`disable_notification`](Self::disable_notification)
    /// for the usual EVENT_IDX loop.
    pub fn enable_notification(&mut self) -> bool {
        self.queue.enable_notification(&*self.mem).unwrap_or(true)
    }

    /// Suppress guest kicks while the worker is busy with this ring.
    pub fn disable_notification(&mut self) {
        if let Err(e) = self.queue.disable_notification(&*self.mem) {
            warn!("queue {}: disable_notification: {e:?}", self.index);
        }
    }

    /// Mark a guest-physical range dirty (writes that bypass vm-memory, e.g. io_uring).
    pub fn mark_dirty(&self, gpa: u64, len: u64) {
        self.log.mark(gpa, len);
    }
}
