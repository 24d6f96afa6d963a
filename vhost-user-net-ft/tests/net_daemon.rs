// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon binary end to end, in a network namespace the test creates: a test vhost-user
//! frontend (ft-tests' TestFrontend) drives the virtio rings, an AF_PACKET socket watches the
//! host side of the tap, and a control client plays the coordinator.
//!
//! Checked: nothing reaches the tap before COMMIT, everything in guest order after it, nothing
//! after ABORT; backpressure with a tiny hold buffer loses no frame; frames written to the tap
//! arrive in the guest RX ring with correct virtio-net headers, including merged buffers, and
//! survive a ring stop while waiting for buffers;
//! RARP on ANNOUNCE; frontend reconnect; clean exit on SIGTERM.

mod common;

use common::{eth_frame, in_netns, PacketSocket};
use ft_common::control::{ControlClient, ErrorCode, Notification, Reply, Request};
use ft_common::epoch::{Epoch, Generation};
use ft_tests::frontend::{Buf, TestFrontend};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vhost_user_net_ft::vnet_hdr::{VnetHdr, VNET_HDR_LEN};

const GUEST: [u8; 6] = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];
const HOST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const RXQ: usize = 0;
const TXQ: usize = 1;
const QSIZE: u16 = 256;
const G: Generation = Generation(1);

struct Daemon {
    child: Child,
    /// The daemon's pid (the child's, or the wrapper's child's when run under a wrapper).
    pid: i32,
    sock: PathBuf,
    ctl: PathBuf,
}

impl Daemon {
    /// Starts the daemon (in the caller thread's network namespace) and waits for its sockets.
    fn start(name: &str, tap: &str, extra: &[&str]) -> Daemon {
        Self::start_wrapped(name, tap, extra, &[])
    }

    /// Like [`Daemon::start`], run as the last argument of `wrap` (e.g. strace), whose only
    /// child it must be.
    fn start_wrapped(name: &str, tap: &str, extra: &[&str], wrap: &[&str]) -> Daemon {
        Self::start_full(name, tap, extra, wrap, &[])
    }

    /// [`Daemon::start_wrapped`] with extra environment variables for the daemon.
    fn start_full(
        name: &str,
        tap: &str,
        extra: &[&str],
        wrap: &[&str],
        envs: &[(&str, &std::ffi::OsStr)],
    ) -> Daemon {
        let dir = std::env::temp_dir();
        let sock = dir.join(format!("ft-net-{name}-{}.sock", std::process::id()));
        let ctl = dir.join(format!("ft-net-{name}-{}.ctl", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_file(&ctl);
        let mac = "52:54:00:ab:cd:ef";
        let mut args = vec![
            "--socket",
            sock.to_str().unwrap(),
            "--tap",
            tap,
            "--ip",
            "10.99.0.1/24",
            "--mac",
            mac,
        ];
        // Gating off serves no control socket (--control with --ft off is refused).
        let gated = !extra.windows(2).any(|w| w == ["--ft", "off"]);
        if gated {
            args.extend(["--control", ctl.to_str().unwrap()]);
        }
        args.extend_from_slice(extra);
        let bin = env!("CARGO_BIN_EXE_vhost-user-net-ft");
        let mut cmd = match wrap.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .args(&args)
            .envs(envs.iter().copied())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn daemon");
        let start = Instant::now();
        while !(sock.exists() && (!gated || ctl.exists())) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = if wrap.is_empty() {
            child.id() as i32
        } else {
            let kids = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
                .expect("wrapper's children");
            kids.trim().parse().expect("one daemon under the wrapper")
        };
        Daemon {
            child,
            pid,
            sock,
            ctl,
        }
    }

    /// A coordinator connection, already accepted by the daemon (one STATUS round trip), so
    /// notifications raised from now on reach it.
    fn control(&self) -> ControlClient {
        let mut c =
            ControlClient::connect(&self.ctl, Duration::from_secs(10)).expect("control connect");
        assert!(matches!(c.call(&Request::Status), Ok(Reply::Status(_))));
        c
    }

    /// SIGTERM and wait: the daemon must exit cleanly and promptly.
    fn stop(mut self) {
        // SAFETY: signals our own child (or the wrapper's).
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "daemon exit status {st}");
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "daemon ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.pid != self.child.id() as i32 {
            // SAFETY: our wrapper's child; a wrapper that is killed may leave it running.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
        let _ = std::fs::remove_file(&self.ctl);
    }
}

/// Frontend with both rings of pair 0 running, every offered feature acked.
fn frontend(sock: &Path) -> TestFrontend {
    let mut f = TestFrontend::connect(sock, 2, Duration::from_secs(10));
    f.handshake();
    f.set_mem_table();
    for q in [RXQ, TXQ] {
        f.init_queue(q, QSIZE);
        f.setup_vring(q, 0);
        f.fe.set_vring_enable(q, true).expect("enable");
    }
    f
}

/// Places one TX frame (zero virtio-net header + `frame`) in a single descriptor, as Linux and
/// DPDK's virtio drivers do for small frames (the header in the buffer's headroom).
fn send_one_desc(f: &mut TestFrontend, frame: &[u8]) {
    let mut data = vec![0u8; VNET_HDR_LEN];
    data.extend_from_slice(frame);
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
}

/// Places one TX frame (zero virtio-net header + `frame`) split over two descriptors.
fn send(f: &mut TestFrontend, frame: &[u8]) {
    let mut data = vec![0u8; VNET_HDR_LEN];
    data.extend_from_slice(frame);
    let gpa = f.alloc(data.len() as u64);
    f.write(gpa, &data);
    let cut = 7u32; // header split across descriptors on purpose
    f.add_chain(
        TXQ,
        &[
            Buf {
                gpa,
                len: cut,
                writable: false,
            },
            Buf {
                gpa: gpa + u64::from(cut),
                len: data.len() as u32 - cut,
                writable: false,
            },
        ],
    );
}

fn test_frames(tag: u8, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| eth_frame(HOST, GUEST, &[tag, i as u8, 0x55, 0x66].repeat(16)))
        .collect()
}

