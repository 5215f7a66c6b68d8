//! Writing secrets to disk: private keys are created with mode 0600 from the start (never
//! written world-readable and then chmod-ed), through a temporary file that is fsynced
//! and renamed so a crash never leaves half a key.

use std::io::Write;
use std::path::Path;

/// Writes `contents` to `path` atomically with the given Unix mode.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable only once the directory entry is.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes a private key: owner read/write only.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_atomic(path, contents, 0o600)
}

/// Writes a public file (certificates): readable by all.
pub fn write_public(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_atomic(path, contents, 0o644)
}
