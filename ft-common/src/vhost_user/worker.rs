// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One epoll-driven thread per queue group.
//!
//! The thread polls the kick eventfds of its running rings, the device's extra fds and a
//! control eventfd. The server's commands (start/stop ring, memory and call-fd updates,
//! disconnect) arrive on one channel, the device's typed messages ([`WorkerHandle`]) on
//! another; the sender writes the control eventfd and waits for the reply on a per-command
//! channel. The worker never waits for the connection thread, and the
//! connection thread holds nothing the worker needs while it waits: this is what lets
//! `stop_queue` wait for io_uring completions without deadlocking.
//!
//! With polling configured ([`QueueWorker::poll_max`]), the thread first spins on
//! [`QueueWorker::poll`] for an adaptive window (see `poll.rs`) with ring notifications
//! disabled, and sleeps in `epoll_wait` only when that finds nothing. While polling finds work
//! it skips `epoll_wait` (kicks and completions are what it polls), but still takes commands
//! at once and looks at the epoll set at least every `EPOLL_EVERY` (100 µs). A command or
//! message that arrives while it spins ends the spin at once (`Doorbell`); before, it waited
//! for the next request or the end of the window (a SEAL's record, a commit's completions).
//!
//! Kick eventfds are registered edge-triggered and never read: every write of the frontend
//! wakes `epoll_wait` once (an eventfd write is a new edge even while its counter is not
//! zero), and the ring itself says how much work there is, so resetting the counter (one
//! `read` per kick) bought nothing. The counter only grows (2^64 - 2 kicks before a write
//! would block the frontend). Everything else is level-triggered.
//!
//! Epoll data encoding: bits 56..64 are the kind (device fd, kick, control), bits 0..56 the
//! device's token or the queue index. Device tokens must therefore be below 2^56.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{QueueWorker, StopStatus};
use super::memory::{DirtyLog, GuestMem};
use super::poll::AdaptivePoll;
use super::vring::{RingSetup, VringHandle};

const KIND_SHIFT: u64 = 56;
const KIND_DEVICE: u64 = 0;
const KIND_KICK: u64 = 1;
const KIND_CONTROL: u64 = 2;
const TOKEN_MASK: u64 = (1 << KIND_SHIFT) - 1;
/// How often a pending stop is re-checked when no fd event arrives.
const STOP_POLL_MS: i32 = 5;
/// While polling keeps finding work, the epoll set (device fds other than the polled ones)
/// is still looked at this often.
const EPOLL_EVERY: Duration = Duration::from_micros(100);

/// Commands from the connection thread and other threads.
pub(crate) enum Command {
    Start {
        setup: RingSetup,
        kick: Arc<EventFd>,
        mem: Arc<GuestMem>,
    },
    /// Stop a ring; replies with its next avail index (None if it was not running).
    Stop(u16),
    SetMemory(Option<Arc<GuestMem>>),
    SetCall(u16, Option<Arc<EventFd>>),
    SetFeatures(u64),
    /// No-op answered with `Done`: once every worker answered, none is inside a guest-memory
    /// write that started before (used to unmap replaced dirty-log areas).
    Sync,
    /// Stop every ring, then `QueueWorker::reset`.
    Disconnect,
    Shutdown,
}

/// Replies to [`Command`]s.
pub(crate) enum Reply {
    Done,
    Stopped(Option<u16>),
    Started(Result<(), String>),
}

/// Error of [`WorkerHandle::call`].
#[derive(Debug, thiserror::Error)]
#[error("queue worker thread is gone")]
pub struct WorkerGone;

/// How other threads wake a worker: an eventfd in its epoll set for when it sleeps, and a
/// flag its polling loop reads for when it spins (reading the eventfd would be a syscall per
/// spin). Rung after the command or message is in its channel; the worker lowers the flag
/// before it drains the channels, so nothing sent is left behind a lowered flag.
#[derive(Debug)]
struct Doorbell {
    fd: EventFd,
    rung: AtomicBool,
}

impl Doorbell {
    fn new() -> std::io::Result<Doorbell> {
        Ok(Doorbell {
            fd: EventFd::new(EFD_NONBLOCK)?,
            rung: AtomicBool::new(false),
        })
    }

    fn ring(&self) -> std::io::Result<()> {
        self.rung.store(true, Ordering::Release);
        self.fd.write(1)
    }

