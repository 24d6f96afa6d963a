// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon binary driven through the real vhost-user protocol by `ft_tests::blk_client`
//! (virtio-driver based frontend, no VM): every request type, config space, multi-queue,
//! EVENT_IDX on and off, read-only, capacity edges, malformed chains, disconnect/reconnect and
//! signal shutdown. Data is always checked in the image file too.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ft_tests::blk_client::*;

mod common;
use common::{file_bytes, kernel_fdatasyncs, new_image, spawn, unavailable, Daemon, IMG_SIZE};

const SECTORS: u64 = IMG_SIZE / SECTOR_SIZE;
const EVENT_IDX: u64 = 1 << 29;

fn start(extra: &[&str]) -> Daemon {
    let (dir, img) = new_image();
    start_on(dir, img, extra)
}

fn start_on(dir: tempfile::TempDir, img: PathBuf, extra: &[&str]) -> Daemon {
    spawn(dir, img, false, Duration::from_secs(15), |c| {
        c.args(["--serial", "ft-serial-42"])
            .args(extra)
            .stderr(Stdio::piped());
    })
}

impl Daemon {
    fn connect(&self, queues: usize) -> BlkClient {
        BlkClient::connect(self.sock.to_str().unwrap(), queues, 128).expect("connect")
    }

    fn connect_with(&self, opts: ClientOptions) -> BlkClient {
        BlkClient::connect_with(self.sock.to_str().unwrap(), opts).expect("connect")
    }

