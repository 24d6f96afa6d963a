// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Holding the primary's key: acquire it under a lease, keep the lease alive (and derive the
//! commit deadline from each answered keepalive), write the VM's generation under it, revoke it.
//!
//! The deadline rule: a keepalive sent at local time `s` and answered with TTL `t` renews the
//! lease on the etcd leader at some instant after `s`, to expire no sooner than `t` later on
//! the leader's clock. So until `s + t` (less the clock-rate error) no one else can acquire the
//! key, and a commit that *starts* by `s + t - margin` and takes less than `margin` ends before
//! that. Keepalive answers are matched to the earliest request still unanswered, which can only
//! make a deadline earlier (safe) than the true one.
//!
//! Every etcd operation here may be repeated by [`Etcd::call`] when its member was unreachable
//! (an etcd cluster with a member down), so each one is safe to repeat: acquiring finds the key
//! under its own lease, the generation's compare-and-swap fails and is read again, a revoked
//! lease is gone either way, and a repeated grant only leaves a lease nobody keeps alive.
//!
//! Invariants: the deadline only moves forward while the lease is held and drops to 0 (every
//! commit refused) the moment the lease is known or suspected lost; "lost" is final, reported
//! once through the loss hook.

use super::etcd::{Etcd, EtcdError};
use super::ArbiterConfig;
use crate::control::deadline::MonotonicTime;
use crate::epoch::Generation;
use crate::fence::GenerationStore;
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Called once when the lease is lost, with the reason.
pub type LostHook = Box<dyn Fn(String) + Send + Sync>;

/// Why the key could not be held or used.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("{0}")]
    Config(String),
    #[error("key {key} is held by {holder:?}; not acquired within {waited:?}")]
    Busy {
        key: String,
        holder: String,
        waited: Duration,
    },
    #[error("the lease was lost: {0}")]
    Lost(String),
    #[error(
        "generation {etcd} in etcd (written by {holder:?}) is newer than this host's {local}: \
         another host took over this VM, so this host's copy is stale; not starting"
    )]
    TakenOver {
        etcd: Generation,
        local: Generation,
        holder: String,
    },
    #[error("generation store: {0}")]
    Store(#[from] std::io::Error),
    #[error("etcd record {key}: {error}")]
    Record { key: String, error: String },
}

/// The value of the primary key (JSON, for operators reading it with `etcdctl`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct PrimaryRecord {
    holder: String,
    lease: i64,
}

/// The value of the generation key.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct GenerationRecord {
    generation: u64,
    holder: String,
}

/// The lease state the keepalive task maintains, read by the coordinator.
#[derive(Default)]
pub struct LeaseShared {
    /// The commit deadline (microseconds of `CLOCK_MONOTONIC`); 0 once lost.
    deadline_us: AtomicU64,
    /// Send time of the newest answered keepalive.
    last_renewed_us: AtomicU64,
    /// TTL granted by etcd, seconds.
    ttl_s: AtomicU64,
    keepalives_ok: AtomicU64,
    keepalives_failed: AtomicU64,
    /// Set when the key is held (before that, the lease only keeps a waiting claim alive).
    held: AtomicBool,
    lost: Mutex<Option<String>>,
    /// Told once when the lease is lost (set by the coordinator once it runs).
    on_lost: Mutex<Option<LostHook>>,
    told: AtomicBool,
}

impl std::fmt::Debug for LeaseShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseShared")
            .field("deadline", &self.deadline())
            .field("lost", &self.lost())
            .finish()
    }
}

impl LeaseShared {
    /// The current commit deadline (`MonotonicTime(0)` once lost).
    pub fn deadline(&self) -> MonotonicTime {
        MonotonicTime(self.deadline_us.load(Ordering::Acquire))
    }