    fn rung(&self) -> bool {
        self.rung.load(Ordering::Acquire)
    }

    /// A swap, not a store: the channel reads that follow must not be done before it (a plain
    /// store could be, and then lower a flag raised for a message those reads missed).
    fn lower(&self) {
        self.rung.swap(false, Ordering::AcqRel);
    }
}

/// Sends the server's commands to one worker thread. Cheap to clone.
#[derive(Clone)]
pub(crate) struct CommandHandle {
    tx: Sender<(Command, Sender<Reply>)>,
    wake: Arc<Doorbell>,
}

impl std::fmt::Debug for CommandHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandHandle").finish_non_exhaustive()
    }
}

impl CommandHandle {
    pub(crate) fn command(&self, cmd: Command) -> Result<Reply, WorkerGone> {
        let (rtx, rrx) = channel();
        self.tx.send((cmd, rtx)).map_err(|_| WorkerGone)?;
        self.wake.ring().map_err(|_| WorkerGone)?;
        rrx.recv().map_err(|_| WorkerGone)
    }
}

/// A message for worker `W` and where its reply goes.
type Envelope<W> = (<W as QueueWorker>::Msg, Sender<<W as QueueWorker>::Reply>);

/// Sends messages to one worker thread, typed by its worker `W`. Cheap to clone; usable from
/// any thread.
///
/// A message is the worker's own [`QueueWorker::Msg`] and the answer its
/// [`QueueWorker::Reply`]:
/// ```
/// # use ft_common::vhost_user::{QueueWorker, StopStatus, WorkerCtx, WorkerHandle};
/// struct Counter(u32);
/// impl QueueWorker for Counter {
///     type Msg = u32;
///     type Reply = u32;
///     fn handle_kick(&mut self, _: &mut WorkerCtx, _: u16) {}
///     fn stop_queue(&mut self, _: &mut WorkerCtx, _: u16) -> StopStatus {
///         StopStatus::Done
///     }
///     fn handle_message(&mut self, _: &mut WorkerCtx, add: u32) -> u32 {
///         self.0 += add;
///         self.0
///     }
/// }
/// fn add(h: &WorkerHandle<Counter>) -> Option<u32> {
///     h.call(2).ok()
/// }
/// ```
/// and a message of another type does not compile:
/// ```compile_fail,E0308
/// # use ft_common::vhost_user::{QueueWorker, StopStatus, WorkerCtx, WorkerHandle};
/// # struct Counter(u32);
/// # impl QueueWorker for Counter {
/// #     type Msg = u32;
/// #     type Reply = u32;
/// #     fn handle_kick(&mut self, _: &mut WorkerCtx, _: u16) {}
/// #     fn stop_queue(&mut self, _: &mut WorkerCtx, _: u16) -> StopStatus {
/// #         StopStatus::Done
/// #     }
/// #     fn handle_message(&mut self, _: &mut WorkerCtx, add: u32) -> u32 {
/// #         self.0 += add;
/// #         self.0
/// #     }
/// # }
/// fn add(h: &WorkerHandle<Counter>) {
///     let _ = h.call("two");
/// }
/// ```
pub struct WorkerHandle<W: QueueWorker> {
    tx: Sender<Envelope<W>>,
    wake: Arc<Doorbell>,
}

impl<W: QueueWorker> Clone for WorkerHandle<W> {
    fn clone(&self) -> Self {
        WorkerHandle {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
        }
    }
}

impl<W: QueueWorker> std::fmt::Debug for WorkerHandle<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerHandle").finish_non_exhaustive()
    }
}

impl<W: QueueWorker> WorkerHandle<W> {
    /// Run [`QueueWorker::handle_message`] on the worker thread and return its reply.
    /// Blocks until the worker gets to it (after its current event). Never call it from the
    /// worker's own thread (it would wait for itself); calls to several workers are not atomic
    /// together: a device needing a cross-queue atomic step (SEAL) shares state under its own
    /// lock and uses `call` only to make workers act on it.
    pub fn call(&self, msg: W::Msg) -> Result<W::Reply, WorkerGone> {
        self.ask(msg)?.wait()
    }