fn quiet(sock: &PacketSocket) -> Vec<Vec<u8>> {
    sock.collect(Duration::from_millis(300), Duration::from_secs(2))
}

fn wait_collect(sock: &PacketSocket, n: usize) -> Vec<Vec<u8>> {
    let start = Instant::now();
    let mut got = Vec::new();
    while got.len() < n && start.elapsed() < Duration::from_secs(10) {
        got.extend(sock.collect(Duration::from_millis(100), Duration::from_secs(1)));
    }
    got
}

/// Reads RX used entries until `want` test frames arrived; returns (num_buffers, frame) of each,
/// checking that a frame's used lengths add up and that num_buffers matches the entries used.
/// Frames of other ethertypes (kernel chatter on the tap) are skipped.
fn rx_test_frames(
    f: &mut TestFrontend,
    bufs: &mut std::collections::HashMap<u16, u64>,
    buf_len: u32,
    want: usize,
) -> Vec<(u16, Vec<u8>)> {
    let start = Instant::now();
    let mut pending: std::collections::VecDeque<(u16, u32)> = Default::default();
    let mut out = Vec::new();
    while out.len() < want && start.elapsed() < Duration::from_secs(10) {
        pending.extend(f.wait_used(RXQ, 1, Duration::from_millis(200)));
        while let Some(&(head, len)) = pending.front() {
            let first = f.read(bufs[&head], len as usize);
            let n = VnetHdr::decode(&first, VNET_HDR_LEN).num_buffers as usize;
            assert!(n >= 1, "num_buffers 0");
            if pending.len() < n {
                break;
            }
            let mut data = Vec::new();
            let heads: Vec<u16> = pending
                .drain(..n)
                .map(|(h, l)| {
                    data.extend(f.read(bufs[&h], l as usize));
                    h
                })
                .collect();
            let frame = data.split_off(VNET_HDR_LEN);
            if frame[12..14] == common::ETH_P_TEST.to_be_bytes() {
                out.push((n as u16, frame));
            } else {
                // The kernel's own frames on a tap that just came up (IPv6 neighbour
                // discovery, MLD reports): give their buffers back, as a guest driver refills
                // its ring, so they cannot starve the test's frames.
                for h in heads {
                    let gpa = bufs[&h];
                    let w = Buf {
                        gpa,
                        len: buf_len,
                        writable: true,
                    };
                    bufs.insert(f.add_chain(RXQ, &[w]), gpa);
                }
                f.kick(RXQ);
            }
        }
    }
    out
}

fn call(c: &mut ControlClient, r: Request) -> Reply {
    c.call(&r).expect("control call")
}

fn seal_commit(c: &mut ControlClient, e: u64) -> Reply {
    match call(
        c,
        Request::Seal {
            generation: G,
            epoch: Epoch(e),
        },
    ) {
        Reply::Sealed { .. } => {}
        r => panic!("seal {e}: {r:?}"),
    }
    call(
        c,
        Request::Commit {
            generation: G,
            epoch: Epoch(e),
            deadline: None,
        },
    )
}

