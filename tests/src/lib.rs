//! test support
pub mod blk_client;
pub mod guest;
