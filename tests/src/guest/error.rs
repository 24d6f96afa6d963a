// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Errors of the guest test harness: anything that keeps a guest test from running at all.
//! (A guest that runs and fails is not an error: see [`super::vm::GuestResult`].)

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{script} failed ({status}); see its output above")]
    Script {
        script: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error("{0}")]
    Missing(String),
    #[error(
        "backend {program} exited ({status}) before creating {socket}; log {log}:\n{log_tail}"
    )]
    BackendExited {
        program: String,
        status: std::process::ExitStatus,
        socket: PathBuf,
        log: PathBuf,
        log_tail: String,
    },
    #[error("backend {program} did not create {socket} within {secs} s")]
    BackendSocketTimeout {
        program: String,
        socket: PathBuf,
        secs: u64,
    },
}

impl HarnessError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> HarnessError {
        let what = what.into();
        move |source| HarnessError::Io { what, source }
    }
}

pub type Result<T> = std::result::Result<T, HarnessError>;