    /// Why the lease was lost, if it was.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().map(|l| l.clone()).unwrap_or(None)
    }

    /// Moves the deadline forward (never back) unless lost.
    fn renew(&self, sent: MonotonicTime, ttl: Duration, margin: Duration) {
        if self.lost().is_some() {
            return;
        }
        let d = sent.plus(ttl).minus(margin);
        self.deadline_us.fetch_max(d.0, Ordering::AcqRel);
        self.last_renewed_us.fetch_max(sent.0, Ordering::AcqRel);
        self.ttl_s.store(ttl.as_secs(), Ordering::Release);
    }

    /// Marks the lease lost and tells the hook (first reason wins).
    fn lose(&self, reason: String) {
        if self.mark_lost(reason.clone()) {
            log::error!("etcd: lease lost: {reason}");
            self.tell();
        }
    }

    /// Calls the hook once the lease is lost and a hook is set, exactly once: both the loss
    /// and the hook's installation call this, and the lock orders them.
    fn tell(&self) {
        let Ok(h) = self.on_lost.lock() else { return };
        let (Some(hook), Some(reason)) = (h.as_ref(), self.lost()) else {
            return;
        };
        if !self.told.swap(true, Ordering::AcqRel) {
            hook(reason);
        }
    }

    /// Marks the lease lost (first reason wins); true if this call did.
    fn mark_lost(&self, reason: String) -> bool {
        let mut l = match self.lost.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        self.deadline_us.store(0, Ordering::Release);
        if l.is_some() {
            return false;
        }
        *l = Some(reason);
        true
    }
}

/// The primary's key, held (or being waited for) under a lease kept alive in the background.
pub struct Claim {
    etcd: Etcd,
    cfg: ArbiterConfig,
    lease: i64,
    shared: Arc<LeaseShared>,
    stop: Arc<AtomicBool>,
    /// When the winning acquisition request was sent (a lower bound of the acquisition).
    acquired_at: MonotonicTime,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("key", &self.cfg.primary_key())
            .field("lease", &self.lease)
            .finish()
    }
}

impl Claim {
    /// Connects, grants a lease, keeps it alive, and waits until the primary key is created
    /// under it (the key is absent: never held, or its holder's lease expired or was revoked).
    /// `wait`: give up after this long (`None`: wait for good).
    pub fn acquire(cfg: &ArbiterConfig, wait: Option<Duration>) -> Result<Claim, ClaimError> {
        cfg.validate().map_err(ClaimError::Config)?;
        let etcd = Etcd::connect(&cfg.endpoints, cfg.call_timeout)?;
        let ttl_req = cfg.ttl.as_secs().max(1) as i64;
        let sent = MonotonicTime::now();
        let (lease, granted) = etcd.call("lease grant", move |mut c: Client| async move {
            let r = c.lease_grant(ttl_req, None).await?;
            Ok((r.id(), r.ttl()))
        })?;
        if granted <= 0 {
            return Err(ClaimError::Lost(format!("etcd granted TTL {granted}")));
        }
        let ttl = Duration::from_secs(granted as u64);
        if cfg.margin >= ttl / 2 {
            return Err(ClaimError::Config(format!(
                "etcd granted TTL {ttl:?}: the margin {:?} must be below half of it",
                cfg.margin
            )));
        }
        let shared = Arc::new(LeaseShared::default());
        shared.renew(sent, ttl, cfg.margin);
        let stop = Arc::new(AtomicBool::new(false));
        let ka = KeepAlive {
            lease,
            margin: cfg.margin,
            interval: ArbiterConfig::keepalive_interval(ttl),
            call_timeout: cfg.call_timeout,
            shared: shared.clone(),
            stop: stop.clone(),
        };
        etcd.spawn(move |c| ka.run(c))?;
        let mut claim = Claim {
            etcd,
            cfg: cfg.clone(),
            lease,
            shared,
            stop,
            acquired_at: MonotonicTime(0),
        };
        claim.acquired_at = claim.wait_for_key(wait)?;
        Ok(claim)
    }

