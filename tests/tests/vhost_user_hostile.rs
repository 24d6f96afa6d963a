// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A hostile or buggy frontend (or guest writing its own rings) against ft-common's vhost-user
//! server, through the real socket protocol, with the ft-test-device binary (it reverses
//! readable bytes into writable buffers). Every case checks that the daemon neither panics,
//! spins nor hangs: the bad ring is refused (NEED_REPLY error) or marked broken (VRING_ERR),
//! the connection goes on, and a well-behaved request afterwards is served with its data
//! intact.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ft_tests::frontend::{TestFrontend, MEM_GPA, MEM_SIZE};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const T: Duration = Duration::from_secs(5);

struct Daemon {
    child: Child,
    log: PathBuf,
    sock: PathBuf,
}

impl Daemon {
    fn spawn(name: &str, args: &[&str]) -> Daemon {
        let sock = std::env::temp_dir().join(format!("ft-hv-{}-{name}.sock", std::process::id()));
        let log = std::env::temp_dir().join(format!("ft-hv-{}-{name}.log", std::process::id()));
        let child = Command::new(env!("CARGO_BIN_EXE_ft-test-device"))
            .arg("--socket")
            .arg(&sock)
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::from(File::create(&log).expect("log file")))
            .spawn()
            .expect("spawn ft-test-device");
        let d = Daemon { child, log, sock };
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

    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map_or(0, |m| m.len())
    }

    fn connect(&self) -> TestFrontend {
        TestFrontend::connect(&self.sock, 2, T)
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

/// Handshake and memory table.
fn ready(d: &Daemon) -> TestFrontend {
    let mut f = d.connect();
    f.handshake();
    f.set_mem_table();
    f
}

/// Queue `q` of size 256 set up with base `base` and enabled; the enable's result.
fn start_queue(f: &mut TestFrontend, q: usize, base: u16) -> vhost::Result<()> {
    f.init_queue(q, 256);
    f.setup_vring(q, base);
    f.fe.set_vring_enable(q, true)
}

/// One request with `data`, served with its data intact, on running queue `q`.
fn served(f: &mut TestFrontend, q: usize, data: &[u8]) {
    let (head, out) = f.add_in_out(q, data);
    f.kick(q);
    assert_eq!(
        f.wait_used(q, 1, T),
        vec![(head, data.len() as u32)],
        "queue {q}"
    );
    let rev: Vec<u8> = data.iter().rev().copied().collect();
    assert_eq!(f.read(out, data.len()), rev);
}

/// Writes queue `q`'s avail idx as the guest would.
fn set_avail_idx(f: &TestFrontend, q: usize, idx: u16) {
    let (_, avail, _) = TestFrontend::ring_gpas(q);
    f.write(avail + 2, &idx.to_le_bytes());
}

fn wait_readable(e: &EventFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: e.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) == 1 }
}

/// The guest puts its avail idx more than the ring size ahead: the ring is marked broken
/// (VRING_ERR) instead of the worker spinning and logging without end; GET_VRING_BASE is
/// answered, the other queue serves, and the ring runs again once restarted sanely.
#[test]
fn avail_idx_beyond_ring_size_breaks_ring_instead_of_spinning() {
    let d = Daemon::spawn("availidx", &[]);
    let mut f = ready(&d);
    let err = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    f.fe.set_vring_err(0, &err).expect("set_vring_err");
    start_queue(&mut f, 0, 0).expect("start 0");
    start_queue(&mut f, 1, 0).expect("start 1");
    served(&mut f, 0, b"before");
    set_avail_idx(&f, 0, 1 + 300);
    f.kick(0);
    assert!(
        wait_readable(&err, T),
        "VRING_ERR not signalled: {}",
        d.text()
    );
    for _ in 0..20 {
        f.kick(0);
    }
    served(&mut f, 1, b"other queue");
    // Stopping answers (the worker is not stuck) with the base it had reached.
    assert_eq!(f.fe.get_vring_base(0).expect("base"), 1);
    let log = d.text();
    assert_eq!(log.matches("ring broken").count(), 1, "{log}");
    assert!(
        !log.contains("Iterator error"),
        "unlimited virtio-queue log: {log}"
    );
    assert!(d.log_len() < 64 << 10, "log grew to {} bytes", d.log_len());
    // The guest repairs its ring; a restart at the reported base serves again.
    set_avail_idx(&f, 0, 1);
    f.fe.set_vring_kick(0, &f.queues[0].kick).expect("restart");
    served(&mut f, 0, b"after restart");
}

