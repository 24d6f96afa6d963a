// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end output commit: a Linux guest under QEMU (TCG) with vhost-user-blk-ft and
//! vhost-user-net-ft, both `--ft hold`, gated by ft-coordinator. The checkpointer is an `exec:`
//! oracle owned by the test: it acknowledges each checkpoint 200 ms after the capture, and not
//! at all while a pause file exists. The guest (tests/guest/tests/e2e-gate.sh) writes its disk
//! with fio (crc32c verify, regular fsyncs) and pings the host every 0.2 s.
//!
//! What is checked (ARCHITECTURE.md section 1, invariant 1, seen from outside the daemons):
//! - with acknowledgements paused, the image file does not change and no frame appears on the
//!   tap for seconds while the guest is busy; once they resume, both move again;
//! - the coordinator killed mid-run: output stays held, the guest stalls (its flushes wait) but
//!   lives; a restarted coordinator (same state file, next generation) releases it;
//! - after the run, fio's verify pass in the guest succeeds and the host finds every block fio
//!   wrote in the image (and nothing beyond).
//!
//! Everything runs in a network namespace of its own (the tap and its address stay private).
//! Frames "on the tap" are watched twice: the tap's RX counter in `/proc/thread-self/net/dev`
//! (every frame the daemon writes to the tap) and a packet socket bound to the tap (what a
//! host-side observer such as tcpdump would capture).

use std::collections::hash_map::DefaultHasher;
use std::ffi::{OsStr, OsString};
use std::hash::Hasher;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ft_tests::guest::image::workspace_binary;
use ft_tests::guest::{
    nonzero_blocks, Backend, BackendCommand, Guest, GuestConfig, GuestImage, GuestResult,
    ScratchDir,
};
use ft_tests::netns::in_netns;

const DISK_SIZE: u64 = 64 << 20;
/// fio's area with the gated disk (slow: every write waits ~250 ms for its commit).
const FIO_SIZE: u64 = 32 << 20;
/// fio's area with the ungated disk, written at [`UNGATED_RATE`]: the write pass lasts ~15 s,
/// well past the pause window, however fast the machine.
const FIO_SIZE_UNGATED: u64 = 60 << 20;
const UNGATED_RATE: &str = "4m";
const BLOCK: usize = 4096;
const TAP: &str = "fte2e0";
const HOST_IP: &str = "10.98.0.1";
const GUEST_IP: &str = "10.98.0.2/24";
/// How long output must stay frozen while nothing is acknowledged.
const FROZEN_FOR: Duration = Duration::from_secs(3);
/// Time for checkpoints that were already past the pause check to finish committing.
const SETTLE: Duration = Duration::from_millis(1500);

/// One guest at a time: each is a busy TCG thread on a small shared machine.
static SERIAL: Mutex<()> = Mutex::new(());

/// A workspace binary next to this test's own (target/<profile>/), built if missing.
fn binary(package: &str, name: &str) -> PathBuf {
    workspace_binary(package, name).unwrap_or_else(|e| panic!("{name} binary: {e}"))
}

fn os_args(args: &[&OsStr]) -> Vec<OsString> {
    args.iter().map(|a| a.to_os_string()).collect()
}

