// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Answering a guest request: its status byte written, its head on the used ring. Shared by the
//! queue worker (plain and rejected requests) and the gate (held requests after commit).
//!
//! Invariant: a write of the status byte that fails (guest memory changed since the request
//! was parsed) reports 0 bytes used instead of failing the ring.

use crate::request::Rejected;
use ft_common::vhost_user::VringHandle;
use vm_memory::{Bytes, GuestAddress};

/// Writes `status` and puts `head` on the used ring.
pub fn finish(vring: &mut VringHandle, head: u16, status_addr: GuestAddress, status: u8, len: u32) {
    let len = match vring.memory().write_obj(status, status_addr) {
        Ok(()) => len,
        // The status byte was checked at parse time; if memory changed since, report nothing.
        Err(_) => 0,
    };
    if let Err(e) = vring.add_used(head, len) {
        ft_common::guest_warn!("queue {}: add_used({head}): {e:?}", vring.index());
    }
}

/// Answers a chain the parser refused.
pub fn answer_rejected(vring: &mut VringHandle, rej: Rejected) {
    match rej.status_addr {
        Some(a) => finish(vring, rej.head, a, rej.status, 1),
        None => {
            if let Err(e) = vring.add_used(rej.head, 0) {
                ft_common::guest_warn!("queue {}: add_used({}): {e:?}", vring.index(), rej.head);
            }
        }
    }
}
