//! FastCDC's (2020) cut-point search, computed in four independent lanes at once.
//!
//! This module owns one question: where does the next chunk end? The answer is exactly
//! fastcdc's `v2020::cut` (same gear table, same masks, same positions tested), so every
//! artifact stored before keeps deduplicating; only the order of the arithmetic differs.
//!
//! How: the gear hash after byte `p` is `h(p) = (h(p-1) << 1) + GEAR[byte p]`, one chain
//! of dependent shifts and adds. Within a 64-bit word, a byte's contribution is shifted
//! out after 64 more bytes, so `h(p)` depends only on bytes `p-63..=p` (and on where
//! hashing started, when that is closer). A stretch of the input can therefore be hashed
//! from 64 bytes before it, with no knowledge of what came earlier, and give the same
//! hashes. The search cuts its range into blocks of [`LANES`] stretches of `STRETCH`
//! bytes and hashes the stretches of a block side by side, as four independent chains.
//! The first stretch of each block continues from the hash the last stretch of the block
//! before ended with; the others first hash the 64 bytes in front of them.
//!
//! What it buys is modest: fastcdc's own loop (two bytes a step) already runs at about
//! one byte a cycle, and ours, at ~3.9 instructions a byte, is bound by how many
//! instructions the core issues, not by the chain. `cargo run --release -p gantry-cas
//! --example cut_speed` measured 2,958 MB/s for fastcdc and 3,653 MB/s (1.24x) for this,
//! with stretches of 4 KiB; 2 KiB gave 1.18x, 1 KiB 1.03x (the warm-ups), 8 KiB 0.99x
//! (the hashing past the cut). Chunking was the largest single item of the uploading
//! agent's CPU (~14% of both cores in the upload benchmark).
//!
//! The cost: up to a block of hashing past the cut point (the later stretches of the
//! block with the cut), and the 64-byte warm-ups (1.6% of the bytes at 4 KiB stretches).

use fastcdc::v2020::{get_gear_with_seed, select_masks, Normalization};

/// Stretches hashed side by side.
const LANES: usize = 4;

/// Bytes a gear hash depends on: older bytes are shifted out of the 64-bit word.
const WINDOW: usize = 64;

/// Stretch length used for chunking: blocks of 16 KiB, so the strict-mask range of the
/// chunking sizes (16 to 64 KiB) is three blocks. Measured against 1, 2 and 8 KiB (see
/// the module docs).
const STRETCH: usize = 4096;

/// The gear table and masks of fastcdc's v2020 chunker for one average size, with
/// normalization level 1 and seed 0: what `fastcdc::v2020::FastCDC::new` uses.
pub(crate) struct GearCutter {
    gear: [u64; 256],
    /// The gear table shifted left once.
    gear_ls: [u64; 256],
    /// Stricter mask, used below the average size (more bits must be zero).
    mask_s: u64,
    /// Looser mask, used from the average size on.
    mask_l: u64,
    min_size: usize,
    avg_size: usize,
    max_size: usize,
}

impl GearCutter {
    /// A cutter for fastcdc's sizes. Sizes must be even (as fastcdc requires) and
    /// `min_size >= 64`.
    pub(crate) fn new(min_size: usize, avg_size: usize, max_size: usize) -> GearCutter {
        debug_assert!(min_size >= WINDOW && min_size <= avg_size && avg_size <= max_size);
        debug_assert!(
            min_size.is_multiple_of(2) && avg_size.is_multiple_of(2) && max_size.is_multiple_of(2)
        );
        let (gear_table, gear_ls_table) = get_gear_with_seed(0);
        let mut gear = [0u64; 256];
        gear.copy_from_slice(&gear_table);
        let mut gear_ls = [0u64; 256];
        gear_ls.copy_from_slice(&gear_ls_table);
        let (mask_s, mask_l) = select_masks(avg_size, Normalization::Level1);
        // Testing twice the hash against the mask shifted once (the two-byte step) is
        // the same test only while the mask's top bit is clear: fastcdc's masks use
        // bits below 48.
        debug_assert!(mask_s >> 63 == 0 && mask_l >> 63 == 0);
        GearCutter {
            gear,
            gear_ls,
            mask_s,
            mask_l,
            min_size,
            avg_size,
            max_size,
        }
    }