#[test]
fn hold_gates_tx_until_commit_and_abort_discards() {
    in_netns(|| {
        let d = Daemon::start("gate", "ftgate0", &[]);
        let mut f = frontend(&d.sock);
        let pkt = PacketSocket::bind("ftgate0").expect("packet socket");
        let mut ctl = d.control();

        // Epoch 1: five frames. Descriptors come back at once, nothing reaches the tap.
        let e1 = test_frames(1, 5);
        for fr in &e1 {
            send(&mut f, fr);
        }
        f.kick(TXQ);
        assert_eq!(f.wait_used(TXQ, 5, Duration::from_secs(5)).len(), 5);
        match ctl.wait_notification(Duration::from_secs(5)).unwrap() {
            Some(Notification::OutputPending { epoch }) => assert_eq!(epoch, Epoch(1)),
            n => panic!("expected OUTPUT_PENDING: {n:?}"),
        }
        assert!(quiet(&pkt).is_empty(), "frames left before COMMIT");

        // COMMIT 1: all five, in guest order.
        match seal_commit(&mut ctl, 1) {
            Reply::Committed { epoch, stats } => {
                assert_eq!(epoch, Epoch(1));
                assert_eq!(stats.requests, 5);
            }
            r => panic!("commit: {r:?}"),
        }
        assert_eq!(wait_collect(&pkt, 5), e1);

        // Epoch 2: three frames, sealed, then ABORT: none ever leaves.
        let e2 = test_frames(2, 3);
        for fr in &e2 {
            send(&mut f, fr);
        }
        f.kick(TXQ);
        assert_eq!(f.wait_used(TXQ, 3, Duration::from_secs(5)).len(), 3);
        match call(
            &mut ctl,
            Request::Seal {
                generation: G,
                epoch: Epoch(2),
            },
        ) {
            Reply::Sealed { state, .. } => {
                assert_eq!(state.queues.len(), 2);
                let tx = &state.queues[1];
                assert_eq!(tx.queue, TXQ as u16);
                assert_eq!((tx.next_avail, tx.used_idx), (8, Some(8)));
                assert!(tx.outstanding.is_empty());
            }
            r => panic!("seal: {r:?}"),
        }
        // The coordinator lost that reply and retries: the same record, not STALE_EPOCH (the
        // shared gate's rule, as on the block daemon).
        let first = call(
            &mut ctl,
            Request::Seal {
                generation: G,
                epoch: Epoch(2),
            },
        );
        match &first {
            Reply::Sealed { epoch, state } => {
                assert_eq!(*epoch, Epoch(2));
                assert_eq!(
                    (state.queues[1].next_avail, state.queues[1].used_idx),
                    (8, Some(8))
                );
            }
            r => panic!("retried seal: {r:?}"),
        }
        match call(&mut ctl, Request::Abort { generation: G }) {
            Reply::Aborted {
                cancelled_requests,
                last_committed,
                ..
            } => {
                assert_eq!(cancelled_requests, 3);
                assert_eq!(last_committed, Some(Epoch(1)));
            }
            r => panic!("abort: {r:?}"),
        }
        match call(
            &mut ctl,
            Request::Commit {
                generation: G,
                epoch: Epoch(2),
                deadline: None,
            },
        ) {
            Reply::Error { code, .. } => assert_eq!(code, ErrorCode::Aborted),
            r => panic!("commit after abort: {r:?}"),
        }
        // Stale generation is fenced.
        match call(
            &mut ctl,
            Request::Abort {
                generation: Generation(0),
            },
        ) {
            Reply::Error { code, .. } => assert_eq!(code, ErrorCode::Fenced),
            r => panic!("fence: {r:?}"),
        }
        assert!(quiet(&pkt).is_empty(), "aborted frames reached the tap");

        // Malformed TX chains (short header, device-writable descriptor) are dropped and
        // returned; the daemon keeps serving and nothing is held for them.
        let gpa = f.alloc(64);
        f.add_chain(
            TXQ,
            &[Buf {
                gpa,
                len: 8,
                writable: false,
            }],
        );
        f.add_chain(
            TXQ,
            &[Buf {
                gpa,
                len: 64,
                writable: true,
            }],
        );
        f.kick(TXQ);
        assert_eq!(f.wait_used(TXQ, 2, Duration::from_secs(5)).len(), 2);
        match call(&mut ctl, Request::Status) {
            Reply::Status(s) => {
                assert_eq!(s.mode, "hold");
                assert_eq!(s.held_requests, 0);
                assert_eq!(s.last_committed, Some(Epoch(1)));
                assert_eq!(s.commits_ok, 1);
            }
            r => panic!("status: {r:?}"),
        }

        // ANNOUNCE: one gratuitous RARP for the guest MAC on the wire.
        let rarp = PacketSocket::bind_proto("ftgate0", 0x8035).expect("rarp socket");
        match call(&mut ctl, Request::Announce { generation: G }) {
            Reply::Announced { packets } => assert_eq!(packets, 1),
            r => panic!("announce: {r:?}"),
        }
        let got = rarp.collect(Duration::from_millis(200), Duration::from_secs(2));
        assert_eq!(got.len(), 1, "one RARP");
        assert_eq!(got[0][..6], [0xff; 6]);
        assert_eq!(got[0][6..12], GUEST);
        assert_eq!(got[0][20..22], [0, 3], "reverse request");
        drop(f);
        d.stop();
    });
}

/// Frames the tap refuses at commit (its interface is down: the tap answers EIO) are not
/// reported COMMITTED: the commit is COMMIT_FAILED and counted in STATUS, the daemon keeps
/// committing later epochs (a lost frame is packet loss, not a reason to hold all output).
#[test]
fn frames_the_tap_refuses_make_the_commit_fail_visibly() {
    in_netns(|| {
        let d = Daemon::start("refuse", "ftrefuse0", &[]);
        let mut f = frontend(&d.sock);
        let mut ctl = d.control();
        let link = |state: &str| {
            let st = Command::new("ip")
                .args(["link", "set", "ftrefuse0", state])
                .status()
                .expect("ip");
            assert!(st.success(), "ip link set {state}");
        };
        let frames = test_frames(3, 2);
        for fr in &frames {
            send(&mut f, fr);
        }
        f.kick(TXQ);
        assert_eq!(f.wait_used(TXQ, 2, Duration::from_secs(5)).len(), 2);
        link("down");
        match seal_commit(&mut ctl, 1) {
            Reply::CommitFailed { epoch, error, .. } => {
                assert_eq!(epoch, Epoch(1));
                assert!(error.contains("refused 2 of 2"), "{error}");
            }
            r => panic!("commit to a downed tap: {r:?}"),
        }
        match call(&mut ctl, Request::Status) {
            Reply::Status(s) => {
                assert_eq!((s.commits_ok, s.commits_failed), (0, 1));
                assert!(!s.commit_refused);
                assert_eq!(s.last_committed, Some(Epoch(1)));
                assert_eq!(s.held_requests, 0);
            }
            r => panic!("status: {r:?}"),
        }
        link("up");
        let pkt = PacketSocket::bind("ftrefuse0").expect("packet socket");
        let more = test_frames(4, 1);
        send(&mut f, &more[0]);
        f.kick(TXQ);
        assert_eq!(f.wait_used(TXQ, 1, Duration::from_secs(5)).len(), 1);
        match seal_commit(&mut ctl, 2) {
            Reply::Committed { stats, .. } => assert_eq!(stats.requests, 1),
            r => panic!("commit after the tap came back: {r:?}"),
        }
        assert_eq!(wait_collect(&pkt, 1), more);
        drop(f);
        d.stop();
    });
}