    /// Returns the send time of the transaction that created the key.
    fn wait_for_key(&self, wait: Option<Duration>) -> Result<MonotonicTime, ClaimError> {
        let key = self.cfg.primary_key();
        let value = serde_json::to_string(&PrimaryRecord {
            holder: self.cfg.holder.clone(),
            lease: self.lease,
        })
        .map_err(|e| ClaimError::Config(e.to_string()))?;
        let t0 = Instant::now();
        let mut last_holder = String::new();
        loop {
            if let Some(reason) = self.shared.lost() {
                return Err(ClaimError::Lost(reason));
            }
            let (k, v, lease) = (key.clone(), value.clone(), self.lease);
            let sent = MonotonicTime::now();
            // Repeatable (an attempt whose answer was lost may have created the key): a key
            // found under our own lease is ours.
            let (won, holder) = self.etcd.call("acquire", move |mut c: Client| {
                let (k, v) = (k.clone(), v.clone());
                async move {
                    let txn = Txn::new()
                        .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(
                            k.clone(),
                            v,
                            Some(PutOptions::new().with_lease(lease)),
                        )])
                        .or_else([TxnOp::get(k, None)]);
                    let r = c.txn(txn).await?;
                    let (holder, ours) = r
                        .op_responses()
                        .into_iter()
                        .find_map(|op| match op {
                            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| {
                                (
                                    String::from_utf8_lossy(kv.value()).into_owned(),
                                    kv.lease() == lease,
                                )
                            }),
                            _ => None,
                        })
                        .unwrap_or_default();
                    Ok((r.succeeded() || ours, holder))
                }
            })?;
            if won {
                self.shared.held.store(true, Ordering::Release);
                log::info!(
                    "etcd: holding {key} under lease {:x} (TTL {} s)",
                    self.lease,
                    self.shared.ttl_s.load(Ordering::Acquire)
                );
                return Ok(sent);
            }
            if holder != last_holder {
                log::warn!("etcd: {key} is held by {holder}; waiting for it to expire");
                last_holder = holder.clone();
            }
            if let Some(w) = wait {
                if t0.elapsed() >= w {
                    return Err(ClaimError::Busy {
                        key,
                        holder,
                        waited: w,
                    });
                }
            }
            // etcd expires leases in rounds of 500 ms; polling a little faster costs nothing.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `hook` is called once when the lease is lost (at once if it already is). A revoke by
    /// this holder does not call it.
    pub fn set_lost_hook(&self, hook: LostHook) {
        if let Ok(mut h) = self.shared.on_lost.lock() {
            *h = Some(hook);
        }
        self.shared.tell();
    }

    /// The commit deadline now (0 once lost).
    pub fn deadline(&self) -> MonotonicTime {
        self.shared.deadline()
    }

    /// The shared lease state (for status and the loss check).
    pub fn shared(&self) -> &Arc<LeaseShared> {
        &self.shared
    }

    /// When the request that acquired the key was sent: the key was not ours before.
    pub fn acquired_at(&self) -> MonotonicTime {
        self.acquired_at
    }

    /// The margin subtracted from the lease for the commit deadline.
    pub fn margin(&self) -> Duration {
        self.cfg.margin
    }

    /// The primary key this claim is for.
    pub fn key(&self) -> String {
        self.cfg.primary_key()
    }

    /// The lease id.
    pub fn lease_id(&self) -> i64 {
        self.lease
    }

    /// The newest generation written to etcd for this VM, its writer and the key's
    /// `mod_revision` (0: never written).
    pub fn read_generation(&self) -> Result<(Generation, String, i64), ClaimError> {
        let key = self.cfg.generation_key();
        let k = key.clone();
        let kv = self.etcd.call("read generation", move |mut c: Client| {
            let k = k.clone();
            async move {
                let r = c.get(k, None).await?;
                Ok(r.kvs()
                    .first()
                    .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
            }
        })?;
        match kv {
            None => Ok((Generation(0), String::new(), 0)),
            Some((v, rev)) => {
                let r: GenerationRecord =
                    serde_json::from_slice(&v).map_err(|e| ClaimError::Record {
                        key,
                        error: e.to_string(),
                    })?;
                Ok((Generation(r.generation), r.holder, rev))
            }
        }
    }

    /// Writes `g` as the VM's generation if the key still is ours and the generation key was
    /// not written since `mod_revision` (compare-and-swap). `Ok(false)`: someone wrote it in
    /// between (read again); `Lost` if the key is no longer under our lease.
    fn write_generation(&self, g: Generation, mod_revision: i64) -> Result<bool, ClaimError> {
        let (pk, gk, lease) = (
            self.cfg.primary_key(),
            self.cfg.generation_key(),
            self.lease,
        );
        let value = serde_json::to_string(&GenerationRecord {
            generation: g.0,
            holder: self.cfg.holder.clone(),
        })
        .map_err(|e| ClaimError::Config(e.to_string()))?;
        // Repeatable: an attempt whose answer was lost may have written `g`; the repeat then
        // finds the revision moved and answers false, and the caller takes the next
        // generation (generations may skip numbers, never go back).
        let (ok, still_ours) = self.etcd.call("write generation", move |mut c: Client| {
            let (pk, gk, value) = (pk.clone(), gk.clone(), value.clone());
            async move {
                let txn = Txn::new()
                    .when([
                        Compare::lease(pk.clone(), CompareOp::Equal, lease),
                        Compare::mod_revision(gk.clone(), CompareOp::Equal, mod_revision),
                    ])
                    .and_then([TxnOp::put(gk, value, None)])
                    .or_else([TxnOp::get(pk, None)]);
                let r = c.txn(txn).await?;
                let ours = r.succeeded()
                    || r.op_responses().into_iter().any(|op| match op {
                        TxnOpResponse::Get(g) => {
                            g.kvs().first().is_some_and(|kv| kv.lease() == lease)
                        }
                        _ => false,
                    });
                Ok((r.succeeded(), ours))
            }
        })?;
        if !still_ours {
            return Err(ClaimError::Lost(format!(
                "{} is no longer under lease {lease:x}",
                self.cfg.primary_key()
            )));
        }
        Ok(ok)
    }

    /// Takes the new holder's generation: above every generation written to etcd for this VM,
    /// above `local`'s and above `floor`; persisted in `local` first (a crash in between leaves
    /// `local` ahead, harmless), then written to etcd by compare-and-swap.
    ///
    /// `refuse_if_behind`: a coordinator's check that no other host took the VM over since this
    /// host last held it (etcd's generation above `local`'s): its VM would then be a stale
    /// copy, and starting it would split the brain. A takeover passes false.
    pub fn advance_generation(
        &self,
        local: &GenerationStore,
        floor: Generation,
        refuse_if_behind: bool,
    ) -> Result<Generation, ClaimError> {
        for _ in 0..8 {
            let (in_etcd, holder, rev) = self.read_generation()?;
            let mine = local.load()?;
            if refuse_if_behind && in_etcd > mine {
                return Err(ClaimError::TakenOver {
                    etcd: in_etcd,
                    local: mine,
                    holder,
                });
            }
            let newest = in_etcd.max(mine).max(floor);
            let g = Generation(
                newest
                    .0
                    .checked_add(1)
                    .ok_or_else(|| ClaimError::Config("generation numbers exhausted".into()))?,
            );
            local.store(g)?;
            if self.write_generation(g, rev)? {
                log::info!(
                    "etcd: generation {g} written to {} (was {in_etcd})",
                    self.cfg.generation_key()
                );
                return Ok(g);
            }
        }
        Err(ClaimError::Config(format!(
            "{} keeps changing under the key's holder",
            self.cfg.generation_key()
        )))
    }

    /// Revokes the lease: the key is deleted at once and another host may acquire it. This
    /// claim is lost from then on.
    pub fn revoke(&self) -> Result<(), ClaimError> {
        self.shared.mark_lost("revoked by this holder".into());
        self.stop.store(true, Ordering::Release);
        let lease = self.lease;
        self.etcd
            .call("lease revoke", move |mut c: Client| async move {
                match c.lease_revoke(lease).await {
                    // Repeated after a lost answer, or expired meanwhile: gone either way.
                    Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::NotFound => {
                        Ok(())
                    }
                    r => r.map(|_| ()),
                }
            })?;
        log::warn!(
            "etcd: lease {lease:x} revoked, {} released",
            self.cfg.primary_key()
        );
        Ok(())
    }

    /// For `ftctl status`.
    pub fn status(&self) -> Value {
        let s = &self.shared;
        let now = MonotonicTime::now();
        let deadline = s.deadline();
        json!({
            "key": self.cfg.primary_key(),
            "lease": format!("{:x}", self.lease),
            "ttl_s": s.ttl_s.load(Ordering::Acquire),
            "margin_ms": self.cfg.margin.as_millis() as u64,
            "held": s.held.load(Ordering::Acquire) && s.lost().is_none(),
            "lost": s.lost(),
            "deadline_monotonic_us": deadline.0,
            "deadline_in_ms": if deadline > now { deadline.since(now).as_millis() as i64 } else { -(now.since(deadline).as_millis() as i64) },
            "last_renewed_ms_ago": now.since(MonotonicTime(s.last_renewed_us.load(Ordering::Acquire))).as_millis() as u64,
            "keepalives_ok": s.keepalives_ok.load(Ordering::Relaxed),
            "keepalives_failed": s.keepalives_failed.load(Ordering::Relaxed),
        })
    }
}

