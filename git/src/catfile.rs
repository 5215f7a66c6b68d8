//! Reading many objects through one `git cat-file --batch`: ids go in on one thread
//! while the caller reads the objects as they come out, so git inflates one object while
//! the caller chunks the one before (the two cores of a small coordinator both busy),
//! and no object is ever held whole in memory by this module.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::time::Duration;

use crate::error::GitError;
use crate::oid::ObjectId;
use crate::run::{GitProgram, Streaming};

/// An object's header as `cat-file --batch` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub oid: ObjectId,
    pub kind: String,
    pub size: u64,
}

/// Streams `oids` (in this order) to `handle`, which must read exactly `size` bytes of
/// each object from the reader it is given (what it leaves is skipped). A missing
/// object is an error.
pub(crate) fn stream_objects(
    git: &GitProgram,
    repo: &Path,
    what: &str,
    oids: &[ObjectId],
    deadline: Duration,
    mut handle: impl FnMut(&Header, &mut dyn Read) -> Result<(), GitError>,
) -> Result<(), GitError> {
    if oids.is_empty() {
        return Ok(());
    }
    let mut proc = Streaming::spawn(
        git,
        what,
        repo,
        &["cat-file", "--batch", "--buffer"],
        deadline,
    )?;
    let Some(mut stdin) = proc.stdin.take() else {
        return Err(proc.failure("no stdin pipe"));
    };
    let requests: Vec<u8> = {
        let mut text = Vec::with_capacity(oids.len() * 41);
        for oid in oids {
            text.extend_from_slice(oid.to_string().as_bytes());
            text.push(b'\n');
        }
        text
    };
    let writer = std::thread::spawn(move || {
        // git stops reading only when it fails; its error is reported from stdout's end.
        let _ = stdin.write_all(&requests);
        let _ = stdin.flush();
    });
    let result = read_all(&mut proc, oids, &mut handle);
    if result.is_err() {
        // git may be blocked writing to us and the writer on git: end git first.
        proc.kill();
    }
    let _ = writer.join();
    match result {
        Ok(()) => proc.finish(),
        Err(e) => Err(e),
    }
}

fn read_all(
    proc: &mut Streaming,
    oids: &[ObjectId],
    handle: &mut impl FnMut(&Header, &mut dyn Read) -> Result<(), GitError>,
) -> Result<(), GitError> {
    let mut out = BufReader::with_capacity(1 << 20, &mut proc.stdout);
    let mut line = Vec::with_capacity(128);
    let mut failure: Option<String> = None;
    for expected in oids {
        line.clear();
        let read = (&mut out).take(4096).read_until(b'\n', &mut line);
        match read {
            Ok(0) => {
                failure = Some(format!("output ended before object {expected}"));
                break;
            }
            Err(e) => {
                failure = Some(format!("reading git's output: {e}"));
                break;
            }
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(line.trim_ascii_end()).into_owned();
        if text.ends_with(" missing") {
            drop(out);
            return Err(GitError::Parse {
                what: proc.what.clone(),
                detail: format!("object {expected} is missing from the repository"),
            });
        }
        let mut parts = text.split(' ');
        let (Some(oid), Some(kind), Some(size), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            failure = Some(format!("unexpected header `{text}`"));
            break;
        };
        let (Some(oid), Ok(size)) = (ObjectId::from_hex(oid), size.parse::<u64>()) else {
            failure = Some(format!("unexpected header `{text}`"));
            break;
        };
        if oid != *expected {
            failure = Some(format!("asked for {expected}, got {oid}"));
            break;
        }
        let header = Header {
            oid,
            kind: kind.to_owned(),
            size,
        };
        let mut body = (&mut out).take(size);
        handle(&header, &mut body)?;
        // Whatever the handler left, then the newline after the object.
        let left = std::io::copy(&mut body, &mut std::io::sink());
        let mut newline = [0u8; 1];
        match (left, out.read_exact(&mut newline)) {
            (Ok(_), Ok(())) if newline[0] == b'\n' => {}
            _ => {
                failure = Some(format!("object {oid} ended early"));
                break;
            }
        }
    }
    drop(out);
    match failure {
        Some(detail) => Err(proc.failure(&detail)),
        None => Ok(()),
    }
}

/// Reads a few small objects whole (commits, tags, symlink targets), each at most
/// `max_bytes`.
pub(crate) fn read_small(
    git: &GitProgram,
    repo: &Path,
    what: &str,
    oids: &[ObjectId],
    max_bytes: u64,
    deadline: Duration,
) -> Result<Vec<(Header, Vec<u8>)>, GitError> {
    let mut out = Vec::with_capacity(oids.len());
    stream_objects(git, repo, what, oids, deadline, |header, body| {
        if header.size > max_bytes {
            return Err(GitError::Parse {
                what: what.to_owned(),
                detail: format!(
                    "object {} is {} bytes, more than {max_bytes}",
                    header.oid, header.size
                ),
            });
        }
        let mut data = Vec::with_capacity(header.size as usize);
        body.read_to_end(&mut data)
            .map_err(GitError::io(what.to_owned()))?;
        out.push((header.clone(), data));
        Ok(())
    })?;
    Ok(out)
}
