//! test support
pub mod frontend;
pub mod guest;
