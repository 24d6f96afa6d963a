//! test support
pub mod blk_client;
pub mod frontend;
pub mod guest;