    /// [`WorkerHandle::call`] in two halves: sends `msg` now, and [`Asked::wait`] returns the
    /// reply. Asking every worker first and then waiting for each costs one round of wakeups,
    /// where `call` in a loop costs one per worker (a SEAL asks every queue for its record).
    pub fn ask(&self, msg: W::Msg) -> Result<Asked<W::Reply>, WorkerGone> {
        let (rtx, rrx) = channel();
        self.tx.send((msg, rtx)).map_err(|_| WorkerGone)?;
        self.wake.ring().map_err(|_| WorkerGone)?;
        Ok(Asked(rrx))
    }

    /// Queue `msg` for [`QueueWorker::handle_message`] on the worker thread without waiting:
    /// its reply is dropped. Messages (posted or called) are handled in the order sent, so a
    /// later [`WorkerHandle::call`] returns only after every earlier post was handled:
    /// ```
    /// # use ft_common::vhost_user::{QueueWorker, StopStatus, WorkerCtx, WorkerHandle};
    /// # struct Counter(u32);
    /// # impl QueueWorker for Counter {
    /// #     type Msg = u32;
    /// #     type Reply = u32;
    /// #     fn handle_kick(&mut self, _: &mut WorkerCtx, _: u16) {}
    /// #     fn stop_queue(&mut self, _: &mut WorkerCtx, _: u16) -> StopStatus {
    /// #         StopStatus::Done
    /// #     }
    /// #     fn handle_message(&mut self, _: &mut WorkerCtx, add: u32) -> u32 {
    /// #         self.0 += add;
    /// #         self.0
    /// #     }
    /// # }
    /// fn add_then_read(h: &WorkerHandle<Counter>) -> Option<u32> {
    ///     h.post(2).ok()?;
    ///     h.call(0).ok() // includes the 2
    /// }
    /// ```
    pub fn post(&self, msg: W::Msg) -> Result<(), WorkerGone> {
        // The reply's receiver is dropped with the `Asked`: the worker's answer goes nowhere.
        self.ask(msg).map(drop)
    }
}

/// A message sent with [`WorkerHandle::ask`] whose reply is still to come.
#[derive(Debug)]
pub struct Asked<R>(Receiver<R>);

impl<R> Asked<R> {
    /// Waits for the worker's reply.
    pub fn wait(self) -> Result<R, WorkerGone> {
        self.0.recv().map_err(|_| WorkerGone)
    }
}

/// Where a ring stands (see [`WorkerCtx::ring_position`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingPosition {
    /// Next avail index: while stopped, what GET_VRING_BASE returned.
    pub next_avail: u16,
    /// The used ring's idx as the daemon last wrote it.
    pub used_idx: u16,
    /// Whether the ring runs now (else: as of its stop).
    pub running: bool,
}

/// What a [`QueueWorker`] may touch: the group's running rings, memory, dirty log, fds.
pub struct WorkerCtx {
    rings: HashMap<u16, VringHandle>,
    /// Position of each ring of this connection at its stop (removed when it runs again).
    stopped: HashMap<u16, RingPosition>,
    kicks: HashMap<u16, Arc<EventFd>>,
    features: u64,
    mem: Option<Arc<GuestMem>>,
    log: Arc<DirtyLog>,
    epoll: Epoll,
    /// The worker is busy-polling: ring notifications are disabled and must stay so.
    polling: bool,
}

impl std::fmt::Debug for WorkerCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerCtx")
            .field("rings", &self.rings.keys().collect::<Vec<_>>())
            .field("features", &self.features)
            .finish()
    }
}

impl WorkerCtx {
    /// The running ring `queue`, if it belongs to this group and runs (or is stopping).
    pub fn queue(&mut self, queue: u16) -> Option<&mut VringHandle> {
        self.rings.get_mut(&queue)
    }

    /// Where ring `queue` stands: live while it runs (or is stopping), as of its stop while
    /// stopped (so the device can report GET_VRING_BASE's value while the VM is paused); None
    /// if it has not run on this connection.
    pub fn ring_position(&self, queue: u16) -> Option<RingPosition> {
        match self.rings.get(&queue) {
            Some(r) => Some(RingPosition {
                next_avail: r.next_avail(),
                used_idx: r.next_used(),
                running: true,
            }),
            None => self.stopped.get(&queue).copied(),
        }
    }

