//! Writes the seed corpus to `corpus/<target>/<name>`, replacing what is there:
//! `cargo run --manifest-path fuzz/Cargo.toml --example seed_corpus`.
//! Inputs the fuzzer finds are kept elsewhere (`.ci/fuzz-smoke` gives it a scratch
//! corpus), so this directory holds only these seeds.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, _) in gantry_fuzz::TARGETS {
        let dir = root.join(target);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
    }
    let seeds = gantry_fuzz::seeds::all();
    for seed in &seeds {
        std::fs::write(root.join(seed.target).join(&seed.name), &seed.bytes)?;
    }
    println!("wrote {} seeds under {}", seeds.len(), root.display());
    Ok(())
}
