// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Private network namespaces for tests: taps, addresses and servers made inside one vanish with
//! it, so fixed test addresses cannot clash with another run.

use std::io;

/// Runs `f` on a thread in a fresh network namespace; processes spawned from that thread
/// inherit it. A panic in `f` is resumed on the caller's thread.
pub fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's network namespace.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            r,
            0,
            "unshare(CLONE_NEWNET): {}",
            io::Error::last_os_error()
        );
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}
