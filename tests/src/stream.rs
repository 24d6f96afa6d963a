// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A numbered TCP byte stream through an echo server, checked byte for byte: the failover tests'
//! proof that the guest's TCP connections survive a takeover.
//!
//! The sender writes the stream `byte(i) = pattern(i)` (each 8-byte word holds its own offset,
//! little endian, so a shifted, repeated or skipped range never matches by accident) at a bounded
//! rate; the receiver reads the echo and compares every byte with the pattern at the offset it
//! expects next. So every byte must come back exactly once, in order. A mismatch, a reset, an EOF
//! or any other socket error is recorded as the stream's error and ends it; a stall is not an
//! error (the guest may be paused or restoring) but its longest gap is reported.
//!
//! Invariant: `verified <= sent`, and `verified` only counts bytes that matched.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The stream's byte at `offset`.
pub fn pattern(offset: u64) -> u8 {
    (offset & !7).to_le_bytes()[(offset & 7) as usize]
}

/// Fills `buf` with the stream's bytes from `offset` on.
fn fill(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(offset + i as u64);
    }
}

/// Index of the first byte of `buf` that differs from the stream at `offset`.
fn first_mismatch(offset: u64, buf: &[u8]) -> Option<usize> {
    buf.iter()
        .enumerate()
        .find(|(i, b)| **b != pattern(offset + *i as u64))
        .map(|(i, _)| i)
}

/// A snapshot of a running stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Bytes written to the socket.
    pub sent: u64,
    /// Bytes echoed back and found equal to the stream, in order.
    pub verified: u64,
    /// Longest time without a verified byte, while bytes were outstanding.
    pub longest_gap: Duration,
    /// The first failure (mismatch, reset, EOF, socket error); the stream is over once set.
    pub error: Option<String>,
}

struct Shared {
    sent: AtomicU64,
    verified: AtomicU64,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
    longest_gap: Mutex<Duration>,
}

