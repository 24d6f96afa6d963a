// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One QEMU guest: command line, serial console capture, verdict.
//!
//! The guest's /init (tests/guest/init) prints `FT-STAGE: <name>` progress lines and exactly one
//! `FT-RESULT: PASS` or `FT-RESULT: FAIL <reason>` line on ttyS0, then powers off. QEMU's serial
//! port is its stdout; a reader thread copies it to the log file and timestamps the marker lines
//! against QEMU's start, so tests can report boot and workload durations.
//! A guest without a result line (crash, hang, early QEMU exit) is a failure, never a pass.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::backend::terminate;
use super::error::{HarnessError, Result};
use super::image::GuestImage;
use super::qemu::QemuFlavor;

const RESULT_MARK: &str = "FT-RESULT: ";
const STAGE_MARK: &str = "FT-STAGE: ";

/// What to boot and what to attach.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Guest RAM; the initramfs alone takes ~90 MB while it is unpacked.
    pub mem_mb: u32,
    /// vCPUs. Each one is a host thread under TCG: keep 1 on a shared 2-core machine.
    pub cpus: u32,
    /// vhost-user-blk sockets, one virtio-blk-pci device each (vda, vdb, ... in this order).
    pub disks: Vec<PathBuf>,
    /// Queues per vhost-user-blk device.
    pub disk_queues: u16,
    /// vhost-user-net socket for one virtio-net-pci device.
    pub net: Option<PathBuf>,
    /// Which QEMU (set with [`GuestConfig::on`]): decides MSI-X on the NIC and the reconnect
    /// option's spelling.
    pub flavor: QemuFlavor,
    /// `-chardev socket,reconnect=N`: QEMU reconnects to a restarted backend after N seconds.
    pub reconnect_secs: Option<u32>,
    /// Test to run: `/ft/tests/<test>.sh` in the guest (`ft.test=`).
    pub test: String,
    /// Extra kernel command line words, e.g. `ft.size=64M` (the guest exports `FT_SIZE`).
    pub cmdline_extra: Vec<String>,
    /// Kill QEMU and report [`GuestResult::Timeout`] after this long.
    pub timeout: Duration,
    /// Where the serial console is written.
    pub serial_log: PathBuf,
    /// QEMU binary (`FT_QEMU` or `qemu-system-x86_64` on PATH by default).
    pub qemu: OsString,
    /// More QEMU arguments, after the devices (e.g. a QMP socket: [`GuestConfig::with_qmp`]).
    pub extra_args: Vec<OsString>,
}

impl GuestConfig {
    /// 512 MiB, 1 vCPU, no devices, 5 minute timeout, serial log in `log_dir`.
    pub fn new(image: &GuestImage, test: &str, log_dir: &Path) -> GuestConfig {
        GuestConfig {
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            mem_mb: 512,
            cpus: 1,
            disks: Vec::new(),
            disk_queues: 1,
            net: None,
            flavor: QemuFlavor::Host,
            reconnect_secs: None,
            test: test.to_owned(),
            cmdline_extra: Vec::new(),
            timeout: Duration::from_secs(300),
            serial_log: log_dir.join(format!("serial-{test}.log")),
            qemu: std::env::var_os("FT_QEMU").unwrap_or_else(|| "qemu-system-x86_64".into()),
            extra_args: Vec::new(),
        }
    }

    /// Adds a QMP server socket at `path` (checkpointers, `ftctl record-vm`).
    pub fn with_qmp(mut self, path: &Path) -> GuestConfig {
        let mut spec = OsString::from("unix:");
        spec.push(path);
        spec.push(",server=on,wait=off");
        self.extra_args.push("-qmp".into());
        self.extra_args.push(spec);
        self
    }

    /// Run on `flavor`'s QEMU (its binary replaces `qemu`).
    pub fn on(mut self, flavor: QemuFlavor) -> GuestConfig {
        self.flavor = flavor;
        self.qemu = flavor.binary();
        self
    }

    /// The `fio-verify` guest test on the vhost-user-blk socket `disk`: fio writes `size` bytes
    /// (whole MiB) in 4 KiB blocks at queue depth 16 with crc32c checks, then verifies them all
    /// again in a separate read-only pass.
    pub fn fio_verify(image: &GuestImage, log_dir: &Path, disk: &Path, size: u64) -> GuestConfig {
        let mut config = GuestConfig::new(image, "fio-verify", log_dir);
        config.disks.push(disk.to_path_buf());
        config.cmdline_extra = vec![
            format!("ft.size={}M", size >> 20),
            "ft.bs=4k".into(),
            "ft.iodepth=16".into(),
            "ft.passes=write,verify".into(),
        ];
        config
    }

