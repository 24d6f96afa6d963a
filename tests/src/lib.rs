//! test support
pub mod frontend;
