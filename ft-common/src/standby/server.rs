// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The standby process: accepts control connections from checkpointers and migration streams
//! from QEMU on one address, writes each stream into the store and publishes it when the
//! checkpointer says the migration completed (see `protocol` for the conversation).
//!
//! Invariants:
//! - `DURABLE E` is sent only after [`Incoming::publish`] returned: the stream, the manifest
//!   and both directories are fsynced and the checkpoint is renamed into place.
//! - One checkpoint is written at a time. A new `BEGIN` preempts one in progress (its
//!   checkpointer is dead or gave up; a live one never overlaps its own captures), and the
//!   preempted one can no longer be published.
//! - A stream is accepted only while a `BEGIN` waits for one, and at most one per `BEGIN`.
//! - A generation older than the fence (`DIR/generation`), the newest published checkpoint or
//!   any generation this standby already accepted is refused, and so is an epoch that is not
//!   newer than the published one of the same generation.
//! - Anything that ends a checkpoint without `DURABLE` (cancel, error, disconnect, preemption)
//!   deletes its `.incoming-*` directory; the published checkpoint is never touched then.

use super::protocol::{CheckpointId, Conn, Listener, StandbyAddr, StandbyReply, StandbyRequest};
use super::protocol::{STREAM_MAGIC, STREAM_VERSION};
use super::store::{CheckpointStore, Incoming, PublishInfo};
use crate::control::codec::{read_message, write_message, MAX_FRAME_LEN};
use crate::epoch::Generation;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long END waits for a stream that connected but was not dispatched yet.
const STREAM_HANDOVER_GRACE: Duration = Duration::from_secs(2);

/// How the standby runs.
#[derive(Clone, Debug)]
pub struct StandbyConfig {
    pub listen: StandbyAddr,
    pub store: PathBuf,
    /// Sleep before the publish fsyncs (test hook: a slow disk). Zero in production.
    pub fsync_delay: Duration,
    /// Bound on waiting for the stream to connect and on each read of it.
    pub stream_timeout: Duration,
}

