// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-connection protocol state: the vhost crate calls this through
//! `VhostUserBackendReqHandlerMut` (wrapped in a `Mutex`) for every parsed message.
//!
//! Ring lifecycle: a ring runs once it has a size, addresses, a kick fd, guest memory, acked
//! features and is enabled (or PROTOCOL_FEATURES was not negotiated, in which case rings start
//! enabled, as the spec says). SET_VRING_ENABLE may arrive at any time, including before
//! SET_FEATURES (QEMU 7.2 net does that): the flag is recorded and applied when the rest is
//! known. GET_VRING_BASE stops the ring through its worker, which returns only after the device
//! says the ring is quiescent, and clears the kick fd (the next SET_VRING_KICK restarts it).
//!
//! A ring that cannot start (a size above `max_queue_size`, addresses outside guest memory, a
//! device refusal) is never reported as running. The failure is logged once as an error naming
//! the ring and the reason, SET_VRING_ENABLE of that ring fails, and so does the next message
//! that asks for a reply (REPLY_ACK) if the failure arose in a message that did not (QEMU sends
//! SET_VRING_NUM without NEED_REPLY, so a refused size would otherwise be invisible to it).
//!
//! Getters never fail: the vhost crate sends no reply when a getter returns an error, which
//! would leave the frontend waiting. Invalid getter arguments are logged and answered with a
//! neutral value.
//!
//! Errors are `Error::ReqHandlerError`, which the server loop treats as non-fatal (the vhost
//! crate already sent the NACK when REPLY_ACK is on).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::Arc;

use log::{error, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, Result as VuResult, VhostUserBackendReqHandlerMut};
use vmm_sys_util::eventfd::EventFd;

use super::device::DeviceOps;
use super::inflight::{InflightQueue, InflightRegion};
use super::memory::{DirtyLog, GuestMem, MemoryMap};
use super::replay::ReplayStore;
use super::sigbus::ConnId;
use super::vring::RingSetup;
use super::worker::{Command, CommandHandle, Reply};

/// Most memory slots we accept (CONFIGURE_MEM_SLOTS); as libvhost-user.
const MAX_MEM_SLOTS: u64 = 509;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Protocol features the server implements itself.
pub fn server_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// State shared by all connections of one server.
pub(crate) struct Shared {
    pub device: Arc<dyn DeviceOps>,
    pub workers: Vec<CommandHandle>,
    /// Queue index -> worker (group) index.
    pub queue_group: Vec<usize>,
    pub log: Arc<DirtyLog>,
    /// Replay records for the rings' first start on a restored VM.
    pub replay: ReplayStore,
}

#[derive(Default)]
struct RingConfig {
    size: u16,
    /// Frontend virtual addresses of descriptor table, used ring, avail ring.
    addr: Option<(u64, u64, u64)>,
    base: u16,
    kick: Option<Arc<EventFd>>,
    call: Option<Arc<EventFd>>,
    err: Option<Arc<EventFd>>,
    enabled: bool,
    running: bool,
    /// Why this ring's configuration cannot run (a refused SET_VRING_NUM); cleared by the next
    /// valid SET_VRING_NUM. An enabled ring with a fault fails every start attempt.
    fault: Option<String>,
    /// A start failure of this ring the frontend has not been told about yet (no reply was
    /// asked when it happened); cleared when a NACK carries it or the ring starts.
    unreported: Option<String>,
    /// Guest-physical (desc, used, avail) the running ring was started with.
    started_gpas: Option<(u64, u64, u64)>,
}

/// Protocol state of one frontend connection.
pub(crate) struct ConnHandler {
    shared: Arc<Shared>,
    acked_features: Option<u64>,
    acked_protocol: u64,
    mem: MemoryMap,
    guest_mem: Option<Arc<GuestMem>>,
    rings: Vec<RingConfig>,
    inflight: Option<Arc<InflightRegion>>,
    /// This connection's identity for the mappings it makes (SIGBUS recovery).
    conn: ConnId,
}

