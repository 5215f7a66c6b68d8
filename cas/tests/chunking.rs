//! Chunk boundaries depend on content only: same data, same chunks; a one-byte insertion
//! changes only the chunks around it.

mod common;

use std::collections::HashSet;
use std::io::Read;

use common::Prng;
use gantry_cas::{chunk_reader, Digest, MAX_CHUNK, MIN_CHUNK};

fn chunks_of(data: &[u8]) -> Vec<(Digest, Vec<u8>)> {
    chunk_reader(data)
        .collect::<Result<Vec<_>, _>>()
        .expect("chunking an in-memory slice")
}

#[test]
fn same_data_gives_same_chunks() {
    let data = Prng::new(42).bytes(4 << 20);
    let first = chunks_of(&data);
    let second = chunks_of(&data);
    assert_eq!(first, second);
    // The chunks cover the data exactly, in order, within the size bounds.
    assert_eq!(first.concat_bytes(), data);
    let (last, rest) = first.split_last().expect("some chunks");
    for (digest, bytes) in rest {
        assert!(
            (MIN_CHUNK..=MAX_CHUNK).contains(&bytes.len()),
            "{}",
            bytes.len()
        );
        assert_eq!(*digest, Digest::of(bytes));
    }
    assert!(last.1.len() <= MAX_CHUNK);
}

#[test]
fn one_byte_insertion_changes_few_chunks() {
    let data = Prng::new(7).bytes(4 << 20);
    let mut edited = data.clone();
    edited.insert(data.len() / 2, 0xAB);
    let before: HashSet<Digest> = chunks_of(&data).into_iter().map(|(d, _)| d).collect();
    let after = chunks_of(&edited);
    let changed = after.iter().filter(|(d, _)| !before.contains(d)).count();
    assert!(after.len() > 20, "only {} chunks", after.len());
    assert!(
        changed * 10 < after.len(),
        "{changed} of {} chunks changed",
        after.len()
    );
    assert!(changed >= 1);
}

#[test]
fn empty_input_has_no_chunks() {
    assert!(chunks_of(&[]).is_empty());
}

/// A reader that hands out a few bytes per call, to check chunking does not depend on
/// how the input arrives.
struct Trickle<'a>(&'a [u8]);

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.0.len()).min(1000);
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[test]
fn chunks_do_not_depend_on_read_sizes() {
    let data = Prng::new(11).bytes(1 << 20);
    let trickled: Vec<_> = chunk_reader(Trickle(&data))
        .collect::<Result<_, _>>()
        .expect("chunking");
    assert_eq!(trickled, chunks_of(&data));
}

/// The boundaries must stay those of fastcdc's own streaming chunker, which uploads
/// used before: otherwise every stored artifact would stop deduplicating against new
/// uploads. 7 MiB spans several read windows (2 MiB each); the trickled copy reads 1,000
/// bytes at a time, so window edges fall everywhere.
#[test]
fn boundaries_are_those_of_fastcdc_streaming_chunker() {
    let mut data = Prng::new(13).bytes(7 << 20);
    // Long runs of one byte cut at MAX_CHUNK exactly: check the window edges there too.
    data[(3 << 20)..(3 << 20) + 700_000].fill(0);
    let reference: Vec<(Digest, Vec<u8>)> =
        fastcdc::v2020::StreamCDC::new(&data[..], MIN_CHUNK, gantry_cas::AVG_CHUNK, MAX_CHUNK)
            .map(|c| {
                let c = c.expect("reference chunking");
                (Digest::of(&c.data), c.data)
            })
            .collect();
    assert!(reference.len() > 50, "only {} chunks", reference.len());
    assert_eq!(chunks_of(&data), reference);
    let trickled: Vec<_> = chunk_reader(Trickle(&data))
        .collect::<Result<_, _>>()
        .expect("chunking");
    assert_eq!(trickled, reference);
}

/// A reader that is interrupted once, then fails after `good` bytes.
struct Failing {
    good: usize,
    interrupted: bool,
}

impl Read for Failing {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.interrupted {
            self.interrupted = true;
            return Err(std::io::ErrorKind::Interrupted.into());
        }
        if self.good == 0 {
            return Err(std::io::Error::other("disk on fire"));
        }
        let n = buf.len().min(self.good);
        buf[..n].fill(7);
        self.good -= n;
        Ok(n)
    }
}

#[test]
fn a_read_error_is_returned_once_and_ends_the_chunks() {
    let results: Vec<_> = chunk_reader(Failing {
        good: 100_000,
        interrupted: false,
    })
    .collect();
    // The window is never full, so the failure comes before any chunk is cut.
    assert_eq!(results.len(), 1, "{results:?}");
    let err = results[0].as_ref().expect_err("the read error");
    assert!(err.to_string().contains("reading data to chunk"), "{err}");
}

trait ConcatBytes {
    fn concat_bytes(&self) -> Vec<u8>;
}

impl ConcatBytes for Vec<(Digest, Vec<u8>)> {
    fn concat_bytes(&self) -> Vec<u8> {
        self.iter().flat_map(|(_, b)| b.iter().copied()).collect()
    }
}