#[test]
fn backpressure_with_tiny_buffer_loses_nothing() {
    in_netns(|| {
        let d = Daemon::start("bp", "ftbp0", &["--tx-buffer-packets", "3"]);
        let mut f = frontend(&d.sock);
        let pkt = PacketSocket::bind("ftbp0").expect("packet socket");
        let mut ctl = d.control();
        let frames = test_frames(7, 20);
        for fr in &frames {
            send(&mut f, fr);
        }
        f.kick(TXQ);
        // Only three fit: the daemon stops taking from the ring and asks for a checkpoint.
        let mut used = f.wait_used(TXQ, 3, Duration::from_secs(10));
        used.extend(f.wait_used(TXQ, 17, Duration::from_millis(300)));
        assert_eq!(used.len(), 3, "hold buffer bounded at 3 packets");
        match ctl.wait_notification(Duration::from_secs(5)).unwrap() {
            Some(Notification::OutputPending { epoch }) => assert_eq!(epoch, Epoch(1)),
            n => panic!("expected OUTPUT_PENDING: {n:?}"),
        }
        let mut total_used = used.len();
        let mut got = Vec::new();
        let mut epoch = 1;
        while got.len() < frames.len() {
            assert!(
                epoch < 50,
                "no progress: {} of {} frames",
                got.len(),
                frames.len()
            );
            match seal_commit(&mut ctl, epoch) {
                Reply::Committed { .. } => {}
                r => panic!("commit {epoch}: {r:?}"),
            }
            epoch += 1;
            got.extend(quiet(&pkt));
            total_used += f
                .wait_used(TXQ, 20 - total_used, Duration::from_millis(100))
                .len();
        }
        assert_eq!(total_used, 20);
        assert_eq!(got, frames, "every frame, once, in guest order");
        drop(f);
        d.stop();
    });
}

#[test]
fn rx_frames_reach_the_guest_with_merged_buffers() {
    in_netns(|| {
        let d = Daemon::start("rx", "ftrx0", &["--ft", "off"]);
        let mut f = frontend(&d.sock);
        let pkt = PacketSocket::bind("ftrx0").expect("packet socket");
        // Sixteen 600-byte single-descriptor RX buffers.
        let mut bufs = std::collections::HashMap::new();
        for _ in 0..16 {
            let gpa = f.alloc(600);
            let head = f.add_chain(
                RXQ,
                &[Buf {
                    gpa,
                    len: 600,
                    writable: true,
                }],
            );
            bufs.insert(head, gpa);
        }
        f.kick(RXQ);
        // A 1500-byte frame (MTU-sized) needs three merged buffers; a small one takes one.
        let big = eth_frame(GUEST, HOST, &(0..1486).map(|i| i as u8).collect::<Vec<_>>());
        let small = eth_frame(
            GUEST,
            HOST,
            b"small frame, padded out to the minimum size....",
        );
        pkt.send(&big).unwrap();
        pkt.send(&small).unwrap();
        let got = rx_test_frames(&mut f, &mut bufs, 600, 2);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            got[0],
            (3, big.clone()),
            "three merged buffers, whole frame"
        );
        assert_eq!(got[1], (1, small.clone()));

        // TX in --ft off goes straight out.
        let fr = test_frames(9, 2);
        for x in &fr {
            send(&mut f, x);
        }
        f.kick(TXQ);
        assert_eq!(wait_collect(&pkt, 2), fr);

        // Frontend disconnect and reconnect: the daemon serves the new connection.
        drop(f);
        let mut f = frontend(&d.sock);
        let mut bufs = std::collections::HashMap::new();
        for _ in 0..8 {
            let gpa = f.alloc(2048);
            let head = f.add_chain(
                RXQ,
                &[Buf {
                    gpa,
                    len: 2048,
                    writable: true,
                }],
            );
            bufs.insert(head, gpa);
        }
        f.kick(RXQ);
        pkt.send(&small).unwrap();
        assert_eq!(
            rx_test_frames(&mut f, &mut bufs, 2048, 1),
            vec![(1, small)],
            "RX after reconnect"
        );
        drop(f);
        d.stop();
    });
}

/// A VM pause (GET_VRING_BASE on the RX ring, as at every checkpoint) while a frame waits for
/// more RX buffers: the buffers taken for it go back to the guest untouched (no used entry) and
/// the frame arrives whole once the ring runs again.
#[test]
fn rx_frame_waiting_for_buffers_survives_a_ring_stop() {
    in_netns(|| {
        let d = Daemon::start("rxstop", "ftrxs0", &["--ft", "off"]);
        let mut f = frontend(&d.sock);
        let pkt = PacketSocket::bind("ftrxs0").expect("packet socket");
        let mut bufs = std::collections::HashMap::new();
        let mut add_bufs = |f: &mut TestFrontend, n: usize| {
            for _ in 0..n {
                let gpa = f.alloc(600);
                let w = Buf {
                    gpa,
                    len: 600,
                    writable: true,
                };
                bufs.insert(f.add_chain(RXQ, &[w]), gpa);
            }
            f.kick(RXQ);
        };
        // Two 600-byte buffers; a 1500-byte frame needs three.
        add_bufs(&mut f, 2);
        let big = eth_frame(GUEST, HOST, &(0..1486).map(|i| i as u8).collect::<Vec<_>>());
        pkt.send(&big).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let used_before = f.used_idx(RXQ);
        let base = f.fe.get_vring_base(RXQ).expect("get_vring_base") as u16;
        assert_eq!(
            base, used_before,
            "buffers taken for the waiting frame are given back, not used"
        );
        assert_eq!(
            f.used_idx(RXQ),
            used_before,
            "no used entry written at the stop"
        );
        // The VM runs again: the ring restarts from that base, the guest adds buffers.
        f.setup_vring(RXQ, base);
        f.fe.set_vring_enable(RXQ, true).expect("enable");
        add_bufs(&mut f, 4);
        let got = rx_test_frames(&mut f, &mut bufs, 600, 1);
        assert_eq!(
            got,
            vec![(3, big)],
            "the frame arrives whole after the restart"
        );
        drop(f);
        d.stop();
    });
}

