//! ft-common: the parts both ft-vhost daemons share.
//!
//! - [`epoch`]: epoch and generation numbers, and the generation fence.
//! - [`vhost_user`]: the vhost-user device server both daemons run.
//!
//! The one invariant everything here serves (ARCHITECTURE.md section 1): no byte of an epoch later
//! than the last committed one reaches the backing file or the tap.

pub mod epoch;
pub mod vhost_user;