/// Frames the daemon has written to the tap (the tap's RX counter in this thread's netns).
fn tap_frames() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").expect("read net/dev");
    text.lines()
        .find_map(|l| {
            let (name, rest) = l.split_once(':')?;
            (name.trim() == TAP).then(|| rest.split_whitespace().nth(1)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("{TAP} not in net/dev:\n{text}"))
}

fn image_hash(path: &Path) -> u64 {
    let mut file = std::fs::File::open(path).expect("open image");
    let mut buf = vec![0u8; 1 << 20];
    let mut h = DefaultHasher::new();
    loop {
        let n = file.read(&mut buf).expect("read image");
        if n == 0 {
            return h.finish();
        }
        h.write(&buf[..n]);
    }
}

/// Waits until `f` holds, polling; false after `timeout`.
fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// A packet socket on the tap: counts the frames the daemon writes into it (what a host-side
/// observer sees), independently of the interface counters.
struct Capture {
    frames: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Capture {
    /// Must be called on a thread in the tap's network namespace (the socket is bound there).
    fn start(tap: &str) -> Capture {
        let name = std::ffi::CString::new(tap).expect("tap name");
        // SAFETY: plain libc calls on a fresh fd we own; sockaddr_ll is zero-initialised.
        let fd = unsafe {
            let ifindex = libc::if_nametoindex(name.as_ptr());
            assert_ne!(
                ifindex,
                0,
                "if_nametoindex({tap}): {}",
                io::Error::last_os_error()
            );
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                proto.into(),
            );
            assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = ifindex as i32;
            let r = libc::bind(
                fd,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            );
            assert_eq!(r, 0, "bind packet socket: {}", io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            fd
        };
        let frames = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, st) = (frames.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::Relaxed) {
                // SAFETY: recvfrom into our buffer; addr is a plain out-parameter.
                let (n, kind) = unsafe {
                    let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                    let n = libc::recvfrom(
                        fd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        &mut addr as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                        &mut len,
                    );
                    (n, addr.sll_pkttype)
                };
                // Frames the host sends towards the guest are PACKET_OUTGOING: not guest output.
                if n > 0 && kind != libc::PACKET_OUTGOING {
                    f.fetch_add(1, Ordering::Relaxed);
                }
            }
            // SAFETY: our fd, closed once.
            unsafe { libc::close(fd) };
        });
        Capture {
            frames,
            stop,
            thread: Some(thread),
        }
    }

    fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Output {
    image: u64,
    /// The tap's RX counter.
    frames: u64,
    /// Guest frames seen by the packet socket.
    captured: u64,
}

/// Both daemons, the coordinator with the oracle checkpointer, and the paths they use.
struct Rig {
    scratch: ScratchDir,
    disk: PathBuf,
    pause: PathBuf,
    blk: Backend,
    net: Backend,
    coordinator: Option<Backend>,
    capture: Capture,
    blk_gated: bool,
    fio_size: u64,
}

impl Rig {
    /// `blk_gated: false` runs the block daemon with `--ft off` (the negative control).
    fn start(name: &str, blk_gated: bool) -> Rig {
        let scratch = ScratchDir::new(name).expect("scratch dir");
        let disk = scratch.raw_image("disk.raw", DISK_SIZE).expect("image");
        let pause = scratch.join("pause");
        let blk = Backend::start(
            &BackendCommand::new(
                binary("vhost-user-blk-ft", "vhost-user-blk-ft"),
                {
                    let mut args = os_args(&[
                        "--socket".as_ref(),
                        scratch.join("blk.sock").as_os_str(),
                        "--image".as_ref(),
                        disk.as_os_str(),
                    ]);
                    if blk_gated {
                        args.extend(os_args(&[
                            "--ft".as_ref(),
                            "hold".as_ref(),
                            "--control".as_ref(),
                            scratch.join("blk.ctl").as_os_str(),
                        ]));
                    }
                    args
                },
                scratch.join("blk.sock"),
            ),
            &scratch.join("blk.log"),
            Duration::from_secs(10),
        )
        .expect("start vhost-user-blk-ft");
        let net = Backend::start(
            &BackendCommand::new(
                binary("vhost-user-net-ft", "vhost-user-net-ft"),
                os_args(&[
                    "--socket".as_ref(),
                    scratch.join("net.sock").as_os_str(),
                    "--tap".as_ref(),
                    TAP.as_ref(),
                    "--ip".as_ref(),
                    format!("{HOST_IP}/24").as_ref(),
                    "--ft".as_ref(),
                    "hold".as_ref(),
                    "--control".as_ref(),
                    scratch.join("net.ctl").as_os_str(),
                ]),
                scratch.join("net.sock"),
            ),
            &scratch.join("net.log"),
            Duration::from_secs(10),
        )
        .expect("start vhost-user-net-ft");
        let mut rig = Rig {
            scratch,
            disk,
            pause,
            blk,
            net,
            coordinator: None,
            capture: Capture::start(TAP),
            blk_gated,
            fio_size: if blk_gated {
                FIO_SIZE
            } else {
                FIO_SIZE_UNGATED
            },
        };
        rig.start_coordinator();
        rig
    }