/// A head index beyond the ring in the avail ring breaks the ring (no unlimited add_used
/// error lines, no spin).
#[test]
fn avail_head_beyond_ring_breaks_ring() {
    let d = Daemon::spawn("availhead", &[]);
    let mut f = ready(&d);
    let err = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    f.fe.set_vring_err(0, &err).expect("set_vring_err");
    start_queue(&mut f, 0, 0).expect("start");
    let (_, avail, _) = TestFrontend::ring_gpas(0);
    for i in 0..200u64 {
        f.write(avail + 4 + 2 * i, &0xfff0u16.to_le_bytes());
    }
    set_avail_idx(&f, 0, 200);
    f.kick(0);
    assert!(
        wait_readable(&err, T),
        "VRING_ERR not signalled: {}",
        d.text()
    );
    assert_eq!(f.fe.get_vring_base(0).expect("base"), 1);
    assert!(
        !d.text().contains("out of bounds descriptor"),
        "{}",
        d.text()
    );
    f.init_queue(0, 256);
    f.setup_vring(0, 0);
    served(&mut f, 0, b"fresh ring");
}

/// SET_VRING_BASE that does not match the avail ring (the idx is more than the ring size
/// ahead of it): the start is refused with an error reply, and a correct base works.
#[test]
fn vring_base_not_matching_avail_ring_is_refused() {
    let d = Daemon::spawn("base", &[]);
    let mut f = ready(&d);
    assert!(start_queue(&mut f, 0, 40000).is_err(), "bad base accepted");
    // Not running: a request is not taken.
    assert!(d.text().contains("ahead of the next entry"), "{}", d.text());
    f.fe.set_vring_base(0, 0).expect("base");
    f.fe.set_vring_kick(0, &f.queues[0].kick).expect("kick");
    served(&mut f, 0, b"good base");
}

/// Used ring overlapping the avail ring or the descriptor table: refused at start.
#[test]
fn overlapping_rings_are_refused() {
    let d = Daemon::spawn("overlap", &[]);
    let mut f = ready(&d);
    f.init_queue(0, 256);
    f.setup_vring(0, 0);
    let (desc, avail, used) = TestFrontend::ring_gpas(0);
    let va = |gpa: u64| gpa - MEM_GPA + f.va_base;
    for (d_, u_, a_) in [(desc, avail, avail), (desc, desc + 0x800, avail)] {
        let cfg = vhost::VringConfigData {
            queue_max_size: 256,
            queue_size: 256,
            flags: 0,
            desc_table_addr: va(d_),
            used_ring_addr: va(u_),
            avail_ring_addr: va(a_),
            log_addr: None,
        };
        f.fe.set_vring_addr(0, &cfg).expect("addr");
        assert!(f.fe.set_vring_enable(0, true).is_err(), "overlap accepted");
    }
    let cfg = vhost::VringConfigData {
        queue_max_size: 256,
        queue_size: 256,
        flags: 0,
        desc_table_addr: va(desc),
        used_ring_addr: va(used),
        avail_ring_addr: va(avail),
        log_addr: None,
    };
    f.fe.set_vring_addr(0, &cfg).expect("addr");
    f.fe.set_vring_enable(0, true).expect("enable");
    served(&mut f, 0, b"separate rings");
}

