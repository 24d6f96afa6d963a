//! test support
pub mod blk_client;
