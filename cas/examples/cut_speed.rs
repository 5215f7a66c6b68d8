//! Prints how fast chunk boundaries are found in random data: fastcdc's own v2020 `cut`
//! (the baseline, measured in the same run) against `gantry_cas::next_cut`, and checks
//! on the way that both cut at the same places.
//!
//! Run: `cargo run --release -p gantry-cas --example cut_speed [MIB]` (default 512).

use std::time::{Duration, Instant};

use gantry_cas::{next_cut, AVG_CHUNK, MAX_CHUNK, MIN_CHUNK};

fn main() {
    let mib: usize = match std::env::args().nth(1) {
        None => 512,
        Some(arg) => match arg.parse() {
            Ok(mib) if mib > 0 => mib,
            _ => {
                eprintln!("cut_speed: expected a size in MiB (a positive integer), got {arg:?}");
                std::process::exit(2);
            }
        },
    };
    let mut data = vec![0u8; mib << 20];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for word in data.chunks_mut(8) {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let value = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        word.copy_from_slice(&value[..word.len()]);
    }
    let fastcdc_cut = |source: &[u8]| {
        fastcdc::v2020::FastCDC::new(source, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
            .cut(0, source.len())
            .1
    };
    let mut best: [Duration; 2] = [Duration::MAX; 2];
    let mut cuts: [Vec<usize>; 2] = [Vec::new(), Vec::new()];
    // Alternate the two, three times each, and keep each one's best time.
    for _ in 0..3 {
        for (which, cut) in [&fastcdc_cut as &dyn Fn(&[u8]) -> usize, &next_cut]
            .into_iter()
            .enumerate()
        {
            let started = Instant::now();
            let mut found = Vec::with_capacity(data.len() / AVG_CHUNK * 2);
            let mut start = 0;
            while start < data.len() {
                let end = (start + MAX_CHUNK).min(data.len());
                let len = cut(&data[start..end]).max(1);
                start += len;
                found.push(start);
            }
            best[which] = best[which].min(started.elapsed());
            cuts[which] = found;
        }
    }
    if cuts[0] != cuts[1] {
        eprintln!("cut_speed: the two cutters disagree: this is a bug in gantry_cas::next_cut");
        std::process::exit(1);
    }
    let speed = |time: Duration| data.len() as f64 / time.as_secs_f64() / 1e6;
    println!(
        "{} chunks in {mib} MiB of random data (best of 3 each)",
        cuts[0].len()
    );
    println!("fastcdc v2020 cut   {:7.0} MB/s", speed(best[0]));
    println!(
        "gantry next_cut     {:7.0} MB/s  ({:.2}x)",
        speed(best[1]),
        best[0].as_secs_f64() / best[1].as_secs_f64()
    );
}
