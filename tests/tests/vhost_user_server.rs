// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Protocol tests of ft-common's vhost-user server, driven by the test frontend against the
//! ft-test-device binary (a toy device: reverses readable bytes into writable buffers; `H`
//! requests are held, `D` requests complete after 100 ms).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ft_tests::frontend::{req, Buf, TestFrontend};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserVirtioFeatures};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

const T: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

struct Daemon {
    child: Child,
    log: PathBuf,
    sock: PathBuf,
}

impl Daemon {
    fn spawn(sock: &Path, name: &str, args: &[&str]) -> Daemon {
        let log = std::env::temp_dir().join(format!(
            "ft-vu-{}-{name}-{}.log",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        let child = Command::new(env!("CARGO_BIN_EXE_ft-test-device"))
            .arg("--socket")
            .arg(sock)
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::from(File::create(&log).expect("log file")))
            .spawn()
            .expect("spawn ft-test-device");
        let d = Daemon {
            child,
            log,
            sock: sock.to_path_buf(),
        };
        let start = Instant::now();
        while !d.text().contains("ready") {
            assert!(start.elapsed() < T, "device did not start: {}", d.text());
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }

    /// Wait until the log contains `needle` at least `n` times.
    fn wait_for(&self, needle: &str, n: usize) {
        let start = Instant::now();
        while self.count(needle) < n {
            assert!(start.elapsed() < T, "no {needle:?} in log: {}", self.text());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

fn sock(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ft-vu-{}-{name}.sock", std::process::id()))
}

/// A request: readable `data`, one writable buffer of the same length. Returns (head, out gpa).
fn request(f: &mut TestFrontend, q: usize, data: &[u8]) -> (u16, u64) {
    f.add_in_out(q, data)
}

fn reversed(d: &[u8]) -> Vec<u8> {
    d.iter().rev().copied().collect()
}

/// Full standard setup of queue `q` (cloud-hypervisor / vhost Frontend order).
fn standard_queue(f: &mut TestFrontend, q: usize) {
    f.init_queue(q, 256);
    f.setup_vring(q, 0);
    f.fe.set_vring_enable(q, true).expect("enable");
}

#[test]
fn standard_ordering_processes_requests_and_config() {
    let s = sock("standard");
    let _d = Daemon::spawn(&s, "standard", &[]);
    let mut f = TestFrontend::connect(&s, 2, T);
    f.handshake();
    assert_eq!(f.fe.get_queue_num().expect("queue num"), 2);
    let (_, cfg) =
        f.fe.get_config(0, 10, VhostUserConfigFlags::empty(), &[0u8; 10])
            .expect("get_config");
    assert_eq!(&cfg[..8], b"FTTESTCF");
    assert_eq!(cfg[8], 2);
    f.set_mem_table();
    standard_queue(&mut f, 0);
    standard_queue(&mut f, 1);
    for q in 0..2 {
        let (head, out) = request(&mut f, q, b"hello world");
        f.kick(q);
        let used = f.wait_used(q, 1, T);
        assert_eq!(used, vec![(head, 11)]);
        assert_eq!(f.read(out, 11), reversed(b"hello world"));
    }
    // GET_VRING_BASE reports what was consumed.
    assert_eq!(f.fe.get_vring_base(0).expect("base"), 1);
}

/// QEMU 7.2 net: SET_VRING_ENABLE(1) arrives before SET_FEATURES; it must be remembered.
#[test]
fn qemu72_enable_before_set_features() {
    let s = sock("qemu72");
    let _d = Daemon::spawn(&s, "qemu72", &["--event-idx", "--pairs"]);
    let mut f = TestFrontend::connect(&s, 2, T);
    let (features, proto) = qemu_handshake(&mut f);
    assert!(features & (1 << 29) != 0, "EVENT_IDX offered");
    assert_eq!(f.raw_vring_enable(0, true), 0, "early enable acked");
    assert_eq!(f.raw_vring_enable(1, true), 0, "early enable acked");
    qemu_set_features(&mut f, features, proto);
    f.set_mem_table();
    for q in 0..2 {
        f.init_queue(q, 256);
        f.setup_vring(q, 0);
    }
    // No further SET_VRING_ENABLE: the early ones must have been kept.
    for q in 0..2 {
        let (head, out) = request(&mut f, q, b"qemu");
        f.kick(q);
        assert_eq!(f.wait_used(q, 1, T), vec![(head, 4)], "queue {q}");
        assert_eq!(f.read(out, 4), b"umeq");
    }
}

/// Rings wait for SET_VRING_ENABLE when PROTOCOL_FEATURES is acked; disable pauses them.
#[test]
fn enable_and_disable_gate_processing() {
    let s = sock("gate");
    let _d = Daemon::spawn(&s, "gate", &[]);
    let mut f = TestFrontend::connect(&s, 2, T);
    f.handshake();
    f.set_mem_table();
    f.init_queue(0, 256);
    f.setup_vring(0, 0);
    let (h1, _) = request(&mut f, 0, b"one");
    f.kick(0);
    assert!(
        f.wait_used(0, 1, QUIET).is_empty(),
        "processed while disabled"
    );
    f.fe.set_vring_enable(0, true).expect("enable");
    assert_eq!(f.wait_used(0, 1, T), vec![(h1, 3)]);
    f.fe.set_vring_enable(0, false).expect("disable");
    let (h2, _) = request(&mut f, 0, b"two");
    f.kick(0);
    assert!(
        f.wait_used(0, 1, QUIET).is_empty(),
        "processed while disabled"
    );
    f.fe.set_vring_enable(0, true).expect("enable");
    assert_eq!(f.wait_used(0, 1, T), vec![(h2, 3)]);
}

/// Memory table after the vring setup, call fd after the kick fd (QEMU vhost_virtqueue_start
/// order), enable before kick.
#[test]
fn late_mem_table_and_call_after_kick() {
    let s = sock("late");
    let _d = Daemon::spawn(&s, "late", &[]);
    let mut f = TestFrontend::connect(&s, 2, T);
    f.handshake();
    f.init_queue(0, 128);
    f.fe.set_vring_enable(0, true).expect("enable");
    f.set_vring_layout(0, 0);
    f.fe.set_vring_kick(0, &f.queues[0].kick).expect("kick");
    f.fe.set_vring_call(0, &f.queues[0].call).expect("call");
    let (head, out) = request(&mut f, 0, b"late");
    f.kick(0);
    assert!(f.wait_used(0, 1, QUIET).is_empty(), "ran without memory");
    f.set_mem_table();
    assert_eq!(f.wait_used(0, 1, T), vec![(head, 4)]);
    assert_eq!(f.read(out, 4), b"etal");
}

/// Without PROTOCOL_FEATURES the rings start enabled (no SET_VRING_ENABLE at all).
#[test]
fn without_protocol_features_rings_start_enabled() {
    let s = sock("noproto");
    let _d = Daemon::spawn(&s, "noproto", &[]);
    let mut f = TestFrontend::connect(&s, 2, T);
    f.fe.set_owner().expect("owner");
    let features = f.fe.get_features().expect("features");
    f.fe.set_features(features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
        .expect("set_features");
    f.set_mem_table();
    f.init_queue(0, 64);
    f.setup_vring(0, 0);
    let (head, _) = request(&mut f, 0, b"x");
    f.kick(0);
    assert_eq!(f.wait_used(0, 1, T), vec![(head, 1)]);
}

/// GET_VRING_BASE returns only after the device resolved in-flight work (delayed request).
#[test]
fn get_vring_base_waits_for_inflight_work() {
    let s = sock("stopwait");
    let d = Daemon::spawn(&s, "stopwait", &[]);
    let mut f = TestFrontend::connect(&s, 2, T);
    f.handshake();
    f.set_mem_table();
    standard_queue(&mut f, 0);
    let (head, out) = request(&mut f, 0, b"Delayed");
    // Held without an inflight region: the stop must complete it rather than lose it.
    let (held, _) = request(&mut f, 0, b"Held");
    f.kick(0);
    // Wait until the device took both (the delayed one completes 100 ms later).
    d.wait_for("delayed q=0", 1);
    d.wait_for("held q=0", 1);
    let base = f.fe.get_vring_base(0).expect("get_vring_base");
    assert_eq!(base, 2);
    assert_eq!(
        f.used_idx(0),
        2,
        "GET_VRING_BASE answered before the requests completed"
    );
    let mut used = f.wait_used(0, 2, T);
    used.sort_unstable();
    let mut want = vec![(head, 7), (held, 4)];
    want.sort_unstable();
    assert_eq!(used, want);
    assert_eq!(f.read(out, 7), reversed(b"Delayed"));
}

/// QEMU 10.x vhost-user-blk order: protocol features before SET_FEATURES, inflight region
/// before memory, memory by ADD_MEM_REG (CONFIGURE_MEM_SLOTS), kick before call, enable last;
/// then a region removed and re-added while the ring runs.
#[test]
fn qemu10_blk_ordering_with_mem_slots() {
    let s = sock("qemu10");
    let _d = Daemon::spawn(&s, "qemu10", &["--event-idx"]);
    let mut f = TestFrontend::connect(&s, 2, T);
    let (features, proto) = qemu_handshake(&mut f);
    qemu_set_features(&mut f, features, proto);
    f.setup_inflight(2, 256);
    let region = f.region_info();
    f.fe.add_mem_region(&region).expect("add_mem_region");
    f.init_queue(0, 256);
    f.set_vring_layout(0, 0);
    f.fe.set_vring_kick(0, &f.queues[0].kick).expect("kick");
    f.fe.set_vring_call(0, &f.queues[0].call).expect("call");
    f.fe.set_vring_enable(0, true).expect("enable");
    let (h, out) = request(&mut f, 0, b"blk10");
    f.kick(0);
    assert_eq!(f.wait_used(0, 1, T), vec![(h, 5)]);
    assert_eq!(f.read(out, 5), b"01klb");
    // Removing an unknown region is refused; removing and re-adding the real one works.
    let mut bogus = region;
    bogus.guest_phys_addr += 0x1000_0000;
    assert!(f.fe.remove_mem_region(&bogus).is_err());
    f.fe.remove_mem_region(&region).expect("remove");
    f.fe.add_mem_region(&region).expect("re-add");
    let (h, _) = request(&mut f, 0, b"again");
    f.kick(0);
    assert_eq!(f.wait_used(0, 1, T), vec![(h, 5)]);
}

/// QEMU 10 gives every ring 1024 entries and sends SET_VRING_NUM without NEED_REPLY, then
/// SET_VRING_ENABLE with it. A size above the device's maximum must make that ENABLE fail
/// (never a success with the ring not running), with one error line naming ring and reason.
#[test]
fn oversized_ring_fails_enable_not_silently() {
    use vhost::vhost_user::message::VhostUserHeaderFlag;
    let s = sock("oversize");
    let d = Daemon::spawn(&s, "oversize", &["--max-queue-size", "256"]);
    let mut f = TestFrontend::connect(&s, 2, T);
    f.handshake();
    f.set_mem_table();
    f.init_queue(0, 1024);
    f.fe.set_hdr_flags(VhostUserHeaderFlag::empty());
    f.setup_vring(0, 0);
    f.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert_ne!(
        f.raw_vring_enable(0, true),
        0,
        "ENABLE of a ring that cannot start"
    );
    assert_eq!(d.count("queue 0 cannot start"), 1, "{}", d.text());
    assert!(
        d.text()
            .contains("size 1024 is larger than this daemon's --queue-size 256"),
        "{}",
        d.text()
    );
    let (_, _) = request(&mut f, 0, b"lost");
    f.kick(0);
    assert!(f.wait_used(0, 1, QUIET).is_empty(), "a refused ring ran");
    // Reported once: later messages that ask for a reply succeed.
    f.fe.set_vring_enable(1, false)
        .expect("unrelated message after the report");
    // A size the device accepts starts the ring (the rings in memory are reset for it).
    f.init_queue(0, 256);
    f.setup_vring(0, 0);
    assert_eq!(f.raw_vring_enable(0, true), 0);
    let (h, out) = request(&mut f, 0, b"works");
    f.kick(0);
    assert_eq!(f.wait_used(0, 1, T), vec![(h, 5)]);
    assert_eq!(f.read(out, 5), b"skrow");
}

/// A ring failure in a message that asked for no reply (QEMU 7.2 sends even SET_VRING_ENABLE
/// without NEED_REPLY) fails the next message that asks for one, once.
#[test]
fn ring_failure_without_reply_fails_next_replied_message() {
    use vhost::vhost_user::message::VhostUserHeaderFlag;
    let s = sock("oversize72");
    let d = Daemon::spawn(&s, "oversize72", &["--max-queue-size", "256"]);
    let mut f = TestFrontend::connect(&s, 2, T);
    f.handshake();
    f.set_mem_table();
    f.init_queue(0, 1024);
    f.fe.set_hdr_flags(VhostUserHeaderFlag::empty());
    f.setup_vring(0, 0);
    let mut b = 0u32.to_le_bytes().to_vec();
    b.extend_from_slice(&1u32.to_le_bytes());
    f.send_raw(req::SET_VRING_ENABLE, 0x1, &b);
    f.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert!(
        f.fe.set_vring_enable(1, false).is_err(),
        "the next message asking for a reply must carry the failure"
    );
    assert!(
        f.fe.set_vring_enable(1, false).is_ok(),
        "reported only once"
    );
    assert_eq!(d.count("queue 0 cannot start"), 1, "{}", d.text());
}

/// QEMU 10 restarts a ring after a VM pause (stop/cont) with SET_VRING_KICK *before*
/// SET_VRING_CALL, and the call eventfd of the previous run is gone by then (QEMU made a new
/// guest notifier). A completion signalled in that window must not be written to the old fd
/// (the guest would never see it: with MSI-X nothing else wakes its RX queue), but delivered on
/// the new one when it arrives.
#[test]
fn completion_between_restart_and_new_call_fd_is_signalled_on_the_new_fd() {
    for event_idx in [false, true] {
        let s = sock(&format!("callwin{}", u8::from(event_idx)));
        let args: &[&str] = if event_idx { &["--event-idx"] } else { &[] };
        let _d = Daemon::spawn(&s, "callwin", args);
        let mut f = TestFrontend::connect(&s, 2, T);
        f.handshake();
        f.set_mem_table();
        standard_queue(&mut f, 0);
        let (h, _) = request(&mut f, 0, b"one");
        f.kick(0);
        assert_eq!(f.wait_used(0, 1, T), vec![(h, 3)]);
        // VM pause: the ring stops.
        let base = f.fe.get_vring_base(0).expect("get_vring_base");
        assert_eq!(base, 1);
        // cont, QEMU 10 order: NUM, BASE, ADDR, KICK (the ring runs again), ... CALL later.
        f.set_vring_layout(0, 1);
        f.fe.set_vring_kick(0, &f.queues[0].kick).expect("kick");
        let (_, avail, _) = TestFrontend::ring_gpas(0);
        // The guest asks for an interrupt at the next entry (EVENT_IDX: used_event = 1).
        f.write(avail + 4 + 2 * 256, &1u16.to_le_bytes());
        let (h, _) = request(&mut f, 0, b"two");
        f.kick(0);
        assert_eq!(f.wait_used(0, 1, T), vec![(h, 3)], "event_idx {event_idx}");
        let fresh = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        f.fe.set_vring_call(0, &fresh).expect("call");
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&fresh),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 2000) };
        assert_eq!(
            n, 1,
            "event_idx {event_idx}: the completion made before the new call fd was never signalled on it"
        );
    }
}

/// QEMU's start of a session by hand (vhost's Frontend insists on SET_FEATURES before the
/// protocol features): GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER, GET_QUEUE_NUM,
/// GET_MAX_MEM_SLOTS, GET_CONFIG. Returns (features, protocol features).
fn qemu_handshake(f: &mut TestFrontend) -> (u64, u64) {
    let u64_of = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().expect("u64"));
    f.send_raw(req::GET_FEATURES, 0x1, &[]);
    let features = u64_of(&f.recv_raw().expect("features").2);
    f.send_raw(15, 0x1, &[]); // GET_PROTOCOL_FEATURES
    let proto = u64_of(&f.recv_raw().expect("protocol features").2);
    f.send_raw(16, 0x1, &proto.to_le_bytes()); // SET_PROTOCOL_FEATURES
    f.send_raw(17, 0x1, &[]); // GET_QUEUE_NUM
    assert_eq!(u64_of(&f.recv_raw().expect("queue num").2), 2);
    f.send_raw(36, 0x1, &[]); // GET_MAX_MEM_SLOTS
    assert_eq!(u64_of(&f.recv_raw().expect("mem slots").2), 509);
    f.send_raw(3, 0x1, &[]); // SET_OWNER
    let mut b = Vec::new();
    for v in [0u32, 8, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&[0u8; 8]);
    f.send_raw(24, 0x1, &b); // GET_CONFIG offset 0 size 8
    let (_, _, cfg) = f.recv_raw().expect("config");
    assert_eq!(&cfg[12..], b"FTTESTCF");
    (features, proto)
}

/// SET_FEATURES through vhost's Frontend (so it knows the features), after a
/// `qemu_handshake`; also re-sends SET_PROTOCOL_FEATURES so the Frontend knows REPLY_ACK.
fn qemu_set_features(f: &mut TestFrontend, features: u64, proto: u64) {
    use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
    f.fe.set_hdr_flags(VhostUserHeaderFlag::empty());
    assert_eq!(f.fe.get_features().expect("get_features"), features);
    f.fe.set_features(features).expect("set_features");
    f.fe.set_protocol_features(VhostUserProtocolFeatures::from_bits_truncate(proto))
        .expect("set_protocol_features");
    f.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
}

/// A frontend goes away and a new one is served by the same process on the same listener;
/// rings continue where the first left (base from GET_VRING_BASE).
#[test]
fn reconnect_on_same_listener() {
    let s = sock("reconnect");
    let d = Daemon::spawn(&s, "reconnect", &[]);
    let mut f = TestFrontend::connect(&s, 2, T);
    f.handshake();
    f.set_mem_table();
    standard_queue(&mut f, 0);
    let (h, _) = request(&mut f, 0, b"first");
    f.kick(0);
    assert_eq!(f.wait_used(0, 1, T), vec![(h, 5)]);
    // Abrupt disconnect (no GET_VRING_BASE), then a new session on the same socket.
    for round in 0..2 {
        f.reconnect(&s, T);
        f.handshake();
        f.set_mem_table();
        let base = f.avail_idx(0);
        f.setup_vring(0, base);
        f.fe.set_vring_enable(0, true).expect("enable");
        let (h, out) = request(&mut f, 0, b"again");
        f.kick(0);
        assert_eq!(f.wait_used(0, 1, T), vec![(h, 5)], "round {round}");
        assert_eq!(f.read(out, 5), b"niaga");
    }
    assert_eq!(d.count("frontend connected"), 3, "{}", d.text());
}

/// Malformed or unexpected messages get an error reply (REPLY_ACK) and a log line; the
/// connection survives.
#[test]
fn malformed_messages_are_rejected_and_connection_survives() {
    let s = sock("malformed");
    let d = Daemon::spawn(&s, "malformed", &[]);
    let mut f = TestFrontend::connect(&s, 2, T);
    f.handshake();
    f.set_mem_table();
    // Unknown request code.
    assert_eq!(f.raw_acked(999, &[1, 2, 3, 4]), 1);
    // SET_VRING_ENABLE with a bad value and a bad body size.
    let mut b = 0u32.to_le_bytes().to_vec();
    b.extend_from_slice(&7u32.to_le_bytes());
    assert_eq!(f.raw_acked(req::SET_VRING_ENABLE, &b), 1);
    assert_eq!(f.raw_acked(req::SET_VRING_ENABLE, &[0; 4]), 1);
    // SET_VRING_ENABLE for a queue that does not exist.
    assert_eq!(f.raw_vring_enable(9, true), 1);
    // SET_FEATURES with bits never offered.
    assert_eq!(
        f.raw_acked(req::SET_FEATURES, &(1u64 << 63).to_le_bytes()),
        1
    );
    // SET_FEATURES with a truncated body (vhost rejects it before our handler).
    assert_eq!(f.raw_acked(req::SET_FEATURES, &[0; 3]), 1);
    // Bad queue size (not a power of two) through vhost's Frontend: NACKed.
    assert!(f.fe.set_vring_num(0, 100).is_err());
    // Reserved header flag bits.
    f.send_raw(req::SET_FEATURES, 0x1 | 0x8 | 0x100, &0u64.to_le_bytes());
    let (_, _, ack) = f.recv_raw().expect("nack");
    assert_eq!(u64::from_le_bytes(ack[..8].try_into().expect("u64")), 1);
    // An fd attached to a message that takes none (SET_FEATURES).
    let stray = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
    f.send_raw_with_fd(
        req::SET_FEATURES,
        0x1 | 0x8,
        &0u64.to_le_bytes(),
        std::os::fd::AsRawFd::as_raw_fd(&stray),
    );
    let (_, _, ack) = f.recv_raw().expect("nack");
    assert_eq!(u64::from_le_bytes(ack[..8].try_into().expect("u64")), 1);
    // SEND_RARP without the RARP protocol feature.
    assert_eq!(f.raw_acked(req::SEND_RARP, &[0; 8]), 1);
    // GET_VRING_BASE for a queue that does not exist still gets an answer.
    let mut b = 7u32.to_le_bytes().to_vec();
    b.extend_from_slice(&0u32.to_le_bytes());
    f.send_raw(11, 0x1, &b); // GET_VRING_BASE
    let (r, _, body) = f.recv_raw().expect("GET_VRING_BASE answered");
    assert_eq!((r, body.len()), (11, 8));
    // Still alive and working.
    f.fe.get_features().expect("alive");
    standard_queue(&mut f, 0);
    let (h, _) = request(&mut f, 0, b"ok");
    f.kick(0);
    assert_eq!(f.wait_used(0, 1, T), vec![(h, 2)]);
    let log = d.text();
    assert!(log.contains("malformed message dropped"), "{log}");
    assert!(log.contains("not offered"), "{log}");
    assert_eq!(
        d.count("frontend connected"),
        1,
        "connection was dropped: {log}"
    );
}

/// Daemon SIGKILLed with requests in flight (held ones and one popped just before), restarted;
/// the frontend reconnects with the same inflight region and every request completes exactly
/// once.
#[test]
fn inflight_requests_resubmitted_after_sigkill_restart() {
    let s = sock("sigkill");
    let mut d = Daemon::spawn(&s, "sigkill", &[]);
    let mut f = TestFrontend::connect(&s, 2, T);
    f.handshake();
    f.set_mem_table();
    let (info, inflight_fd) = f.setup_inflight(2, 256);
    standard_queue(&mut f, 0);
    let mut expect = std::collections::HashMap::new();
    let mut held = Vec::new();
    for i in 0..6u8 {
        let data = if i % 2 == 1 {
            vec![b'H', i]
        } else {
            vec![b'n', i]
        };
        let (h, out) = request(&mut f, 0, &data);
        expect.insert(h, (out, reversed(&data)));
        if i % 2 == 1 {
            held.push(h);
        }
    }
    f.kick(0);
    let done = f.wait_used(0, 3, T);
    assert_eq!(done.len(), 3);
    assert!(done.iter().all(|(h, _)| !held.contains(h)));
    // Wait until the device has taken all six (three held), then kill it.
    d.wait_for("held q=0", 3);
    d.kill9();
    assert_eq!(f.used_idx(0), 3);

    let d2 = Daemon::spawn(&s, "sigkill2", &["--release-held"]);
    f.reconnect(&s, T);
    f.handshake();
    f.set_mem_table();
    f.fe.set_inflight_fd(&info, std::os::fd::AsRawFd::as_raw_fd(&inflight_fd))
        .expect("set_inflight_fd");
    // QEMU restarts the ring at the used index when the backend died.
    let used = f.used_idx(0);
    f.setup_vring(0, used);
    f.fe.set_vring_enable(0, true).expect("enable");
    let resubmitted = f.wait_used(0, 3, T);
    let mut heads: Vec<u16> = resubmitted.iter().map(|&(h, _)| h).collect();
    heads.sort_unstable();
    let mut want = held.clone();
    want.sort_unstable();
    assert_eq!(heads, want, "resubmitted heads");
    for (h, len) in &resubmitted {
        let (out, data) = &expect[h];
        assert_eq!(*len as usize, data.len());
        assert_eq!(&f.read(*out, data.len()), data);
    }
    // Nothing completed twice, and new requests go on.
    assert!(f.wait_used(0, 1, QUIET).is_empty(), "extra completions");
    let (h, _) = request(&mut f, 0, b"after");
    f.kick(0);
    assert_eq!(f.wait_used(0, 1, T), vec![(h, 5)]);
    assert_eq!(f.used_idx(0), 7);
    assert_eq!(d2.count("completed q=0"), 4, "{}", d2.text());
}

/// A frontend that disconnects while requests are held loses none: the same daemon gets them
/// back from the inflight region on reconnect.
#[test]
fn frontend_disconnect_mid_request_resubmits_held() {
    let s = sock("midreq");
    let d = Daemon::spawn(&s, "midreq", &[]);
    let mut f = TestFrontend::connect(&s, 2, T);
    f.handshake();
    f.set_mem_table();
    let (info, fd) = f.setup_inflight(2, 256);
    standard_queue(&mut f, 0);
    let (h, _) = request(&mut f, 0, b"Hx");
    f.kick(0);
    let start = Instant::now();
    while d.count(&format!("held q=0 head={h}")) < 1 {
        assert!(start.elapsed() < T);
        std::thread::sleep(Duration::from_millis(10));
    }
    f.reconnect(&s, T);
    f.handshake();
    f.set_mem_table();
    f.fe.set_inflight_fd(&info, std::os::fd::AsRawFd::as_raw_fd(&fd))
        .expect("set_inflight_fd");
    let used = f.used_idx(0);
    f.setup_vring(0, used);
    f.fe.set_vring_enable(0, true).expect("enable");
    let start = Instant::now();
    while d.count(&format!("held q=0 head={h}")) < 2 {
        assert!(
            start.elapsed() < T,
            "held request not resubmitted: {}",
            d.text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(f.used_idx(0), 0);
}

/// QEMU 10 asks GET_INFLIGHT_FD for its `queue-size` (default 128) but runs rings of 1024:
/// the region must still track every head of the ring (here head 140), across a reconnect.
#[test]
fn inflight_region_covers_rings_larger_than_asked() {
    let s = sock("inflight1024");
    let d = Daemon::spawn(&s, "inflight1024", &[]);
    let mut f = TestFrontend::connect(&s, 2, T);
    f.handshake();
    f.set_mem_table();
    let (info, fd) = f.setup_inflight(2, 128);
    assert_eq!(info.queue_size, 128, "the reply echoes the size asked for");
    f.init_queue(0, 1024);
    f.setup_vring(0, 0);
    f.fe.set_vring_enable(0, true).expect("enable");
    for i in 0..70u8 {
        request(&mut f, 0, &[b'n', i]);
    }
    f.kick(0);
    assert_eq!(f.wait_used(0, 70, T).len(), 70);
    let (h, _) = request(&mut f, 0, b"Hx");
    assert!(
        h >= 128,
        "head {h} should lie beyond the size QEMU asked for"
    );
    f.kick(0);
    d.wait_for(&format!("held q=0 head={h}"), 1);
    f.reconnect(&s, T);
    f.handshake();
    f.set_mem_table();
    f.fe.set_inflight_fd(&info, std::os::fd::AsRawFd::as_raw_fd(&fd))
        .expect("set_inflight_fd");
    let used = f.used_idx(0);
    f.setup_vring(0, used);
    f.fe.set_vring_enable(0, true).expect("enable");
    d.wait_for(&format!("held q=0 head={h}"), 2);
    assert!(!d.text().contains("not tracked"), "{}", d.text());
}

/// A region the frontend laid out for smaller rings than it runs: the daemon says at ring
/// start that in-flight requests are not tracked and names the QEMU option that fixes it.
#[test]
fn too_small_inflight_region_is_reported_with_the_fix() {
    use std::os::fd::FromRawFd;
    let s = sock("inflightsmall");
    let d = Daemon::spawn(&s, "inflightsmall", &[]);
    let mut f = TestFrontend::connect(&s, 2, T);
    f.handshake();
    f.set_mem_table();
    // SAFETY: plain syscall; the fd is owned by the File.
    let file =
        unsafe { std::fs::File::from_raw_fd(libc::memfd_create(c"ft-test-inflight".as_ptr(), 0)) };
    let size = 2 * (16 + 16 * 128u64).div_ceil(64) * 64;
    file.set_len(size).expect("size");
    let info = vhost::vhost_user::message::VhostUserInflight {
        mmap_size: size,
        mmap_offset: 0,
        num_queues: 2,
        queue_size: 128,
    };
    f.fe.set_inflight_fd(&info, std::os::fd::AsRawFd::as_raw_fd(&file))
        .expect("set_inflight_fd");
    f.init_queue(0, 1024);
    f.setup_vring(0, 0);
    f.fe.set_vring_enable(0, true).expect("enable");
    d.wait_for("set queue-size=1024 on the QEMU device", 1);
    // The ring still runs.
    let (h, _) = request(&mut f, 0, b"ok");
    f.kick(0);
    assert_eq!(f.wait_used(0, 1, T), vec![(h, 2)]);
}

/// A frontend that disconnects while a request is being processed (completes 100 ms later):
/// the disconnect waits for it, and the next session neither loses nor repeats it.
#[test]
fn frontend_disconnect_waits_for_running_request() {
    let s = sock("discwait");
    let d = Daemon::spawn(&s, "discwait", &[]);
    let mut f = TestFrontend::connect(&s, 2, T);
    f.handshake();
    f.set_mem_table();
    let (info, fd) = f.setup_inflight(2, 256);
    standard_queue(&mut f, 0);
    let (h, out) = request(&mut f, 0, b"Dx");
    f.kick(0);
    d.wait_for("delayed q=0", 1);
    f.reconnect(&s, T);
    f.handshake();
    f.set_mem_table();
    f.fe.set_inflight_fd(&info, std::os::fd::AsRawFd::as_raw_fd(&fd))
        .expect("set_inflight_fd");
    let used = f.used_idx(0);
    assert_eq!(used, 1, "request completed during the disconnect");
    f.setup_vring(0, used);
    f.fe.set_vring_enable(0, true).expect("enable");
    assert_eq!(f.wait_used(0, 1, T), vec![(h, 2)]);
    assert_eq!(f.read(out, 2), b"xD");
    assert!(f.wait_used(0, 1, QUIET).is_empty(), "completed twice");
    assert_eq!(d.count("completed q=0"), 1, "{}", d.text());
}

/// LOG_ALL + LOG_SHMFD: every guest page a request wrote (data buffer spanning pages, used
/// ring) is marked; pages not written are not.
#[test]
fn dirty_log_marks_every_written_page() {
    let s = sock("dirty");
    let _d = Daemon::spawn(&s, "dirty", &[]);
    let mut f = TestFrontend::connect(&s, 2, T);
    let (features, _) = f.handshake();
    assert!(features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0);
    f.set_mem_table();
    standard_queue(&mut f, 0);
    let log = f.setup_dirty_log();
    f.fe.set_features(features)
        .expect("set_features with LOG_ALL");
    TestFrontend::clear_log(&log);
    let data: Vec<u8> = (0..10000u32).map(|i| i as u8).collect();
    // Output buffer starts mid-page and spans four pages.
    let inp = f.alloc(data.len() as u64);
    let out = f.alloc(0x1000).div_ceil(0x1000) * 0x1000 + 0x800;
    f.alloc(0x4000);
    f.write(inp, &data);
    let head = f.add_chain(
        0,
        &[
            Buf {
                gpa: inp,
                len: data.len() as u32,
                writable: false,
            },
            Buf {
                gpa: out,
                len: data.len() as u32,
                writable: true,
            },
        ],
    );
    f.kick(0);
    assert_eq!(f.wait_used(0, 1, T), vec![(head, 10000)]);
    let mut page = out & !0xfff;
    while page < out + data.len() as u64 {
        assert!(
            TestFrontend::page_dirty(&log, page),
            "page {page:#x} not logged"
        );
        page += 0x1000;
    }
    assert!(
        !TestFrontend::page_dirty(&log, page),
        "page after the buffer logged"
    );
    assert!(
        !TestFrontend::page_dirty(&log, inp),
        "read-only input page logged"
    );
    let (_, _, used) = TestFrontend::ring_gpas(0);
    assert!(
        TestFrontend::page_dirty(&log, used),
        "used ring page not logged"
    );
}

/// SEND_RARP with the RARP protocol feature reaches the device.
#[test]
fn send_rarp_reaches_device() {
    let s = sock("rarp");
    let rarp = std::env::temp_dir().join(format!("ft-vu-{}-rarp.txt", std::process::id()));
    let _ = std::fs::remove_file(&rarp);
    let _d = Daemon::spawn(&s, "rarp", &["--rarp-file", rarp.to_str().expect("path")]);
    let mut f = TestFrontend::connect(&s, 2, T);
    let (_, proto) = f.handshake();
    assert!(proto.contains(vhost::vhost_user::message::VhostUserProtocolFeatures::RARP));
    let mut mac = [0x52u8, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0];
    assert_eq!(f.raw_acked(req::SEND_RARP, &mac), 0);
    assert_eq!(
        std::fs::read_to_string(&rarp).expect("rarp file"),
        "52:54:00:12:34:56"
    );
    mac[5] = 0x57;
    assert_eq!(f.raw_acked(req::SEND_RARP, &mac), 0);
    assert_eq!(
        std::fs::read_to_string(&rarp).expect("rarp file"),
        "52:54:00:12:34:57"
    );
    let _ = std::fs::remove_file(&rarp);
}

/// Queue pairs in one worker (net style), MQ, and RESET_DEVICE then a fresh setup.
#[test]
fn queue_pairs_and_reset_device() {
    let s = sock("pairs");
    let _d = Daemon::spawn(&s, "pairs", &["--queues", "4", "--pairs", "--event-idx"]);
    let mut f = TestFrontend::connect(&s, 4, T);
    f.handshake();
    assert_eq!(f.fe.get_queue_num().expect("queue num"), 4);
    f.set_mem_table();
    for q in 0..4 {
        standard_queue(&mut f, q);
    }
    for q in 0..4 {
        let (h, _) = request(&mut f, q, b"pair");
        f.kick(q);
        assert_eq!(f.wait_used(q, 1, T), vec![(h, 4)], "queue {q}");
    }
    f.fe.reset_device().expect("reset_device");
    let features = f.fe.get_features().expect("features");
    f.fe.set_features(features).expect("set_features");
    for q in 0..4 {
        standard_queue(&mut f, q);
    }
    for q in 0..4 {
        let (h, _) = request(&mut f, q, b"again");
        f.kick(q);
        assert_eq!(f.wait_used(q, 1, T), vec![(h, 5)], "queue {q} after reset");
    }
}

/// SIGTERM stops the server cleanly (connection drained, workers joined).
#[test]
fn sigterm_stops_server() {
    let s = sock("sigterm");
    let mut d = Daemon::spawn(&s, "sigterm", &[]);
    let mut f = TestFrontend::connect(&s, 2, T);
    f.handshake();
    f.set_mem_table();
    standard_queue(&mut f, 0);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    loop {
        if let Some(st) = d.child.try_wait().expect("wait") {
            assert!(st.success(), "exit status {st}");
            break;
        }
        assert!(start.elapsed() < T, "did not stop: {}", d.text());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(d.text().contains("stopped"));
}

/// Throughput of the server path (inflight tracking on) with the toy device (release build):
/// `cargo test --release -p ft-tests --test vhost_user_server -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput_smoke() {
    let s = sock("tput");
    let _d = Daemon::spawn(&s, "tput", &["--quiet"]);
    let mut f = TestFrontend::connect(&s, 2, T);
    f.handshake();
    f.set_mem_table();
    let _inflight = f.setup_inflight(2, 1024);
    f.init_queue(0, 1024);
    f.setup_vring(0, 0);
    f.fe.set_vring_enable(0, true).expect("enable");
    let inp = f.alloc(64);
    let out = f.alloc(64);
    f.write(inp, &[b'x'; 64]);
    let batch = 256usize;
    let rounds = 400usize;
    let t0 = Instant::now();
    for _ in 0..rounds {
        let mut heads = Vec::with_capacity(batch);
        for _ in 0..batch {
            heads.push(f.add_chain(
                0,
                &[
                    Buf {
                        gpa: inp,
                        len: 64,
                        writable: false,
                    },
                    Buf {
                        gpa: out,
                        len: 64,
                        writable: true,
                    },
                ],
            ));
        }
        f.kick(0);
        let used = f.wait_used(0, batch, T);
        assert_eq!(used.len(), batch);
        f.recycle(0, &heads);
    }
    let el = t0.elapsed();
    let n = batch * rounds;
    println!(
        "throughput_smoke: {n} requests in {el:?}: {:.0} req/s",
        n as f64 / el.as_secs_f64()
    );
}
