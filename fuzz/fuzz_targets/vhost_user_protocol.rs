// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user message decoder and handler (with fds) against a live server; see
//! `ft_common::vhost_user::fuzzing::protocol`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ft_common::vhost_user::fuzzing::protocol(data);
});
