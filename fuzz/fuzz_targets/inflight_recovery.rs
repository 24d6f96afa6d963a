// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! INFLIGHT_SHMFD recovery and bookkeeping over a fuzzed region; see
//! `ft_common::vhost_user::fuzzing::inflight_recovery`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ft_common::vhost_user::fuzzing::inflight_recovery(data);
});
