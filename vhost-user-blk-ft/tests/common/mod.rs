// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Setup shared by the daemon-binary tests (`hold.rs`, `protocol.rs`, `replica.rs`,
//! `failback.rs`, ...): a temporary directory
//! with a zeroed image, the `vhost-user-blk-ft` binary spawned on it and waited for until its
//! sockets exist, killed when the [`Daemon`] drops; reads of the image file behind its back and
//! the kernel's own count of fdatasyncs on it; virtio-blk chains built by hand for the raw test
//! frontend; a queue-0 session and SEAL+COMMIT for the replication tests.

#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ft_common::control::{ControlClient, Reply, Request};
use ft_common::epoch::{Epoch, Generation};
use ft_tests::frontend::{Buf, TestFrontend};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;

pub const IMG_SIZE: u64 = 16 << 20;

/// A running daemon; its files live in `_dir` and vanish with it.
pub struct Daemon {
    pub child: Option<Child>,
    pub sock: PathBuf,
    /// The control socket (only served when spawned with `control`).
    pub ctl: PathBuf,
    pub img: PathBuf,
    pub _dir: tempfile::TempDir,
    /// The daemon's pid when `child` is a wrapper (strace) around it.
    pub wrapped_pid: Option<i32>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.wrapped_pid {
            // SAFETY: our wrapper's child; killing the wrapper may leave it running.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A new temporary directory holding `disk.img`, [`IMG_SIZE`] bytes of zeroes.
pub fn new_image() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    File::create(&img)
        .and_then(|f| f.set_len(IMG_SIZE))
        .expect("create image");
    (dir, img)
}

/// Spawns the daemon with `--socket DIR/blk.sock --image IMG`, `--control DIR/ctl.sock` when
/// `control`, then whatever `args` adds; waits up to `wait` until its socket(s) exist.
pub fn spawn(
    dir: tempfile::TempDir,
    img: PathBuf,
    control: bool,
    wait: Duration,
    args: impl FnOnce(&mut Command),
) -> Daemon {
    spawn_wrapped(&[], dir, img, control, wait, args)
}

/// [`spawn`] with the daemon run as the last argument of `wrap` (e.g. strace), whose only child
/// it must be; an empty `wrap` runs it directly.
pub fn spawn_wrapped(
    wrap: &[&str],
    dir: tempfile::TempDir,
    img: PathBuf,
    control: bool,
    wait: Duration,
    args: impl FnOnce(&mut Command),
) -> Daemon {
    let sock = dir.path().join("blk.sock");
    let ctl = dir.path().join("ctl.sock");
    let bin = env!("CARGO_BIN_EXE_vhost-user-blk-ft");
    let mut cmd = match wrap.split_first() {
        Some((w, rest)) => {
            let mut c = Command::new(w);
            c.args(rest).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.arg("--socket").arg(&sock).arg("--image").arg(&img);
    if control {
        cmd.arg("--control").arg(&ctl);
    }
    args(&mut cmd);
    let child = cmd
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn daemon");
    let mut d = Daemon {
        child: Some(child),
        sock,
        ctl,
        img,
        _dir: dir,
        wrapped_pid: None,
    };
    let deadline = Instant::now() + wait;
    while !(d.sock.exists() && (!control || d.ctl.exists())) {
        if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("daemon exited early: {st}");
        }
        assert!(Instant::now() < deadline, "socket(s) never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    if !wrap.is_empty() {
        let id = d.child.as_ref().unwrap().id();
        let kids = std::fs::read_to_string(format!("/proc/{id}/task/{id}/children"))
            .expect("wrapper's children");
        d.wrapped_pid = Some(kids.trim().parse().expect("one daemon under the wrapper"));
    }
    d
}

/// [`spawn_wrapped`] under strace with one fault injection in strace's `-e inject=` syntax
/// (e.g. `io_uring_enter:delay_exit=20000`), tracing only that syscall and printing nothing.
/// Check [`have_tool`]`("strace")` first.
pub fn spawn_under_strace(
    inject: &str,
    dir: tempfile::TempDir,
    img: PathBuf,
    control: bool,
    wait: Duration,
    args: impl FnOnce(&mut Command),
) -> Daemon {
    let syscall = inject.split(':').next().expect("SYSCALL:ACTION");
    let trace = format!("trace={syscall}");
    let inject = format!("inject={inject}");
    let wrap = [
        "strace",
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        &trace,
        "-e",
        &inject,
    ];
    spawn_wrapped(&wrap, dir, img, control, wait, args)
}

/// Whether `tool` runs; see [`unavailable`] for what happens when it does not.
pub fn have_tool(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        unavailable(&format!("{tool} is missing"));
    }
    ok
}

/// `len` bytes of the image file at `offset`, read past the daemon.
pub fn file_bytes(img: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    File::open(img)
        .unwrap()
        .read_exact_at(&mut v, offset)
        .unwrap();
    v
}

/// A check this machine cannot run (no perf, no tmpfs mount, no loop device). Outside CI it
/// prints why and the caller skips the check; under `CI=true`, where `scripts/setup.sh` provides
/// everything, it fails the test, so a green CI never hides a check that did not run.
pub fn unavailable(what: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what}, but CI=true: scripts/setup.sh should have provided it");
    }
    eprintln!("{what}: skipping that check");
}

