// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Control protocol framing and message decoding; see `ft_common::control::fuzzing::codec`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ft_common::control::fuzzing::codec(data);
});