    /// Length of the chunk that starts at `source[0]`: the same as
    /// `fastcdc::v2020::cut` for these sizes. At most `max_size`; all of `source` when it
    /// is no longer than `min_size` or holds no cut point within `max_size`.
    pub(crate) fn cut(&self, source: &[u8]) -> usize {
        self.cut_with::<STRETCH>(source)
    }

    /// [`GearCutter::cut`] with a chosen stretch length (tests use short ones, so that
    /// small chunks still cross many blocks).
    pub(crate) fn cut_with<const S: usize>(&self, source: &[u8]) -> usize {
        let mut remaining = source.len();
        if remaining <= self.min_size {
            return remaining;
        }
        let mut center = self.avg_size;
        if remaining > self.max_size {
            remaining = self.max_size;
        } else if remaining < center {
            center = remaining;
        }
        // fastcdc tests positions in pairs: an odd last byte is never a cut candidate,
        // and the stricter mask applies to the pairs wholly below `center`.
        let end = remaining & !1;
        let switch = (center & !1).max(self.min_size);
        let origin = self.min_size;
        self.first_cut::<S>(source, origin, origin, switch, self.mask_s)
            .or_else(|| self.first_cut::<S>(source, origin, switch, end, self.mask_l))
            .unwrap_or(remaining)
    }

    /// The first position `p` in `from..to` whose gear hash, accumulated from `origin`
    /// (with zero before it), has no bit of `mask` set.
    fn first_cut<const S: usize>(
        &self,
        source: &[u8],
        origin: usize,
        from: usize,
        to: usize,
        mask: u64,
    ) -> Option<usize> {
        const {
            assert!(S >= WINDOW, "a stretch must be at least the hash window");
            assert!(S.is_multiple_of(2), "stretches are hashed two bytes a step");
        };
        let gear = &self.gear;
        let gear_ls = &self.gear_ls;
        let mask_ls = mask << 1;
        // The hash just before `from`, exact: bytes older than the window do not matter.
        let mut carry = 0u64;
        for &byte in &source[from.saturating_sub(WINDOW).max(origin)..from] {
            carry = (carry << 1).wrapping_add(gear[usize::from(byte)]);
        }
        let mut position = from;
        while position + LANES * S <= to {
            let block = &source[position..position + LANES * S];
            // Stretch j is block[j*S..(j+1)*S]; its warm-up the WINDOW bytes before it,
            // which lie inside the block for j >= 1.
            let mut hashes = [carry, 0, 0, 0];
            for i in 0..WINDOW {
                for (lane, hash) in hashes.iter_mut().enumerate().skip(1) {
                    let byte = block[lane * S - WINDOW + i];
                    *hash = (*hash << 1).wrapping_add(gear[usize::from(byte)]);
                }
            }
            let stretch = |lane: usize| -> &[u8; S] {
                block[lane * S..(lane + 1) * S]
                    .try_into()
                    .expect("a block holds LANES stretches of S bytes")
            };
            let (s0, s1, s2, s3) = (stretch(0), stretch(1), stretch(2), stretch(3));
            let [mut h0, mut h1, mut h2, mut h3] = hashes;
            // The first hit of each stretch, as an offset into it.
            let mut hits = [usize::MAX; LANES];
            // Two bytes a step, as fastcdc does: `(h << 2) + (GEAR[a] << 1)` is twice the
            // hash after `a` (so it is tested against the mask shifted left once: the
            // masks' top bit is clear), and adding `GEAR[b]` gives the hash after `b`.
            // Four independent chains, written out so that they stay in registers.
            for i in (0..S).step_by(2) {
                h0 = (h0 << 2).wrapping_add(gear_ls[usize::from(s0[i])]);
                h1 = (h1 << 2).wrapping_add(gear_ls[usize::from(s1[i])]);
                h2 = (h2 << 2).wrapping_add(gear_ls[usize::from(s2[i])]);
                h3 = (h3 << 2).wrapping_add(gear_ls[usize::from(s3[i])]);
                if h0 & mask_ls == 0 {
                    note_hit(&mut hits[0], i);
                }
                if h1 & mask_ls == 0 {
                    note_hit(&mut hits[1], i);
                }
                if h2 & mask_ls == 0 {
                    note_hit(&mut hits[2], i);
                }
                if h3 & mask_ls == 0 {
                    note_hit(&mut hits[3], i);
                }
                h0 = h0.wrapping_add(gear[usize::from(s0[i + 1])]);
                h1 = h1.wrapping_add(gear[usize::from(s1[i + 1])]);
                h2 = h2.wrapping_add(gear[usize::from(s2[i + 1])]);
                h3 = h3.wrapping_add(gear[usize::from(s3[i + 1])]);
                if h0 & mask == 0 {
                    note_hit(&mut hits[0], i + 1);
                }
                if h1 & mask == 0 {
                    note_hit(&mut hits[1], i + 1);
                }
                if h2 & mask == 0 {
                    note_hit(&mut hits[2], i + 1);
                }
                if h3 & mask == 0 {
                    note_hit(&mut hits[3], i + 1);
                }
            }
            hashes = [h0, h1, h2, h3];
            if let Some(lane) = hits.iter().position(|&hit| hit != usize::MAX) {
                return Some(position + lane * S + hits[lane]);
            }
            carry = hashes[LANES - 1];
            position += LANES * S;
        }
        for (offset, &byte) in source[position..to].iter().enumerate() {
            carry = (carry << 1).wrapping_add(gear[usize::from(byte)]);
            if carry & mask == 0 {
                return Some(position + offset);
            }
        }
        None
    }
}

