//! placeholder, replaced by the scheduler crate
