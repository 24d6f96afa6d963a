// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Arbitration of the primary role on etcd: which host may commit a protected VM's output.
//!
//! Two keys per protected VM (`--vm-key NAME`):
//!
//! - `/ft-vhost/vm/NAME/primary`: attached to an etcd lease (TTL a few seconds) that its holder
//!   keeps alive; created only if absent (a transaction on `create_revision == 0`). The holder
//!   is the primary. A primary's coordinator sends every `COMMIT` with a deadline derived from
//!   its lease; `ftctl takeover` proceeds only once it has acquired the key (the old lease
//!   expired or was revoked by `ftctl abort`).
//! - `/ft-vhost/vm/NAME/generation`: the newest fencing generation ever handed out for the VM,
//!   written only by the key's holder, by compare-and-swap on its `mod_revision`.
//!
//! - [`etcd`]: the blocking façade: the async `etcd-client` on a dedicated thread with a
//!   current-thread tokio runtime (the coordinator stays synchronous).
//! - [`claim`]: acquiring the key, keeping its lease alive (the commit deadline), the
//!   generation, revoking.
//!
//! Invariants:
//! - A coordinator holds the key before it sends any command, and its commit deadline is never
//!   later than `send time of an answered keepalive + granted TTL - margin`, so no commit starts
//!   after the lease can have expired on the etcd leader (timing argument:
//!   `docs/architecture.md`, "Arbitration on etcd").
//! - Generations written to etcd only grow, and only under the key: a new holder's generation
//!   is above every generation ever written for the VM.
//! - A lost lease is final for that claim: it is never renewed or re-acquired behind the
//!   holder's back; the coordinator is deposed.

pub mod claim;
pub mod etcd;

pub use claim::{Claim, LeaseShared};
pub use etcd::Etcd;

use std::time::Duration;

/// How to reach etcd and which VM's key to hold.
#[derive(Clone, Debug)]
pub struct ArbiterConfig {
    /// etcd client endpoints (`http://HOST:PORT`).
    pub endpoints: Vec<String>,
    /// The protected VM's name (`--vm-key`).
    pub vm_key: String,
    /// Requested lease TTL; etcd grants whole seconds, at least its minimum TTL (the granted
    /// TTL is the one used).
    pub ttl: Duration,
    /// Subtracted from the lease to get the commit deadline: must cover the longest commit
    /// (from the daemon's admission check to its last write and `fdatasync`) plus the clock
    /// rate error over one TTL.
    pub margin: Duration,
    /// Bound on one etcd request.
    pub call_timeout: Duration,
    /// Who holds the key (written into it, for operators): e.g. `coordinator on HOST pid N`.
    pub holder: String,
}

impl ArbiterConfig {
    /// A configuration with the defaults: TTL 2 s, margin a quarter of the TTL, 2 s calls.
    pub fn new(endpoints: Vec<String>, vm_key: String, holder: String) -> ArbiterConfig {
        ArbiterConfig {
            endpoints,
            vm_key,
            ttl: Duration::from_secs(2),
            margin: Duration::from_millis(500),
            call_timeout: Duration::from_secs(2),
            holder,
        }
    }

    /// The key naming the primary.
    pub fn primary_key(&self) -> String {
        format!("/ft-vhost/vm/{}/primary", self.vm_key)
    }

    /// The key holding the newest generation.
    pub fn generation_key(&self) -> String {
        format!("/ft-vhost/vm/{}/generation", self.vm_key)
    }

    /// Checks the VM name and the timing.
    pub fn validate(&self) -> Result<(), String> {
        check_vm_key(&self.vm_key)?;
        if self.endpoints.is_empty() {
            return Err("--etcd needs at least one endpoint".into());
        }
        if self.ttl < Duration::from_secs(1) {
            return Err("the lease TTL must be at least 1 s (etcd counts whole seconds)".into());
        }
        if self.margin >= self.ttl / 2 {
            return Err(format!(
                "the lease margin {:?} must be below half the TTL {:?}",
                self.margin, self.ttl
            ));
        }
        Ok(())
    }

    /// Keepalive period: a sixth of the TTL, so that a few lost keepalives still renew the
    /// lease well before the deadline.
    pub fn keepalive_interval(ttl: Duration) -> Duration {
        (ttl / 6).max(Duration::from_millis(50))
    }
}

/// `NAME` of `--vm-key`: letters, digits, `.`, `_`, `-` (it becomes a path segment of a key).
pub fn check_vm_key(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        || name.starts_with('.')
    {
        return Err(format!(
            "bad --vm-key {name:?}: 1 to 128 of letters, digits, '.', '_', '-', not starting with '.'"
        ));
    }
    Ok(())
}

/// `--etcd HOST:PORT[,HOST:PORT...]` (a scheme may be given; `http://` is assumed).
pub fn parse_endpoints(s: &str) -> Result<Vec<String>, String> {
    let eps: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            if e.contains("://") {
                e.to_string()
            } else {
                format!("http://{e}")
            }
        })
        .collect();
    if eps.is_empty() {
        return Err(format!(
            "bad --etcd {s:?}: expected HOST:PORT[,HOST:PORT...]"
        ));
    }
    Ok(eps)
}

/// A duration such as `2s`, `500ms` or `2` (seconds), for the lease flags.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("bad duration {s:?}: expected e.g. 2s or 500ms");
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    match unit {
        "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        _ => Err(bad()),
    }
}

/// `ROLE on HOSTNAME pid N`: what the key and the generation record say about their writer.
pub fn holder_name(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!("{role} on {host} pid {}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        assert_eq!(
            parse_endpoints("127.0.0.1:2379, http://h:1").unwrap(),
            vec!["http://127.0.0.1:2379", "http://h:1"]
        );
        assert!(parse_endpoints(" , ").is_err());
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("2m").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(check_vm_key("vm-1.a_b").is_ok());
        for bad in ["", "a/b", "..", ".x", "a b"] {
            assert!(check_vm_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timing_is_validated() {
        let mut c = ArbiterConfig::new(vec!["http://x:1".into()], "vm".into(), "t".into());
        c.validate().unwrap();
        c.margin = Duration::from_secs(1);
        assert!(c.validate().is_err());
        c.margin = Duration::from_millis(100);
        c.ttl = Duration::from_millis(500);
        assert!(c.validate().is_err());
        assert_eq!(c.primary_key(), "/ft-vhost/vm/vm/primary");
        assert_eq!(
            ArbiterConfig::keepalive_interval(Duration::from_secs(2)).as_millis(),
            333
        );
    }
}
