// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A live control server fed arbitrary bytes; see `ft_common::control::fuzzing::server`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ft_common::control::fuzzing::server(data);
});