    /// Sends `sig`, waits for exit; returns (exit code, stderr).
    fn stop(mut self, sig: libc::c_int) -> (Option<i32>, String) {
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon did not exit on signal {sig}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status.code(), err)
    }

    fn assert_alive(&mut self) {
        assert!(
            self.child.as_mut().unwrap().try_wait().unwrap().is_none(),
            "daemon died"
        );
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// Submits one request built by `f` on idle queue 0 and returns the raw status.
fn one(c: &mut BlkClient, f: impl FnOnce(&mut BlkClient, usize) -> Result<()>) -> u8 {
    c.request_sync(0, f).expect("request")
}

#[test]
fn write_read_flush_reach_the_image_and_fsync() {
    let d = start(&[]);
    let mut c = d.connect(1);
    for (i, (off, len)) in [(0u64, 512usize), (4096, 65536), (IMG_SIZE - 8192, 8192)]
        .into_iter()
        .enumerate()
    {
        let data = pattern(i as u64 + 1, len);
        c.write_at(0, off, &data).unwrap();
        let mut back = vec![0u8; len];
        c.read_at(0, off, &mut back).unwrap();
        assert!(back == data, "read back differs at {off}+{len}");
        assert!(
            file_bytes(&d.img, off, len) == data,
            "image differs at {off}"
        );
    }
    let flushes = || {
        for i in 0..5u8 {
            c.write_at(0, 0, &[i; 4096]).unwrap();
            c.flush(0).unwrap();
        }
    };
    match kernel_fdatasyncs(&d.img, flushes).0 {
        // Each FLUSH is one fdatasync of the image, seen by the filesystem itself.
        Some(n) => assert_eq!(n, 5, "kernel saw {n} fdatasyncs of the image for 5 FLUSHes"),
        None => unavailable("perf/tracefs/ext4 unavailable (kernel-side fdatasync count)"),
    }
    drop(c);
    let (code, log) = d.stop(libc::SIGTERM);
    assert_eq!(code, Some(0), "{log}");
    // Every FLUSH reached a real fdatasync; each came alone (the write before it had
    // completed), so each ran on the queue thread rather than through io_uring.
    assert!(
        log.contains("fdatasyncs 5 (5 on the queue thread)"),
        "{log}"
    );
}

#[test]
fn config_space_and_features() {
    let d = start(&["--queues", "3", "--queue-size", "256"]);
    let c = d.connect(3);
    let cfg = c.config();
    assert_eq!(cfg.capacity, SECTORS);
    assert_eq!(cfg.blk_size, 512);
    assert_eq!(cfg.seg_max, 128);
    assert_eq!(cfg.num_queues, 3);
    assert_eq!(cfg.writeback, 1);
    assert_eq!(cfg.max_discard_seg, 1);
    assert_eq!(cfg.max_write_zeroes_seg, 1);
    assert_eq!(cfg.write_zeroes_may_unmap, 1);
    assert!(cfg.max_discard_sectors > 0);
    for (bit, name) in [
        (32, "VERSION_1"),
        (2, "SEG_MAX"),
        (6, "BLK_SIZE"),
        (9, "FLUSH"),
        (11, "CONFIG_WCE"),
        (10, "TOPOLOGY"),
        (12, "MQ"),
        (13, "DISCARD"),
        (14, "WRITE_ZEROES"),
        (29, "EVENT_IDX"),
    ] {
        assert!(c.has_feature(1 << bit), "{name} not negotiated");
    }
    assert!(!c.has_feature(1 << 5), "RO offered on a writable disk");
}

#[test]
fn get_id_discard_write_zeroes_and_unknown_types() {
    let d = start(&[]);
    let mut c = d.connect(1);
    let id = c.get_id(0).unwrap();
    assert_eq!(&id[..12], b"ft-serial-42");
    assert!(id[12..].iter().all(|&b| b == 0));

    let ones = vec![0x5au8; 1 << 20];
    c.write_at(0, 0, &ones).unwrap();
    c.discard(0, 0, 64 << 10).unwrap();
    c.write_zeroes(0, 128 << 10, 64 << 10, false).unwrap();
    c.write_zeroes(0, 512 << 10, 64 << 10, true).unwrap();
    let mut back = vec![0u8; 1 << 20];
    c.read_at(0, 0, &mut back).unwrap();
    assert!(back == file_bytes(&d.img, 0, 1 << 20));
    let zero = |r: std::ops::Range<usize>| back[r].iter().all(|&b| b == 0);
    let kept = |r: std::ops::Range<usize>| back[r].iter().all(|&b| b == 0x5a);
    assert!(zero(0..64 << 10), "discarded range not zero");
    assert!(kept(64 << 10..128 << 10));
    assert!(zero(128 << 10..192 << 10), "write-zeroes range not zero");
    assert!(kept(192 << 10..512 << 10));
    assert!(
        zero(512 << 10..576 << 10),
        "write-zeroes+unmap range not zero"
    );
    assert!(kept(576 << 10..1 << 20));

    // Unknown and legacy types: UNSUPP.
    for t in [2u32, 3, 99, u32::MAX] {
        assert_eq!(
            one(&mut c, |c, q| c.submit_raw(q, t, 0, None, 0)),
            VIRTIO_BLK_S_UNSUPP
        );
    }
    // Discard with the UNMAP flag and write-zeroes with unknown flags: UNSUPP.
    let seg = |flags| DwzSegment {
        sector: 0,
        num_sectors: 8,
        flags,
    };
    let dwz_chain = [
        ChainDesc::Header {
            len: 16,
            device_writable: false,
        },
        ChainDesc::Dwz {
            device_writable: false,
        },
        ChainDesc::Status {
            device_writable: true,
        },
    ];
    let hdr = |t| ReqHeader {
        req_type: t,
        reserved: 0,
        sector: 0,
    };
    let st = one(&mut c, |c, q| {
        c.submit_chain(q, hdr(VIRTIO_BLK_T_DISCARD), seg(1), &dwz_chain, 0)
    });
    assert_eq!(st, VIRTIO_BLK_S_UNSUPP);
    let st = one(&mut c, |c, q| {
        c.submit_chain(q, hdr(VIRTIO_BLK_T_WRITE_ZEROES), seg(6), &dwz_chain, 0)
    });
    assert_eq!(st, VIRTIO_BLK_S_UNSUPP);
    // Beyond capacity.
    let past = DwzSegment {
        sector: SECTORS - 4,
        num_sectors: 8,
        flags: 0,
    };
    let st = one(&mut c, |c, q| {
        c.submit_chain(q, hdr(VIRTIO_BLK_T_WRITE_ZEROES), past, &dwz_chain, 0)
    });
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
}

#[test]
fn bad_input_gets_ioerr_and_the_daemon_survives() {
    let mut d = start(&[]);
    let mut c = d.connect(1);
    let buf = c.alloc_buffer(8192).unwrap();
    let hdr = |t, sector| ReqHeader {
        req_type: t,
        reserved: 0,
        sector,
    };
    let h16 = ChainDesc::Header {
        len: 16,
        device_writable: false,
    };
    let status = ChainDesc::Status {
        device_writable: true,
    };
    let data = |len, w| ChainDesc::Data {
        buf: buf.slice(0, len),
        device_writable: w,
    };
    let cases: Vec<(&str, ReqHeader, Vec<ChainDesc>)> = vec![
        (
            "short header",
            hdr(VIRTIO_BLK_T_IN, 0),
            vec![
                ChainDesc::Header {
                    len: 8,
                    device_writable: false,
                },
                data(512, true),
                status,
            ],
        ),
        (
            "writable header",
            hdr(VIRTIO_BLK_T_IN, 0),
            vec![
                ChainDesc::Header {
                    len: 16,
                    device_writable: true,
                },
                data(512, true),
                status,
            ],
        ),
        (
            "read into readable buffer",
            hdr(VIRTIO_BLK_T_IN, 0),
            vec![h16, data(512, false), status],
        ),
        (
            "write from writable buffer",
            hdr(VIRTIO_BLK_T_OUT, 0),
            vec![h16, data(512, true), status],
        ),
        (
            "partial sector",
            hdr(VIRTIO_BLK_T_IN, 0),
            vec![h16, data(100, true), status],
        ),
        (
            "read past the end",
            hdr(VIRTIO_BLK_T_IN, SECTORS - 1),
            vec![h16, data(1024, true), status],
        ),
        (
            "write at capacity",
            hdr(VIRTIO_BLK_T_OUT, SECTORS),
            vec![h16, data(512, false), status],
        ),
        (
            "huge sector",
            hdr(VIRTIO_BLK_T_IN, u64::MAX),
            vec![h16, data(512, true), status],
        ),
        (
            "flush with data",
            hdr(VIRTIO_BLK_T_FLUSH, 0),
            vec![h16, data(512, false), status],
        ),
        (
            "get_id without buffer",
            hdr(VIRTIO_BLK_T_GET_ID, 0),
            vec![h16, status],
        ),
        (
            "discard without segment",
            hdr(VIRTIO_BLK_T_DISCARD, 0),
            vec![h16, status],
        ),
    ];
    for (name, h, descs) in cases {
        let st = one(&mut c, |c, q| {
            c.submit_chain(q, h, DwzSegment::default(), &descs, 0)
        });
        assert_eq!(st, VIRTIO_BLK_S_IOERR, "{name}");
    }
    // No usable status byte: the chain is returned untouched (and the daemon does not hang).
    let st = one(&mut c, |c, q| {
        c.submit_chain(
            q,
            hdr(VIRTIO_BLK_T_IN, 0),
            DwzSegment::default(),
            &[
                h16,
                data(512, true),
                ChainDesc::Status {
                    device_writable: false,
                },
            ],
            0,
        )
    });
    assert_eq!(st, STATUS_NOT_WRITTEN);
    let st = one(&mut c, |c, q| {
        c.submit_chain(
            q,
            hdr(VIRTIO_BLK_T_OUT, 0),
            DwzSegment::default(),
            &[h16],
            0,
        )
    });
    assert_eq!(st, STATUS_NOT_WRITTEN);
    // Edges that are valid: the very last sector.
    c.write_at(0, IMG_SIZE - 512, &[7u8; 512]).unwrap();
    let mut last = [0u8; 512];
    c.read_at(0, IMG_SIZE - 512, &mut last).unwrap();
    assert_eq!(last, [7u8; 512]);
    d.assert_alive();
}

#[test]
fn readonly_disk_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.img");
    std::fs::write(&img, vec![0x33u8; 1 << 20]).unwrap();
    let d = start_on(dir, img, &["--readonly"]);
    let mut c = d.connect(1);
    assert!(c.has_feature(1 << 5), "RO not negotiated");
    assert!(
        !c.has_feature(1 << 13),
        "DISCARD offered on a read-only disk"
    );
    let mut back = vec![0u8; 4096];
    c.read_at(0, 0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x33));
    match c.write_at(0, 0, &[1u8; 512]) {
        Err(ClientError::Status(s)) => assert_eq!(s, VIRTIO_BLK_S_IOERR),
        other => panic!("write on RO disk: {other:?}"),
    }
    match c.write_zeroes(0, 0, 4096, true) {
        Err(ClientError::Status(s)) => assert_eq!(s, VIRTIO_BLK_S_IOERR),
        other => panic!("write-zeroes on RO disk: {other:?}"),
    }
    c.flush(0).unwrap();
    assert!(file_bytes(&d.img, 0, 1 << 20).iter().all(|&b| b == 0x33));
}