/// Take `file` as an eventfd, refusing any other kind of fd: the worker writes call and err
/// fds and reads kick fds assuming 8-byte eventfd semantics (a pipe would block the worker once
/// full, a socket at EOF would keep epoll readable forever). Made non-blocking, so a frontend
/// that never reads cannot block the worker (QEMU creates its eventfds non-blocking too).
fn eventfd_from(file: File, what: &str) -> VuResult<EventFd> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|e| herr(format!("{what}: cannot identify fd: {e}")))?;
    if link.as_os_str() != "anon_inode:[eventfd]" {
        return Err(herr(format!(
            "{what}: fd is {}, not an eventfd",
            link.display()
        )));
    }
    // SAFETY: fcntl on an fd we own.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(herr(format!(
            "{what}: make non-blocking: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: into_raw_fd hands over sole ownership of a valid fd.
    Ok(unsafe { EventFd::from_raw_fd(file.into_raw_fd()) })
}

fn herr(msg: impl Into<String>) -> VuError {
    let msg = msg.into();
    crate::guest_warn!("vhost-user: {msg}");
    VuError::ReqHandlerError(std::io::Error::other(msg))
}

impl ConnHandler {
    pub(crate) fn new(shared: Arc<Shared>) -> std::io::Result<Self> {
        let n = shared.device.num_queues();
        let conn = ConnId::next();
        Ok(ConnHandler {
            mem: MemoryMap::new(conn),
            conn,
            rings: (0..n).map(|_| RingConfig::default()).collect(),
            shared,
            acked_features: None,
            acked_protocol: 0,
            guest_mem: None,
            inflight: None,
        })
    }

    /// This connection's identity (its mappings are registered under it).
    pub(crate) fn conn_id(&self) -> ConnId {
        self.conn
    }

