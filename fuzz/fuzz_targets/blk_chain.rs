// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! virtio-blk descriptor chain parser; see `vhost_user_blk_ft::fuzzing::blk_chain`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhost_user_blk_ft::fuzzing::blk_chain(data);
});