/// Many requests per kick on every queue, with and without EVENT_IDX.
fn batched_multiqueue(event_idx: bool) {
    let d = start(&["--queues", "4"]);
    let mut features = DEFAULT_FEATURES;
    if !event_idx {
        features &= !EVENT_IDX;
    }
    let mut c = d.connect_with(ClientOptions {
        num_queues: 4,
        queue_size: 128,
        features,
        ..ClientOptions::default()
    });
    assert_eq!(c.has_feature(EVENT_IDX), event_idx);
    const N: usize = 40; // 120 of 128 descriptors per queue
    let buf = c.alloc_buffer(4 * N * 4096).unwrap();
    let mut expect = vec![0u8; 4 * N * 4096];
    for (i, chunk) in expect.chunks_mut(4096).enumerate() {
        chunk.copy_from_slice(&pattern(1000 + i as u64, 4096));
    }
    c.buf_mut(buf).copy_from_slice(&expect);
    for round in 0..3 {
        for q in 0..4 {
            for i in 0..N {
                let k = q * N + i;
                c.submit_write(q, (k * 4096) as u64, buf.slice(k * 4096, 4096), k as u64)
                    .unwrap();
            }
            c.kick(q).unwrap();
        }
        let mut done = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while done < 4 * N {
            for q in 0..4 {
                done += c.drain_completions(q, |comp| {
                    assert_eq!(comp.status, VIRTIO_BLK_S_OK, "tag {}", comp.tag)
                });
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: {done} of {} done",
                4 * N
            );
            if done < 4 * N {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    for q in 0..4 {
        c.flush(q).unwrap();
        assert_eq!(c.spurious_completions(q), 0);
    }
    assert!(file_bytes(&d.img, 0, expect.len()) == expect);
    // And read back in parallel through all queues.
    let rbuf = c.alloc_buffer(4 * N * 4096).unwrap();
    for q in 0..4 {
        for i in 0..N {
            let k = q * N + i;
            c.submit_read(q, (k * 4096) as u64, rbuf.slice(k * 4096, 4096), k as u64)
                .unwrap();
        }
        c.kick(q).unwrap();
    }
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while done < 4 * N {
        for q in 0..4 {
            done += c.drain_completions(q, |comp| assert_eq!(comp.status, VIRTIO_BLK_S_OK));
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(c.buf(rbuf) == &expect[..]);
}

/// Bursts of back-to-back requests with idle gaps longer than the polling window: within a
/// burst the polling worker finds each request with guest notifications off, so kicks are
/// suppressed; after each gap it must have re-armed them, or the next request would never be
/// seen. Returns (requests, kicks sent).
fn bursts_with_gaps(poll_max_ns: &str, event_idx: bool) -> (u64, u64) {
    let d = start(&["--poll-max-ns", poll_max_ns, "--poll-on-busy-host"]);
    let mut features = DEFAULT_FEATURES;
    if !event_idx {
        features &= !EVENT_IDX;
    }
    let mut c = d.connect_with(ClientOptions {
        features,
        ..ClientOptions::default()
    });
    let buf = c.alloc_buffer(4096).unwrap();
    let mut requests = 0;
    for burst in 0..10u64 {
        for i in 0..40u64 {
            let off = (burst * 40 + i) * 4096;
            let data = pattern(off, 4096);
            c.buf_mut(buf).copy_from_slice(&data);
            let st = one(&mut c, |c, q| c.submit_write(q, off, buf.slice(0, 4096), 0));
            assert_eq!(st, VIRTIO_BLK_S_OK);
            c.buf_mut(buf).fill(0);
            let st = one(&mut c, |c, q| c.submit_read(q, off, buf.slice(0, 4096), 0));
            assert_eq!(st, VIRTIO_BLK_S_OK);
            assert!(c.buf(buf) == &data[..], "burst {burst} request {i}");
            requests += 2;
        }
        // Longer than the window: the worker stops polling and sleeps.
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(c.spurious_completions(0), 0);
    (requests, c.kicks_sent(0))
}

#[test]
fn polling_suppresses_kicks_and_sleeps_between_bursts() {
    for event_idx in [false, true] {
        // Without polling the worker re-enables notifications before it answers, so every
        // request is kicked.
        let (n, kicks) = bursts_with_gaps("0", event_idx);
        assert_eq!(kicks, n, "no polling, event_idx {event_idx}");
        // With a generous window (debug build, busy CI), most requests are found by polling.
        let (n, kicks) = bursts_with_gaps("2000000", event_idx);
        assert!(
            kicks < n / 2,
            "polling, event_idx {event_idx}: {kicks} kicks for {n} requests"
        );
    }
}

#[test]
fn multiqueue_batches_with_event_idx() {
    batched_multiqueue(true);
}

#[test]
fn multiqueue_batches_without_event_idx() {
    batched_multiqueue(false);
}

#[test]
fn reconnect_keeps_data_and_in_flight_requests_are_not_leaked() {
    reconnect_cycles(&[]);
}

/// The same while the worker busy-polls: the rings stop (disconnect) in the middle of a polling
/// streak, and the worker must neither pop from a ring being stopped nor miss the next one.
#[test]
fn reconnect_while_polling() {
    reconnect_cycles(&["--poll-max-ns", "2000000", "--poll-on-busy-host"]);
}

fn reconnect_cycles(extra: &[&str]) {
    let mut d = start(extra);
    let data = pattern(77, 256 << 10);
    {
        let mut c = d.connect(1);
        c.write_at(0, 1 << 20, &data).unwrap();
        c.flush(0).unwrap();
    }
    // Disconnect with a full batch in flight.
    {
        let mut c = d.connect(1);
        let buf = c.alloc_buffer(40 * 4096).unwrap();
        c.buf_mut(buf).fill(0xee);
        for i in 0..40 {
            c.submit_write(
                0,
                (4 << 20) + i * 4096,
                buf.slice(i as usize * 4096, 4096),
                i,
            )
            .unwrap();
        }
        c.kick(0).unwrap();
    }
    for round in 0..3 {
        let mut c = d.connect(1);
        let mut back = vec![0u8; data.len()];
        c.read_at(0, 1 << 20, &mut back).unwrap();
        assert!(back == data, "round {round}: data lost across reconnect");
        c.write_at(0, 8 << 20, &[round as u8 + 1; 4096]).unwrap();
    }
    assert!(file_bytes(&d.img, 1 << 20, data.len()) == data);
    assert!(file_bytes(&d.img, 8 << 20, 4096).iter().all(|&b| b == 3));
    d.assert_alive();
    let (code, log) = d.stop(libc::SIGINT);
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn cli_rejects_bad_arguments() {
    let bin = env!("CARGO_BIN_EXE_vhost-user-blk-ft");
    let out = Command::new(bin).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--socket",
        "--image",
        "--readonly",
        "--direct",
        "--queues",
        "--queue-size",
        "--serial",
        "--ft",
    ] {
        assert!(help.contains(opt), "--help lacks {opt}");
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    for args in [
        vec![
            "--socket",
            sock.to_str().unwrap(),
            "--image",
            "/nonexistent/disk",
        ],
        vec![
            "--socket",
            sock.to_str().unwrap(),
            "--image",
            "/dev/null",
            "--queues",
            "0",
        ],
        vec![
            "--socket",
            sock.to_str().unwrap(),
            "--image",
            "/dev/null",
            "--ft",
            "bogus",
        ],
        vec!["--image", "/dev/null"],
    ] {
        let out = Command::new(bin).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
    }
}

#[test]
fn direct_io_round_trip() {
    let d = start(&["--direct", "--queues", "2"]);
    // The image fd really is O_DIRECT.
    let pid = d.child.as_ref().unwrap().id();
    let mut direct = false;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let e = e.unwrap();
        if std::fs::read_link(e.path()).ok().as_deref() == Some(d.img.as_path()) {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_str().unwrap()
            ))
            .unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
                .unwrap();
            direct |= flags & libc::O_DIRECT as u32 != 0;
        }
    }
    assert!(direct, "image not opened with O_DIRECT");
    let mut c = d.connect(2);
    let data = pattern(5, 192 << 10);
    c.write_at(1, 64 << 10, &data).unwrap();
    c.flush(1).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read_at(0, 64 << 10, &mut back).unwrap();
    assert!(back == data);
    assert!(file_bytes(&d.img, 64 << 10, data.len()) == data);
}

mod raw_frontend {
    //! Tests with the server's raw test frontend (`ft_tests::frontend`), which exposes what
    //! blk_client does not: SET_CONFIG and the dirty log.
    use super::*;
    use ft_tests::frontend::TestFrontend;
    use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserVirtioFeatures};
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::VhostBackend;

    const T: Duration = Duration::from_secs(10);

    fn session(d: &Daemon) -> (TestFrontend, u64) {
        let mut f = TestFrontend::connect(&d.sock, 1, T);
        let (features, _) = f.handshake();
        f.set_mem_table();
        f.init_queue(0, 256);
        f.setup_vring(0, 0);
        f.fe.set_vring_enable(0, true).expect("enable");
        (f, features)
    }

    /// header + data + status on queue 0; returns (head, status gpa).
    fn blk_req(f: &mut TestFrontend, rtype: u32, sector: u64, data: u64, len: u32) -> (u16, u64) {
        common::blk_req_on(f, 0, rtype, sector, Some((data, len)))
    }

    #[test]
    fn reads_into_guest_memory_are_marked_dirty() {
        let d = start(&[]);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&d.img)
            .unwrap()
            .write_all_at(&pattern(9, 12288), 0)
            .unwrap();
        let (mut f, features) = session(&d);
        assert!(features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0);
        let log = f.setup_dirty_log();
        f.fe.set_features(features)
            .expect("set_features with LOG_ALL");
        TestFrontend::clear_log(&log);
        // A 12 KiB read into a page-aligned buffer: three pages written by io_uring.
        let buf = f.alloc(0x1000).div_ceil(0x1000) * 0x1000;
        f.alloc(0x4000);
        let untouched = buf + 0x3000;
        let (head, status) = blk_req(&mut f, VIRTIO_BLK_T_IN, 0, buf, 12288);
        f.kick(0);
        assert_eq!(f.wait_used(0, 1, T), vec![(head, 12289)]);
        assert_eq!(f.read(status, 1), [VIRTIO_BLK_S_OK]);
        assert!(f.read(buf, 12288) == pattern(9, 12288));
        for page in [buf, buf + 0x1000, buf + 0x2000, status] {
            assert!(
                TestFrontend::page_dirty(&log, page),
                "page {page:#x} not dirty"
            );
        }
        assert!(
            !TestFrontend::page_dirty(&log, untouched),
            "unwritten page dirty"
        );
    }

    #[test]
    fn write_through_mode_syncs_every_write() {
        let d = start(&[]);
        let (mut f, _) = session(&d);
        let cfg = |f: &mut TestFrontend| {
            let (_, c) =
                f.fe.get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
                    .expect("get_config");
            c[32]
        };
        assert_eq!(cfg(&mut f), 1, "write back by default");
        let data = f.alloc(4096);
        f.write(data, &[0x42; 4096]);
        let writes = |f: &mut TestFrontend, n: u64| {
            for i in 0..n {
                let (head, status) = blk_req(f, VIRTIO_BLK_T_OUT, i * 8, data, 4096);
                f.kick(0);
                assert_eq!(f.wait_used(0, 1, T), vec![(head, 1)]);
                assert_eq!(f.read(status, 1), [VIRTIO_BLK_S_OK]);
            }
        };
        let Some(wb) = kernel_fdatasyncs(&d.img, || writes(&mut f, 3)).0 else {
            unavailable("perf/tracefs/ext4 unavailable (kernel-side fdatasync count)");
            return;
        };
        assert_eq!(wb, 0, "write-back writes must not sync");
        f.fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
            .expect("set_config wce=0");
        assert_eq!(cfg(&mut f), 0);
        let wt = kernel_fdatasyncs(&d.img, || writes(&mut f, 3)).0.unwrap();
        assert_eq!(wt, 3, "each write-through write is synced (RWF_DSYNC)");
        // Other config fields are read-only.
        assert!(f
            .fe
            .set_config(0, VhostUserConfigFlags::WRITABLE, &[1, 2, 3, 4, 5, 6, 7, 8])
            .is_err());
        assert!(file_bytes(&d.img, 0, 3 * 4096).iter().all(|&b| b == 0x42));
    }
}

/// A loop device, detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn block_device_backend() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("loop.img");
    std::fs::write(&backing, vec![0x77u8; 8 << 20]).unwrap();
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&backing)
        .output();
    let dev = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => {
            unavailable("no loop device here (losetup -f failed)");
            return;
        }
    };
    let _loop = Loop(dev.clone());
    let d = start_on(tempfile::tempdir().unwrap(), PathBuf::from(&dev), &[]);
    let mut c = d.connect(1);
    assert_eq!(c.config().capacity, (8 << 20) / 512, "BLKGETSIZE64");
    let data = pattern(3, 64 << 10);
    c.write_at(0, 4096, &data).unwrap();
    c.flush(0).unwrap();
    c.write_zeroes(0, 128 << 10, 64 << 10, false).unwrap();
    c.write_zeroes(0, 256 << 10, 64 << 10, true).unwrap();
    c.discard(0, 1 << 20, 64 << 10).unwrap();
    let mut back = vec![0u8; 320 << 10];
    c.read_at(0, 0, &mut back).unwrap();
    assert!(back[4096..4096 + data.len()] == data[..]);
    assert!(back[128 << 10..192 << 10].iter().all(|&b| b == 0));
    assert!(back[192 << 10..256 << 10].iter().all(|&b| b == 0x77));
    assert!(back[256 << 10..320 << 10].iter().all(|&b| b == 0));
    drop(c);
    drop(d);
    // Through the device to the file behind it.
    assert!(file_bytes(&backing, 4096, data.len()) == data);
    assert!(file_bytes(&backing, 128 << 10, 64 << 10)
        .iter()
        .all(|&b| b == 0));
}