    pub fn cmdline(&self) -> String {
        // panic=-1 + -no-reboot: a guest kernel panic ends QEMU at once instead of hanging.
        let mut words = vec![
            "console=ttyS0".to_owned(),
            "panic=-1".to_owned(),
            "loglevel=4".to_owned(),
            format!("ft.test={}", self.test),
        ];
        words.extend(self.cmdline_extra.iter().cloned());
        words.join(" ")
    }

    /// The full QEMU argument list.
    pub fn qemu_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        // vhost-user needs guest RAM the backend can map: a shared memfd backend.
        for s in [
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ] {
            push(s);
        }
        push("-smp");
        push(&self.cpus.to_string());
        push("-m");
        push(&format!("{}M", self.mem_mb));
        push("-object");
        push(&format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            self.mem_mb
        ));
        push("-machine");
        push("q35,memory-backend=mem");
        let reconnect = self
            .reconnect_secs
            .map(|s| format!(",{}", self.flavor.reconnect_option(s)))
            .unwrap_or_default();
        let chardev = |id: &str, path: &Path| -> OsString {
            let mut s = OsString::from(format!("socket,id={id},path="));
            s.push(path);
            s.push(&reconnect);
            s
        };
        let mut devices: Vec<OsString> = Vec::new();
        for (i, disk) in self.disks.iter().enumerate() {
            devices.push("-chardev".into());
            devices.push(chardev(&format!("blk{i}"), disk));
            devices.push("-device".into());
            devices.push(
                format!(
                    "vhost-user-blk-pci,chardev=blk{i},num-queues={}",
                    self.disk_queues
                )
                .into(),
            );
        }
        if let Some(net) = &self.net {
            devices.push("-chardev".into());
            devices.push(chardev("net0", net));
            devices.push("-netdev".into());
            devices.push("vhost-user,id=net0,chardev=net0".into());
            devices.push("-device".into());
            // vectors=0 (INTx): QEMU 7.2 TCG segfaults in vhost_net_start with MSI-X.
            let vectors = if self.flavor.net_msix() {
                ""
            } else {
                "vectors=0,"
            };
            devices
                .push(format!("virtio-net-pci,netdev=net0,{vectors}mac=52:54:00:12:34:56").into());
        }
        a.extend(devices);
        a.extend(self.extra_args.iter().cloned());
        a.push("-kernel".into());
        a.push(self.kernel.clone().into());
        a.push("-initrd".into());
        a.push(self.initrd.clone().into());
        a.push("-append".into());
        a.push(self.cmdline().into());
        a
    }
}

/// The guest's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestResult {
    Pass,
    /// `FT-RESULT: FAIL <reason>`.
    Fail(String),
    /// No result line before the timeout; QEMU was killed.
    Timeout,
    /// QEMU exited without a result line.
    Exited(String),
}

/// Everything a test needs to judge and report a guest run.
#[derive(Clone, Debug)]
pub struct GuestOutcome {
    pub result: GuestResult,
    /// `FT-STAGE:` names with their time since QEMU started, in order.
    pub stages: Vec<(String, Duration)>,
    /// When the result line appeared (or the run ended), since QEMU started.
    pub elapsed: Duration,
    /// The whole serial console.
    pub serial: String,
    pub serial_log: PathBuf,
    /// QEMU's own stderr (connection errors, assertion failures).
    pub qemu_stderr: String,
}

impl GuestOutcome {
    pub fn passed(&self) -> bool {
        self.result == GuestResult::Pass
    }

    /// Time of the first `FT-STAGE: <name>` line since QEMU started.
    pub fn stage(&self, name: &str) -> Option<Duration> {
        self.stages.iter().find(|(n, _)| n == name).map(|(_, t)| *t)
    }

    /// Time between two stages, if both were reached in this order.
    pub fn between(&self, from: &str, to: &str) -> Option<Duration> {
        self.stage(to)?.checked_sub(self.stage(from)?)
    }

    /// Result, the last serial lines and QEMU's stderr, for assertion messages.
    pub fn report(&self, lines: usize) -> String {
        let all: Vec<&str> = self.serial.lines().collect();
        format!(
            "guest result {:?} after {:.1} s (serial log {})\n--- last {} serial lines ---\n{}\n--- qemu stderr ---\n{}",
            self.result,
            self.elapsed.as_secs_f64(),
            self.serial_log.display(),
            lines,
            all[all.len().saturating_sub(lines)..].join("\n"),
            self.qemu_stderr.trim_end(),
        )
    }
}

