//! test support
pub mod acknowledger;
pub mod frontend;
pub mod guest;
