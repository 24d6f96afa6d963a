// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The block daemon against a guest that writes its own rings wrong, in both modes (`--ft off`
//! and `--ft hold`): an avail idx more than the ring size ahead used to make the queue worker
//! spin at 100% CPU, log without end, ignore GET_VRING_BASE and SIGTERM, and serve no later
//! frontend. Now the ring is marked broken (VRING_ERR), the daemon answers, serves a
//! restarted ring with the data intact, and stops on SIGTERM. A frontend that truncates its
//! guest memory file under a pending write used to kill the daemon with SIGBUS; now it costs
//! that connection, nothing of the lost memory reaches the image, and the next frontend is
//! served.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use ft_common::control::{ControlClient, Reply, Request};
use ft_common::epoch::{Epoch, Generation};
use ft_tests::frontend::{TestFrontend, MEM_GPA, MEM_SIZE};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

mod common;
use common::{blk_req_on, file_bytes, new_image, spawn, Daemon};

const T: Duration = Duration::from_secs(10);

fn start(hold: bool) -> Daemon {
    let (dir, img) = new_image();
    spawn(dir, img, hold, T, |c| {
        if hold {
            c.args(["--ft", "hold"]);
        }
    })
}

fn readable(e: &EventFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: e.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) == 1 }
}

/// Places a write of `data` at `sector` on queue 0 and kicks; returns (head, status gpa).
fn write(f: &mut TestFrontend, sector: u64, data: &[u8]) -> (u16, u64) {
    let buf = f.alloc(data.len() as u64);
    f.write(buf, data);
    let r = blk_req_on(
        f,
        0,
        VIRTIO_BLK_T_OUT,
        sector,
        Some((buf, data.len() as u32)),
    );
    f.kick(0);
    r
}

