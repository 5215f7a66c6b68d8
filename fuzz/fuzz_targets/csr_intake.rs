//! Fuzz target `csr_intake`: the checks live in `gantry_fuzz::csr_intake`, so `cargo test` in this
//! crate runs them over the seed corpus too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gantry_fuzz::csr_intake(data));
