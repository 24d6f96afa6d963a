// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Test support shared by the cross-crate integration tests and the benchmarks.
//!
//! - [`frontend`]: a raw vhost-user frontend (vhost `Frontend`, memfd guest memory, a small
//!   split-ring driver) for protocol tests, including malformed chains.
//! - [`blk_client`]: a virtio-blk client over vhost-user built on `virtio-driver`, for block tests
//!   and the benchmark.
//! - [`guest`]: the QEMU (TCG) guest harness: boots a small Linux guest with our daemons attached
//!   and reads its verdict from the serial console.
//! - [`acknowledger`]: a stand-in coordinator that seals and commits an epoch every interval on
//!   daemon control sockets (guest net test, `ft-ack` for benchmarks).
//! - [`etcd`]: a real etcd per test (loopback or a network namespace) and the namespaces of
//!   the partition test.
//! - [`netns`]: run a closure in a private network namespace (guest net and end-to-end tests).
//! - [`proxy`]: a TCP proxy that freezes or cuts a link on command (replication fault tests).
//! - [`stamped`]: a VM-less writer of blocks stamped with their submit time (arbitration tests:
//!   nothing submitted after a commit deadline reaches the image).
//! - [`stream`]: a numbered TCP byte stream through an echo server, checked byte for byte
//!   (failover tests: the guest's connections survive a takeover).

pub mod acknowledger;
pub mod blk_client;
pub mod etcd;
pub mod frontend;
pub mod guest;
pub mod netns;
pub mod proxy;
pub mod stamped;
pub mod stream;
pub mod takeover_store;