/// SET_MEM_TABLE that moves running rings to other guest addresses: the rings follow (they
/// are stopped and restarted at their new place) rather than reading unmapped memory.
#[test]
fn mem_table_moving_live_rings() {
    let d = Daemon::spawn("memmove", &[]);
    let mut f = ready(&d);
    start_queue(&mut f, 0, 0).expect("start");
    served(&mut f, 0, b"one");
    let mut moved = f.region_info();
    moved.guest_phys_addr = MEM_GPA + 2 * MEM_SIZE;
    f.fe.set_mem_table(&[moved]).expect("moved table");
    f.kick(0);
    // The rings' old GPAs are gone; the daemon still answers and stops the ring.
    let base = f.fe.get_vring_base(0).expect("base");
    assert_eq!(base, 1);
    f.set_mem_table();
    f.fe.set_vring_kick(0, &f.queues[0].kick).expect("restart");
    served(&mut f, 0, b"two");
}

/// The call and kick fds must be eventfds: a pipe (blocks the worker once full) or a socket
/// is refused; the ring keeps its good eventfd.
#[test]
fn non_eventfd_call_and_kick_are_refused() {
    let d = Daemon::spawn("callfd", &[]);
    let mut f = ready(&d);
    start_queue(&mut f, 0, 0).expect("start");
    let mut p = [0i32; 2];
    // SAFETY: pipe(2) into a local array.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    // SAFETY: the pipe fds are ours.
    let (r, w) = unsafe { (File::from_raw_fd(p[0]), File::from_raw_fd(p[1])) };
    // vhost's Frontend takes anything AsRawFd with the EventFd type; send raw instead.
    let body = 0u64.to_le_bytes();
    f.send_raw_with_fd(13, 0x1 | 0x8, &body, w.as_raw_fd()); // SET_VRING_CALL
    let (_, _, ack) = f.recv_raw().expect("ack");
    assert_eq!(u64::from_le_bytes(ack[..8].try_into().expect("u64")), 1);
    f.send_raw_with_fd(12, 0x1 | 0x8, &body, r.as_raw_fd()); // SET_VRING_KICK
    let (_, _, ack) = f.recv_raw().expect("ack");
    assert_eq!(u64::from_le_bytes(ack[..8].try_into().expect("u64")), 1);
    assert!(d.text().contains("not an eventfd"), "{}", d.text());
    served(&mut f, 0, b"still served");
}

// Inflight region layout (vhost-user spec, split rings): per queue, 64-byte aligned,
// { u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx; }
// then { u8 inflight; u8 pad[5]; u16 next; u64 counter; } desc[desc_num].
fn queue_area(size: u16) -> u64 {
    (16 + 16 * u64::from(size)).div_ceil(64) * 64
}

fn mark_inflight(file: &File, layout: u16, q: u16, head: u16, counter: u64) {
    let d = u64::from(q) * queue_area(layout) + 16 + 16 * u64::from(head);
    file.write_at(&[1], d).expect("inflight");
    file.write_at(&counter.to_le_bytes(), d + 8)
        .expect("counter");
}

fn set_desc_num(file: &File, layout: u16, q: u16, n: u16) {
    file.write_at(&n.to_le_bytes(), u64::from(q) * queue_area(layout) + 10)
        .expect("desc_num");
}