impl Claim {
    /// The lease as Prometheus text (appended to the coordinator's metrics).
    pub fn render_metrics(&self, out: &mut String) {
        use crate::coordinator::metrics::scalar;
        let s = &self.shared;
        let now = MonotonicTime::now();
        let deadline = s.deadline();
        let left = if deadline > now {
            deadline.since(now).as_secs_f64()
        } else {
            -now.since(deadline).as_secs_f64()
        };
        let held = s.held.load(Ordering::Acquire) && s.lost().is_none();
        scalar(
            out,
            "ft_lease_held",
            "gauge",
            "1 while this coordinator holds the VM's etcd key under a live lease.",
            &[(String::new(), if held { 1.0 } else { 0.0 })],
        );
        scalar(
            out,
            "ft_lease_deadline_seconds",
            "gauge",
            "Time left until the commit deadline (negative: passed).",
            &[(String::new(), left)],
        );
        scalar(
            out,
            "ft_lease_keepalives_total",
            "counter",
            "Keepalives answered (ok) and failed or unanswered in their round (failed).",
            &[
                (
                    "result=\"ok\"".into(),
                    s.keepalives_ok.load(Ordering::Relaxed) as f64,
                ),
                (
                    "result=\"failed\"".into(),
                    s.keepalives_failed.load(Ordering::Relaxed) as f64,
                ),
            ],
        );
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // The lease is not revoked: it expires by itself within its TTL (a clean shutdown of
        // the coordinator is not a handover; `ftctl abort` revokes).
        self.stop.store(true, Ordering::Release);
    }
}

