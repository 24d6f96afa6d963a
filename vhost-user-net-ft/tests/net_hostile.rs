// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The net daemon against a guest that writes its TX ring wrong, with gating off and on: an
//! avail idx more than the ring size ahead marks the ring broken (VRING_ERR) instead of making
//! the worker spin; the daemon answers GET_VRING_BASE, a restarted ring sends frames to the tap
//! intact, and SIGTERM stops it. (Runs in a network namespace of its own.)

mod common;

use common::{eth_frame, in_netns, PacketSocket};
use ft_tests::frontend::{Buf, TestFrontend};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vhost_user_net_ft::vnet_hdr::VNET_HDR_LEN;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const T: Duration = Duration::from_secs(10);
const RXQ: usize = 0;
const TXQ: usize = 1;

struct Daemon {
    child: Child,
    sock: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

fn start(name: &str, tap: &str, gated: bool) -> Daemon {
    let dir = std::env::temp_dir();
    let sock = dir.join(format!("ft-nethv-{name}-{}.sock", std::process::id()));
    let ctl = dir.join(format!("ft-nethv-{name}-{}.ctl", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-net-ft"));
    cmd.arg("--socket")
        .arg(&sock)
        .args(["--tap", tap, "--ip", "10.98.0.1/24"]);
    if gated {
        cmd.arg("--control").arg(&ctl);
    } else {
        cmd.args(["--ft", "off"]);
    }
    let child = cmd
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn daemon");
    let d = Daemon { child, sock };
    let t0 = Instant::now();
    while !d.sock.exists() {
        assert!(t0.elapsed() < T, "daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    d
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

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

fn rings(f: &mut TestFrontend) {
    for q in [RXQ, TXQ] {
        f.init_queue(q, 256);
        f.setup_vring(q, 0);
        f.fe.set_vring_enable(q, true).expect("enable");
    }
}

/// Places one test frame (virtio-net header + Ethernet frame) on the TX ring (no kick);
/// returns the Ethernet frame the tap should see.
fn add_tx_frame(f: &mut TestFrontend) -> Vec<u8> {
    let frame = eth_frame([0x02, 0, 0, 0, 0, 1], [0x52, 0x54, 0, 1, 2, 3], &[0x5a; 64]);
    let mut data = vec![0u8; VNET_HDR_LEN];
    data.extend_from_slice(&frame);
    let gpa = f.alloc(data.len() as u64);
    f.write(gpa, &data);
    f.add_chain(
        TXQ,
        &[Buf {
            gpa,
            len: data.len() as u32,
            writable: false,
        }],
    );
    frame
}

fn tx_avail_far_ahead(gated: bool, tap: &'static str) {
    in_netns(move || {
        let mut d = start(tap, tap, gated);
        let pid = d.child.id();
        let mut f = TestFrontend::connect(&d.sock, 2, T);
        f.handshake();
        f.set_mem_table();
        let err = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        f.fe.set_vring_err(TXQ, &err).expect("set_vring_err");
        rings(&mut f);
        let (_, avail, _) = TestFrontend::ring_gpas(TXQ);
        f.write(avail + 2, &1000u16.to_le_bytes());
        f.kick(TXQ);
        assert!(readable(&err, T), "VRING_ERR not signalled");
        let before = cpu_ticks(pid);
        std::thread::sleep(Duration::from_millis(500));
        let used = cpu_ticks(pid) - before;
        assert!(used <= 10, "daemon used {used} ticks in 500 ms: spinning");
        assert_eq!(
            f.fe.get_vring_base(TXQ).expect("GET_VRING_BASE answered"),
            0
        );
        // Reset rings; with gating off a frame reaches the tap intact.
        let _ = f.fe.get_vring_base(RXQ);
        rings(&mut f);
        if !gated {
            let pkt = PacketSocket::bind(tap).expect("packet socket");
            let frame = add_tx_frame(&mut f);
            f.kick(TXQ);
            assert_eq!(f.wait_used(TXQ, 1, T).len(), 1);
            let t0 = Instant::now();
            let mut seen = false;
            while !seen && t0.elapsed() < T {
                seen = pkt
                    .collect(Duration::from_millis(100), Duration::from_secs(1))
                    .contains(&frame);
            }
            assert!(seen, "frame never reached the tap");
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Some(st) = d.child.try_wait().expect("wait") {
                assert!(st.success(), "exit status {st}");
                break;
            }
            assert!(t0.elapsed() < T, "SIGTERM ignored");
            std::thread::sleep(Duration::from_millis(20));
        }
    });
}

#[test]
fn tx_avail_idx_far_ahead_breaks_the_ring_ft_off() {
    tx_avail_far_ahead(false, "fthvoff0");
}

#[test]
fn tx_avail_idx_far_ahead_breaks_the_ring_ft_hold() {
    tx_avail_far_ahead(true, "fthvhold0");
}

/// A frontend that truncates its guest memory file under a TX frame in hold mode: the daemon's
/// copy faults, the SIGBUS handler maps zeros there, and the connection is dropped. The zeroed
/// copy must not be held: a COMMIT afterwards sends nothing to the tap, and the daemon lives.
#[test]
fn tx_frame_over_truncated_memory_is_never_sent_ft_hold() {
    use ft_common::control::{ControlClient, Reply, Request};
    use ft_common::epoch::{Epoch, Generation};
    in_netns(|| {
        let tap = "fthvtrunc0";
        let mut d = start("trunc", tap, true);
        let ctl = std::env::temp_dir().join(format!("ft-nethv-trunc-{}.ctl", std::process::id()));
        let mut f = TestFrontend::connect(&d.sock, 2, T);
        f.handshake();
        f.set_mem_table();
        rings(&mut f);
        // Every ethertype: a zeroed copy would carry ethertype 0.
        let pkt = PacketSocket::bind_proto(tap, libc::ETH_P_ALL as u16).expect("packet socket");
        // Data buffers live 2 MiB into the memfd, above the rings, which stay readable.
        let frame = add_tx_frame(&mut f);
        f.truncate_guest_memory(0x20_0000);
        f.kick(TXQ);
        // The daemon notices the fault and closes the connection.
        let t0 = Instant::now();
        loop {
            let mut b = [0u8; 1];
            // SAFETY: reading one byte from our own socket fd.
            let n = unsafe {
                libc::recv(
                    f.raw().as_raw_fd(),
                    b.as_mut_ptr().cast(),
                    1,
                    libc::MSG_DONTWAIT | libc::MSG_PEEK,
                )
            };
            if n == 0 {
                break;
            }
            assert!(t0.elapsed() < T, "connection not closed after the fault");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(d.child.try_wait().expect("wait").is_none(), "daemon died");
        let mut c = ControlClient::connect(&ctl, T).expect("control connect");
        let g = Generation(1);
        match c
            .call(&Request::Seal {
                generation: g,
                epoch: Epoch(1),
            })
            .expect("seal")
        {
            Reply::Sealed { .. } => {}
            r => panic!("seal: {r:?}"),
        }
        let r = c
            .call(&Request::Commit {
                generation: g,
                epoch: Epoch(1),
                deadline: None,
            })
            .expect("commit");
        assert!(matches!(r, Reply::Committed { .. }), "commit: {r:?}");
        let sent = pkt.collect(Duration::from_millis(300), Duration::from_secs(2));
        let zeros = vec![0u8; frame.len()];
        assert!(
            !sent.iter().any(|p| *p == zeros || *p == frame),
            "a frame read over truncated memory reached the tap: {sent:?}"
        );
    });
}