#[derive(Default)]
struct Console {
    text: String,
    stages: Vec<(String, Duration)>,
    result: Option<(GuestResult, Duration)>,
    closed: bool,
}

/// A running QEMU; killed on drop.
pub struct Guest {
    child: Option<Child>,
    started: Instant,
    timeout: Duration,
    serial_log: PathBuf,
    console: Arc<(Mutex<Console>, Condvar)>,
    readers: Vec<JoinHandle<()>>,
    stderr: Arc<Mutex<String>>,
}

impl Guest {
    /// Starts QEMU. The backends must already be listening (QEMU is the vhost-user client).
    pub fn start(config: &GuestConfig) -> Result<Guest> {
        let log = File::create(&config.serial_log).map_err(HarnessError::io(format!(
            "creating {}",
            config.serial_log.display()
        )))?;
        let started = Instant::now();
        let mut child = Command::new(&config.qemu)
            .args(config.qemu_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(HarnessError::io(format!(
                "starting {}",
                config.qemu.to_string_lossy()
            )))?;
        let console = Arc::new((Mutex::new(Console::default()), Condvar::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let readers = vec![
            {
                let console = console.clone();
                std::thread::spawn(move || read_console(out, log, started, &console))
            },
            {
                let stderr = stderr.clone();
                std::thread::spawn(move || {
                    let mut buf = String::new();
                    let _ = BufReader::new(err).read_to_string(&mut buf);
                    stderr
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&buf);
                })
            },
        ];
        Ok(Guest {
            child: Some(child),
            started,
            timeout: config.timeout,
            serial_log: config.serial_log.clone(),
            console,
            readers,
            stderr,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Blocks until `FT-STAGE: <name>` appears; false if the guest ended or the run timed out
    /// first. Lets a test act on the host mid-run (kill a backend, take a checkpoint, ...).
    pub fn wait_for_stage(&self, name: &str) -> bool {
        let deadline = self.started + self.timeout;
        let (lock, cvar) = &*self.console;
        let mut c = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if c.stages.iter().any(|(n, _)| n == name) {
                return true;
            }
            let now = Instant::now();
            if c.result.is_some() || c.closed || now >= deadline {
                return false;
            }
            c = cvar
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for the result line, QEMU's exit or the timeout, then makes sure QEMU is gone.
    pub fn wait(mut self) -> Result<GuestOutcome> {
        let deadline = self.started + self.timeout;
        let (lock, cvar) = &*self.console;
        let mut timed_out = false;
        {
            let mut c = lock.lock().unwrap_or_else(|e| e.into_inner());
            while c.result.is_none() && !c.closed {
                let now = Instant::now();
                if now >= deadline {
                    timed_out = true;
                    break;
                }
                c = cvar
                    .wait_timeout(c, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        // The guest powers off right after its result line: give QEMU a moment to exit.
        let child = self.child.take().expect("running guest");
        let grace = if timed_out {
            Duration::ZERO
        } else {
            Duration::from_secs(10)
        };
        let status =
            wait_or_kill(child, grace).map_err(HarnessError::io("waiting for QEMU to exit"))?;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let c = std::mem::take(&mut *lock.lock().unwrap_or_else(|e| e.into_inner()));
        let elapsed = c
            .result
            .as_ref()
            .map(|(_, t)| *t)
            .unwrap_or_else(|| self.started.elapsed());
        let result = match c.result {
            Some((r, _)) => r,
            None if timed_out => GuestResult::Timeout,
            None => GuestResult::Exited(format!("{status}")),
        };
        Ok(GuestOutcome {
            result,
            stages: c.stages,
            elapsed,
            serial: c.text,
            serial_log: self.serial_log.clone(),
            qemu_stderr: std::mem::take(
                &mut *self.stderr.lock().unwrap_or_else(|e| e.into_inner()),
            ),
        })
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = wait_or_kill(child, Duration::ZERO);
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

/// Waits up to `grace` for QEMU to exit by itself, then kills it. Killing closes its stdout
/// and stderr, which ends the reader threads.
fn wait_or_kill(mut child: Child, grace: Duration) -> std::io::Result<ExitStatus> {
    let deadline = Instant::now() + grace;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            return terminate(child, Duration::from_secs(2));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_console(
    out: impl Read,
    mut log: File,
    started: Instant,
    console: &(Mutex<Console>, Condvar),
) {
    let (lock, cvar) = console;
    let mut reader = BufReader::new(out);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let _ = log.write_all(&raw);
        let at = started.elapsed();
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\n', '\r']);
        let mut c = lock.lock().unwrap_or_else(|e| e.into_inner());
        c.text.push_str(line);
        c.text.push('\n');
        // Kernel messages can land mid-line: look for the marks anywhere in the line.
        if let Some(i) = line.find(STAGE_MARK) {
            c.stages
                .push((line[i + STAGE_MARK.len()..].trim().to_owned(), at));
        } else if let Some(i) = line.find(RESULT_MARK) {
            let verdict = line[i + RESULT_MARK.len()..].trim();
            if c.result.is_none() {
                let result = if verdict == "PASS" {
                    GuestResult::Pass
                } else {
                    GuestResult::Fail(
                        verdict
                            .strip_prefix("FAIL")
                            .unwrap_or(verdict)
                            .trim()
                            .to_owned(),
                    )
                };
                c.result = Some((result, at));
            }
        }
        cvar.notify_all();
    }
    let _ = log.flush();
    lock.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
    cvar.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(serial: &str) -> Console {
        let console = (Mutex::new(Console::default()), Condvar::new());
        let log = File::options().write(true).open("/dev/null").unwrap();
        read_console(serial.as_bytes(), log, Instant::now(), &console);
        console.0.into_inner().unwrap()
    }

    #[test]
    fn pass_and_stages_are_parsed() {
        let c =
            parse("[ 1.0] boot\r\nFT-STAGE: init\nFT-STAGE: test fio-verify\n\nFT-RESULT: PASS\n");
        let names: Vec<&str> = c.stages.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["init", "test fio-verify"]);
        assert_eq!(c.result.map(|(r, _)| r), Some(GuestResult::Pass));
        assert!(c.closed);
    }

    #[test]
    fn fail_reason_survives_a_kernel_message_mid_line() {
        let c = parse("[ 3.2] virtio: foo FT-RESULT: FAIL fio-verify: disk missing\n");
        assert_eq!(
            c.result.map(|(r, _)| r),
            Some(GuestResult::Fail("fio-verify: disk missing".into()))
        );
    }

    #[test]
    fn no_result_line_is_no_result_and_first_result_wins() {
        let c = parse("FT-STAGE: init\nKernel panic\n");
        assert!(c.result.is_none() && c.closed);
        let c = parse("FT-RESULT: FAIL x\nFT-RESULT: PASS\n");
        assert_eq!(
            c.result.map(|(r, _)| r),
            Some(GuestResult::Fail("x".into()))
        );
        let c = parse("FT-RESULT: PASSED\n");
        assert_eq!(
            c.result.map(|(r, _)| r),
            Some(GuestResult::Fail("PASSED".into()))
        );
    }

    #[test]
    fn qemu_command_line_is_tcg_with_shared_memory() {
        let image = GuestImage {
            kernel: "/k".into(),
            initrd: "/i".into(),
        };
        let mut config = GuestConfig::new(&image, "boot", Path::new("/tmp"));
        config.disks = vec!["/s/a.sock".into(), "/s/b.sock".into()];
        config.net = Some("/s/n.sock".into());
        config.reconnect_secs = Some(1);
        config.cmdline_extra.push("ft.size=4M".into());
        let args: Vec<String> = config
            .qemu_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        assert!(line.contains("-accel tcg"), "{line}");
        assert!(!line.contains("kvm"), "{line}");
        assert!(line.contains("memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(line.contains("-chardev socket,id=blk1,path=/s/b.sock,reconnect=1"));
        assert!(line.contains("-device vhost-user-blk-pci,chardev=blk1,num-queues=1"));
        assert!(line.contains("virtio-net-pci,netdev=net0,vectors=0"));
        // QEMU 10: MSI-X on the NIC, reconnect in milliseconds, its own binary.
        let config = config.on(QemuFlavor::Qemu10);
        let line: Vec<String> = config
            .qemu_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = line.join(" ");
        assert!(
            line.contains("virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56"),
            "{line}"
        );
        assert!(line.contains("path=/s/b.sock,reconnect-ms=1000"), "{line}");
        assert!(config.qemu.to_string_lossy().ends_with("scripts/qemu10.sh"));
        assert_eq!(
            args.last().unwrap(),
            "console=ttyS0 panic=-1 loglevel=4 ft.test=boot ft.size=4M"
        );
    }
}
