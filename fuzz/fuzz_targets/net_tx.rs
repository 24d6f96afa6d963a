// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! virtio-net TX chain parser and vnet header validation; see
//! `vhost_user_net_ft::fuzzing::net_tx`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhost_user_net_ft::fuzzing::net_tx(data);
});
