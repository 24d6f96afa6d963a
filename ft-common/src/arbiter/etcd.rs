// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A blocking façade over the async `etcd-client`: one dedicated thread runs a current-thread
//! tokio runtime with the client; callers hand it jobs (closures returning futures) and wait for
//! their results with a timeout, or leave them running in the background (the keepalive).
//!
//! With several endpoints (an etcd cluster) the client balances requests over them; a request
//! that lands on a member that is down or without a leader is repeated within its timeout.
//!
//! Invariants: no caller ever blocks longer than its timeout (a partitioned etcd costs a
//! timeout, never a hang); dropping the façade stops the runtime and every background job.

use etcd_client::{Client, ConnectOptions};
use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

type Job = Box<dyn FnOnce(Client) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Why an etcd operation did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd {what}: {source}")]
    Etcd {
        what: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd {what}: no answer within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("etcd client thread: {0}")]
    Thread(String),
}

/// The etcd client thread.
pub struct Etcd {
    jobs: Option<tokio::sync::mpsc::UnboundedSender<Job>>,
    thread: Option<JoinHandle<()>>,
    timeout: Duration,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Etcd {
    /// Starts the thread and connects to `endpoints`; `timeout` bounds the connect and every
    /// later [`Etcd::call`].
    pub fn connect(endpoints: &[String], timeout: Duration) -> Result<Etcd, EtcdError> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), EtcdError>>();
        let (jobs_tx, mut jobs_rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let endpoints = endpoints.to_vec();
        let thread = std::thread::Builder::new()
            .name("ft-etcd".into())
            .spawn(move || {
                // Signals are for the process's main thread (the coordinator's sigwait).
                block_termination_signals();
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(EtcdError::Thread(e.to_string())));
                        return;
                    }
                };
                rt.block_on(async move {
                    // No per-request timeout in the options: tonic would apply it to the
                    // keepalive stream as a whole. Every call is bounded by `call` instead.
                    let opts = ConnectOptions::new().with_connect_timeout(timeout);
                    let client = match tokio::time::timeout(
                        timeout,
                        Client::connect(&endpoints, Some(opts)),
                    )
                    .await
                    {
                        Ok(Ok(c)) => c,
                        Ok(Err(source)) => {
                            let _ = ready_tx.send(Err(EtcdError::Etcd {
                                what: format!("connect to {}", endpoints.join(",")),
                                source,
                            }));
                            return;
                        }
                        Err(_) => {
                            let _ = ready_tx.send(Err(EtcdError::Timeout {
                                what: format!("connect to {}", endpoints.join(",")),
                                after: timeout,
                            }));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    while let Some(job) = jobs_rx.recv().await {
                        tokio::spawn(job(client.clone()));
                    }
                });
            })
            .map_err(|e| EtcdError::Thread(e.to_string()))?;
        let ready = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(EtcdError::Thread("client thread ended".into())));
        let mut etcd = Etcd {
            jobs: Some(jobs_tx),
            thread: Some(thread),
            timeout,
        };
        match ready {
            Ok(()) => Ok(etcd),
            Err(e) => {
                etcd.stop();
                Err(e)
            }
        }
    }

    /// The bound on one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `f` on the client thread and waits for its result, at most the call timeout.
    ///
    /// An attempt that finds its etcd member unreachable (a member down, or one without a
    /// leader: gRPC `UNAVAILABLE`) is repeated every [`RETRY`] within the timeout: the client
    /// balances over every endpoint and may pick a dead one, and the next attempt may pick a
    /// live one. Such an attempt may still have been applied (its answer lost), so `f` must be
    /// safe to repeat: the callers' operations are (see [`super::claim`]).
    pub fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, EtcdError>
    where
        T: Send + 'static,
        F: Fn(Client) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let timeout = self.timeout;
        let label = what.to_string();
        let job: Job = Box::new(move |client| {
            Box::pin(async move {
                let deadline = tokio::time::Instant::now() + timeout;
                let r = loop {
                    let attempt = f(client.clone());
                    match tokio::time::timeout_at(deadline, attempt).await {
                        Ok(Err(e))
                            if unreachable(&e)
                                && tokio::time::Instant::now() + RETRY < deadline =>
                        {
                            log::debug!("etcd {label}: {e}; trying again");
                            tokio::time::sleep(RETRY).await;
                        }
                        r => break r,
                    }
                };
                let _ = tx.send(r);
            })
        });
        self.submit(job)?;
        let timed_out = || EtcdError::Timeout {
            what: what.to_string(),
            after: timeout,
        };
        // The job's own timeout answers first; this one only guards a stuck thread.
        match rx.recv_timeout(timeout + Duration::from_secs(1)) {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(source))) => Err(EtcdError::Etcd {
                what: what.to_string(),
                source,
            }),
            Ok(Err(_)) | Err(_) => Err(timed_out()),
        }
    }

    /// Runs `f` on the client thread in the background until it ends or the façade is dropped.
    pub fn spawn<F, Fut>(&self, f: F) -> Result<(), EtcdError>
    where
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.submit(Box::new(move |client| Box::pin(f(client))))
    }

    fn submit(&self, job: Job) -> Result<(), EtcdError> {
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| EtcdError::Thread("client thread stopped".into()))
    }

    fn stop(&mut self) {
        // Closing the job channel ends the thread's loop; dropping its runtime cancels the
        // background jobs.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Pause between attempts of a call whose etcd member was unreachable.
pub const RETRY: Duration = Duration::from_millis(50);

/// Whether `e` says the member the attempt went to could not serve it (down, unreachable, or
/// without a leader), so that another attempt may succeed.
fn unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::Unavailable,
        _ => false,
    }
}

/// Blocks SIGINT and SIGTERM on the calling thread, so that they reach the thread that waits
/// for them (or, before that thread blocks them, end the process by their default action).
fn block_termination_signals() {
    // SAFETY: plain libc signal-mask calls on a zeroed, initialised sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