    /// All virtio features offered to the frontend.
    pub(crate) fn offered_features(&self) -> u64 {
        self.shared.device.features()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn offered_protocol_features(&self) -> VhostUserProtocolFeatures {
        let mut p = server_protocol_features() | self.shared.device.protocol_features();
        if !self.shared.device.has_config() {
            p.remove(VhostUserProtocolFeatures::CONFIG);
        }
        p
    }

    /// Whether replies to NEED_REPLY messages are due (REPLY_ACK negotiated).
    pub(crate) fn reply_ack(&self) -> bool {
        self.acked_protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    fn protocol_negotiated(&self) -> bool {
        self.acked_features
            .is_some_and(|f| f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0)
    }

    fn ring(&mut self, index: u32) -> VuResult<&mut RingConfig> {
        let n = self.rings.len();
        self.rings
            .get_mut(index as usize)
            .ok_or_else(|| herr(format!("queue index {index} out of range (device has {n})")))
    }

    fn worker(&self, q: usize) -> &CommandHandle {
        &self.shared.workers[self.shared.queue_group[q]]
    }

    /// Record that ring `q` cannot start: one error log naming the ring and the reason (not
    /// repeated for the same reason), and the failure is kept until a reply carries it.
    fn ring_failed(&mut self, q: usize, reason: String) -> VuError {
        let r = &mut self.rings[q];
        if r.unreported.as_deref() != Some(reason.as_str()) {
            crate::guest_warn!("vhost-user: queue {q} cannot start: {reason}");
        }
        r.unreported = Some(reason.clone());
        VuError::ReqHandlerError(std::io::Error::other(format!(
            "queue {q} cannot start: {reason}"
        )))
    }

    /// A ring start failure the frontend was not told about yet; the next message that asks
    /// for a reply is NACKed with it. Taking it marks every pending failure as reported.
    pub(crate) fn take_unreported(&mut self) -> Option<String> {
        let mut first = None;
        for (q, r) in self.rings.iter_mut().enumerate() {
            if let Some(reason) = r.unreported.take() {
                first.get_or_insert(format!("queue {q}: {reason}"));
            }
        }
        first
    }

    fn try_start(&mut self, q: usize) -> VuResult<()> {
        let res = self.try_start_inner(q);
        if res.is_ok() && self.rings[q].running {
            self.rings[q].unreported = None;
        }
        res
    }

    fn try_start_inner(&mut self, q: usize) -> VuResult<()> {
        let protocol = self.protocol_negotiated();
        if self.rings[q].fault.is_some() {
            // Already logged and reported (or pending report); SET_VRING_ENABLE fails on it.
            return Ok(());
        }
        let Some(features) = self.acked_features else {
            return Ok(());
        };
        let Some(mem) = self.guest_mem.clone() else {
            return Ok(());
        };
        let r = &self.rings[q];
        // Without PROTOCOL_FEATURES rings start enabled (spec); with it they wait for ENABLE.
        let enabled = r.enabled || !protocol;
        if r.running || r.size == 0 || !enabled {
            return Ok(());
        }
        let (Some((desc_va, used_va, avail_va)), Some(kick)) = (r.addr, r.kick.clone()) else {
            return Ok(());
        };
        let tr = |va: u64, what: &str| {
            self.mem
                .va_to_gpa(va)
                .ok_or_else(|| format!("{what} address {va:#x} not in any memory region"))
        };
        let addrs = (|| {
            Ok::<_, String>((
                tr(desc_va, "desc")?,
                tr(used_va, "used")?,
                tr(avail_va, "avail")?,
            ))
        })();
        let (desc, used, avail) = match addrs {
            Ok(a) => a,
            Err(reason) => return Err(self.ring_failed(q, reason)),
        };
        let r = &self.rings[q];
        let inflight = match &self.inflight {
            Some(region) => {
                let iq = InflightQueue::new(region.clone(), q as u16, r.size);
                if iq.is_none() {
                    if q < usize::from(region.num_queues()) {
                        warn!(
                            "queue {q}: the inflight region holds {} descriptors per queue but the \
                             ring has {}: requests in flight on this ring are not tracked and a \
                             daemon restart can lose them; set queue-size={} on the QEMU device \
                             (e.g. -device vhost-user-blk-pci,...,queue-size={})",
                            region.queue_size(),
                            r.size,
                            r.size,
                            r.size
                        );
                    } else {
                        warn!(
                            "queue {q}: the inflight region covers only {} queue(s); requests in \
                             flight on this ring are not tracked",
                            region.num_queues()
                        );
                    }
                }
                iq
            }
            None => None,
        };
        let setup = RingSetup {
            index: q as u16,
            size: r.size,
            desc,
            avail,
            used,
            base: r.base,
            call: r.call.clone(),
            err: r.err.clone(),
            event_idx: features & VIRTIO_RING_F_EVENT_IDX != 0,
            inflight,
            replay: self.shared.replay.peek(q as u16),
        };
        match self.worker(q).command(Command::Start { setup, kick, mem }) {
            Ok(Reply::Started(Ok(()))) => {
                self.shared.replay.started(q as u16);
                self.rings[q].running = true;
                self.rings[q].started_gpas = Some((desc, used, avail));
                Ok(())
            }
            Ok(Reply::Started(Err(e))) => Err(self.ring_failed(q, e)),
            _ => Err(self.ring_failed(q, "worker thread gone".into())),
        }
    }

    fn try_start_all(&mut self) -> VuResult<()> {
        let mut res = Ok(());
        for q in 0..self.rings.len() {
            if let Err(e) = self.try_start(q) {
                res = Err(e);
            }
        }
        res
    }

    /// Stop ring `q` if it runs; its base becomes the worker's next avail index.
    fn stop(&mut self, q: usize) {
        if !self.rings[q].running {
            return;
        }
        match self.worker(q).command(Command::Stop(q as u16)) {
            Ok(Reply::Stopped(Some(next))) => self.rings[q].base = next,
            Ok(_) => {}
            Err(e) => error!("queue {q}: stop: {e}"),
        }
        self.rings[q].running = false;
    }

    /// Stop everything and let every worker reset its device state (disconnect, RESET_*).
    pub(crate) fn disconnect(&mut self) {
        for q in 0..self.rings.len() {
            self.rings[q].running = false;
        }
        for w in &self.shared.workers {
            if let Err(e) = w.command(Command::Disconnect) {
                error!("disconnect: {e}");
            }
        }
    }

    /// The connection is gone: stop everything and drop the dirty log (no ring runs now).
    pub(crate) fn close(&mut self) {
        self.disconnect();
        self.shared.log.reset();
    }

    fn reset(&mut self) {
        self.disconnect();
        let n = self.rings.len();
        self.rings = (0..n).map(|_| RingConfig::default()).collect();
        self.acked_features = None;
        self.shared.log.set_active(false);
    }

    fn memory_changed(&mut self) -> VuResult<()> {
        // Ring addresses are frontend virtual addresses: a new table may put a running ring
        // at other guest-physical addresses (or nowhere). Such rings are stopped (drained over
        // the old mapping) and started again below at their new place, or not at all.
        for q in 0..self.rings.len() {
            let r = &self.rings[q];
            if !r.running {
                continue;
            }
            let now = r.addr.and_then(|(d, u, a)| {
                Some((
                    self.mem.va_to_gpa(d)?,
                    self.mem.va_to_gpa(u)?,
                    self.mem.va_to_gpa(a)?,
                ))
            });
            if now != r.started_gpas {
                info!("vhost-user: queue {q}: rings moved by the new memory table; restarting");
                self.stop(q);
            }
        }
        let mem = if self.mem.is_empty() {
            None
        } else {
            Some(
                self.mem
                    .guest_memory()
                    .map_err(|e| herr(format!("guest memory: {e}")))?,
            )
        };
        self.guest_mem = mem.clone();
        for w in &self.shared.workers {
            let _ = w.command(Command::SetMemory(mem.clone()));
        }
        self.try_start_all()
    }

    /// SET_VRING_ENABLE, also when it arrives before SET_FEATURES.
    pub(crate) fn vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        log::debug!(
            "vhost-user: SET_VRING_ENABLE {index} {enable} (features {})",
            if self.acked_features.is_some() {
                "known"
            } else {
                "not yet set"
            }
        );
        let r = self.ring(index)?;
        r.enabled = enable;
        let q = index as usize;
        if enable {
            if let Some(reason) = self.rings[q].fault.clone() {
                return Err(self.ring_failed(q, reason));
            }
            self.try_start(q)
        } else {
            self.stop(q);
            Ok(())
        }
    }

    /// SEND_RARP: pass the MAC to the device.
    pub(crate) fn send_rarp(&mut self, mac: [u8; 6]) -> Result<(), String> {
        if self.acked_protocol & VhostUserProtocolFeatures::RARP.bits() == 0 {
            return Err("SEND_RARP without the RARP protocol feature".into());
        }
        self.shared
            .device
            .send_rarp(mac)
            .map_err(|e| format!("SEND_RARP: {e}"))
    }
}

impl VhostUserBackendReqHandlerMut for ConnHandler {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        info!("vhost-user: RESET_OWNER");
        self.reset();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        info!("vhost-user: RESET_DEVICE");
        self.reset();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.offered_features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.offered_features();
        if features & !offered != 0 {
            return Err(herr(format!(
                "SET_FEATURES {features:#x} has bits not offered ({offered:#x})"
            )));
        }
        self.acked_features = Some(features);
        self.shared
            .log
            .set_active(features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0);
        self.shared.device.set_acked_features(features);
        for w in &self.shared.workers {
            let _ = w.command(Command::SetFeatures(features));
        }
        self.try_start_all()
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<u64>>> {
        self.mem.clear();
        for (r, f) in regions.iter().zip(files) {
            let (gpa, size) = (r.guest_phys_addr, r.memory_size);
            self.mem
                .add_region(
                    &self.shared.log,
                    r.guest_phys_addr,
                    r.memory_size,
                    r.user_addr,
                    r.mmap_offset,
                    f,
                )
                .map_err(|e| {
                    herr(format!(
                        "SET_MEM_TABLE region gpa {gpa:#x} size {size:#x}: {e}"
                    ))
                })?;
        }
        self.memory_changed()?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = self.shared.device.max_queue_size();
        let fault = if num == 0 || !num.is_power_of_two() || num > 32768 {
            Some(format!(
                "SET_VRING_NUM size {num} invalid (a power of two up to 32768)"
            ))
        } else if num > u32::from(max) {
            Some(format!(
                "SET_VRING_NUM size {num} is larger than this daemon's --queue-size {max}; \
                 restart the daemon with --queue-size {num}"
            ))
        } else {
            None
        };
        self.ring(index)?;
        let q = index as usize;
        match fault {
            None => {
                let r = &mut self.rings[q];
                r.size = num as u16;
                r.fault = None;
                Ok(())
            }
            Some(reason) => {
                // Never keep running or later start with the previous size.
                self.stop(q);
                let r = &mut self.rings[q];
                r.size = 0;
                r.fault = Some(reason.clone());
                Err(self.ring_failed(q, reason))
            }
        }
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let new = Some((descriptor, used, available));
        let r = self.ring(index)?;
        if r.addr == new {
            // Only the LOG flag changed (migration start/end): used-ring writes are logged
            // through the memory bitmap anyway.
            return Ok(());
        }
        r.addr = new;
        let running = r.running;
        if running {
            self.stop(index as usize);
            return self.try_start(index as usize);
        }
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let r = self.ring(index)?;
        if r.running {
            return Err(herr(format!("SET_VRING_BASE {index} on a running ring")));
        }
        r.base = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        if index as usize >= self.rings.len() {
            error!("vhost-user: GET_VRING_BASE for queue {index} out of range; answering 0");
            return Ok(VhostUserVringState::new(index, 0));
        }
        let q = index as usize;
        self.stop(q);
        let r = &mut self.rings[q];
        // The stop signalled anything pending on the current call fd. Both fds are the
        // frontend's to replace now: QEMU makes a new guest notifier at every VM start and may
        // send it only after SET_VRING_KICK restarted the ring (QEMU 10 does), so a ring must
        // never run on the previous one (libvhost-user and DPDK drop both here too).
        r.kick = None;
        r.call = None;
        Ok(VhostUserVringState::new(index, u32::from(r.base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let Some(fd) = fd else {
            return Err(herr(format!(
                "SET_VRING_KICK {index}: polling mode (no fd) is not supported"
            )));
        };
        let q = index as usize;
        self.ring(u32::from(index))?;
        let kick = Arc::new(eventfd_from(fd, &format!("SET_VRING_KICK {index}"))?);
        if self.rings[q].running {
            self.stop(q);
        }
        self.rings[q].kick = Some(kick);
        self.try_start(q)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.ring(u32::from(index))?;
        let call = match fd {
            Some(f) => Some(Arc::new(eventfd_from(
                f,
                &format!("SET_VRING_CALL {index}"),
            )?)),
            None => None,
        };
        let r = self.ring(u32::from(index))?;
        r.call = call.clone();
        if r.running {
            let _ = self
                .worker(index as usize)
                .command(Command::SetCall(u16::from(index), call));
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.ring(u32::from(index))?;
        let err = match fd {
            Some(f) => Some(Arc::new(eventfd_from(
                f,
                &format!("SET_VRING_ERR {index}"),
            )?)),
            None => None,
        };
        // Used from the ring's next start.
        self.ring(u32::from(index))?.err = err;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(self.offered_protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.offered_protocol_features().bits();
        if features & !offered != 0 {
            crate::guest_warn!(
                "vhost-user: SET_PROTOCOL_FEATURES {features:#x} has bits not offered"
            );
        }
        self.acked_protocol = features & offered;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.rings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.vring_enable(index, enable)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let mut buf = vec![0u8; size as usize];
        self.shared.device.read_config(offset, &mut buf);
        Ok(buf)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        self.shared
            .device
            .write_config(offset, buf)
            .map_err(|e| herr(format!("SET_CONFIG offset {offset}: {e}")))
    }

    fn set_gpu_socket(&mut self, _gpu: vhost::vhost_user::GpuBackend) -> VuResult<()> {
        Err(herr("GPU_SET_SOCKET is not supported"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(herr("GET_SHARED_OBJECT is not supported"))
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        // Bounded by what this device can run: the region costs memory (RSS) and mappings.
        let max = self.shared.device.max_queue_size();
        if usize::from(msg.num_queues) > self.rings.len() || msg.queue_size > max {
            return Err(herr(format!(
                "GET_INFLIGHT_FD for {} queue(s) of {}: the device has {} of at most {max}",
                msg.num_queues,
                msg.queue_size,
                self.rings.len()
            )));
        }
        // QEMU sizes its request by the device's `queue-size` property (default 128), but QEMU
        // 10 gives every ring 1024 entries anyway, and GET_INFLIGHT_FD comes before
        // SET_VRING_NUM. Lay the region out for the largest ring we accept, so every
        // ring we can run is tracked; the per-queue `desc_num` records the layout.
        let layout = msg.queue_size.max(self.shared.device.max_queue_size());
        let (region, file) = InflightRegion::create(msg.num_queues, layout, self.conn)
            .map_err(|e| herr(format!("GET_INFLIGHT_FD: {e}")))?;
        let size = super::inflight::queue_region_size(layout) * u64::from(msg.num_queues);
        if layout != msg.queue_size {
            info!(
                "vhost-user: GET_INFLIGHT_FD for {} queue(s) of {}: region laid out for rings of up to {layout}",
                msg.num_queues, msg.queue_size
            );
        }
        self.inflight = Some(region);
        Ok((
            VhostUserInflight {
                mmap_size: size,
                mmap_offset: 0,
                num_queues: msg.num_queues,
                queue_size: msg.queue_size,
            },
            file,
        ))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> VuResult<()> {
        if usize::from(msg.num_queues) > self.rings.len() {
            return Err(herr(format!(
                "SET_INFLIGHT_FD for {} queue(s): the device has {}",
                msg.num_queues,
                self.rings.len()
            )));
        }
        let region = InflightRegion::open(
            &file,
            msg.mmap_size,
            msg.mmap_offset,
            msg.num_queues,
            msg.queue_size,
            self.conn,
        )
        .map_err(|e| herr(format!("SET_INFLIGHT_FD: {e}")))?;
        if self.rings.iter().any(|r| r.running) {
            warn!("vhost-user: SET_INFLIGHT_FD with running rings; used from their next start");
        }
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        r: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<u64>> {
        let gpa = r.guest_phys_addr;
        if self.mem.len() as u64 >= MAX_MEM_SLOTS {
            return Err(herr("ADD_MEM_REG: all memory slots in use"));
        }
        self.mem
            .add_region(
                &self.shared.log,
                r.guest_phys_addr,
                r.memory_size,
                r.user_addr,
                r.mmap_offset,
                fd,
            )
            .map_err(|e| herr(format!("ADD_MEM_REG gpa {gpa:#x}: {e}")))?;
        self.memory_changed()?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, r: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (gpa, size) = (r.guest_phys_addr, r.memory_size);
        if !self.mem.remove_region(gpa, size) {
            return Err(herr(format!(
                "REM_MEM_REG gpa {gpa:#x} size {size:#x}: no such region"
            )));
        }
        self.memory_changed()
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(herr("SET_DEVICE_STATE_FD is not supported"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(herr("CHECK_DEVICE_STATE is not supported"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Ok(VhostUserShMemConfig::default())
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        self.shared
            .log
            .set_base(&file, log.mmap_size, log.mmap_offset, self.conn)
            .map_err(|e| herr(format!("SET_LOG_BASE: {e}")))?;
        // The replaced area is unmapped once no worker can still be marking it.
        for w in &self.shared.workers {
            let _ = w.command(Command::Sync);
        }
        self.shared.log.drop_retired();
        Ok(())
    }
}