/// Counts, in the kernel, the fdatasync calls ext4 sees on `img` while `f` runs (tracepoint
/// `ext4:ext4_sync_file_enter` with `datasync == 1`, filtered by inode, via `perf stat`).
/// `f` always runs once; the count is None when perf, tracefs or ext4 is not available here.
///
/// perf starts with its events disabled (`-D -1`) and is enabled through its control fifo; its
/// `ack` is the readiness check: every fdatasync after it is counted.
pub fn kernel_fdatasyncs<R>(img: &Path, f: impl FnOnce() -> R) -> (Option<u64>, R) {
    use std::os::unix::fs::MetadataExt;
    if !Path::new("/sys/kernel/tracing/events/ext4/ext4_sync_file_enter").exists() {
        return (None, f());
    }
    let ino = std::fs::metadata(img).unwrap().ino();
    let out = img.with_extension("perf");
    let (ctl, ack) = (
        img.with_extension("perf-ctl"),
        img.with_extension("perf-ack"),
    );
    for fifo in [&ctl, &ack] {
        let _ = std::fs::remove_file(fifo);
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(
            unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
            0,
            "mkfifo {fifo:?}"
        );
    }
    let Ok(mut perf) = Command::new("perf")
        .args([
            "stat",
            "-x,",
            "-a",
            "-D",
            "-1",
            "-e",
            "ext4:ext4_sync_file_enter",
            "--filter",
        ])
        .arg(format!("ino == {ino} && datasync == 1"))
        .arg("--control")
        .arg(format!("fifo:{},{}", ctl.display(), ack.display()))
        .arg("-o")
        .arg(&out)
        .stderr(Stdio::null())
        .spawn()
    else {
        return (None, f());
    };
    if !perf_enable(&mut perf, &ctl, &ack) {
        unsafe { libc::kill(perf.id() as i32, libc::SIGKILL) };
        let _ = perf.wait();
        return (None, f());
    }
    let r = f();
    unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
    let _ = perf.wait();
    let n = std::fs::read_to_string(&out).ok().and_then(|t| {
        let line = t.lines().find(|l| l.contains("ext4_sync_file_enter"))?;
        line.split(',').next()?.trim().parse().ok()
    });
    (n, r)
}

/// Sends `enable` on perf's control fifo and waits (10 s at most) for its `ack`. False when perf
/// exited or never answered.
fn perf_enable(perf: &mut Child, ctl: &Path, ack: &Path) -> bool {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let deadline = Instant::now() + Duration::from_secs(10);
    let alive = |perf: &mut Child| perf.try_wait().ok().flatten().is_none();
    // The ack fifo opened non-blocking never waits for perf; reads give EOF until perf has it open.
    let Ok(mut ack) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(ack)
    else {
        return false;
    };
    // A non-blocking open for writing fails (ENXIO) until perf has opened its end.
    let mut ctl = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(ctl)
        {
            Ok(f) => break f,
            Err(_) if alive(perf) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(_) => return false,
        }
    };
    if ctl.write_all(b"enable\n").is_err() {
        return false;
    }
    let mut got = Vec::new();
    while Instant::now() < deadline && alive(perf) {
        let mut buf = [0u8; 16];
        match ack.read(&mut buf) {
            Ok(n) if n > 0 => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(3).any(|w| w == b"ack") {
                    return true;
                }
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    false
}

/// Places a virtio-blk request on queue `q` of the raw test frontend: a 16-byte header, the
/// optional data buffer (device-writable for IN) and a status byte preset to 0xff. Returns
/// (head, status gpa).
pub fn blk_req_on(
    f: &mut TestFrontend,
    q: usize,
    rtype: u32,
    sector: u64,
    data: Option<(u64, u32)>,
) -> (u16, u64) {
    let hdr = f.alloc(16);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&rtype.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    f.write(hdr, &h);
    let status = f.alloc(1);
    f.write(status, &[0xff]);
    let mut bufs = vec![Buf {
        gpa: hdr,
        len: 16,
        writable: false,
    }];
    if let Some((gpa, len)) = data {
        bufs.push(Buf {
            gpa,
            len,
            writable: rtype == VIRTIO_BLK_T_IN,
        });
    }
    bufs.push(Buf {
        gpa: status,
        len: 1,
        writable: true,
    });
    (f.add_chain(q, &bufs), status)
}

/// A raw frontend on `d` with queue 0 (256 entries) set up and enabled.
pub fn session(d: &Daemon) -> TestFrontend {
    let mut f = TestFrontend::connect(&d.sock, 1, Duration::from_secs(10));
    f.handshake();
    f.set_mem_table();
    f.init_queue(0, 256);
    f.setup_vring(0, 0);
    vhost::vhost_user::VhostUserFrontend::set_vring_enable(&mut f.fe, 0, true).expect("enable");
    f
}

pub fn call(c: &mut ControlClient, r: Request) -> Reply {
    c.call(&r).expect("control call")
}

/// SEAL epoch `e` (must answer SEALED), then COMMIT it under generation 1; the COMMIT's reply.
pub fn seal_commit(c: &mut ControlClient, e: u64) -> Reply {
    const G: Generation = Generation(1);
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
