//! Small files written durably, directories made fresh, files' digests: the filesystem
//! habits the agent's state (deploy markers, upgrade binaries, workspaces) relies on.
//!
//! It must not know what the files mean.

use std::io::{Read as _, Write as _};
use std::path::Path;

/// Writes a small file by a temporary name (`path` with the extension `tmp`), fsync and
/// rename, then syncs the directory: after a crash the file is the old or the new one,
/// never a torn mix.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(())
}

/// Makes a rename or a new entry in `dir` durable. Best effort: a directory that cannot
/// be opened (a read-only mount) loses only that durability.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Removes whatever is at `dir` and creates it empty.
pub fn fresh_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(dir)
}

/// Lower-case hex SHA-256 of a file, read in 256 KiB pieces.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(gantry_certs::hex(ctx.finish().as_ref()));
        }
        ctx.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_durable_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("epoch");
        write_durably(&path, b"3").expect("first");
        write_durably(&path, b"4").expect("second");
        assert_eq!(std::fs::read(&path).expect("read"), b"4");
        assert!(!path.with_extension("tmp").exists());
    }

    #[test]
    fn a_fresh_dir_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ws = dir.path().join("ws");
        std::fs::create_dir_all(ws.join("old")).expect("mkdir");
        fresh_dir(&ws).expect("fresh");
        assert_eq!(std::fs::read_dir(&ws).expect("list").count(), 0);
        fresh_dir(&dir.path().join("new")).expect("fresh where nothing was");
    }
}
