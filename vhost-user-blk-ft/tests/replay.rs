//! Replay on the standby: a VM restored from a checkpoint hands a fresh daemon a fresh inflight
//! region and SET_VRING_BASE = the checkpoint's last avail index. Requests the primary had
//! taken off the ring and not completed at the checkpoint are no one's unless the daemon is
//! told which they are (the SEALED record). Driven through the real vhost-user protocol (raw
//! test frontend; the "restored" frontend is a copy of the primary's guest memory) and the
//! real control protocol.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ft_common::control::{ControlClient, Reply, Request, TransactionState};
use ft_common::epoch::{Epoch, Generation};
use ft_tests::frontend::TestFrontend;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::*;

mod common;
use common::{blk_req_on, new_image, spawn, Daemon};

const T: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(300);
const G: Generation = Generation(1);

/// Starts the daemon on `img` with its sockets in a new directory and its log in `log`.
fn daemon_on(img: &Path, control: bool, log: &Path, extra: &[&str]) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = File::create(log).expect("log file");
    spawn(dir, img.to_path_buf(), control, T, |c| {
        c.args(extra).stderr(err);
    })
}

fn control(d: &Daemon) -> ControlClient {
    ControlClient::connect(&d.ctl, T).expect("control connect")
}

fn held(c: &mut ControlClient) -> u64 {
    match c.call(&Request::Status).expect("status") {
        Reply::Status(s) => s.held_requests,
        r => panic!("{r:?}"),
    }
}

fn wait_held(c: &mut ControlClient, n: u64) {
    let deadline = Instant::now() + T;
    while held(c) != n {
        assert!(Instant::now() < deadline, "never held {n}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn seal(c: &mut ControlClient, e: u64) -> TransactionState {
    match c
        .call(&Request::Seal {
            generation: G,
            epoch: Epoch(e),
        })
        .expect("seal")
    {
        Reply::Sealed { state, .. } => state,
        r => panic!("{r:?}"),
    }
}

/// A primary in hold mode with queue 0 (256 entries) running on an inflight region.
fn primary(img: &Path, log: &Path) -> (Daemon, ControlClient, TestFrontend) {
    let d = daemon_on(img, true, log, &["--ft", "hold"]);
    let c = control(&d);
    let mut f = TestFrontend::connect(&d.sock, 1, T);
    f.handshake();
    f.set_mem_table();
    f.setup_inflight(1, 256);
    f.init_queue(0, 256);
    f.setup_vring(0, 0);
    f.fe.set_vring_enable(0, true).expect("enable");
    (d, c, f)
}

/// The restored VM's frontend on `standby`: a copy of `f`'s memory, a fresh inflight region
/// from the new daemon, queue 0 set up at `base`. Returns the frontend and SET_VRING_ENABLE's
/// result (the ring starts there).
fn restore(f: &TestFrontend, standby: &Daemon, base: u16) -> (TestFrontend, vhost::Result<()>) {
    let mut r = f.restored_copy(&standby.sock, T);
    r.handshake();
    r.set_mem_table();
    r.setup_inflight(1, 256);
    r.setup_vring(0, base);
    let started = r.fe.set_vring_enable(0, true);
    (r, started)
}

/// The primary dies.
fn kill(d: &mut Daemon) {
    if let Some(mut c) = d.child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn log_text(p: &PathBuf) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The bug of issue 13: a fresh inflight region made the daemon ignore SET_VRING_BASE and pop
/// avail[used idx..] again, so a read the primary had already completed (out of order, beside
/// a held write) was executed and put on the used ring a second time (the guest's "id N is not
/// a head"). Without a replay record, such a ring must be refused, naming both numbers.
#[test]
fn fresh_inflight_region_keeps_set_vring_base_and_refuses_unknown_outstanding() {
    let (dir, img) = new_image();
    let (plog, slog) = (
        dir.path().join("primary.log"),
        dir.path().join("standby.log"),
    );
    let (mut p, mut c, mut f) = primary(&img, &plog);
    let buf = f.alloc(4096);
    f.write(buf, &[0x5a; 4096]);
    let (w, _) = blk_req_on(&mut f, 0, VIRTIO_BLK_T_OUT, 0, Some((buf, 4096)));
    let mut reads = Vec::new();
    for i in 1..3u64 {
        let b = f.alloc(4096);
        reads.push(blk_req_on(&mut f, 0, VIRTIO_BLK_T_IN, i * 64, Some((b, 4096))).0);
    }
    f.kick(0);
    let used: Vec<u16> = f.wait_used(0, 2, T).into_iter().map(|u| u.0).collect();
    assert_eq!(used, reads, "reads complete at once, the write is held");
    wait_held(&mut c, 1);
    // The checkpoint: VM stopped (GET_VRING_BASE), SEAL, memory copied.
    let base = f.fe.get_vring_base(0).expect("get_vring_base") as u16;
    assert_eq!((base, f.used_idx(0)), (3, 2));
    let state = seal(&mut c, 1);
    assert_eq!(state.queues[0].held_heads, vec![w]);
    drop(c);
    kill(&mut p);
    let s = daemon_on(&img, false, &slog, &[]);
    let (mut r, started) = restore(&f, &s, base);
    assert!(
        r.wait_used(0, 1, QUIET).is_empty(),
        "a request was executed again (duplicate in the used ring)"
    );
    assert!(
        started.is_err(),
        "ring started without knowing the outstanding request"
    );
    let log = log_text(&slog);
    assert!(
        log.contains("SET_VRING_BASE is 3 but the used ring's idx is 2"),
        "{log}"
    );
    drop(p);
}