/// The device's avail_event for `q` (EVENT_IDX: the last field of the used ring).
fn avail_event(f: &TestFrontend, q: usize) -> u16 {
    let (_, _, used) = TestFrontend::ring_gpas(q);
    let b = f.read(used + 4 + 8 * u64::from(QSIZE), 2);
    u16::from_le_bytes([b[0], b[1]])
}

/// Linux's EVENT_IDX kick rule (`vring_need_event`): having moved its avail idx from `old` to
/// `new`, the driver kicks only if avail_event lies in `[old, new)`.
fn linux_kicks(avail_event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Issue 16, TX re-arm after a ring restart (VM pause): frames the guest published while the
/// ring was stopped, whose kick QEMU consumed (it reads the kick eventfd when it stops the
/// ring), go out when the ring starts again without any kick; afterwards avail_event sits at
/// the guest's avail idx, so a guest that kicks only as Linux's EVENT_IDX rule says still gets
/// every later frame through.
#[test]
fn tx_frames_published_while_stopped_go_out_at_restart_and_the_ring_stays_armed() {
    in_netns(|| {
        let d = Daemon::start("txrestart", "fttxr0", &["--ft", "off"]);
        let mut f = frontend(&d.sock);
        let pkt = PacketSocket::bind("fttxr0").expect("packet socket");
        let first = test_frames(1, 2);
        for fr in &first {
            send(&mut f, fr);
        }
        f.kick(TXQ);
        assert_eq!(wait_collect(&pkt, 2), first);
        // VM pause: the ring stops; the guest had published three more frames and kicked, but
        // the kick went to QEMU.
        let base = f.fe.get_vring_base(TXQ).expect("get_vring_base") as u16;
        assert_eq!(base, 2);
        let during = test_frames(2, 3);
        for fr in &during {
            send(&mut f, fr);
        }
        // cont: same rings, a fresh kick eventfd that was never written.
        f.queues[TXQ].kick = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
        f.setup_vring(TXQ, base);
        f.fe.set_vring_enable(TXQ, true).expect("enable");
        assert_eq!(
            wait_collect(&pkt, 3),
            during,
            "frames published while stopped"
        );
        assert_eq!(f.wait_used(TXQ, 5, Duration::from_secs(5)).len(), 5);
        // From now on the guest kicks only when Linux's rule says so.
        for round in 0..20u8 {
            let old = f.avail_idx(TXQ);
            let fr = test_frames(10 + round, 1);
            send(&mut f, &fr[0]);
            let new = f.avail_idx(TXQ);
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            if linux_kicks(avail_event(&f, TXQ), new, old) {
                f.kick(TXQ);
            }
            assert_eq!(
                wait_collect(&pkt, 1),
                fr,
                "round {round}: frame stuck (avail_event {}, avail idx {new})",
                avail_event(&f, TXQ)
            );
        }
        drop(f);
        d.stop();
    });
}

#[test]
fn multi_queue_pairs_each_get_a_tap_queue_and_commit_together() {
    in_netns(|| {
        let d = Daemon::start("mq", "ftmq1", &["--queues", "2"]);
        let mut f = TestFrontend::connect(&d.sock, 4, Duration::from_secs(10));
        let (features, _) = f.handshake();
        assert_ne!(features & (1 << 22), 0, "MQ offered with two pairs");
        f.set_mem_table();
        for q in 0..4 {
            f.init_queue(q, QSIZE);
            f.setup_vring(q, 0);
            f.fe.set_vring_enable(q, true).expect("enable");
        }
        let pkt = PacketSocket::bind("ftmq1").expect("packet socket");
        let mut ctl = d.control();
        // Pair 0 TX (queue 1) and pair 1 TX (queue 3), four frames each.
        let a = test_frames(0xa, 4);
        let b = test_frames(0xb, 4);
        for (q, frames) in [(1usize, &a), (3usize, &b)] {
            for fr in frames.iter() {
                let mut data = vec![0u8; VNET_HDR_LEN];
                data.extend_from_slice(fr);
                let gpa = f.alloc(data.len() as u64);
                f.write(gpa, &data);
                f.add_chain(
                    q,
                    &[Buf {
                        gpa,
                        len: data.len() as u32,
                        writable: false,
                    }],
                );
            }
            f.kick(q);
            assert_eq!(f.wait_used(q, 4, Duration::from_secs(5)).len(), 4);
        }
        assert!(quiet(&pkt).is_empty(), "held on both pairs");
        match call(&mut ctl, Request::Status) {
            Reply::Status(s) => assert_eq!(s.held_requests, 8),
            r => panic!("status: {r:?}"),
        }
        match seal_commit(&mut ctl, 1) {
            Reply::Committed { stats, .. } => assert_eq!(stats.requests, 8),
            r => panic!("commit: {r:?}"),
        }
        let got = wait_collect(&pkt, 8);
        assert_eq!(got.len(), 8);
        // Per-queue order is guest order; the two queues interleave freely.
        let only =
            |tag: u8| -> Vec<Vec<u8>> { got.iter().filter(|g| g[14] == tag).cloned().collect() };
        assert_eq!(only(0xa), a);
        assert_eq!(only(0xb), b);
        drop(f);
        d.stop();
    });
}

/// Whether `tool` runs; without it a test is skipped, except in CI where that is a failure.
fn have_tool(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "{tool} is missing, but CI=true: scripts/setup.sh should have provided it"
        );
        eprintln!("skipped: {tool} is missing (scripts/setup.sh installs it)");
    }
    ok
}