    /// Indices of the rings currently running (or stopping) in this group.
    pub fn running_queues(&self) -> Vec<u16> {
        let mut v: Vec<u16> = self.rings.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Features the frontend acknowledged (0 before SET_FEATURES).
    pub fn acked_features(&self) -> u64 {
        self.features
    }

    /// Whether the worker is busy-polling (see [`QueueWorker::poll`]): ring notifications
    /// are disabled and a batch must not re-enable them.
    pub fn polling(&self) -> bool {
        self.polling
    }

    /// Current guest memory, None between connections.
    pub fn memory(&self) -> Option<&Arc<GuestMem>> {
        self.mem.as_ref()
    }

    /// Mark the guest-physical range dirty (for writes that bypass vm-memory, e.g. io_uring
    /// reads into guest buffers). No-op unless the frontend enabled logging.
    pub fn mark_dirty(&self, gpa: u64, len: u64) {
        self.log.mark(gpa, len);
    }

    /// Start polling `fd` for `events` (an `EPOLLIN`-style mask), reporting `token`
    /// (< 2^56) to `handle_fd`; modifies the registration if `fd` is already polled.
    pub fn watch_fd(&self, fd: RawFd, token: u64, events: u32) -> std::io::Result<()> {
        let ev = EpollEvent::new(
            EventSet::from_bits_truncate(events),
            (KIND_DEVICE << KIND_SHIFT) | (token & TOKEN_MASK),
        );
        match self.epoll.ctl(ControlOperation::Add, fd, ev) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                self.epoll.ctl(ControlOperation::Modify, fd, ev)
            }
            r => r,
        }
    }

    /// Stop polling `fd`.
    pub fn unwatch_fd(&self, fd: RawFd) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// Signal every running ring that has new used entries (once per batch).
    pub fn signal_all(&mut self) {
        for r in self.rings.values_mut() {
            r.signal_used();
        }
    }
}

/// A pending stop: the ring index and who waits for it.
struct Stopping {
    queue: u16,
    reply: Option<Sender<Reply>>,
}

struct Worker<W: QueueWorker> {
    group: usize,
    dev: W,
    ctx: WorkerCtx,
    rx: Receiver<(Command, Sender<Reply>)>,
    msgs: Receiver<Envelope<W>>,
    wake: Arc<Doorbell>,
    stopping: Vec<Stopping>,
    /// Disconnect waiting for all stops to finish.
    disconnecting: Option<Sender<Reply>>,
    poll: AdaptivePoll,
    /// Scratch list of rings with avail entries when polling ends.
    ready: Vec<u16>,
}

/// Spawn the worker thread for `group`: the server's command handle, the device's message
/// handle, and the thread.
pub(crate) fn spawn<W: QueueWorker>(
    group: usize,
    dev: W,
    log: Arc<DirtyLog>,
) -> std::io::Result<(CommandHandle, WorkerHandle<W>, JoinHandle<()>)> {
    let epoll = Epoll::new()?;
    let wake = Arc::new(Doorbell::new()?);
    epoll.ctl(
        ControlOperation::Add,
        wake.fd.as_raw_fd(),
        EpollEvent::new(EventSet::IN, KIND_CONTROL << KIND_SHIFT),
    )?;
    let ctx = WorkerCtx {
        rings: HashMap::new(),
        stopped: HashMap::new(),
        kicks: HashMap::new(),
        features: 0,
        mem: None,
        log,
        epoll,
        polling: false,
    };
    for (fd, token) in dev.fds() {
        ctx.watch_fd(fd, token, EventSet::IN.bits())?;
    }
    let (tx, rx) = channel();
    let handle = CommandHandle {
        tx,
        wake: wake.clone(),
    };
    let (mtx, msgs) = channel();
    let messages = WorkerHandle {
        tx: mtx,
        wake: wake.clone(),
    };
    let poll = AdaptivePoll::new(dev.poll_max()).with_cpu_guard(dev.poll_cpu_guard());
    let mut w = Worker {
        group,
        poll,
        dev,
        ctx,
        rx,
        msgs,
        wake,
        stopping: Vec::new(),
        disconnecting: None,
        ready: Vec::new(),
    };
    let jh = std::thread::Builder::new()
        .name(format!("vu-worker-{group}"))
        .spawn(move || w.run())?;
    Ok((handle, messages, jh))
}