impl Shared {
    fn fail(&self, e: String) {
        let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A running checked stream; [`EchoStream::finish`] stops it and returns the final stats.
pub struct EchoStream {
    shared: Arc<Shared>,
    stream: TcpStream,
    threads: Vec<JoinHandle<()>>,
}

impl EchoStream {
    /// Connects to the echo server at `addr` (from the calling thread, so a test's network
    /// namespace applies) and starts sending `rate` bytes per second in `chunk`-byte writes.
    /// At most `window` bytes are outstanding (sent, not yet echoed).
    pub fn start(
        addr: SocketAddr,
        connect_timeout: Duration,
        rate: u64,
        chunk: usize,
        window: u64,
    ) -> io::Result<EchoStream> {
        let stream = TcpStream::connect_timeout(&addr, connect_timeout)?;
        stream.set_nodelay(true)?;
        cap_retransmit_backoff(&stream);
        let shared = Arc::new(Shared {
            sent: AtomicU64::new(0),
            verified: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
            longest_gap: Mutex::new(Duration::ZERO),
        });
        let mut threads = Vec::new();
        {
            let shared = shared.clone();
            let mut out = stream.try_clone()?;
            out.set_write_timeout(Some(Duration::from_millis(200)))?;
            threads.push(std::thread::spawn(move || {
                send_loop(&mut out, &shared, rate.max(1), chunk.max(1), window)
            }));
        }
        {
            let shared = shared.clone();
            let mut input = stream.try_clone()?;
            // A read timeout lets the receiver notice stop and measure gaps.
            input.set_read_timeout(Some(Duration::from_millis(100)))?;
            threads.push(std::thread::spawn(move || recv_loop(&mut input, &shared)));
        }
        Ok(EchoStream {
            shared,
            stream,
            threads,
        })
    }

    pub fn stats(&self) -> StreamStats {
        StreamStats {
            sent: self.shared.sent.load(Ordering::Relaxed),
            verified: self.shared.verified.load(Ordering::Relaxed),
            longest_gap: *self
                .shared
                .longest_gap
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
            error: self
                .shared
                .error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// Waits until `verified` reaches at least `bytes`, or the stream failed, or `timeout`.
    pub fn wait_verified(&self, bytes: u64, timeout: Duration) -> StreamStats {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.stats();
            if s.verified >= bytes || s.error.is_some() || Instant::now() >= deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops sending, waits up to `drain` for the outstanding bytes to come back, closes the
    /// connection and returns the final stats. Bytes still outstanding after `drain` are an
    /// error.
    pub fn finish(mut self, drain: Duration) -> StreamStats {
        self.shared.stop.store(true, Ordering::Relaxed);
        // The sender ends at its next tick; the receiver keeps reading until all is back.
        if let Some(sender) = (!self.threads.is_empty()).then(|| self.threads.remove(0)) {
            let _ = sender.join();
        }
        let sent = self.shared.sent.load(Ordering::Relaxed);
        let s = self.wait_verified(sent, drain);
        if s.error.is_none() && s.verified < sent {
            self.shared.fail(format!(
                "{} of {sent} bytes sent never came back within {drain:?}",
                sent - s.verified
            ));
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.stats()
    }
}

impl Drop for EchoStream {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.stream.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `TCP_RTO_MAX_MS` (Linux 6.15+; not in older headers).
const TCP_RTO_MAX_MS: libc::c_int = 44;

/// Caps the retransmission timeout of `stream` at 1 s where the kernel allows it (6.15+).
///
/// After a takeover the guest's peer retransmits; with the default exponential backoff (up to
/// 120 s) a few seconds of outage on a loaded machine turn into a minute of silence, which
/// measures TCP's backoff, not the failover. Older kernels keep the default (logged).
pub fn cap_retransmit_backoff(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let ms: libc::c_int = 1000;
    // SAFETY: setsockopt on our own socket with a c_int option value.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_RTO_MAX_MS,
            (&ms as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        log::info!(
            "TCP_RTO_MAX_MS not supported ({}): default retransmission backoff",
            io::Error::last_os_error()
        );
        return;
    }
    // More frequent retransmissions would exhaust tcp_retries2 (15) within seconds and reset
    // the connection during a long stall: give up only after 10 minutes instead.
    let user_timeout: libc::c_uint = 600_000;
    // SAFETY: as above, with a c_uint value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&user_timeout as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        );
    }
}

fn send_loop(out: &mut TcpStream, shared: &Shared, rate: u64, chunk: usize, window: u64) {
    let started = Instant::now();
    let mut buf = vec![0u8; chunk];
    let mut sent = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        // Rate and window both bound what may be outstanding; TCP's own flow control does the rest.
        let allowed = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        let outstanding = sent - shared.verified.load(Ordering::Relaxed);
        if sent >= allowed || outstanding + chunk as u64 > window {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        fill(sent, &mut buf);
        // A write may block for a long time while the peer is frozen: that is a gap, not an
        // error (the write timeout only lets this loop notice `stop`). Only a socket error
        // ends the stream.
        let mut done = 0;
        // Counted before the write: the echo may be back before write() returns.
        shared.sent.store(sent + chunk as u64, Ordering::Relaxed);
        while done < buf.len() {
            match out.write(&buf[done..]) {
                Ok(0) => {
                    shared.fail(format!(
                        "send at byte {}: socket closed",
                        sent + done as u64
                    ));
                    return;
                }
                Ok(n) => done += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    if shared.stop.load(Ordering::Relaxed) {
                        // Only what really went out is owed back.
                        shared.sent.store(sent + done as u64, Ordering::Relaxed);
                        return;
                    }
                }
                Err(e) => {
                    if !shared.stop.load(Ordering::Relaxed) {
                        shared.fail(format!("send at byte {}: {e}", sent + done as u64));
                    }
                    return;
                }
            }
        }
        sent += chunk as u64;
    }
}

fn recv_loop(input: &mut TcpStream, shared: &Shared) {
    let mut buf = vec![0u8; 64 << 10];
    let mut offset = 0u64;
    let mut last_progress = Instant::now();
    loop {
        match input.read(&mut buf) {
            Ok(0) => {
                let sent = shared.sent.load(Ordering::Relaxed);
                if offset < sent || !shared.stop.load(Ordering::Relaxed) {
                    shared.fail(format!("EOF from the echo server after {offset} bytes"));
                }
                return;
            }
            Ok(n) => {
                if let Some(i) = first_mismatch(offset, &buf[..n]) {
                    shared.fail(format!(
                        "byte {} came back as {:#04x}, expected {:#04x}",
                        offset + i as u64,
                        buf[i],
                        pattern(offset + i as u64)
                    ));
                    return;
                }
                offset += n as u64;
                if offset > shared.sent.load(Ordering::Relaxed) {
                    shared.fail(format!("{offset} bytes came back, more than were sent"));
                    return;
                }
                shared.verified.store(offset, Ordering::Relaxed);
                note_gap(shared, last_progress.elapsed());
                last_progress = Instant::now();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let outstanding = shared.sent.load(Ordering::Relaxed) > offset;
                if outstanding {
                    note_gap(shared, last_progress.elapsed());
                } else {
                    last_progress = Instant::now();
                }
                let done = shared.stop.load(Ordering::Relaxed)
                    && shared.error.lock().map(|e| e.is_some()).unwrap_or(true);
                if done {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // After finish() shut the socket down, errors are expected.
                let sent = shared.sent.load(Ordering::Relaxed);
                if !(shared.stop.load(Ordering::Relaxed) && offset >= sent) {
                    shared.fail(format!("receive after {offset} bytes: {e}"));
                }
                return;
            }
        }
    }
}

fn note_gap(shared: &Shared, gap: Duration) {
    let mut g = shared.longest_gap.lock().unwrap_or_else(|e| e.into_inner());
    if gap > *g {
        *g = gap;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// An echo server on loopback; `corrupt_at` flips the byte at that stream offset,
    /// `close_after` hangs up after that many bytes.
    fn echo_server(corrupt_at: Option<u64>, close_after: Option<u64>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let mut off = 0u64;
            loop {
                let n = match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    if Some(off + i as u64) == corrupt_at {
                        *b ^= 0xff;
                    }
                }
                let n = match close_after {
                    Some(c) if off + n as u64 >= c => {
                        let _ = s.write_all(&buf[..(c - off) as usize]);
                        return;
                    }
                    _ => n,
                };
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
                off += n as u64;
            }
        });
        addr
    }

    fn run(addr: SocketAddr) -> StreamStats {
        let s = EchoStream::start(addr, Duration::from_secs(5), 4 << 20, 1000, 1 << 20).unwrap();
        let stats = s.wait_verified(200_000, Duration::from_secs(30));
        assert!(
            stats.verified >= 200_000 || stats.error.is_some(),
            "{stats:?}"
        );
        s.finish(Duration::from_secs(10))
    }

    #[test]
    fn pattern_numbers_each_word() {
        let mut b = [0u8; 16];
        fill(8, &mut b);
        assert_eq!(&b[..8], &8u64.to_le_bytes());
        assert_eq!(&b[8..], &16u64.to_le_bytes());
        assert_eq!(first_mismatch(8, &b), None);
        assert_eq!(first_mismatch(0, &b), Some(0));
    }

    #[test]
    fn an_honest_echo_verifies_every_byte() {
        let stats = run(echo_server(None, None));
        assert_eq!(stats.error, None);
        assert_eq!(stats.verified, stats.sent);
        assert!(stats.sent >= 200_000);
    }

    #[test]
    fn a_corrupted_byte_is_caught_at_its_offset() {
        let stats = run(echo_server(Some(123_457), None));
        let e = stats.error.expect("corruption must be detected");
        assert!(e.contains("byte 123457"), "{e}");
    }

    #[test]
    fn a_hang_up_is_an_error() {
        let stats = run(echo_server(None, Some(50_000)));
        assert!(stats.error.is_some(), "{stats:?}");
        assert!(stats.verified <= 50_000, "{stats:?}");
    }
}
