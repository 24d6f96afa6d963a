//! test support
pub mod guest;