/// A running standby; dropping it stops accepting (running sessions finish on their own).
pub struct StandbyServer {
    addr: StandbyAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct ActiveCapture {
    id: u64,
    /// Taken by the first stream connection.
    stream_tx: Option<mpsc::SyncSender<Conn>>,
    /// A clone of the stream, to wake its writer on cancel.
    stream: Option<Conn>,
}

struct State {
    /// Newest generation accepted by a BEGIN.
    max_generation: Generation,
    capture: Option<ActiveCapture>,
    next_id: u64,
}

struct Shared {
    store: CheckpointStore,
    cfg: StandbyConfig,
    state: Mutex<State>,
    /// Serialises publishing (checks of the newest published against the new one, rename).
    publish: Mutex<()>,
}

impl StandbyServer {
    /// Opens (creates) the store, binds the address and starts accepting.
    pub fn start(cfg: StandbyConfig) -> io::Result<StandbyServer> {
        let store = CheckpointStore::create(&cfg.store)?;
        let listener = cfg.listen.bind()?;
        let addr = listener.local_addr()?;
        if let Some(n) = store.newest_published()? {
            log::info!(
                "store {}: newest published checkpoint generation {} epoch {}",
                store.dir().display(),
                n.0,
                n.1
            );
        }
        let shared = Arc::new(Shared {
            store,
            cfg,
            state: Mutex::new(State {
                max_generation: Generation(0),
                capture: None,
                next_id: 1,
            }),
            publish: Mutex::new(()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ft-standby-accept".into())
            .spawn(move || accept_loop(listener, shared, stop2))?;
        log::info!("standby listening on {addr}");
        Ok(StandbyServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The bound address (as a QEMU migration URI with `to_string`).
    pub fn addr(&self) -> &StandbyAddr {
        &self.addr
    }
}

impl Drop for StandbyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: Listener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        let mut p = libc::pollfd {
            fd: listener.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut p, 1, 100) } <= 0 {
            continue;
        }
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                log::warn!("standby accept: {e}");
                continue;
            }
        };
        let shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("ft-standby-conn".into())
            .spawn(move || serve(conn, &shared));
        if let Err(e) = spawned {
            log::error!("standby: cannot start a connection thread: {e}");
        }
    }
}

fn serve(mut conn: Conn, shared: &Arc<Shared>) {
    // Nothing legitimate stays silent for long before its first bytes.
    let _ = conn.set_read_timeout(Some(shared.cfg.stream_timeout));
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match conn.read(&mut head[got..]) {
            Ok(0) => return,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    if head == STREAM_MAGIC {
        hand_over_stream(conn, shared);
    } else {
        let _ = conn.set_read_timeout(None);
        Session::new(shared.clone()).run(head, conn);
    }
}

/// Gives a migration stream to the capture waiting for one, or closes it.
fn hand_over_stream(conn: Conn, shared: &Shared) {
    let mut st = match shared.state.lock() {
        Ok(s) => s,
        Err(_) => return,
    };
    let slot = st.capture.as_mut().and_then(|c| {
        let tx = c.stream_tx.take()?;
        c.stream = conn.try_clone().ok();
        Some(tx)
    });
    drop(st);
    match slot {
        Some(tx) => {
            if tx.send(conn).is_err() {
                log::warn!("standby: migration stream arrived after its checkpoint ended");
            }
        }
        None => {
            log::warn!("standby: refused a migration stream: no checkpoint announced (BEGIN)");
            conn.shutdown();
        }
    }
}

/// Copies one stream into `incoming` until EOF. The first 4 bytes (the magic) were consumed
/// by the dispatcher.
fn write_stream(
    rx: mpsc::Receiver<Conn>,
    mut incoming: Incoming,
    timeout: Duration,
) -> Result<Incoming, String> {
    let mut conn = match rx.recv_timeout(timeout) {
        Ok(c) => c,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            return Err(format!(
                "no migration stream arrived within {} ms",
                timeout.as_millis()
            ))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            return Err("cancelled before the stream arrived".into())
        }
    };
    let fail = |conn: &Conn, e: String| {
        // Close at once so QEMU's migration fails now instead of filling buffers.
        conn.shutdown();
        Err(e)
    };
    if let Err(e) = incoming.write(&STREAM_MAGIC) {
        return fail(&conn, format!("writing vmstate: {e}"));
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut version = [0u8; 4];
    let mut have = 0;
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return fail(&conn, format!("reading the migration stream: {e}")),
        };
        if have < 4 {
            let take = (4 - have).min(n);
            version[have..have + take].copy_from_slice(&buf[..take]);
            have += take;
            if have == 4 && version != STREAM_VERSION {
                return fail(
                    &conn,
                    format!(
                        "not a QEMU migration stream of version 3 (version bytes {version:02x?})"
                    ),
                );
            }
        }
        if let Err(e) = incoming.write(&buf[..n]) {
            return fail(&conn, format!("writing vmstate: {e}"));
        }
    }
    Ok(incoming)
}

struct MyCapture {
    id: u64,
    generation: Generation,
    writer: JoinHandle<Result<Incoming, String>>,
}

/// One control connection.
struct Session {
    shared: Arc<Shared>,
    capture: Option<MyCapture>,
}

impl Session {
    fn new(shared: Arc<Shared>) -> Session {
        Session {
            shared,
            capture: None,
        }
    }