/// CPU time (user + system, clock ticks) the process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// Held until committed: waits until `n` requests are held, then seals and commits `epoch`.
fn commit_held(d: &Daemon, n: u64, epoch: u64) {
    let mut c = ControlClient::connect(&d.ctl, T).expect("control");
    let deadline = Instant::now() + T;
    loop {
        match c.call(&Request::Status).expect("status") {
            Reply::Status(st) if st.held_requests == n => break,
            _ => assert!(Instant::now() < deadline, "write never held"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let g = Generation(1);
    let r = c
        .call(&Request::Seal {
            generation: g,
            epoch: Epoch(epoch),
        })
        .expect("seal");
    assert!(matches!(r, Reply::Sealed { .. }), "{r:?}");
    let r = c
        .call(&Request::Commit {
            generation: g,
            epoch: Epoch(epoch),
            deadline: None,
        })
        .expect("commit");
    assert!(matches!(r, Reply::Committed { .. }), "{r:?}");
}

fn avail_idx_far_ahead(hold: bool) {
    let mut d = start(hold);
    let pid = d.child.as_ref().expect("child").id();
    let mut f = TestFrontend::connect(&d.sock, 1, T);
    f.handshake();
    f.set_mem_table();
    let err = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    f.fe.set_vring_err(0, &err).expect("set_vring_err");
    f.init_queue(0, 256);
    f.setup_vring(0, 0);
    f.fe.set_vring_enable(0, true).expect("enable");
    // The guest's avail idx jumps 1000 entries ahead of a 256-entry ring.
    let (_, avail, _) = TestFrontend::ring_gpas(0);
    f.write(avail + 2, &1000u16.to_le_bytes());
    f.kick(0);
    assert!(readable(&err, T), "VRING_ERR not signalled");
    // No spinning: a quarter second of wall time costs well under a quarter second of CPU
    // (a spinning worker burns all of it; the bound holds on a loaded machine too, where a
    // spinning worker would still get far more than a tick).
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_millis(500));
    let used = cpu_ticks(pid) - before;
    assert!(used <= 10, "daemon used {used} ticks in 500 ms: spinning");
    assert_eq!(f.fe.get_vring_base(0).expect("GET_VRING_BASE answered"), 0);
    // The guest resets its ring; it runs again and data reaches the image intact.
    f.init_queue(0, 256);
    f.setup_vring(0, 0);
    f.fe.set_vring_enable(0, true).expect("enable");
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let (head, status) = write(&mut f, 8, &data);
    if hold {
        commit_held(&d, 1, 1);
    }
    assert_eq!(f.wait_used(0, 1, T).first().map(|u| u.0), Some(head));
    assert_eq!(f.read(status, 1)[0], VIRTIO_BLK_S_OK as u8);
    let deadline = Instant::now() + T;
    while file_bytes(&d.img, 8 * 512, 4096) != data {
        assert!(Instant::now() < deadline, "data never reached the image");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SIGTERM is honoured.
    let mut child = d.child.take().expect("child");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + T;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            assert!(st.success(), "exit status {st}");
            break;
        }
        assert!(Instant::now() < deadline, "SIGTERM ignored");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn avail_idx_far_ahead_breaks_the_ring_ft_off() {
    avail_idx_far_ahead(false);
}

#[test]
fn avail_idx_far_ahead_breaks_the_ring_ft_hold() {
    avail_idx_far_ahead(true);
}

/// Waits until the daemon closes `f`'s connection (EOF on the socket).
fn wait_closed(f: &mut TestFrontend) -> bool {
    let deadline = Instant::now() + T;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        match std::io::Read::read(f.raw(), &mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
    false
}

/// The frontend truncates its (unsealed) guest memory file under a pending write: the daemon
/// faults reading the request header. It must cost the connection (closed, nothing of the
/// lost memory written to the image, no completion), not the daemon, which then serves a
/// fresh frontend with its data intact. Before the SIGBUS handler the daemon died.
fn truncated_guest_memory(hold: bool) {
    let d = start(hold);
    let mut f = TestFrontend::connect(&d.sock, 1, T);
    f.handshake();
    f.set_mem_table();
    f.init_queue(0, 256);
    f.setup_vring(0, 0);
    f.fe.set_vring_enable(0, true).expect("enable");
    let data = vec![0x5au8; 4096];
    let buf = f.alloc(4096);
    f.write(buf, &data);
    blk_req_on(&mut f, 0, VIRTIO_BLK_T_OUT, 8, Some((buf, 4096)));
    let used = f.used_idx(0);
    // Rings stay (the first 2 MiB); header, data and status (from DATA_GPA on) are gone.
    f.truncate_guest_memory(0x20_0000);
    f.kick(0);
    assert!(wait_closed(&mut f), "connection not closed");
    assert_eq!(f.used_idx(0), used, "a request over lost memory completed");
    let pid = d.child.as_ref().expect("child").id();
    // SAFETY: probing our own child with signal 0 (a zombie still answers: check its state).
    assert_eq!(unsafe { libc::kill(pid as i32, 0) }, 0, "daemon gone");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    assert!(!stat.contains(") Z "), "daemon died");
    assert_eq!(file_bytes(&d.img, 8 * 512, 4096), vec![0u8; 4096]);
    // A fresh frontend: served, data intact.
    let mut f = TestFrontend::connect(&d.sock, 1, T);
    f.handshake();
    f.set_mem_table();
    f.init_queue(0, 256);
    f.setup_vring(0, 0);
    f.fe.set_vring_enable(0, true).expect("enable");
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 1) as u8).collect();
    let (head, status) = write(&mut f, 8, &data);
    if hold {
        commit_held(&d, 1, 1);
    }
    assert_eq!(f.wait_used(0, 1, T).first().map(|u| u.0), Some(head));
    assert_eq!(f.read(status, 1)[0], VIRTIO_BLK_S_OK as u8);
    let deadline = Instant::now() + T;
    while file_bytes(&d.img, 8 * 512, 4096) != data {
        assert!(Instant::now() < deadline, "data never reached the image");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn truncated_guest_memory_costs_the_connection_ft_off() {
    truncated_guest_memory(false);
}

#[test]
fn truncated_guest_memory_costs_the_connection_ft_hold() {
    truncated_guest_memory(true);
}

/// Only the data page of a write is truncated away (header, status and rings stay): the
/// daemon never touches it itself, the kernel's copy fails (EFAULT), the guest gets
/// VIRTIO_BLK_S_IOERR and nothing reaches the image; the connection goes on.
#[test]
fn write_from_a_truncated_data_page_fails_with_ioerr_ft_off() {
    let d = start(false);
    let mut f = TestFrontend::connect(&d.sock, 1, T);
    f.handshake();
    f.set_mem_table();
    f.init_queue(0, 256);
    f.setup_vring(0, 0);
    f.fe.set_vring_enable(0, true).expect("enable");
    // The last page of guest memory (the test allocator never gets there).
    let buf = MEM_GPA + MEM_SIZE - 0x1000;
    f.write(buf, &[0x5a; 4096]);
    let (head, status) = blk_req_on(&mut f, 0, VIRTIO_BLK_T_OUT, 8, Some((buf, 4096)));
    f.truncate_guest_memory(MEM_SIZE - 0x1000);
    f.kick(0);
    assert_eq!(f.wait_used(0, 1, T).first().map(|u| u.0), Some(head));
    assert_eq!(f.read(status, 1)[0], VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(file_bytes(&d.img, 8 * 512, 4096), vec![0u8; 4096]);
    // Same connection, a sane write.
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 5 + 2) as u8).collect();
    let (head, status) = write(&mut f, 16, &data);
    assert_eq!(f.wait_used(0, 1, T).first().map(|u| u.0), Some(head));
    assert_eq!(f.read(status, 1)[0], VIRTIO_BLK_S_OK as u8);
    assert_eq!(file_bytes(&d.img, 16 * 512, 4096), data);
}

/// A write whose header straddles into a page the frontend truncated away: its type is on
/// intact memory, its sector and data are on the lost page. Parsing it faults, the SIGBUS
/// handler maps a zero page over the lost one, and the request now reads as a write of
/// zeros to sector 0. It must never be written (the connection's memory is broken), the
/// guest gets no completion and the connection is closed. Before the check in `dispatch`
/// the daemon wrote those zeros over sector 0.
#[test]
fn write_parsed_from_a_truncated_page_is_never_written_ft_off() {
    let d = start(false);
    let old: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8 | 1).collect();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new()
            .write(true)
            .open(&d.img)
            .expect("image"),
        &old,
        0,
    )
    .expect("pattern");
    let mut f = TestFrontend::connect(&d.sock, 1, T);
    f.handshake();
    f.set_mem_table();
    f.init_queue(0, 256);
    f.setup_vring(0, 0);
    f.fe.set_vring_enable(0, true).expect("enable");
    let lost = MEM_GPA + MEM_SIZE - 0x1000;
    // type and reserved on the last intact page, sector on the lost one.
    let hdr = lost - 8;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    h[8..16].copy_from_slice(&8u64.to_le_bytes());
    f.write(hdr, &h);
    let data = lost + 0x200;
    f.write(data, &[0x5a; 512]);
    let status = f.alloc(1);
    f.write(status, &[0xff]);
    let used = f.used_idx(0);
    f.add_chain(
        0,
        &[
            ft_tests::frontend::Buf {
                gpa: hdr,
                len: 16,
                writable: false,
            },
            ft_tests::frontend::Buf {
                gpa: data,
                len: 512,
                writable: false,
            },
            ft_tests::frontend::Buf {
                gpa: status,
                len: 1,
                writable: true,
            },
        ],
    );
    f.truncate_guest_memory(MEM_SIZE - 0x1000);
    f.kick(0);
    assert!(wait_closed(&mut f), "connection not closed");
    assert_eq!(f.used_idx(0), used, "a request over lost memory completed");
    // (Not assert_eq: a failure would print 8 KiB.)
    assert!(
        file_bytes(&d.img, 0, 8192) == old,
        "a write from a zero page reached the image"
    );
    assert_ne!(
        f.read(status, 1)[0],
        VIRTIO_BLK_S_OK as u8,
        "reported written"
    );
}
