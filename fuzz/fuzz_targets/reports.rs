//! Fuzz target `reports`: the checks live in `gantry_fuzz::reports`, so `cargo test` in this
//! crate runs them over the seed corpus too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gantry_fuzz::reports(data));