    /// ft-coordinator over both control sockets; the checkpointer prints `captured` at once
    /// (the VM runs on) and acknowledges 200 ms later, or once the pause file is gone.
    fn start_coordinator(&mut self) {
        let s = &self.scratch;
        let oracle = format!(
            "exec:echo captured; while [ -e {} ]; do sleep 0.1; done; sleep 0.2",
            self.pause.display()
        );
        let mut args: Vec<OsString> = Vec::new();
        if self.blk_gated {
            args.push("--device".into());
            args.push(format!("blk={}", s.join("blk.ctl").display()).into());
        }
        args.extend::<[OsString; 14]>([
            "--device".into(),
            format!("net={}", s.join("net.ctl").display()).into(),
            "--checkpointer".into(),
            oracle.into(),
            "--interval-ms".into(),
            "50".into(),
            "--min-interval-ms".into(),
            "20".into(),
            "--checkpoint-timeout-ms".into(),
            "120000".into(),
            "--state-file".into(),
            s.join("coordinator.state").into(),
            "--api".into(),
            s.join("api.sock").into(),
        ]);
        let c = Backend::start(
            &BackendCommand::new(
                binary("ft-common", "ft-coordinator"),
                args,
                s.join("api.sock"),
            ),
            &s.join("coordinator.log"),
            Duration::from_secs(10),
        )
        .expect("start ft-coordinator");
        self.coordinator = Some(c);
    }

    /// `ftctl status` as JSON.
    fn status(&self) -> serde_json::Value {
        let out = Command::new(binary("ft-common", "ftctl"))
            .arg("--api")
            .arg(self.scratch.join("api.sock"))
            .arg("status")
            .output()
            .expect("ftctl");
        assert!(out.status.success(), "ftctl status: {out:?}");
        serde_json::from_slice(&out.stdout).expect("ftctl status prints JSON")
    }

    fn output(&self) -> Output {
        Output {
            image: image_hash(&self.disk),
            frames: tap_frames(),
            captured: self.capture.frames(),
        }
    }

    fn guest(&self, image: &GuestImage) -> Guest {
        let mut config = GuestConfig::new(image, "e2e-gate", self.scratch.path());
        config.disks.push(self.scratch.join("blk.sock"));
        config.net = Some(self.scratch.join("net.sock"));
        config.timeout = Duration::from_secs(240);
        config.cmdline_extra = vec![
            format!("ft.size={}M", self.fio_size >> 20),
            format!("ft.ip={GUEST_IP}"),
            format!("ft.peer={HOST_IP}"),
        ];
        if !self.blk_gated {
            config.cmdline_extra.push(format!("ft.rate={UNGATED_RATE}"));
        }
        Guest::start(&config).expect("start QEMU")
    }

    /// Waits until the guest's writes and pings are flowing out (output commits happen).
    fn wait_flowing(&self, guest: &Guest) {
        assert!(guest.wait_for_stage("busy"), "guest never got busy");
        let before = self.output();
        assert!(
            eventually(Duration::from_secs(30), || {
                let now = self.output();
                now.image != before.image
                    && now.frames > before.frames
                    && now.captured > before.captured
            }),
            "no output reached the image and the tap while acknowledgements flow"
        );
    }

    /// Asserts that for [`FROZEN_FOR`] neither the image nor the tap changes, and that the
    /// guest and both daemons stay alive meanwhile.
    fn assert_frozen(&mut self, guest: &Guest, what: &str) -> Output {
        std::thread::sleep(SETTLE);
        let first = self.output();
        std::thread::sleep(FROZEN_FOR);
        let second = self.output();
        if self.blk_gated {
            assert_eq!(
                first.image, second.image,
                "{what}: the image changed while no checkpoint was acknowledged"
            );
        } else {
            // Negative control: an ungated disk keeps changing, so the check above can fail.
            assert_ne!(
                first.image, second.image,
                "{what}: an ungated disk did not change while the guest was writing"
            );
        }
        assert_eq!(
            first.frames, second.frames,
            "{what}: frames reached the tap while no checkpoint was acknowledged"
        );
        assert_eq!(
            first.captured, second.captured,
            "{what}: the packet socket on the tap saw guest frames while nothing was acknowledged"
        );
        let pid = guest.pid().expect("QEMU pid");
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "{what}: QEMU died"
        );
        assert!(self.blk.is_running(), "{what}: vhost-user-blk-ft died");
        assert!(self.net.is_running(), "{what}: vhost-user-net-ft died");
        second
    }

    fn assert_released(&self, frozen: &Output, what: &str) {
        assert!(
            eventually(Duration::from_secs(30), || {
                let now = self.output();
                // An ungated disk never held anything (its writes may even be over by now).
                (now.image != frozen.image || !self.blk_gated)
                    && now.frames > frozen.frames
                    && now.captured > frozen.captured
            }),
            "{what}: held output was not released after acknowledgements resumed"
        );
    }

    /// Guest verdict, then the host-side check of the image.
    fn finish(mut self, guest: Guest, started: Instant) {
        let outcome = guest.wait().expect("run guest");
        println!(
            "guest: {:?}; busy at {:?}, write pass {:?}, verify pass {:?}; test {:.1} s",
            outcome.result,
            outcome.stage("busy"),
            outcome.between("busy", "write-done"),
            outcome.between("write-done", "verify-done"),
            started.elapsed().as_secs_f64()
        );
        let status = self.status();
        let cycle = &status["cycle"];
        println!(
            "coordinator: generation {}, epochs sealed {}, committed {}, seal to commit p50 {} us",
            cycle["generation"],
            cycle["epochs_sealed"],
            cycle["epochs_committed"],
            status["latency"]["seal_to_commit"]["p50_us"]
        );
        assert!(
            cycle["epochs_committed"].as_u64().unwrap_or(0) > 0,
            "nothing committed: {status:#}"
        );
        assert_eq!(outcome.result, GuestResult::Pass, "{}", outcome.report(60));
        assert!(
            outcome.stage("verify-done").is_some(),
            "{}",
            outcome.report(60)
        );
        // Final commits happened before the guest could finish: stop everything, then read.
        drop(self.coordinator.take());
        let (inside, outside) = nonzero_blocks(&self.disk, self.fio_size).expect("scan disk image");
        assert_eq!(
            inside,
            self.fio_size / BLOCK as u64,
            "blocks written by fio"
        );
        assert_eq!(outside, 0, "blocks written beyond fio's area");
    }
}