/// Inflight regions that contradict the ring (desc_num 0 or smaller than the ring, a head
/// beyond the ring marked, more heads in flight than the avail ring ever offered, garbage
/// flags): the ring start fails with an error reply, never a panic; the worker stays usable
/// and a later frontend is served.
#[test]
fn hostile_inflight_regions_are_errors() {
    let d = Daemon::spawn("inflight", &[]);
    type Spoil = fn(&File);
    let cases: [(&str, Spoil); 5] = [
        ("desc_num 0", |f| set_desc_num(f, 256, 0, 0)),
        ("desc_num below ring", |f| set_desc_num(f, 256, 0, 16)),
        ("head beyond ring", |f| {
            set_desc_num(f, 256, 0, 256);
            mark_inflight(f, 256, 0, 200, 1)
        }),
        ("more heads than offered", |f| {
            // The ring was re-initialised (avail idx 0): 20 heads cannot be in flight.
            for h in 0..20 {
                mark_inflight(f, 256, 0, h, u64::from(h) + 1);
            }
        }),
        ("garbage flag", |f| {
            f.write_at(&[0x5a], 16 + 16 * 3).expect("flag");
        }),
    ];
    for (name, spoil) in cases {
        // A first connection runs the ring with the region (it is now "in use": a reconnect
        // recovers from it), then the frontend spoils it and reconnects.
        let mut f = ready(&d);
        let (info, file) = f.setup_inflight(2, 256);
        start_queue(&mut f, 0, 0).expect("start");
        served(&mut f, 0, b"x");
        f.reconnect(&d.sock, T);
        spoil(&file);
        f.handshake();
        f.set_mem_table();
        f.fe.set_inflight_fd(&info, file.as_raw_fd())
            .expect("set_inflight_fd");
        // Rings of 128 in a region laid out for 256 for the head-beyond case.
        let ring = if name == "head beyond ring" { 128 } else { 256 };
        f.init_queue(0, ring);
        f.setup_vring(0, 0);
        assert!(
            f.fe.set_vring_enable(0, true).is_err(),
            "{name}: hostile inflight region accepted"
        );
        drop(f);
    }
    assert!(!d.text().contains("panicked"), "{}", d.text());
    // A well-behaved frontend afterwards, with inflight tracking.
    let mut f = ready(&d);
    f.setup_inflight(2, 256);
    start_queue(&mut f, 0, 0).expect("start");
    served(&mut f, 0, b"sane frontend");
}

/// The frontend zeroes (or fills with 0xff) the inflight region while the ring runs: requests
/// are still served, nothing panics, and the next frontend is served.
#[test]
fn inflight_region_scribbled_after_start() {
    let d = Daemon::spawn("scribble", &[]);
    for fill in [0u8, 0xff] {
        let mut f = ready(&d);
        let (info, file) = f.setup_inflight(2, 256);
        start_queue(&mut f, 0, 0).expect("start");
        served(&mut f, 0, b"first");
        file.write_at(&vec![fill; info.mmap_size as usize], 0)
            .expect("scribble");
        served(&mut f, 0, b"after scribble");
        served(&mut f, 0, b"and again");
    }
    assert!(!d.text().contains("panicked"), "{}", d.text());
    let mut f = ready(&d);
    start_queue(&mut f, 0, 0).expect("start");
    served(&mut f, 0, b"later frontend");
}

fn memfd(name: &str, size: u64) -> File {
    let name = std::ffi::CString::new(name).expect("name");
    // SAFETY: plain syscall.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).expect("set_len");
    f
}

