// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A TCP proxy that can freeze or cut a link on command: fault injection between the primary's
//! block daemon and the replica service (a stalled network, a lost link) without touching
//! either process.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PASS: u8 = 0;
const FREEZE: u8 = 1;
const CUT: u8 = 2;

struct Shared {
    mode: AtomicU8,
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

/// Forwards connections to `target` while passing; see [`FaultyProxy::freeze`] and
/// [`FaultyProxy::cut`].
pub struct FaultyProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultyProxy {
    /// Listens on `listen` (port 0: any) and forwards to `target`.
    pub fn start(listen: &str, target: SocketAddr) -> std::io::Result<FaultyProxy> {
        let l = TcpListener::bind(listen)?;
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        let shared = Arc::new(Shared {
            mode: AtomicU8::new(PASS),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            while !s.stop.load(Ordering::Acquire) {
                let c = match l.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                if s.mode.load(Ordering::Acquire) == CUT {
                    continue;
                }
                let _ = c.set_nonblocking(false);
                let Ok(up) = TcpStream::connect(target) else {
                    continue;
                };
                let _ = c.set_nodelay(true);
                let _ = up.set_nodelay(true);
                for (a, b) in [(&c, &up), (&up, &c)] {
                    let (Ok(a), Ok(b)) = (a.try_clone(), b.try_clone()) else {
                        continue;
                    };
                    let s2 = s.clone();
                    std::thread::spawn(move || pump(&s2, a, b));
                }
                let mut conns = s.conns.lock().unwrap();
                conns.push(c);
                conns.push(up);
            }
        });
        Ok(FaultyProxy {
            addr,
            shared,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes stop moving (both ways) but connections stay open: a stalled link.
    pub fn freeze(&self) {
        self.shared.mode.store(FREEZE, Ordering::Release);
    }

    /// Every connection is closed and new ones are dropped at once: a lost link.
    pub fn cut(&self) {
        self.shared.mode.store(CUT, Ordering::Release);
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Bytes move again (held ones first); new connections are forwarded.
    pub fn pass(&self) {
        self.shared.mode.store(PASS, Ordering::Release);
    }
}

fn pump(s: &Shared, mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        loop {
            match s.mode.load(Ordering::Acquire) {
                FREEZE if !s.stop.load(Ordering::Acquire) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                CUT => {
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
                _ => break,
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.cut();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
