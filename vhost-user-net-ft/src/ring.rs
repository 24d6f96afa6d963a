// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The few ring operations the RX and TX paths need, as a trait, so the copy logic runs the same
//! over the server's `VringHandle` (with inflight tracking and dirty logging) and over a plain
//! virtio-queue `Queue` (unit tests with `MockSplitQueue`).

use std::ops::Deref;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

pub trait Ring {
    /// Handle to guest memory that chains carry.
    type M: Deref<Target: GuestMemory> + Clone;

    /// Next available chain, marked in flight.
    fn pop(&mut self) -> Option<DescriptorChain<Self::M>>;
    /// Puts back the chain just popped (not completed, not consumed).
    fn unpop(&mut self, head: u16);
    /// Whether [`unpop`](Self::unpop) may also put back chains popped before the last one, in
    /// reverse order (false when chains may come from somewhere else than the avail ring, e.g.
    /// inflight resubmission).
    fn can_unpop_all(&self) -> bool {
        true
    }
    /// Completes `head` with `len` bytes written by the device.
    fn add_used(&mut self, head: u16, len: u32) -> bool;
    /// Re-enables guest kicks; true if chains arrived meanwhile.
    fn enable_notification(&mut self) -> bool;
    /// Suppresses guest kicks while a pass runs.
    fn disable_notification(&mut self);
    /// Guest memory, for writes into RX buffers.
    fn mem(&self) -> &<Self::M as Deref>::Target;
}

/// A plain virtio-queue `Queue` over borrowed guest memory.
pub struct QueueRing<'a, G: GuestMemory> {
    pub queue: Queue,
    pub mem: &'a G,
}

impl<'a, G: GuestMemory> Ring for QueueRing<'a, G> {
    type M = &'a G;

    fn pop(&mut self) -> Option<DescriptorChain<&'a G>> {
        self.queue.pop_descriptor_chain(self.mem)
    }

    fn unpop(&mut self, _head: u16) {
        self.queue.go_to_previous_position();
    }

    fn add_used(&mut self, head: u16, len: u32) -> bool {
        self.queue.add_used(self.mem, head, len).is_ok()
    }

    fn enable_notification(&mut self) -> bool {
        self.queue.enable_notification(self.mem).unwrap_or(true)
    }

    fn disable_notification(&mut self) {
        let _ = self.queue.disable_notification(self.mem);
    }

    fn mem(&self) -> &G {
        self.mem
    }
}
