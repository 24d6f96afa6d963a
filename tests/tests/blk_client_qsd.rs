// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Validates the vhost-user-blk test client (`ft_tests::blk_client`) against a reference
//! backend, qemu-storage-daemon's vhost-user-blk export: round trips, batching, flush,
//! write-zeroes/discard, GET_ID, and the raw error statuses. Data is also checked in the image
//! file itself, so a client that reads back its own mistakes cannot pass.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ft_tests::blk_client::*;

const IMG_SIZE: u64 = 64 << 20;

struct Qsd {
    child: Child,
    sock: PathBuf,
    img: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qsd_binary() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("qemu-storage-daemon"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "qemu-storage-daemon not found in PATH: run scripts/setup.sh \
             (or `apt-get install qemu-system-x86 qemu-utils`, both together)"
        )
    })
}

fn start_qsd(num_queues: usize) -> Qsd {
    let bin = qsd_binary();
    // A directory on the real disk (not tmpfs), like the benchmark uses.
    let dir = tempfile::Builder::new()
        .prefix("blk-client-qsd")
        .tempdir_in(std::env::temp_dir())
        .expect("tempdir");
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("vhost.sock");
    File::create(&img)
        .and_then(|f| f.set_len(IMG_SIZE))
        .expect("create image");
    let child = Command::new(bin)
        .arg("--blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=disk,cache.direct=off",
            img.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},\
             writable=on,num-queues={num_queues}",
            sock.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn qemu-storage-daemon");
    let mut qsd = Qsd {
        child,
        sock,
        img,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !qsd.sock.exists() {
        if let Some(st) = qsd.child.try_wait().expect("try_wait") {
            panic!("qemu-storage-daemon exited early: {st}");
        }
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    qsd
}

fn connect(qsd: &Qsd, num_queues: usize) -> BlkClient {
    BlkClient::connect(qsd.sock.to_str().unwrap(), num_queues, 128).expect("connect")
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

fn file_bytes(img: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = OpenOptions::new().read(true).open(img).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, offset).unwrap();
    v
}

#[test]
fn config_and_features() {
    let qsd = start_qsd(2);
    let c = connect(&qsd, 2);
    assert_eq!(c.config().capacity, IMG_SIZE / SECTOR_SIZE);
    assert_eq!(c.config().capacity_bytes(), IMG_SIZE);
    assert!(c.config().blk_size >= 512);
    assert_eq!(c.num_queues(), 2);
    assert!(c.has_feature(1 << 32), "VERSION_1 not negotiated");
    assert!(c.has_feature(1 << 9), "FLUSH not negotiated");
    assert!(c.has_feature(1 << 12), "MQ must be negotiated for 2 queues");
    assert_eq!(
        c.features() & (1 << 28),
        0,
        "INDIRECT must not be negotiated"
    );
}

#[test]
fn too_many_queues_is_an_error() {
    let qsd = start_qsd(1);
    match BlkClient::connect(qsd.sock.to_str().unwrap(), 4, 128) {
        Err(ClientError::InvalidArgument(_)) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("4 queues accepted from a 1-queue export"),
    }
}

#[test]
fn sync_round_trips_reach_the_image() {
    let qsd = start_qsd(2);
    let mut c = connect(&qsd, 2);
    // Sizes below, at, and above the 1 MiB bounce buffer (chunked), on both queues.
    for (i, (off, len)) in [
        (0u64, 512usize),
        (4096, 4096),
        (1 << 20, 3 << 20),
        (IMG_SIZE - 8192, 8192),
    ]
    .into_iter()
    .enumerate()
    {
        let q = i % 2;
        let data = pattern(i as u64 + 1, len);
        c.write_at(q, off, &data).unwrap();
        c.flush(q).unwrap();
        let mut back = vec![0u8; len];
        c.read_at(1 - q, off, &mut back).unwrap();
        assert!(back == data, "read back differs at {off}+{len}");
        assert!(
            file_bytes(&qsd.img, off, len) == data,
            "image differs at {off}+{len}"
        );
    }
}

#[test]
fn batched_requests_complete_with_their_tags() {
    let qsd = start_qsd(1);
    let mut c = connect(&qsd, 1);
    let n = 42usize; // 126 of the 128 descriptors
    let buf = c.alloc_buffer(n * 4096).unwrap();
    for i in 0..n {
        let p = pattern(100 + i as u64, 4096);
        c.buf_mut(buf)[i * 4096..(i + 1) * 4096].copy_from_slice(&p);
    }
    for i in 0..n {
        // Reverse order on disk, so tags and offsets are not trivially equal.
        let off = ((n - 1 - i) * 4096) as u64;
        c.submit_write(0, off, buf.slice(i * 4096, 4096), i as u64)
            .unwrap();
    }
    assert_eq!(c.inflight(0), n);
    assert_eq!(c.free_descriptors(0), 128 - 3 * n);
    // A 43rd write does not fit: the client must say so instead of corrupting the ring.
    match c.submit_write(0, 0, buf.slice(0, 4096), 999) {
        Err(ClientError::QueueFull {
            need: 3, free: 2, ..
        }) => {}
        other => panic!("expected QueueFull, got {other:?}"),
    }
    c.kick(0).unwrap();
    let mut seen = vec![false; n];
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.iter().any(|s| !s) {
        c.drain_completions(0, |comp| {
            assert_eq!(comp.status, VIRTIO_BLK_S_OK, "tag {}", comp.tag);
            assert!(!seen[comp.tag as usize], "tag {} completed twice", comp.tag);
            seen[comp.tag as usize] = true;
        });
        assert!(Instant::now() < deadline, "batch did not complete");
        if seen.iter().any(|s| !s) {
            c.wait_notification(0, Some(Duration::from_secs(1)))
                .unwrap();
        }
    }
    assert_eq!(c.inflight(0), 0);
    assert_eq!(c.free_descriptors(0), 128);
    assert_eq!(c.spurious_completions(0), 0);
    c.flush(0).unwrap();
    for i in 0..n {
        let off = ((n - 1 - i) * 4096) as u64;
        assert!(file_bytes(&qsd.img, off, 4096) == pattern(100 + i as u64, 4096));
    }
    // Batched reads into distinct slices of one buffer.
    let rbuf = c.alloc_buffer(n * 4096).unwrap();
    for i in 0..n {
        c.submit_read(0, (i * 4096) as u64, rbuf.slice(i * 4096, 4096), i as u64)
            .unwrap();
    }
    c.kick(0).unwrap();
    let mut done = 0;
    while done < n {
        done += c.drain_completions(0, |comp| assert!(comp.is_ok()));
        if done < n {
            assert!(c
                .wait_notification(0, Some(Duration::from_secs(20)))
                .unwrap());
        }
    }
    for i in 0..n {
        let expect = pattern(100 + (n - 1 - i) as u64, 4096);
        assert!(
            c.buf(rbuf)[i * 4096..(i + 1) * 4096] == expect[..],
            "read {i}"
        );
    }
}

#[test]
fn write_zeroes_discard_and_get_id() {
    let qsd = start_qsd(1);
    let mut c = connect(&qsd, 1);
    let data = pattern(7, 64 << 10);
    c.write_at(0, 0, &data).unwrap();
    if c.has_feature(1 << 14) {
        c.write_zeroes(0, 4096, 8192, false).unwrap();
        c.write_zeroes(0, 32768, 4096, true).unwrap();
        let mut back = vec![0u8; 64 << 10];
        c.read_at(0, 0, &mut back).unwrap();
        assert_eq!(back[..4096], data[..4096]);
        assert!(back[4096..12288].iter().all(|&b| b == 0));
        assert_eq!(back[12288..32768], data[12288..32768]);
        assert!(back[32768..36864].iter().all(|&b| b == 0));
        assert_eq!(back[36864..], data[36864..]);
    }
    if c.has_feature(1 << 13) {
        // Discard content is undefined afterwards; only the status is checked.
        c.discard(0, 0, 65536).unwrap();
    }
    // qsd answers GET_ID (its serial may be empty); the status must be OK.
    c.get_id(0).unwrap();
}

#[test]
fn raw_statuses_are_exposed() {
    let qsd = start_qsd(1);
    let mut c = connect(&qsd, 1);
    // Unknown request type.
    let st = c
        .request_sync(0, |c, q| c.submit_raw(q, 0x7777, 0, None, 1))
        .unwrap();
    assert_eq!(st, VIRTIO_BLK_S_UNSUPP);
    // Read past the end of the disk.
    let buf = c.alloc_buffer(4096).unwrap();
    let end = IMG_SIZE;
    let st = c
        .request_sync(0, |c, q| c.submit_read(q, end, buf.slice(0, 4096), 2))
        .unwrap();
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    match c.read_at(0, end, &mut [0u8; 512]) {
        Err(ClientError::Status(VIRTIO_BLK_S_IOERR)) => {}
        other => panic!("expected IOERR, got {other:?}"),
    }
    // Misaligned offsets never reach the device.
    assert!(matches!(
        c.write_at(0, 100, &[0u8; 512]),
        Err(ClientError::InvalidArgument(_))
    ));
    // Empty chains are refused locally.
    assert!(matches!(
        c.submit_chain(0, ReqHeader::default(), DwzSegment::default(), &[], 3),
        Err(ClientError::InvalidArgument(_))
    ));
    // The queue still works after the errors.
    c.write_at(0, 0, &[0x5a; 4096]).unwrap();
    let mut back = [0u8; 4096];
    c.read_at(0, 0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));
}

#[test]
fn hand_built_chains() {
    let qsd = start_qsd(1);
    let mut c = connect(&qsd, 1);
    let buf = c.alloc_buffer(8192).unwrap();
    c.buf_mut(buf).fill(0xa5);
    // A write whose data is split over two descriptors, one given by raw address.
    let second = c.addr_of(buf.slice(4096, 4096)).unwrap();
    let write = ReqHeader {
        req_type: VIRTIO_BLK_T_OUT,
        reserved: 0,
        sector: 16,
    };
    let st = c
        .request_sync(0, |c, q| {
            c.submit_chain(
                q,
                write,
                DwzSegment::default(),
                &[
                    ChainDesc::Header {
                        len: 16,
                        device_writable: false,
                    },
                    ChainDesc::Data {
                        buf: buf.slice(0, 4096),
                        device_writable: false,
                    },
                    ChainDesc::Raw {
                        addr: second,
                        len: 4096,
                        device_writable: false,
                    },
                    ChainDesc::Status {
                        device_writable: true,
                    },
                ],
                7,
            )
        })
        .unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK);
    c.flush(0).unwrap();
    assert!(file_bytes(&qsd.img, 16 * 512, 8192)
        .iter()
        .all(|&b| b == 0xa5));
    assert_eq!(c.free_descriptors(0), 128);
}