/// A commit whose `io_uring_enter` fails (strace injects EIO into the first one of each thread,
/// without the kernel seeing it) must not leave SQEs behind that point into the hold arena:
/// the arena is reused for later epochs, and a stale SQE sent at the next commit would put
/// bytes of an unacknowledged epoch on the wire. Epoch 1 holds one long frame; epochs 2 and 3
/// then hold short frames at the same arena offsets. Committing 2 must send exactly epoch 2's
/// frame, and epoch 1's frame must not be lost either.
#[test]
fn a_failed_io_uring_submit_sends_nothing_of_a_later_epoch() {
    if !have_tool("strace") {
        return;
    }
    in_netns(|| {
        let d = Daemon::start_wrapped(
            "uring-fail",
            "ftufail0",
            &[],
            &[
                "strace",
                "-f",
                "-qq",
                "-o",
                "/dev/null",
                "-e",
                "trace=io_uring_enter",
                "-e",
                "inject=io_uring_enter:error=EIO:when=1",
            ],
        );
        let mut f = frontend(&d.sock);
        let pkt = PacketSocket::bind("ftufail0").expect("packet socket");
        let mut ctl = d.control();
        let long = eth_frame(HOST, GUEST, &[0x11; 1200]);
        let e2 = eth_frame(HOST, GUEST, &[0x22; 50]);
        let e3 = eth_frame(HOST, GUEST, &[0x33; 300]);

        send(&mut f, &long);
        f.kick(TXQ);
        assert_eq!(f.wait_used(TXQ, 1, Duration::from_secs(5)).len(), 1);
        match seal_commit(&mut ctl, 1) {
            Reply::Committed { stats, .. } => assert_eq!(stats.requests, 1),
            r => panic!("commit 1: {r:?}"),
        }
        assert_eq!(wait_collect(&pkt, 1), vec![long.clone()], "epoch 1 lost");

        send(&mut f, &e2);
        f.kick(TXQ);
        assert_eq!(f.wait_used(TXQ, 1, Duration::from_secs(5)).len(), 1);
        match call(
            &mut ctl,
            Request::Seal {
                generation: G,
                epoch: Epoch(2),
            },
        ) {
            Reply::Sealed { .. } => {}
            r => panic!("seal 2: {r:?}"),
        }
        send(&mut f, &e3);
        f.kick(TXQ);
        assert_eq!(f.wait_used(TXQ, 1, Duration::from_secs(5)).len(), 1);
        match call(
            &mut ctl,
            Request::Commit {
                generation: G,
                epoch: Epoch(2),
                deadline: None,
            },
        ) {
            Reply::Committed { .. } => {}
            r => panic!("commit 2: {r:?}"),
        }
        let got = quiet(&pkt);
        assert!(
            !got.iter().any(|g| g.windows(16).any(|w| w == [0x33; 16])),
            "bytes of unacknowledged epoch 3 reached the wire"
        );
        assert_eq!(got, vec![e2], "commit 2 sends exactly epoch 2");
        match seal_commit(&mut ctl, 3) {
            Reply::Committed { .. } => {}
            r => panic!("commit 3: {r:?}"),
        }
        assert_eq!(wait_collect(&pkt, 1), vec![e3]);
        drop(f);
        d.stop();
    });
}

