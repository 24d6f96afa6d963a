// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A real etcd for the arbitration tests (Debian's `etcd-server`, installed by
//! scripts/setup.sh), one per test, and the network namespaces of the partition test.
//!
//! Each etcd is a single-member cluster with its own temporary data directory (always removed,
//! also after a failed test: etcd preallocates 64 MiB of WAL) and ports from the range reserved
//! for these tests (27300-27399). Network namespaces and veth devices carry `etcd` in their
//! names and are deleted on drop.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

const PORT_BASE: u16 = 27300;
const PORT_COUNT: u16 = 100;

/// Two ports (client, peer) of the range not bound on loopback right now.
fn two_ports() -> io::Result<(u16, u16)> {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let mut free = Vec::with_capacity(2);
    for _ in 0..PORT_COUNT {
        let p = PORT_BASE + NEXT.fetch_add(1, Ordering::Relaxed) % PORT_COUNT;
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            free.push(p);
            if free.len() == 2 {
                return Ok((free[0], free[1]));
            }
        }
    }
    Err(io::Error::other("no free port in 27300-27399"))
}

/// Whether the etcd binaries are installed (scripts/setup.sh installs them).
pub fn available() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A running single-member etcd.
pub struct EtcdServer {
    child: Child,
    data: PathBuf,
    endpoint: String,
    netns: Option<String>,
}

impl EtcdServer {
    /// On 127.0.0.1 of the current network namespace.
    pub fn start_loopback(log: &Path) -> io::Result<EtcdServer> {
        let (client, peer) = two_ports()?;
        Self::start(None, "127.0.0.1", client, peer, log)
    }

    /// In network namespace `netns` (created with [`Netns`]), serving clients on every address
    /// of it; the endpoint names `ip`.
    pub fn start_in(netns: &Netns, ip: &str, log: &Path) -> io::Result<EtcdServer> {
        let (client, peer) = two_ports()?;
        Self::start(Some(netns.name()), ip, client, peer, log)
    }

    fn start(
        netns: Option<&str>,
        ip: &str,
        client: u16,
        peer: u16,
        log: &Path,
    ) -> io::Result<EtcdServer> {
        let data =
            std::env::temp_dir().join(format!("ft-etcd-data-{}-{client}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data)?;
        let endpoint = format!("http://{ip}:{client}");
        let listen = if netns.is_some() {
            format!("http://0.0.0.0:{client}")
        } else {
            endpoint.clone()
        };
        let peer_url = format!("http://127.0.0.1:{peer}");
        let args: Vec<String> = vec![
            "--name".into(),
            "ft".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen-client-urls".into(),
            listen,
            "--advertise-client-urls".into(),
            endpoint.clone(),
            "--listen-peer-urls".into(),
            peer_url.clone(),
            "--initial-advertise-peer-urls".into(),
            peer_url.clone(),
            "--initial-cluster".into(),
            format!("ft={peer_url}"),
            "--initial-cluster-state".into(),
            "new".into(),
            "--log-level".into(),
            "warn".into(),
            "--logger".into(),
            "zap".into(),
        ];
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let mut cmd = in_netns(netns, "etcd");
        cmd.args(&args).stdout(out).stderr(err).stdin(Stdio::null());
        let child = cmd.spawn()?;
        let mut s = EtcdServer {
            child,
            data,
            endpoint,
            netns: netns.map(str::to_string),
        };
        s.wait_healthy(Duration::from_secs(30), log)?;
        Ok(s)
    }

    fn wait_healthy(&mut self, timeout: Duration, log: &Path) -> io::Result<()> {
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(io::Error::other(format!(
                    "etcd exited ({st}): {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )));
            }
            let ok = self
                .etcdctl(&["endpoint", "health"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                return Err(io::Error::other(format!(
                    "etcd not healthy within {timeout:?}: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://IP:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `IP:PORT` (the form of `--etcd`).
    pub fn host_port(&self) -> &str {
        self.endpoint.trim_start_matches("http://")
    }

    /// An `etcdctl` command against this server (run in its namespace).
    pub fn etcdctl(&self, args: &[&str]) -> Command {
        let mut c = in_netns(self.netns.as_deref(), "etcdctl");
        c.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(&self.endpoint)
            .arg("--dial-timeout=2s")
            .arg("--command-timeout=3s")
            .args(args);
        c
    }

    /// The value of `key` (`None`: absent).
    pub fn get(&self, key: &str) -> io::Result<Option<String>> {
        let o = self.etcdctl(&["get", "--print-value-only", key]).output()?;
        if !o.status.success() {
            return Err(io::Error::other(
                String::from_utf8_lossy(&o.stderr).into_owned(),
            ));
        }
        let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
        Ok((!v.is_empty()).then_some(v))
    }

    /// Writes `key`.
    pub fn put(&self, key: &str, value: &str) -> io::Result<()> {
        let o = self.etcdctl(&["put", key, value]).output()?;
        if !o.status.success() {
            return Err(io::Error::other(
                String::from_utf8_lossy(&o.stderr).into_owned(),
            ));
        }
        Ok(())
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// `program` run in network namespace `netns` (through `ip netns exec`), or directly.
pub fn in_netns(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    let o = Command::new("ip").args(args).output()?;
    if !o.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        )));
    }
    Ok(())
}

/// A named network namespace (`ip netns add`), deleted on drop with everything in it.
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ftetcd-TAG-PID`, with its loopback up.
    pub fn new(tag: &str) -> io::Result<Netns> {
        let name = format!("ftetcd-{tag}-{}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        ip(&a)
    }

    /// `program` to run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A veth pair between two namespaces: `a_if` with `a_ip/24` in `a`, `b_if` with `b_ip/24` in
/// `b`, both up. Interface names must fit in 15 bytes.
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_ip: &str,
    b: &Netns,
    b_if: &str,
    b_ip: &str,
) -> io::Result<()> {
    ip(&[
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["addr", "add", &format!("{a_ip}/24"), "dev", a_if])?;
    b.ip(&["addr", "add", &format!("{b_ip}/24"), "dev", b_if])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}