/// Records `offset` as a stretch's hit unless it has one already. Hits are rare (about
/// one per chunk), so this stays out of the hashing loop's way.
#[cold]
#[inline(never)]
fn note_hit(hit: &mut usize, offset: usize) {
    if *hit == usize::MAX {
        *hit = offset;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic test data without a dependency.
    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
            })
            .collect()
    }

    fn reference(source: &[u8], min: usize, avg: usize, max: usize) -> usize {
        let (_, len) = fastcdc::v2020::FastCDC::new(source, min, avg, max).cut(0, source.len());
        len
    }

    /// Cuts `data` into chunks with both cutters and compares every boundary.
    fn assert_same_cuts<const S: usize>(data: &[u8], min: usize, avg: usize, max: usize) -> usize {
        let cutter = GearCutter::new(min, avg, max);
        let mut start = 0;
        let mut chunks = 0;
        while start < data.len() {
            let rest = &data[start..];
            let expected = reference(rest, min, avg, max);
            assert_eq!(
                cutter.cut_with::<S>(rest),
                expected,
                "chunk {chunks} at offset {start} of {} bytes (sizes {min}/{avg}/{max}, stretch {S})",
                data.len()
            );
            start += expected.max(1);
            chunks += 1;
        }
        chunks
    }

    #[test]
    fn cuts_where_fastcdc_cuts_with_the_chunking_sizes() {
        let mut data = bytes(1, 6 << 20);
        // A long run of one byte has no cut point: chunks of exactly max_size.
        data[(2 << 20)..(2 << 20) + 900_000].fill(0);
        let chunks = assert_same_cuts::<STRETCH>(
            &data,
            crate::MIN_CHUNK,
            crate::AVG_CHUNK,
            crate::MAX_CHUNK,
        );
        assert!(chunks > 60, "only {chunks} chunks");
    }

    #[test]
    fn cuts_where_fastcdc_cuts_when_cuts_fall_on_every_stretch_and_block_edge() {
        // Sizes 64/256/1024 with 64-byte stretches put a cut every few hundred bytes,
        // so over 1 MiB cuts land at every offset in a block, in every lane, at warm-up
        // edges and right at the switch between the masks.
        for seed in 0..4 {
            let data = bytes(seed, 1 << 20);
            let chunks = assert_same_cuts::<64>(&data, 64, 256, 1024);
            assert!(chunks > 1000, "only {chunks} chunks");
            assert_same_cuts::<128>(&data, 256, 1024, 4096);
        }
    }

    #[test]
    fn short_and_odd_inputs_cut_where_fastcdc_cuts() {
        let data = bytes(9, 5000);
        let cutter = GearCutter::new(64, 256, 1024);
        for len in 0..data.len() {
            let source = &data[data.len() - len..];
            assert_eq!(
                cutter.cut_with::<64>(source),
                reference(source, 64, 256, 1024),
                "input of {len} bytes"
            );
        }
    }
}
