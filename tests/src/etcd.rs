// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A real etcd for the arbitration tests (Debian's `etcd-server`, installed by
//! scripts/setup.sh), one per test, and the network namespaces of the partition test.
//!
//! Each etcd is a single-member cluster ([`EtcdServer`]) or a cluster of a few members on
//! loopback ([`EtcdCluster`]); every member has its own temporary data directory (always removed,
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

/// `n` ports of the range not bound on loopback right now.
fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let mut free = Vec::with_capacity(n);
    for _ in 0..PORT_COUNT {
        let p = PORT_BASE + NEXT.fetch_add(1, Ordering::Relaxed) % PORT_COUNT;
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            free.push(p);
            if free.len() == n {
                return Ok(free);
            }
        }
    }
    Err(io::Error::other("not enough free ports in 27300-27399"))
}

/// Two ports (client, peer) of the range not bound on loopback right now.
fn two_ports() -> io::Result<(u16, u16)> {
    let p = free_ports(2)?;
    Ok((p[0], p[1]))
}

/// A fresh data directory for the member whose client port is `client`.
fn data_dir(client: u16) -> io::Result<PathBuf> {
    let data = std::env::temp_dir().join(format!("ft-etcd-data-{}-{client}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data)?;
    Ok(data)
}

/// The flags of one member, without `--initial-cluster`. A member restarted on its data
/// directory rejoins its cluster (etcd then ignores the initial-cluster flags).
fn member_args(
    name: &str,
    data: &Path,
    listen: &str,
    advertise: &str,
    peer_url: &str,
) -> Vec<String> {
    [
        "--name",
        name,
        "--data-dir",
        &data.display().to_string(),
        "--listen-client-urls",
        listen,
        "--advertise-client-urls",
        advertise,
        "--listen-peer-urls",
        peer_url,
        "--initial-advertise-peer-urls",
        peer_url,
        "--initial-cluster-state",
        "new",
        "--log-level",
        "warn",
        "--logger",
        "zap",
    ]
    .map(String::from)
    .to_vec()
}

/// Starts `etcd ARGS` (in `netns`), its output to `log` (appended: a restarted member keeps
/// its earlier log).
fn spawn(netns: Option<&str>, args: &[String], log: &Path) -> io::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let err = out.try_clone()?;
    let mut cmd = in_netns(netns, "etcd");
    cmd.args(args).stdout(out).stderr(err).stdin(Stdio::null());
    cmd.spawn()
}

/// `etcdctl --endpoints EPS` with short timeouts (API v3).
fn etcdctl(netns: Option<&str>, endpoints: &str, args: &[&str]) -> Command {
    let mut c = in_netns(netns, "etcdctl");
    c.env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoints)
        .arg("--dial-timeout=2s")
        .arg("--command-timeout=3s")
        .args(args);
    c
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
        let data = data_dir(client)?;
        let endpoint = format!("http://{ip}:{client}");
        let listen = if netns.is_some() {
            format!("http://0.0.0.0:{client}")
        } else {
            endpoint.clone()
        };
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut args = member_args("ft", &data, &listen, &endpoint, &peer_url);
        args.extend(["--initial-cluster".into(), format!("ft={peer_url}")]);
        let child = spawn(netns, &args, log)?;
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
        etcdctl(self.netns.as_deref(), &self.endpoint, args)
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

/// One member of an [`EtcdCluster`].
struct Member {
    name: String,
    client: String,
    data: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

/// A cluster of etcd members on loopback (a few seconds to start), each with its own data
/// directory and log; members can be killed (SIGKILL) and restarted on their data.
pub struct EtcdCluster {
    members: Vec<Member>,
}

impl EtcdCluster {
    /// `n` members on 127.0.0.1, logs `DIR/etcd-mI.log`. Raft timing: a heartbeat every
    /// `heartbeat_ms`, elections after `election_ms` (etcd: at least 5 heartbeats; its
    /// defaults are 100 and 1000).
    pub fn start_loopback(
        n: usize,
        dir: &Path,
        heartbeat_ms: u32,
        election_ms: u32,
    ) -> io::Result<EtcdCluster> {
        let ports = free_ports(2 * n)?;
        let peer_url = |i: usize| format!("http://127.0.0.1:{}", ports[2 * i + 1]);
        let initial = (0..n)
            .map(|i| format!("m{i}={}", peer_url(i)))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let client = format!("http://127.0.0.1:{}", ports[2 * i]);
            let name = format!("m{i}");
            let data = data_dir(ports[2 * i])?;
            let mut args = member_args(&name, &data, &client, &client, &peer_url(i));
            args.extend([
                "--initial-cluster".into(),
                initial.clone(),
                "--heartbeat-interval".into(),
                heartbeat_ms.to_string(),
                "--election-timeout".into(),
                election_ms.to_string(),
            ]);
            members.push(Member {
                log: dir.join(format!("etcd-{name}.log")),
                name,
                client,
                data,
                args,
                child: None,
            });
        }
        let mut c = EtcdCluster { members };
        for i in 0..n {
            c.restart(i)?;
        }
        c.wait_healthy(&(0..n).collect::<Vec<_>>(), Duration::from_secs(30))?;
        Ok(c)
    }

    /// Every member's client endpoint, in member order (`http://IP:PORT`).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    /// `IP:PORT,IP:PORT,...` (the form of `--etcd`).
    pub fn host_ports(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client.trim_start_matches("http://"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Member `i`'s name (`mI`).
    pub fn name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    /// SIGKILL of member `i` (its data stays for a restart).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` (again) on its data directory; it rejoins the cluster. Does not wait.
    pub fn restart(&mut self, i: usize) -> io::Result<()> {
        self.kill(i);
        let m = &mut self.members[i];
        m.child = Some(spawn(None, &m.args, &m.log)?);
        Ok(())
    }

    /// `etcdctl` against the running members `on`.
    pub fn etcdctl(&self, on: &[usize], args: &[&str]) -> Command {
        let eps: Vec<&str> = on
            .iter()
            .map(|&i| self.members[i].client.as_str())
            .collect();
        etcdctl(None, &eps.join(","), args)
    }

    /// Waits until each of the members `on` answers `endpoint health` (which needs a quorum).
    pub fn wait_healthy(&mut self, on: &[usize], timeout: Duration) -> io::Result<()> {
        let t0 = Instant::now();
        for &i in on {
            loop {
                let m = &mut self.members[i];
                if let Some(Ok(Some(st))) = m.child.as_mut().map(Child::try_wait) {
                    return Err(io::Error::other(format!(
                        "etcd {} exited ({st}): {}",
                        m.name,
                        std::fs::read_to_string(&m.log).unwrap_or_default()
                    )));
                }
                let ok = self
                    .etcdctl(&[i], &["endpoint", "health"])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if ok {
                    break;
                }
                if t0.elapsed() > timeout {
                    return Err(io::Error::other(format!(
                        "etcd {} not healthy within {timeout:?}",
                        self.members[i].name
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The member that is the raft leader, as seen by the running members `on` (`None`: none
    /// of them knows one, or they disagree).
    pub fn leader(&self, on: &[usize]) -> Option<usize> {
        let o = self
            .etcdctl(on, &["endpoint", "status", "--write-out", "json"])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        let mut leader = None;
        for st in v.as_array()? {
            let ep = st["Endpoint"].as_str()?;
            let me = st["Status"]["header"]["member_id"].as_u64()?;
            let l = st["Status"]["leader"].as_u64()?;
            if me == l {
                let i = self.members.iter().position(|m| m.client == ep)?;
                if leader.replace(i).is_some_and(|old| old != i) {
                    return None;
                }
            }
        }
        leader
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
            let _ = std::fs::remove_dir_all(&self.members[i].data);
        }
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