/// The background keepalive loop.
struct KeepAlive {
    lease: i64,
    margin: Duration,
    interval: Duration,
    call_timeout: Duration,
    shared: Arc<LeaseShared>,
    stop: Arc<AtomicBool>,
}

impl KeepAlive {
    fn lose(&self, reason: String) {
        self.shared
            .lose(format!("lease {:x}: {reason}", self.lease));
    }

    async fn run(self, client: Client) {
        let mut stream = None;
        // Send times of keepalives not answered yet, oldest first.
        let mut unanswered: VecDeque<MonotonicTime> = VecDeque::new();
        loop {
            if self.stop.load(Ordering::Acquire) || self.shared.lost().is_some() {
                return;
            }
            let now = MonotonicTime::now();
            if now > self.shared.deadline() {
                let since = now.since(MonotonicTime(
                    self.shared.last_renewed_us.load(Ordering::Acquire),
                ));
                self.lose(format!(
                    "no keepalive answered in time: the commit deadline passed ({} ms since the \
                     last renewed keepalive was sent)",
                    since.as_millis()
                ));
                return;
            }
            let tick = tokio::time::Instant::now() + self.interval;
            if stream.is_none() {
                let mut lc = client.lease_client();
                match tokio::time::timeout(
                    self.call_timeout.min(self.interval),
                    lc.keep_alive(self.lease),
                )
                .await
                {
                    Ok(Ok(s)) => {
                        stream = Some(s);
                        unanswered.clear();
                    }
                    Ok(Err(e)) => {
                        self.shared
                            .keepalives_failed
                            .fetch_add(1, Ordering::Relaxed);
                        log::warn!("etcd: keepalive stream for lease {:x}: {e}", self.lease);
                        tokio::time::sleep_until(tick).await;
                        continue;
                    }
                    Err(_) => {
                        self.shared
                            .keepalives_failed
                            .fetch_add(1, Ordering::Relaxed);
                        log::warn!(
                            "etcd: keepalive stream for lease {:x}: no answer",
                            self.lease
                        );
                        continue;
                    }
                }
            }
            let Some((keeper, responses)) = stream.as_mut() else {
                continue;
            };
            let sent = MonotonicTime::now();
            if keeper.keep_alive().await.is_err() {
                stream = None;
                self.shared
                    .keepalives_failed
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            unanswered.push_back(sent);
            loop {
                match tokio::time::timeout_at(tick, responses.message()).await {
                    Err(_) => {
                        self.shared
                            .keepalives_failed
                            .fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Ok(Ok(Some(r))) => {
                        let Some(at) = unanswered.pop_front() else {
                            continue;
                        };
                        if r.ttl() <= 0 {
                            self.lose(
                                "etcd answered TTL 0: the lease expired or was revoked".into(),
                            );
                            return;
                        }
                        self.shared
                            .renew(at, Duration::from_secs(r.ttl() as u64), self.margin);
                        self.shared.keepalives_ok.fetch_add(1, Ordering::Relaxed);
                        if unanswered.is_empty() {
                            break;
                        }
                    }
                    Ok(Ok(None)) | Ok(Err(_)) => {
                        self.shared
                            .keepalives_failed
                            .fetch_add(1, Ordering::Relaxed);
                        stream = None;
                        break;
                    }
                }
            }
            // A stream that stopped answering is replaced (its late answers are not needed).
            if unanswered.len() > 3 {
                stream = None;
            }
            tokio::time::sleep_until(tick).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_only_moves_forward_and_a_loss_is_final() {
        let s = LeaseShared::default();
        let (ttl, margin) = (Duration::from_secs(2), Duration::from_millis(500));
        s.renew(MonotonicTime(10_000_000), ttl, margin);
        assert_eq!(s.deadline(), MonotonicTime(11_500_000));
        // A late answer to an older keepalive does not move the deadline back.
        s.renew(MonotonicTime(9_000_000), ttl, margin);
        assert_eq!(s.deadline(), MonotonicTime(11_500_000));
        s.renew(MonotonicTime(10_400_000), ttl, margin);
        assert_eq!(s.deadline(), MonotonicTime(11_900_000));
        let told = Arc::new(AtomicU64::new(0));
        let t = told.clone();
        *s.on_lost.lock().unwrap() = Some(Box::new(move |_| {
            t.fetch_add(1, Ordering::Relaxed);
        }));
        s.lose("cut".into());
        s.lose("again".into());
        assert_eq!(told.load(Ordering::Relaxed), 1, "the hook is told once");
        assert_eq!(s.lost().as_deref(), Some("cut"));
        assert_eq!(s.deadline(), MonotonicTime(0), "a lost lease still commits");
        s.renew(MonotonicTime(20_000_000), ttl, margin);
        assert_eq!(s.deadline(), MonotonicTime(0), "a lost lease was renewed");
    }
}
