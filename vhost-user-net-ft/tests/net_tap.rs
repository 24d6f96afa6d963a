// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The tap layer against the real kernel, each test in its own network namespace: create and
//! attach (single and multi-queue), offload probing, `--ip` configuration, and frames with
//! virtio-net headers in both directions.

mod common;

use common::{eth_frame, in_netns, PacketSocket, ETH_P_TEST};
use std::process::Command;
use std::time::Duration;
use vhost_user_net_ft::open_tap::{configure_ip, open_tap, probe_offloads, OpenTapError};
use vhost_user_net_ft::tap::Tap;
use vhost_user_net_ft::tap_batch::TapBatch;
use vhost_user_net_ft::vnet_hdr::{VnetHdr, VNET_HDR_LEN};

const GUEST: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

fn read_test_frame(tap: &Tap) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70000];
    for _ in 0..500 {
        match tap.read(&mut buf) {
            Ok(n) => {
                let f = &buf[..n];
                if n >= VNET_HDR_LEN + 14
                    && f[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == ETH_P_TEST.to_be_bytes()
                {
                    return Some(f.to_vec());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("tap read: {e}"),
        }
    }
    None
}

#[test]
fn created_tap_carries_vnet_frames_both_ways() {
    in_netns(|| {
        let taps = open_tap("ftnet0", 1).unwrap();
        assert_eq!(taps.len(), 1);
        let tap = &taps[0];
        assert_eq!(tap.name(), "ftnet0");
        let off = probe_offloads(tap);
        assert!(
            off.csum && off.tso,
            "kernel taps support csum and TSO: {off:?}"
        );
        configure_ip("ftnet0", "10.77.0.1/24".parse().unwrap()).unwrap();
        let out = Command::new("ip")
            .args(["-4", "addr", "show", "ftnet0"])
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(s.contains("10.77.0.1/24") && s.contains("UP"), "{s}");

        let sock = PacketSocket::bind("ftnet0").unwrap();
        // Guest -> host: header + frame written to the tap is received by the interface.
        let f = eth_frame(
            [0xff; 6],
            GUEST,
            b"hello from the guest, padded to sixty bytes....",
        );
        let mut w = vec![0u8; VNET_HDR_LEN];
        w.extend_from_slice(&f);
        assert_eq!(tap.write(&w).unwrap(), w.len());
        let got = sock.collect(Duration::from_millis(100), Duration::from_secs(2));
        assert_eq!(got, vec![f]);

        // Host -> guest: a frame sent on the interface comes out of the tap with a header.
        let back = eth_frame(GUEST, [2, 0, 0, 0, 0, 1], &[7u8; 100]);
        sock.send(&back).unwrap();
        let r = read_test_frame(tap).expect("frame on the tap");
        assert_eq!(VnetHdr::decode(&r, VNET_HDR_LEN).gso_type, 0);
        assert_eq!(&r[VNET_HDR_LEN..], &back[..]);
    });
}

#[test]
fn multi_queue_and_existing_taps() {
    in_netns(|| {
        let taps = open_tap("ftmq0", 4).unwrap();
        assert_eq!(taps.len(), 4);
        // Attaching one more queue to the same multi-queue tap also works (existing tap).
        let one = open_tap("ftmq0", 1).unwrap();
        assert_eq!(one.len(), 1);
        drop((taps, one));

        // An existing persistent single-queue tap made with iproute2.
        let st = Command::new("ip")
            .args(["tuntap", "add", "dev", "ftsq0", "mode", "tap", "vnet_hdr"])
            .status()
            .unwrap();
        assert!(st.success());
        let sq = open_tap("ftsq0", 1).unwrap();
        assert_eq!(sq.len(), 1);
        // It cannot serve several queues: a typed error, not a panic.
        drop(sq);
        assert!(matches!(
            open_tap("ftsq0", 2),
            Err(OpenTapError::SetIff { .. })
        ));
    });
}

#[test]
fn batched_writes_keep_order_with_few_syscalls_linked_or_not() {
    in_netns(|| {
        let taps = open_tap("ftbat0", 1).unwrap();
        configure_ip("ftbat0", "10.78.0.1/24".parse().unwrap()).unwrap();
        let sock = PacketSocket::bind("ftbat0").unwrap();
        let frames: Vec<Vec<u8>> = (0..600u32)
            .map(|i| {
                let mut f = vec![0u8; VNET_HDR_LEN];
                f.extend(eth_frame([0xff; 6], GUEST, &i.to_be_bytes().repeat(12)));
                f
            })
            .collect();
        let iovs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        let uring = TapBatch::new();
        assert!(uring.uses_io_uring(), "io_uring works on this kernel");
        assert_eq!(
            taps[0].send_buffer().unwrap(),
            i32::MAX,
            "a new tap's default"
        );
        // Unlinked writes (the default tap), linked writes (a limited send buffer), then
        // write(2).
        let writers = [
            (uring, None, Some(false)),
            (TapBatch::new(), Some(16 * 1024), Some(true)),
            (TapBatch::without_io_uring(), None, Some(true)),
        ];
        for (mut b, send_buffer, linked) in writers {
            if let Some(size) = send_buffer {
                taps[0].set_send_buffer(size).unwrap();
            }
            // SAFETY: `frames` outlives the call.
            let r = unsafe { b.write_all(&taps[0], &iovs) };
            assert_eq!(b.links_writes(), linked);
            assert_eq!((r.frames, r.errors), (600, 0));
            if b.uses_io_uring() {
                assert!(
                    r.syscalls <= 10,
                    "io_uring batch took {} syscalls",
                    r.syscalls
                );
            } else {
                assert_eq!(r.syscalls, 600);
            }
            let got = sock.collect(Duration::from_millis(200), Duration::from_secs(5));
            let want: Vec<Vec<u8>> = frames.iter().map(|f| f[VNET_HDR_LEN..].to_vec()).collect();
            assert_eq!(got.len(), want.len());
            assert!(got == want, "frames reordered or altered");
        }
    });
}
