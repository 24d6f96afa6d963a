// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The restore command line: the primary's recorded QEMU argument vector with the same virtual
//! hardware, made to wait for its state (`-S -incoming defer`) and to be driven over a QMP socket
//! of the takeover's own.
//!
//! Only host-side plumbing is changed, never a device: the migration stream only loads into the
//! same machine type, memory layout and device set. Dropped: `-S`, `-daemonize`, `-incoming`,
//! `-qmp`, `-qmp-pretty`, `-monitor`, `-pidfile`. Each `-serial` keeps its port but gets a new
//! backend: the first writes to the takeover's serial log, others go to `null` (a port without
//! a backend would be a different machine).
//!
//! QEMU's own parser decides whether an option takes a value from a fixed table; a value is never
//! mistaken for an option here either (`-append "-S"` stays a kernel command line), because every
//! option not in `NO_VALUE` consumes the next word.

use std::path::Path;

/// QEMU 7.2 options without a value (qemu-options.hx entries without HAS_ARG) that may appear
/// in a VM's command line. Every other option takes one.
const NO_VALUE: &[&str] = &[
    "S",
    "s",
    "daemonize",
    "nodefaults",
    "no-reboot",
    "no-shutdown",
    "nographic",
    "enable-kvm",
    "snapshot",
    "no-hpet",
    "no-acpi",
    "no-user-config",
    "full-screen",
    "only-migratable",
    "preconfig",
    "enable-fips",
    "win2k-hack",
    "no-fd-bootchk",
    "semihosting",
    "xen-attach",
    "xen-domid-restrict",
    "alt-grab",
    "ctrl-grab",
    "usb",
    "version",
    "h",
    "help",
];

/// Options dropped with their value.
const DROP_WITH_VALUE: &[&str] = &["incoming", "qmp", "qmp-pretty", "monitor", "pidfile"];
/// Options dropped alone.
const DROP_ALONE: &[&str] = &["S", "daemonize"];

/// `-name`, `--name` or `-name=v` / `--name=v` -> (name, inline value).
fn option(word: &str) -> Option<(&str, Option<&str>)> {
    let body = word.strip_prefix("--").or_else(|| word.strip_prefix('-'))?;
    if body.is_empty() {
        return None;
    }
    Some(match body.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (body, None),
    })
}

/// The restore argument vector (without the program): `recorded` minus its program, rewritten
/// as the module doc says, plus `-S -incoming defer -qmp unix:QMP,server=on,wait=off`.
pub fn restore_args(recorded: &[String], qmp: &Path, serial_log: &Path) -> Vec<String> {
    let mut out = Vec::with_capacity(recorded.len() + 6);
    let mut serials = 0;
    let mut words = recorded.iter().skip(1);
    while let Some(w) = words.next() {
        let Some((name, inline)) = option(w) else {
            out.push(w.clone());
            continue;
        };
        if NO_VALUE.contains(&name) && inline.is_none() {
            if !DROP_ALONE.contains(&name) {
                out.push(w.clone());
            }
            continue;
        }
        let value = match inline {
            Some(v) => Some(v.to_owned()),
            None => words.next().cloned(),
        };
        if DROP_WITH_VALUE.contains(&name) {
            continue;
        }
        if name == "serial" {
            out.push("-serial".into());
            out.push(if serials == 0 {
                format!("file:{}", serial_log.display())
            } else {
                "null".into()
            });
            serials += 1;
            continue;
        }
        match (inline, value) {
            (Some(_), _) => out.push(w.clone()),
            (None, Some(v)) => {
                out.push(w.clone());
                out.push(v);
            }
            (None, None) => out.push(w.clone()),
        }
    }
    out.extend([
        "-S".into(),
        "-incoming".into(),
        "defer".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    out
}

/// The value of `--flag VALUE` or `--flag=VALUE` in a daemon's argument vector.
pub fn flag_value<'a>(argv: &'a [String], flag: &str) -> Option<&'a str> {
    let long = format!("--{flag}");
    let eq = format!("--{flag}=");
    let mut it = argv.iter();
    while let Some(w) = it.next() {
        if *w == long {
            return it.next().map(String::as_str);
        }
        if let Some(v) = w.strip_prefix(&eq) {
            return Some(v);
        }
    }
    None
}

/// `argv` without any `--flag VALUE` / `--flag=VALUE`.
pub fn without_flag(argv: &[String], flag: &str) -> Vec<String> {
    let long = format!("--{flag}");
    let eq = format!("--{flag}=");
    let mut out = Vec::with_capacity(argv.len());
    let mut it = argv.iter();
    while let Some(w) = it.next() {
        if *w == long {
            it.next();
        } else if !w.starts_with(&eq) {
            out.push(w.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn host_plumbing_is_replaced_and_devices_are_kept() {
        let rec = v(
            "/usr/bin/qemu -accel tcg -nodefaults -serial stdio -no-reboot -m 320M \
             -qmp unix:/a/qmp.sock,server=on,wait=off -S -daemonize -pidfile /a/pid \
             -chardev socket,id=blk0,path=/a/blk.sock -device vhost-user-blk-pci,chardev=blk0 \
             -append -S -incoming tcp:0:4444 -serial pty",
        );
        let out = restore_args(&rec, Path::new("/r/qmp.sock"), Path::new("/r/serial.log"));
        assert_eq!(
            out.join(" "),
            "-accel tcg -nodefaults -serial file:/r/serial.log -no-reboot -m 320M \
             -chardev socket,id=blk0,path=/a/blk.sock -device vhost-user-blk-pci,chardev=blk0 \
             -append -S -serial null \
             -S -incoming defer -qmp unix:/r/qmp.sock,server=on,wait=off"
        );
    }

    #[test]
    fn inline_values_and_double_dashes_are_understood() {
        let rec = v("qemu --qmp=unix:/x --m 512M -serial=stdio -kernel /k");
        let out = restore_args(&rec, Path::new("/q"), Path::new("/s"));
        assert_eq!(
            out.join(" "),
            "--m 512M -serial file:/s -kernel /k -S -incoming defer -qmp unix:/q,server=on,wait=off"
        );
    }

    #[test]
    fn daemon_flags_are_found_and_replaced() {
        let argv = v("blk --socket /a.sock --replay old.json --image=/i --replay=x");
        assert_eq!(flag_value(&argv, "socket"), Some("/a.sock"));
        assert_eq!(flag_value(&argv, "image"), Some("/i"));
        assert_eq!(flag_value(&argv, "control"), None);
        assert_eq!(
            without_flag(&argv, "replay").join(" "),
            "blk --socket /a.sock --image=/i"
        );
    }
}