    fn run(mut self, head: [u8; 4], conn: Conn) {
        let Ok(mut writer) = conn.try_clone() else {
            return;
        };
        let mut reader = io::Cursor::new(head).chain(conn);
        loop {
            let req = match read_message::<_, StandbyRequest>(&mut reader, MAX_FRAME_LEN) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    log::warn!("standby: refused a bad request: {e}");
                    let reply = StandbyReply::Refused {
                        reason: format!("bad request: {e}"),
                    };
                    let _ = write_message(&mut writer, &reply);
                    if e.is_fatal() {
                        break;
                    }
                    continue;
                }
            };
            let reply = self.handle(req);
            if let StandbyReply::Refused { reason } = &reply {
                log::warn!("standby: refused: {reason}");
            }
            if write_message(&mut writer, &reply).is_err() {
                break;
            }
        }
        if self.capture.is_some() {
            log::warn!("standby: checkpointer disconnected during a checkpoint; discarded");
            self.cancel();
        }
    }

    fn newest(&self) -> Option<CheckpointId> {
        self.shared
            .store
            .newest_published()
            .ok()
            .flatten()
            .map(|(generation, epoch)| CheckpointId { generation, epoch })
    }

    /// The oldest generation still accepted.
    fn floor(&self, st: &State) -> Result<Generation, String> {
        let fence = self
            .shared
            .store
            .fenced_generation()
            .map_err(|e| format!("reading the fence: {e}"))?;
        let newest = self.newest().map_or(Generation(0), |n| n.generation);
        Ok(fence.max(newest).max(st.max_generation))
    }

    fn handle(&mut self, req: StandbyRequest) -> StandbyReply {
        match req {
            StandbyRequest::Begin { generation } => self.begin(generation),
            StandbyRequest::End {
                generation,
                epoch,
                devices,
                mode,
                vm_paused_us,
                meta,
            } => self.end(PublishInfo {
                generation,
                epoch,
                devices,
                mode,
                vm_paused_us,
                meta,
                fsync_delay: self.shared.cfg.fsync_delay,
            }),
            StandbyRequest::Cancel { reason } => {
                log::info!("standby: checkpoint cancelled by the checkpointer: {reason}");
                let standby_error = self.cancel();
                StandbyReply::Cancelled { standby_error }
            }
            StandbyRequest::Status => {
                let busy = self
                    .shared
                    .state
                    .lock()
                    .map(|s| s.capture.is_some())
                    .unwrap_or(false);
                StandbyReply::Status {
                    newest: self.newest(),
                    fenced_generation: self
                        .shared
                        .store
                        .fenced_generation()
                        .unwrap_or(Generation(0)),
                    busy,
                }
            }
        }
    }

    fn begin(&mut self, generation: Generation) -> StandbyReply {
        if self.capture.is_some() {
            // Our checkpointer gave up on the previous one without saying so.
            self.cancel();
        }
        let Ok(mut st) = self.shared.state.lock() else {
            return refused("standby state poisoned".into());
        };
        let floor = match self.floor(&st) {
            Ok(f) => f,
            Err(e) => return refused(e),
        };
        if generation < floor {
            return refused(format!(
                "generation {generation} is older than generation {floor} this standby \
                 already serves (a deposed primary?)"
            ));
        }
        if let Some(old) = st.capture.take() {
            log::warn!("standby: a new BEGIN preempts the checkpoint in progress");
            if let Some(s) = old.stream {
                s.shutdown();
            }
        }
        let incoming = match self.shared.store.begin(generation) {
            Ok(i) => i,
            Err(e) => return refused(format!("cannot start a checkpoint in the store: {e}")),
        };
        let (tx, rx) = mpsc::sync_channel(1);
        let timeout = self.shared.cfg.stream_timeout;
        let writer = std::thread::Builder::new()
            .name("ft-standby-stream".into())
            .spawn(move || write_stream(rx, incoming, timeout));
        let writer = match writer {
            Ok(w) => w,
            Err(e) => return refused(format!("cannot start the stream writer: {e}")),
        };
        let id = st.next_id;
        st.next_id += 1;
        st.max_generation = st.max_generation.max(generation);
        st.capture = Some(ActiveCapture {
            id,
            stream_tx: Some(tx),
            stream: None,
        });
        drop(st);
        self.capture = Some(MyCapture {
            id,
            generation,
            writer,
        });
        StandbyReply::Ready {
            newest: self.newest(),
        }
    }

    /// Takes this session's capture out of the shared state (if still there). Returns whether
    /// a stream had connected, or None when the capture was preempted.
    fn detach(&self, id: u64, wake_writer: bool) -> Option<bool> {
        let mut st = self.shared.state.lock().ok()?;
        if st.capture.as_ref().map(|c| c.id) != Some(id) {
            return None;
        }
        let c = st.capture.take()?;
        if wake_writer {
            if let Some(s) = &c.stream {
                s.shutdown();
            }
        }
        // Dropping stream_tx wakes a writer still waiting for its stream.
        Some(c.stream_tx.is_none())
    }

    /// QEMU reports `completed` after its last write, but our accept thread may not have
    /// handed the connection over yet: give it a moment before calling the stream missing.
    fn wait_for_stream(&self, id: u64) {
        let deadline = std::time::Instant::now() + STREAM_HANDOVER_GRACE;
        while std::time::Instant::now() < deadline {
            let waiting = self.shared.state.lock().is_ok_and(|st| {
                st.capture
                    .as_ref()
                    .is_some_and(|c| c.id == id && c.stream_tx.is_some())
            });
            if !waiting {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn cancel(&mut self) -> Option<String> {
        let c = self.capture.take()?;
        self.detach(c.id, true);
        match c.writer.join() {
            Ok(Ok(incoming)) => {
                drop(incoming);
                None
            }
            Ok(Err(e)) => Some(e),
            Err(_) => Some("stream writer panicked".into()),
        }
    }

    fn end(&mut self, info: PublishInfo) -> StandbyReply {
        let Some(c) = self.capture.take() else {
            return refused("END without a checkpoint in progress (send BEGIN first)".into());
        };
        if info.generation != c.generation {
            let g = c.generation;
            self.capture = Some(c);
            let _ = self.cancel();
            return refused(format!(
                "END for generation {} but BEGIN was for generation {g}",
                info.generation
            ));
        }
        self.wait_for_stream(c.id);
        match self.detach(c.id, false) {
            None => {
                let _ = c.writer.join();
                return refused("preempted by a newer BEGIN".into());
            }
            Some(false) => {
                // No stream ever came: the writer is waiting for one; detach woke it.
                let _ = c.writer.join();
                return refused("END but no migration stream arrived".into());
            }
            Some(true) => {}
        }
        let incoming = match c.writer.join() {
            Ok(Ok(i)) => i,
            Ok(Err(e)) => return refused(e),
            Err(_) => return refused("stream writer panicked".into()),
        };
        if incoming.len() < 8 {
            return refused(format!(
                "the migration stream has only {} bytes",
                incoming.len()
            ));
        }
        let Ok(_guard) = self.shared.publish.lock() else {
            return refused("standby publish lock poisoned".into());
        };
        let fence = self
            .shared
            .store
            .fenced_generation()
            .unwrap_or(Generation(0));
        if info.generation < fence {
            return refused(format!(
                "generation {} is fenced (store fence is {fence})",
                info.generation
            ));
        }
        if let Some(n) = self.newest() {
            if (info.generation, info.epoch) <= (n.generation, n.epoch) {
                return refused(format!(
                    "checkpoint generation {} epoch {} is not newer than the published \
                     generation {} epoch {}",
                    info.generation, info.epoch, n.generation, n.epoch
                ));
            }
        }
        let (generation, epoch) = (info.generation, info.epoch);
        match incoming.publish(info) {
            Ok((p, t)) => {
                log::info!(
                    "published checkpoint generation {generation} epoch {epoch}: {} bytes, \
                     fsync {} us",
                    p.manifest.vmstate_len,
                    t.fsync.as_micros()
                );
                StandbyReply::Durable {
                    generation,
                    epoch,
                    vmstate_len: p.manifest.vmstate_len,
                    vmstate_crc32c: p.manifest.vmstate_crc32c,
                    fsync_us: t.fsync.as_micros() as u64,
                }
            }
            Err(e) => refused(format!("publishing checkpoint {epoch}: {e}")),
        }
    }
}

fn refused(reason: String) -> StandbyReply {
    StandbyReply::Refused { reason }
}