/// SIGTERM while the frontend sits in the middle of a message stops the daemon.
#[test]
fn sigterm_while_frontend_is_mid_message() {
    let mut d = Daemon::spawn("midmsg", &[]);
    let mut f = ready(&d);
    start_queue(&mut f, 0, 0).expect("start");
    // Half a header, then nothing.
    std::io::Write::write_all(f.raw(), &[1, 0, 0, 0, 1, 0]).expect("half header");
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    loop {
        if let Some(st) = d.child.try_wait().expect("wait") {
            assert!(st.success(), "exit status {st}: {}", d.text());
            break;
        }
        assert!(start.elapsed() < T, "SIGTERM ignored: {}", d.text());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Files shorter than the mapping they are offered for (SIGBUS on access) are refused:
/// a memory region larger than its memfd, SET_INFLIGHT_FD and SET_LOG_BASE with 0-byte
/// memfds. The daemon survives and serves.
#[test]
fn files_shorter_than_their_mapping_are_refused() {
    let d = Daemon::spawn("sigbus", &[]);
    let mut f = ready(&d);
    // A region claiming twice the memfd's size, with a request buffer in the missing half.
    let mut big = f.region_info();
    big.memory_size *= 2;
    assert!(
        f.fe.set_mem_table(&[big]).is_err(),
        "oversized region accepted"
    );
    f.set_mem_table();
    // SET_INFLIGHT_FD with an empty memfd.
    let empty = memfd("ft-hv-empty", 0);
    let info = vhost::vhost_user::message::VhostUserInflight {
        mmap_size: 4096 * 4,
        mmap_offset: 0,
        num_queues: 2,
        queue_size: 256,
    };
    assert!(f.fe.set_inflight_fd(&info, empty.as_raw_fd()).is_err());
    start_queue(&mut f, 0, 0).expect("start");
    served(&mut f, 0, b"after inflight");
    // SET_LOG_BASE with an empty memfd: refused (it has no error reply: the connection ends).
    let _ = f.fe.set_log_base(
        0,
        Some(vhost::VhostUserDirtyLogRegion {
            mmap_size: 4096,
            mmap_offset: 0,
            mmap_handle: empty.as_raw_fd(),
        }),
    );
    let mut f = ready(&d);
    start_queue(&mut f, 0, 0).expect("start");
    served(&mut f, 0, b"next frontend");
    let log = d.text();
    assert!(log.contains("the mapping needs"), "{log}");
}

/// Waits until the daemon closes `f`'s connection (EOF on the socket).
fn wait_closed(f: &mut TestFrontend) -> bool {
    let start = Instant::now();
    let mut buf = [0u8; 256];
    while start.elapsed() < T {
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

/// A frontend truncates a file it shared after the daemon mapped it: the data pages of guest
/// memory under a pending request, the whole guest memory (rings included), or the inflight
/// region. The daemon's next access raises SIGBUS; it must cost that connection (closed with
/// a clear error, the request not completed), never the process, and a fresh well-behaved
/// frontend is then served with its data intact.
#[test]
fn shared_files_truncated_after_mapping_cost_the_connection_not_the_daemon() {
    let mut d = Daemon::spawn("sigbus-trunc", &[]);
    for case in ["data pages", "all guest memory", "inflight region"] {
        let mut f = ready(&d);
        let inflight = (case == "inflight region").then(|| f.setup_inflight(2, 256).1);
        start_queue(&mut f, 0, 0).expect("start");
        served(&mut f, 0, b"before the truncation");
        let used = f.used_idx(0);
        // Buffers live at DATA_GPA, 2 MiB into the memfd, above the rings.
        let (head, _) = f.add_in_out(0, b"written before the truncation");
        match case {
            "data pages" => f.truncate_guest_memory(0x20_0000),
            "all guest memory" => f.truncate_guest_memory(0),
            _ => inflight
                .as_ref()
                .expect("region")
                .set_len(0)
                .expect("truncate"),
        }
        f.kick(0);
        assert!(wait_closed(&mut f), "{case}: connection not closed");
        assert!(
            d.child.try_wait().expect("wait").is_none(),
            "{case}: daemon died: {}",
            d.text()
        );
        if case != "all guest memory" {
            // Rings are still readable here: the request over zeroed memory never completed.
            assert_eq!(f.used_idx(0), used, "{case}: head {head} completed");
        }
        let log = d.text();
        assert!(log.contains("shrank under its mapping"), "{case}: {log}");
    }
    let mut f = ready(&d);
    start_queue(&mut f, 0, 0).expect("start");
    served(&mut f, 0, b"a fresh frontend after three truncations");
    assert!(!d.text().contains("panicked"), "{}", d.text());
}

/// The scratch avail ring used to resubmit in-flight heads is not in the guest's address
/// space: a guest that rewrites a resubmitted request's writable descriptor to point at it
/// after the ring started gets nothing written there (the test device's error answer: used
/// length 0), not a successful write into device-private memory.
#[test]
fn resubmitted_descriptor_cannot_reach_the_scratch_ring() {
    let d = Daemon::spawn("scratch", &[]);
    let mut f = ready(&d);
    let (info, file) = f.setup_inflight(2, 256);
    start_queue(&mut f, 0, 0).expect("start");
    served(&mut f, 0, b"x");
    // Stopped before the next request is placed, so this connection cannot take it.
    assert_eq!(f.fe.get_vring_base(0).expect("get_vring_base"), 1);
    f.reconnect(&d.sock, T);
    // As if the previous connection had taken this request: on the avail ring, marked in
    // flight. `D` requests are completed 100 ms after they are taken.
    let data = b"Delayed resubmitted request";
    let (head, out) = f.add_in_out(0, data);
    mark_inflight(&file, 256, 0, head, 100);
    f.handshake();
    f.set_mem_table();
    f.fe.set_inflight_fd(&info, file.as_raw_fd())
        .expect("set_inflight_fd");
    f.setup_vring(0, 2);
    f.fe.set_vring_enable(0, true)
        .expect("start with resubmission");
    // The chain was popped from the scratch ring at the start; now point its writable
    // descriptor (the one after the head) at the scratch.
    let (desc, _, _) = TestFrontend::ring_gpas(0);
    let next: u16 = {
        let b = f.read(desc + 16 * u64::from(head) + 14, 2);
        u16::from_le_bytes([b[0], b[1]])
    };
    f.write(desc + 16 * u64::from(next), &(1u64 << 52).to_le_bytes());
    assert_eq!(f.wait_used(0, 1, T), vec![(head, 0)], "{}", d.text());
    assert_eq!(f.read(out, data.len()), vec![0; data.len()]);
    // A later request on the same ring is served normally.
    served(&mut f, 0, b"after the resubmission");
}

/// Guest memory in a memfd without F_SEAL_SHRINK is warned about (it could be truncated under
/// us); a sealed one is not.
#[test]
fn unsealed_guest_memory_is_warned_about() {
    let d = Daemon::spawn("seals", &[]);
    let mut f = d.connect();
    f.handshake();
    // A sealed copy of the layout: its own memfd, sealed against shrinking.
    let name = std::ffi::CString::new("ft-hv-sealed").expect("name");
    // SAFETY: plain syscall.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: fresh fd.
    let sealed = unsafe { File::from_raw_fd(fd) };
    sealed.set_len(MEM_SIZE).expect("size");
    // SAFETY: fcntl on our fd.
    assert_eq!(
        unsafe {
            libc::fcntl(
                sealed.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        },
        0
    );
    let mut r = f.region_info();
    r.mmap_handle = sealed.as_raw_fd();
    f.fe.set_mem_table(&[r]).expect("sealed table");
    assert!(!d.text().contains("F_SEAL_SHRINK"), "{}", d.text());
    f.set_mem_table();
    assert!(d.text().contains("F_SEAL_SHRINK"), "{}", d.text());
}

fn pid_stat(pid: u32) -> (usize, u64, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (fds, field("VmRSS:"), field("Threads:"))
}

fn maps_matching(pid: u32, needle: &str) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// GET_INFLIGHT_FD is bounded by the device's queues and sizes; SET_LOG_BASE unmaps the area
/// it replaces.
#[test]
fn inflight_and_log_regions_are_bounded() {
    let d = Daemon::spawn("bounds", &[]);
    let pid = d.child.id();
    let mut f = ready(&d);
    let req = vhost::vhost_user::message::VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 0xffff,
        queue_size: 0xffff,
    };
    // "No inflight region" (size 0) rather than a 64 GiB mapping.
    if let Ok((info, _)) = f.fe.get_inflight_fd(&req) {
        assert_eq!(info.mmap_size, 0);
    }
    let (_, rss, _) = pid_stat(pid);
    assert!(rss < 64 << 10, "RSS {rss} KiB");
    let pages = (MEM_GPA + MEM_SIZE) / 4096;
    let size = pages.div_ceil(8).div_ceil(4096) * 4096;
    for _ in 0..300 {
        let log = memfd("ft-hv-logarea", size);
        f.fe.set_log_base(
            0,
            Some(vhost::VhostUserDirtyLogRegion {
                mmap_size: size,
                mmap_offset: 0,
                mmap_handle: log.as_raw_fd(),
            }),
        )
        .expect("set_log_base");
    }
    let n = maps_matching(pid, "ft-hv-logarea");
    assert!(n <= 2, "{n} log mappings after 300 SET_LOG_BASE");
    start_queue(&mut f, 0, 0).expect("start");
    served(&mut f, 0, b"still fine");
}

/// 1000 hostile connections, a mix of the cases above, leave fd, RSS and thread counts flat,
/// and a well-behaved frontend is served afterwards with its data intact.
#[test]
fn thousand_hostile_connections_leak_nothing() {
    let d = Daemon::spawn("thousand", &["--quiet"]);
    let pid = d.child.id();
    let round = |i: usize| {
        let mut f = ready(&d);
        match i % 5 {
            0 => {
                start_queue(&mut f, 0, 0).expect("start");
                set_avail_idx(&f, 0, 999);
                f.kick(0);
                let _ = f.fe.get_vring_base(0);
            }
            1 => {
                let (_, file) = f.setup_inflight(2, 256);
                set_desc_num(&file, 256, 0, 3);
                start_queue(&mut f, 0, 0).expect("start");
                served(&mut f, 0, b"i");
            }
            2 => {
                let _ = start_queue(&mut f, 1, 30000);
            }
            3 => {
                std::io::Write::write_all(f.raw(), &[1, 0, 0, 0]).expect("partial");
            }
            _ => {
                let empty = memfd("ft-hv-empty", 0);
                let info = vhost::vhost_user::message::VhostUserInflight {
                    mmap_size: 4096,
                    mmap_offset: 0,
                    num_queues: 1,
                    queue_size: 64,
                };
                let _ = f.fe.set_inflight_fd(&info, empty.as_raw_fd());
            }
        }
    };
    // Both counts are taken with no connection open, once the daemon has let go of the last
    // one (it releases a connection's fds on its own time: a leak stays, a lag does not).
    let settled = |floor: Option<usize>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = pid_stat(pid);
        let mut stable_since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = pid_stat(pid);
            if now.0 != last.0 {
                stable_since = Instant::now();
            }
            last = now;
            let done = match floor {
                Some(f) => last.0 <= f,
                None => stable_since.elapsed() >= Duration::from_millis(300),
            };
            if done || Instant::now() >= deadline {
                return last;
            }
        }
    };
    for i in 0..50 {
        round(i);
    }
    let before = settled(None);
    let start = Instant::now();
    for i in 0..1000 {
        round(i);
    }
    let took = start.elapsed();
    // A well-behaved frontend is served with its data intact, then leaves too.
    {
        let mut f = ready(&d);
        start_queue(&mut f, 0, 0).expect("start");
        served(&mut f, 0, b"well-behaved after 1000 hostile");
    }
    let after = settled(Some(before.0));
    eprintln!(
        "1000 hostile connections in {took:?}: (fds, rss KiB, threads) {before:?} -> {after:?}"
    );
    if after.0 > before.0 {
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .map(|e| format!("{:?}", std::fs::read_link(e.path()).unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        panic!("fds {before:?} -> {after:?}: {fds:?}");
    }
    assert_eq!(after.2, before.2, "threads {before:?} -> {after:?}");
    assert!(after.1 <= before.1 + 4096, "RSS {before:?} -> {after:?}");
}

/// A frontend flooding malformed messages gets each NACKed, but the log stays bounded (rate
/// limited per call site), and the connection keeps working.
#[test]
fn malformed_message_flood_is_rate_limited_in_the_log() {
    let d = Daemon::spawn("flood", &[]);
    let mut f = ready(&d);
    for _ in 0..5000 {
        f.send_raw(999, 0x1, &[0; 8]);
    }
    // Still in sync and served.
    start_queue(&mut f, 0, 0).expect("start");
    served(&mut f, 0, b"after the flood");
    let n = d.text().matches("malformed message dropped").count();
    assert!(
        (1..=40).contains(&n),
        "{n} log lines for 5000 malformed messages"
    );
}