/// `--state-dir`: the fence survives a daemon restart (SIGKILL), so a deposed coordinator stays
/// refused.
#[test]
fn the_fence_survives_a_restart_with_a_state_dir() {
    let state = std::env::temp_dir().join(format!("ft-net-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let state_arg = state.to_str().unwrap().to_string();
    in_netns(move || {
        let abort = |c: &mut ControlClient, g| {
            call(
                c,
                Request::Abort {
                    generation: Generation(g),
                },
            )
        };
        let d = Daemon::start("fence1", "ftfence0", &["--state-dir", &state_arg]);
        let mut c = d.control();
        assert!(matches!(abort(&mut c, 5), Reply::Aborted { .. }));
        drop(c);
        drop(d); // SIGKILL
        let d = Daemon::start("fence2", "ftfence0", &["--state-dir", &state_arg]);
        let mut c = d.control();
        match call(&mut c, Request::Status) {
            Reply::Status(s) => assert_eq!(s.generation, Generation(5)),
            r => panic!("status: {r:?}"),
        }
        match abort(&mut c, 4) {
            Reply::Error { code, .. } => assert_eq!(code, ErrorCode::Fenced),
            r => panic!("deposed coordinator admitted after a restart: {r:?}"),
        }
        d.stop();
    });
    std::fs::remove_dir_all(&state).unwrap();
}

/// A panic in the control handler (a panic point armed at the start of COMMIT) fails that
/// command with INTERNAL and loses nothing: the held frames stay held, the next COMMIT sends
/// them, and later commands work (the handler's lock is not poisoned).
#[test]
fn a_panic_in_commit_fails_that_command_and_loses_nothing() {
    let arm = std::env::temp_dir().join(format!("ft-net-panic-{}.arm", std::process::id()));
    std::fs::write(&arm, b"").unwrap();
    let arm_env = arm.clone();
    in_netns(move || {
        let d = Daemon::start_full(
            "panic",
            "ftpanic0",
            &[],
            &[],
            &[
                ("FT_PANIC_AT", "net-before-commit".as_ref()),
                ("FT_STOP_ARM", arm_env.as_os_str()),
            ],
        );
        let mut f = frontend(&d.sock);
        let pkt = PacketSocket::bind("ftpanic0").expect("packet socket");
        let mut ctl = d.control();
        let frames = test_frames(7, 3);
        for fr in &frames {
            send(&mut f, fr);
        }
        f.kick(TXQ);
        assert_eq!(f.wait_used(TXQ, 3, Duration::from_secs(5)).len(), 3);
        match seal_commit(&mut ctl, 1) {
            Reply::Error { code, message } => {
                assert_eq!(code, ErrorCode::Internal);
                assert!(message.contains("panicked"), "{message}");
            }
            r => panic!("commit with a panic: {r:?}"),
        }
        assert!(!arm_env.exists(), "the panic point was not reached");
        assert!(
            quiet(&pkt).is_empty(),
            "nothing was sent by the failed command"
        );
        match call(&mut ctl, Request::Status) {
            Reply::Status(s) => assert_eq!(s.held_requests, 3),
            r => panic!("status after the panic: {r:?}"),
        }
        match call(
            &mut ctl,
            Request::Commit {
                generation: G,
                epoch: Epoch(1),
                deadline: None,
            },
        ) {
            Reply::Committed { stats, .. } => assert_eq!(stats.requests, 3),
            r => panic!("commit after the panic: {r:?}"),
        }
        assert_eq!(wait_collect(&pkt, 3), frames);
        drop(f);
        d.stop();
    });
    let _ = std::fs::remove_file(&arm);
}

/// A panic after the frames of a commit went out is not answered COMMITTED nor as a harmless
/// INTERNAL error: the commit failed (`COMMIT_FAILED`, counted), and the daemon goes on.
#[test]
fn a_panic_after_frames_were_sent_is_a_failed_commit() {
    let arm = std::env::temp_dir().join(format!("ft-net-panic2-{}.arm", std::process::id()));
    std::fs::write(&arm, b"").unwrap();
    let arm_env = arm.clone();
    in_netns(move || {
        let d = Daemon::start_full(
            "panic2",
            "ftpanic1",
            &[],
            &[],
            &[
                ("FT_PANIC_AT", "net-after-release".as_ref()),
                ("FT_STOP_ARM", arm_env.as_os_str()),
            ],
        );
        let mut f = frontend(&d.sock);
        let pkt = PacketSocket::bind("ftpanic1").expect("packet socket");
        let mut ctl = d.control();
        let frames = test_frames(8, 2);
        for fr in &frames {
            send(&mut f, fr);
        }
        f.kick(TXQ);
        assert_eq!(f.wait_used(TXQ, 2, Duration::from_secs(5)).len(), 2);
        match seal_commit(&mut ctl, 1) {
            Reply::CommitFailed { epoch, error, .. } => {
                assert_eq!(epoch, Epoch(1));
                assert!(error.contains("panicked"), "{error}");
            }
            r => panic!("commit with a panic after sending: {r:?}"),
        }
        assert!(!arm_env.exists(), "the panic point was not reached");
        assert_eq!(wait_collect(&pkt, 2), frames, "the frames did go out");
        match call(&mut ctl, Request::Status) {
            Reply::Status(s) => {
                assert_eq!((s.commits_ok, s.commits_failed), (0, 1));
                assert!(!s.commit_refused);
                assert_eq!(s.last_committed, Some(Epoch(1)));
            }
            r => panic!("status after the panic: {r:?}"),
        }
        let more = test_frames(9, 1);
        send(&mut f, &more[0]);
        f.kick(TXQ);
        assert_eq!(f.wait_used(TXQ, 1, Duration::from_secs(5)).len(), 1);
        match seal_commit(&mut ctl, 2) {
            Reply::Committed { stats, .. } => assert_eq!(stats.requests, 1),
            r => panic!("commit after the panic: {r:?}"),
        }
        assert_eq!(wait_collect(&pkt, 1), more);
        drop(f);
        d.stop();
    });
    let _ = std::fs::remove_file(&arm);
}

#[test]
fn bad_command_lines_fail_cleanly() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vhost-user-net-ft"))
            .args(args)
            .env("RUST_LOG", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("spawn")
    };
    let base = ["--socket", "/tmp/ft-net-never.sock", "--tap", "ftnever0"];
    for extra in [
        &["--ft", "hold"][..],               // hold without a coordinator
        &["--tx-buffer-bytes", "1000"][..],  // smaller than one frame
        &["--tx-buffer-packets", "0"][..],   // no room at all
        &["--queue-size", "100"][..],        // not a power of two
        &["--mac", "01:00:5e:00:00:01"][..], // multicast MAC
        &["--ip", "fe80::1/64"][..],         // IPv6 not supported by --ip
        &["--queues", "0"][..],              // no queue pair
        &["--ft", "off", "--control", "/tmp/ft-net-never.ctl"][..], // contradiction
    ] {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        let st = run(&a);
        assert!(!st.success() && st.code().is_some(), "{extra:?}: {st}");
    }
    assert!(!Path::new("/tmp/ft-net-never.sock").exists());
}

/// A checkpoint taken with the rings stopped (as QEMU's migration does) records each ring's
/// base as GET_VRING_BASE returned it and nothing outstanding (it used to read 0 for a stopped
/// TX ring); a new daemon on the VM restored from that checkpoint (a copy of guest memory, the
/// recorded bases, a new tap of the same name) carries on: TX and RX continue on both rings.
#[test]
fn restored_vm_carries_on_with_a_new_daemon() {
    in_netns(|| {
        let d = Daemon::start("rst1", "ftrst0", &[]);
        let mut f = frontend(&d.sock);
        let mut ctl = d.control();
        let mut bufs = std::collections::HashMap::new();
        let add_bufs =
            |f: &mut TestFrontend, bufs: &mut std::collections::HashMap<u16, u64>, n: usize| {
                for _ in 0..n {
                    let gpa = f.alloc(600);
                    let w = Buf {
                        gpa,
                        len: 600,
                        writable: true,
                    };
                    bufs.insert(f.add_chain(RXQ, &[w]), gpa);
                }
                f.kick(RXQ);
            };
        // Epoch 1: three TX frames held; an RX frame waits for a third buffer.
        let e1 = test_frames(0x31, 3);
        for fr in &e1 {
            send(&mut f, fr);
        }
        f.kick(TXQ);
        assert_eq!(f.wait_used(TXQ, 3, Duration::from_secs(5)).len(), 3);
        add_bufs(&mut f, &mut bufs, 2);
        let pkt = PacketSocket::bind("ftrst0").expect("packet socket");
        let big = eth_frame(GUEST, HOST, &(0..1486).map(|i| i as u8).collect::<Vec<_>>());
        pkt.send(&big).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // The checkpoint: both rings stopped, then SEAL.
        let rx_base = f.fe.get_vring_base(RXQ).expect("get_vring_base") as u16;
        let tx_base = f.fe.get_vring_base(TXQ).expect("get_vring_base") as u16;
        assert_eq!(tx_base, 3);
        let state = match call(
            &mut ctl,
            Request::Seal {
                generation: G,
                epoch: Epoch(1),
            },
        ) {
            Reply::Sealed { state, .. } => state,
            r => panic!("seal: {r:?}"),
        };
        let rings: Vec<_> = state
            .queues
            .iter()
            .map(|q| (q.queue, q.next_avail, q.used_idx, q.outstanding.len()))
            .collect();
        assert_eq!(
            rings,
            vec![
                (RXQ as u16, rx_base, Some(rx_base), 0),
                (TXQ as u16, tx_base, Some(tx_base), 0)
            ]
        );
        assert!(matches!(
            call(
                &mut ctl,
                Request::Commit {
                    generation: G,
                    epoch: Epoch(1),
                    deadline: None,
                },
            ),
            Reply::Committed { .. }
        ));
        assert_eq!(wait_collect(&pkt, 3), e1);
        drop(pkt);
        drop(ctl);
        drop(d);

        // The standby: a new daemon (new tap of the same name), the restored guest.
        let d2 = Daemon::start("rst2", "ftrst0", &[]);
        let mut r = f.restored_copy(&d2.sock, Duration::from_secs(10));
        r.handshake();
        r.set_mem_table();
        r.setup_vring(RXQ, rx_base);
        r.setup_vring(TXQ, tx_base);
        for q in [RXQ, TXQ] {
            r.fe.set_vring_enable(q, true)
                .expect("restored ring starts");
        }
        let pkt = PacketSocket::bind("ftrst0").expect("packet socket");
        let mut ctl = d2.control();
        let e2 = test_frames(0x32, 2);
        for fr in &e2 {
            send(&mut r, fr);
        }
        r.kick(TXQ);
        assert_eq!(r.wait_used(TXQ, 2, Duration::from_secs(5)).len(), 2);
        assert_eq!(r.used_idx(TXQ), tx_base + 2);
        assert!(matches!(
            call(
                &mut ctl,
                Request::Seal {
                    generation: G,
                    epoch: Epoch(1),
                },
            ),
            Reply::Sealed { .. }
        ));
        assert!(matches!(
            call(
                &mut ctl,
                Request::Commit {
                    generation: G,
                    epoch: Epoch(1),
                    deadline: None,
                },
            ),
            Reply::Committed { .. }
        ));
        assert_eq!(wait_collect(&pkt, 2), e2);
        // RX carries on: the buffers the old daemon gave back plus new ones take a new frame.
        add_bufs(&mut r, &mut bufs, 2);
        let small = eth_frame(GUEST, HOST, &[0x77; 100]);
        pkt.send(&small).unwrap();
        let got = rx_test_frames(&mut r, &mut bufs, 600, 1);
        assert_eq!(got, vec![(1, small)]);
        drop(r);
        d2.stop();
    });
}

/// `--ft off` writes single-descriptor frames to the tap in batches and a multi-descriptor
/// frame on its own after the batch before it: every frame reaches the tap once, in guest
/// order, and every chain comes back only after its frame was written.
#[test]
fn off_mode_batches_keep_guest_order_across_frame_shapes() {
    in_netns(|| {
        let d = Daemon::start("offbatch", "ftoffb0", &["--ft", "off"]);
        let mut f = frontend(&d.sock);
        let pkt = PacketSocket::bind("ftoffb0").expect("packet socket");
        // 150 frames (more than one batch), every 13th split over two descriptors.
        let frames = test_frames(7, 150);
        for (i, fr) in frames.iter().enumerate() {
            if i % 13 == 5 {
                send(&mut f, fr);
            } else {
                send_one_desc(&mut f, fr);
            }
        }
        f.kick(TXQ);
        assert_eq!(f.wait_used(TXQ, 150, Duration::from_secs(10)).len(), 150);
        assert_eq!(wait_collect(&pkt, 150), frames);
        assert!(quiet(&pkt).is_empty(), "a frame went out twice");
        drop(f);
        d.stop();
    });
}