fn guest_image() -> GuestImage {
    GuestImage::ensure().unwrap_or_else(|e| panic!("guest prerequisites: {e}"))
}

/// Pausing acknowledgements freezes the image and the tap while the guest keeps writing and
/// pinging; resuming releases both; fio's data verifies in the guest and on the host.
#[test]
fn paused_acknowledgements_hold_disk_and_network_output() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let image = guest_image();
    in_netns(move || {
        let started = Instant::now();
        let mut rig = Rig::start("e2e-pause", true);
        let guest = rig.guest(&image);
        rig.wait_flowing(&guest);

        std::fs::write(&rig.pause, b"").expect("create pause file");
        let frozen = rig.assert_frozen(&guest, "acks paused");
        println!(
            "acks paused: image and tap frozen for {FROZEN_FOR:?} ({} guest frames captured before)",
            frozen.captured
        );
        std::fs::remove_file(&rig.pause).expect("remove pause file");
        rig.assert_released(&frozen, "acks resumed");
        rig.finish(guest, started);
    });
}

/// The coordinator dies mid-run: nothing leaves while it is gone, the guest waits (it is not
/// failed), and a coordinator restarted with the same state file releases everything.
#[test]
fn coordinator_death_holds_output_until_restart() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let image = guest_image();
    in_netns(move || {
        let started = Instant::now();
        let mut rig = Rig::start("e2e-kill", true);
        let guest = rig.guest(&image);
        rig.wait_flowing(&guest);

        let coordinator = rig.coordinator.take().expect("coordinator running");
        let pid = coordinator.pid().expect("coordinator pid") as libc::pid_t;
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        drop(coordinator);
        let frozen = rig.assert_frozen(&guest, "coordinator dead");
        println!(
            "coordinator killed: image and tap frozen for {FROZEN_FOR:?} ({} guest frames captured before)",
            frozen.captured
        );
        rig.start_coordinator();
        rig.assert_released(&frozen, "coordinator restarted");
        // The restarted coordinator fenced its dead predecessor: next generation.
        let status = rig.status();
        assert_eq!(status["cycle"]["generation"], 2, "{status:#}");
        rig.finish(guest, started);
    });
}

/// Negative control for the checks above: with the block daemon ungated (`--ft off`) the same
/// guest visibly changes the image while acknowledgements are paused, while the gated NIC still
/// shows no frame. So an unchanged image in the tests above is the gate's doing.
#[test]
fn ungated_disk_changes_while_acknowledgements_are_paused() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let image = guest_image();
    in_netns(move || {
        let started = Instant::now();
        let mut rig = Rig::start("e2e-ungated", false);
        let guest = rig.guest(&image);
        rig.wait_flowing(&guest);

        std::fs::write(&rig.pause, b"").expect("create pause file");
        let frozen = rig.assert_frozen(&guest, "acks paused, disk ungated");
        std::fs::remove_file(&rig.pause).expect("remove pause file");
        rig.assert_released(&frozen, "acks resumed");
        rig.finish(guest, started);
    });
}