impl<W: QueueWorker> Worker<W> {
    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        let mut last_epoll = Instant::now();
        loop {
            let start = Instant::now();
            let polled = self.poll_for_work(start);
            if let Some(waited) = polled.filter(|_| last_epoll.elapsed() < EPOLL_EVERY) {
                self.poll.record(waited);
                // Polling did the work; commands are the only other input that cannot wait.
                if !self.drain_commands() {
                    return;
                }
                continue;
            }
            // While a stop is pending, re-ask the device every few ms even without events.
            let timeout = if polled.is_some() {
                0
            } else if self.stopping.is_empty() {
                -1
            } else {
                STOP_POLL_MS
            };
            let n = match self.ctx.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("worker {}: epoll_wait: {e}", self.group);
                    return;
                }
            };
            last_epoll = Instant::now();
            self.poll.record(polled.unwrap_or(last_epoll - start));
            for ev in &events[..n] {
                let data = ev.data();
                let token = data & TOKEN_MASK;
                match data >> KIND_SHIFT {
                    KIND_CONTROL => {
                        let _ = self.wake.fd.read();
                        if !self.drain_commands() {
                            return;
                        }
                    }
                    KIND_KICK => self.kick(token as u16),
                    _ => self.dev.handle_fd(&mut self.ctx, token, ev.events()),
                }
            }
            self.poll_stopping();
        }
    }

    /// Spins on [`QueueWorker::poll`] for the adaptive window, with ring notifications
    /// disabled. Returns how long it waited for work (from `start`) if it found and did some,
    /// None if the thread should sleep. Leaves polling mode (re-enabling notifications and
    /// looking once more) when the window is over or zero.
    fn poll_for_work(&mut self, start: Instant) -> Option<Duration> {
        let window = self.poll.window();
        if window.is_zero() || !self.stopping.is_empty() || self.ctx.rings.is_empty() {
            return self.stop_polling(start);
        }
        if !self.ctx.polling {
            self.ctx.polling = true;
            for r in self.ctx.rings.values_mut() {
                r.disable_notification();
            }
        }
        loop {
            let now = Instant::now();
            // Mail counts as work found: the caller drains the commands and messages.
            if self.dev.poll(&mut self.ctx) || self.wake.rung() {
                return Some(now - start);
            }
            if now - start >= window {
                return self.stop_polling(start);
            }
            std::hint::spin_loop();
        }
    }

    fn stop_polling(&mut self, start: Instant) -> Option<Duration> {
        if !self.ctx.polling {
            return None;
        }
        self.ctx.polling = false;
        self.ready.clear();
        for (q, r) in self.ctx.rings.iter_mut() {
            if r.enable_notification() {
                self.ready.push(*q);
            }
        }
        // A request made available between the last look and re-enabling raised no kick:
        // look once more.
        let now = Instant::now();
        if self.stopping.is_empty() {
            return self.dev.poll(&mut self.ctx).then(|| now - start);
        }
        // A ring being stopped must not be popped again (its base is about to be reported);
        // the others get the look a kick would give them.
        for i in 0..self.ready.len() {
            let q = self.ready[i];
            if self.stopping.iter().all(|s| s.queue != q) {
                self.dev.handle_kick(&mut self.ctx, q);
            }
        }
        None
    }

    fn kick(&mut self, q: u16) {
        // Edge-triggered, so not read: a kick arriving during processing wakes us again.
        if self.ctx.kicks.contains_key(&q)
            && self.stopping.iter().all(|s| s.queue != q)
            && self.ctx.rings.contains_key(&q)
        {
            self.dev.handle_kick(&mut self.ctx, q);
        }
    }

    /// Returns false on shutdown.
    fn drain_commands(&mut self) -> bool {
        self.wake.lower();
        while let Ok((cmd, reply)) = self.rx.try_recv() {
            match cmd {
                Command::Start { setup, kick, mem } => {
                    let q = setup.index;
                    self.ctx.mem = Some(mem.clone());
                    let res = VringHandle::start(setup, mem, self.ctx.log.clone()).and_then(|r| {
                        self.ctx
                            .epoll
                            .ctl(
                                ControlOperation::Add,
                                kick.as_raw_fd(),
                                // Edge-triggered: see the module docs.
                                EpollEvent::new(
                                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                                    (KIND_KICK << KIND_SHIFT) | u64::from(q),
                                ),
                            )
                            .map_err(|e| format!("queue {q}: epoll add kick: {e}"))?;
                        Ok(r)
                    });
                    match res {
                        Ok(ring) => {
                            self.ctx.stopped.remove(&q);
                            self.ctx.rings.insert(q, ring);
                            self.ctx.kicks.insert(q, kick);
                            let _ = reply.send(Reply::Started(Ok(())));
                            self.dev.queue_started(&mut self.ctx, q);
                        }
                        Err(e) => {
                            let _ = reply.send(Reply::Started(Err(e)));
                        }
                    }
                }
                Command::Stop(q) => {
                    if self.ctx.rings.contains_key(&q) {
                        self.begin_stop(q, Some(reply));
                    } else {
                        let _ = reply.send(Reply::Stopped(None));
                    }
                }
                Command::SetMemory(mem) => {
                    if let Some(m) = &mem {
                        for r in self.ctx.rings.values_mut() {
                            r.set_memory(m.clone());
                        }
                    }
                    self.ctx.mem = mem;
                    let _ = reply.send(Reply::Done);
                }
                Command::SetCall(q, call) => {
                    if let Some(r) = self.ctx.rings.get_mut(&q) {
                        r.set_call(call);
                    }
                    let _ = reply.send(Reply::Done);
                }
                Command::SetFeatures(f) => {
                    self.ctx.features = f;
                    let _ = reply.send(Reply::Done);
                }
                Command::Sync => {
                    let _ = reply.send(Reply::Done);
                }
                Command::Disconnect => {
                    let running = self.ctx.running_queues();
                    for q in running {
                        if self.stopping.iter().all(|s| s.queue != q) {
                            self.begin_stop(q, None);
                        }
                    }
                    self.disconnecting = Some(reply);
                }
                Command::Shutdown => {
                    for q in self.ctx.running_queues() {
                        self.begin_stop(q, None);
                    }
                    // Keep polling until the device has resolved its in-flight work.
                    while !self.stopping.is_empty() {
                        let mut events = vec![EpollEvent::default(); 16];
                        let n = self.ctx.epoll.wait(STOP_POLL_MS, &mut events).unwrap_or(0);
                        for ev in &events[..n] {
                            if ev.data() >> KIND_SHIFT == KIND_DEVICE {
                                self.dev.handle_fd(
                                    &mut self.ctx,
                                    ev.data() & TOKEN_MASK,
                                    ev.events(),
                                );
                            }
                        }
                        self.poll_stopping();
                    }
                    self.dev.reset(&mut self.ctx);
                    let _ = reply.send(Reply::Done);
                    return false;
                }
            }
        }
        // Messages from other threads (control thread) share the wakeup eventfd.
        while let Ok((msg, reply)) = self.msgs.try_recv() {
            let r = self.dev.handle_message(&mut self.ctx, msg);
            let _ = reply.send(r);
        }
        self.poll_stopping();
        true
    }

    fn begin_stop(&mut self, q: u16, reply: Option<Sender<Reply>>) {
        if let Some(k) = self.ctx.kicks.remove(&q) {
            if let Err(e) = self.ctx.epoll.ctl(
                ControlOperation::Delete,
                k.as_raw_fd(),
                EpollEvent::default(),
            ) {
                warn!("worker {}: epoll del kick {q}: {e}", self.group);
            }
        }
        self.stopping.push(Stopping { queue: q, reply });
    }

    /// Ask the device again about every stopping ring; finish the ones that are quiescent.
    fn poll_stopping(&mut self) {
        let mut i = 0;
        while i < self.stopping.len() {
            let q = self.stopping[i].queue;
            if self.dev.stop_queue(&mut self.ctx, q) == StopStatus::Done {
                let s = self.stopping.swap_remove(i);
                let ring = self.ctx.rings.remove(&q);
                if let Some(mut r) = ring {
                    r.signal_used();
                    self.ctx.stopped.insert(
                        q,
                        RingPosition {
                            next_avail: r.next_avail(),
                            used_idx: r.next_used(),
                            running: false,
                        },
                    );
                    if let Some(reply) = s.reply {
                        let _ = reply.send(Reply::Stopped(Some(r.next_avail())));
                    }
                } else if let Some(reply) = s.reply {
                    let _ = reply.send(Reply::Stopped(None));
                }
            } else {
                i += 1;
            }
        }
        if self.stopping.is_empty() {
            if let Some(reply) = self.disconnecting.take() {
                self.dev.reset(&mut self.ctx);
                self.ctx.mem = None;
                self.ctx.stopped.clear();
                let _ = reply.send(Reply::Done);
            }
        }
    }
}
