// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `--checkpointer` argument: parsed into a [`CheckpointerSpec`], which builds the
//! checkpointer it names. Kept apart from the trait (`checkpointer.rs`) so that the
//! implementations, `migrate.rs` among them, depend on the trait and only this file depends on
//! them all.

use super::checkpointer::{Checkpointer, ExecCheckpointer, QmpCheckpointer, SimCheckpointer, Sink};
use super::migrate::{MigrateCheckpointer, MigrateOptions};
use std::path::PathBuf;
use std::time::Duration;

/// A parsed `--checkpointer` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckpointerSpec {
    Sim { ack_delay: Duration },
    Exec { command: String },
    Qmp { socket: PathBuf },
    Migrate(MigrateOptions),
}

impl std::str::FromStr for CheckpointerSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        match (kind, arg) {
            ("sim", None) => Ok(CheckpointerSpec::Sim {
                ack_delay: Duration::ZERO,
            }),
            ("sim", Some(ms)) => ms
                .parse::<u64>()
                .map(|ms| CheckpointerSpec::Sim {
                    ack_delay: Duration::from_millis(ms),
                })
                .map_err(|e| format!("sim:ACK_DELAY_MS: {e}")),
            ("exec", Some(c)) if !c.trim().is_empty() => Ok(CheckpointerSpec::Exec {
                command: c.to_string(),
            }),
            ("qmp", Some(p)) if !p.is_empty() => Ok(CheckpointerSpec::Qmp { socket: p.into() }),
            ("migrate", Some(o)) => MigrateOptions::parse(o).map(CheckpointerSpec::Migrate),
            _ => Err(format!(
                "bad checkpointer {s:?}: expected sim[:ACK_DELAY_MS], exec:CMD, qmp:QMP_SOCKET \
                 or migrate:QMP_SOCKET,standby=ADDR[,mode=live|paused]..."
            )),
        }
    }
}

impl CheckpointerSpec {
    /// Builds the checkpointer, reporting through `sink`.
    pub fn build(&self, sink: Sink) -> Box<dyn Checkpointer> {
        match self {
            CheckpointerSpec::Sim { ack_delay } => Box::new(SimCheckpointer::new(*ack_delay, sink)),
            CheckpointerSpec::Exec { command } => {
                Box::new(ExecCheckpointer::new(command.clone(), sink))
            }
            CheckpointerSpec::Qmp { socket } => {
                Box::new(QmpCheckpointer::new(socket.clone(), sink))
            }
            CheckpointerSpec::Migrate(o) => Box::new(MigrateCheckpointer::new(o.clone(), sink)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(
            "sim".parse::<CheckpointerSpec>().unwrap(),
            CheckpointerSpec::Sim {
                ack_delay: Duration::ZERO
            }
        );
        assert_eq!(
            "sim:5".parse::<CheckpointerSpec>().unwrap(),
            CheckpointerSpec::Sim {
                ack_delay: Duration::from_millis(5)
            }
        );
        assert_eq!(
            "exec:true".parse::<CheckpointerSpec>().unwrap(),
            CheckpointerSpec::Exec {
                command: "true".into()
            }
        );
        assert!(matches!(
            "qmp:/run/q.sock".parse::<CheckpointerSpec>().unwrap(),
            CheckpointerSpec::Qmp { .. }
        ));
        assert!(matches!(
            "migrate:/run/q.sock,standby=unix:/run/s.sock"
                .parse::<CheckpointerSpec>()
                .unwrap(),
            CheckpointerSpec::Migrate(_)
        ));
        for bad in [
            "",
            "sim:x",
            "exec:",
            "exec",
            "qmp:",
            "remus:1",
            "migrate:",
            "migrate:/q",
        ] {
            assert!(bad.parse::<CheckpointerSpec>().is_err(), "{bad}");
        }
    }
}
