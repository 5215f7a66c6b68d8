//! placeholder, replaced by the pipeline crate
