// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The checkpointer's end of the standby protocol: one control connection, one request at a
//! time, every read and write bounded by a timeout.
//!
//! Invariant: a connection that saw an I/O error, a timeout or an unexpected reply is dropped
//! (the next call reconnects), so a late reply can never be taken as the answer to a later
//! request.

use super::protocol::{Conn, StandbyAddr, StandbyReply, StandbyRequest};
use crate::control::codec::{read_message, write_message, MAX_FRAME_LEN};
use std::time::Duration;

/// A (lazily connected) control connection to a standby.
#[derive(Debug)]
pub struct StandbyClient {
    addr: StandbyAddr,
    timeout: Duration,
    conn: Option<Conn>,
}

impl StandbyClient {
    pub fn new(addr: StandbyAddr, timeout: Duration) -> StandbyClient {
        StandbyClient {
            addr,
            timeout,
            conn: None,
        }
    }

    pub fn addr(&self) -> &StandbyAddr {
        &self.addr
    }

    /// Drops the connection (the standby discards a checkpoint in progress).
    pub fn disconnect(&mut self) {
        if let Some(c) = self.conn.take() {
            c.shutdown();
        }
    }

    fn conn(&mut self) -> Result<&mut Conn, String> {
        if self.conn.is_none() {
            let c = self
                .addr
                .connect(self.timeout)
                .map_err(|e| format!("standby {} unreachable: {e}", self.addr))?;
            self.conn = Some(c);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| "standby not connected".to_string())
    }

    /// Sends a request without waiting for its reply.
    pub fn send(&mut self, req: &StandbyRequest) -> Result<(), String> {
        let addr = self.addr.to_string();
        let r = write_message(self.conn()?, req);
        r.map_err(|e| {
            self.disconnect();
            format!("standby {addr}: {e}")
        })
    }

    /// Reads the next reply, waiting at most `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<StandbyReply, String> {
        let addr = self.addr.to_string();
        let c = self.conn()?;
        let _ = c.set_read_timeout(Some(timeout));
        let r = read_message::<_, StandbyReply>(c, MAX_FRAME_LEN);
        match r {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => {
                self.disconnect();
                Err(format!("standby {addr} closed the connection"))
            }
            Err(e) => {
                self.disconnect();
                Err(format!("standby {addr}: {e}"))
            }
        }
    }

    /// One request, one reply.
    pub fn call(&mut self, req: &StandbyRequest) -> Result<StandbyReply, String> {
        self.send(req)?;
        self.recv(self.timeout)
    }
}
