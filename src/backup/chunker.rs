//! Content-defined chunking: which consecutive blocks of a run become one blob
//! (docs/ARCHITECTURE.md, "Content-defined blobs").
//!
//! A blob is cut before block `b` when the block's own content says so (its xxh3 falls under a
//! threshold that makes one block in [`Chunker::avg_blocks`] a cut), when the blob reached
//! [`Chunker::max_blocks`], or around a block that is not stored (zero, unchanged, already
//! in the repository…), and at the end of the run. Because a cut depends on the block at the
//! cut alone, the same content met at another offset of the volume (a file moved, data
//! inserted before it) is cut the same way from its first content-defined cut on, and its
//! blobs deduplicate.
//!
//! In an encrypted repository the XXH3 is seeded with a secret of the repository
//! ([`crate::repo::seal::Sealer::chunker_seed`]), so that where blobs are cut (visible as frame
//! sizes) says nothing about the content; seed 0 is XXH3's default, what plain repositories use.
//!
//! This is writer policy, not format: readers only see blobs of 1..=N whole blocks.

use std::ops::Range;

/// Average blob size aimed at: 64 KiB (16 blocks of 4 KiB). Smaller blobs deduplicate
/// better but cost index entries (52 bytes each) and tree records (41 bytes per blob run).
pub const AVG_BLOB_BYTES: u64 = 64 << 10;
/// Largest blob made of several blocks: 256 KiB (64 blocks of 4 KiB), so that a random read
/// of one block never decompresses much more than that, whatever the content.
pub const MAX_BLOB_BYTES: u64 = 256 << 10;

/// The cut policy for one block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunker {
    avg_blocks: u64,
    max_blocks: u64,
    /// Cut before a block whose xxh3_64 is below this.
    threshold: u64,
    /// The XXH3's seed (0: its default).
    seed: u64,
}

impl Chunker {
    /// The policy for `block_size`: [`AVG_BLOB_BYTES`] on average, at most
    /// [`MAX_BLOB_BYTES`]; blocks of 64 KiB or more are one blob each.
    pub fn new(block_size: u64) -> Chunker {
        let bs = block_size.max(1);
        let avg = (AVG_BLOB_BYTES / bs).max(1);
        let max = (MAX_BLOB_BYTES / bs).max(1);
        Chunker::with(avg, if avg == 1 { 1 } else { max })
    }

    /// A policy of `avg_blocks` on average and at most `max_blocks` per blob (both ≥ 1).
    pub fn with(avg_blocks: u64, max_blocks: u64) -> Chunker {
        let avg_blocks = avg_blocks.max(1);
        Chunker {
            avg_blocks,
            max_blocks: max_blocks.max(1),
            threshold: u64::MAX / avg_blocks,
            seed: 0,
        }
    }

    /// This policy with the XXH3 seeded with `seed` (0: XXH3's default, unseeded).
    pub fn with_seed(self, seed: u64) -> Chunker {
        Chunker { seed, ..self }
    }

    pub fn avg_blocks(&self) -> u64 {
        self.avg_blocks
    }

    pub fn max_blocks(&self) -> u64 {
        self.max_blocks
    }

    /// True when a blob must start at a block holding `block` (content-defined cut).
    pub fn cuts_before(&self, block: &[u8]) -> bool {
        self.avg_blocks == 1
            || xxhash_rust::xxh3::xxh3_64_with_seed(block, self.seed) < self.threshold
    }

    /// The blobs of a run of blocks: ranges of block positions in the run, in order, covering
    /// exactly the positions `stored` marks (the other blocks are in no blob). `block(i)` is
    /// the content of position `i`; it is only asked for stored positions.
    pub fn blobs<'a>(
        &self,
        stored: &[bool],
        mut block: impl FnMut(usize) -> &'a [u8],
    ) -> Vec<Range<usize>> {
        let mut out = Vec::new();
        let mut start: Option<usize> = None;
        for (i, &s) in stored.iter().enumerate() {
            if !s {
                if let Some(st) = start.take() {
                    out.push(st..i);
                }
                continue;
            }
            match start {
                None => start = Some(i),
                Some(st) => {
                    if (i - st) as u64 >= self.max_blocks || self.cuts_before(block(i)) {
                        out.push(st..i);
                        start = Some(i);
                    }
                }
            }
        }
        if let Some(st) = start {
            out.push(st..stored.len());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BS: usize = 64;

    /// Blocks of BS bytes, each made from one seed (seed 0: a zero block).
    fn blocks(seeds: &[u16]) -> Vec<u8> {
        let mut v = Vec::with_capacity(seeds.len() * BS);
        for &s in seeds {
            for k in 0..BS {
                v.push(if s == 0 {
                    0
                } else {
                    (u32::from(s)
                        .wrapping_mul(2654435761)
                        .wrapping_add(k as u32 * 40503)
                        >> 13) as u8
                });
            }
        }
        v
    }

    fn cut(c: &Chunker, seeds: &[u16]) -> Vec<Range<usize>> {
        let data = blocks(seeds);
        let stored: Vec<bool> = seeds.iter().map(|&s| s != 0).collect();
        c.blobs(&stored, |i| &data[i * BS..(i + 1) * BS])
    }

    #[test]
    fn policy_per_block_size() {
        let c = Chunker::new(4096);
        assert_eq!((c.avg_blocks(), c.max_blocks()), (16, 64));
        let c = Chunker::new(16384);
        assert_eq!((c.avg_blocks(), c.max_blocks()), (4, 16));
        for bs in [65536, 1 << 20, 16 << 20] {
            let c = Chunker::new(bs);
            assert_eq!((c.avg_blocks(), c.max_blocks()), (1, 1), "{bs}");
            assert!(c.cuts_before(&[1, 2, 3]));
        }
    }

    #[test]
    fn seed_0_cuts_as_unseeded_xxh3_and_other_seeds_elsewhere() {
        let data = blocks(&(1..=3000).collect::<Vec<u16>>());
        for b in data.chunks(BS).take(200) {
            assert_eq!(
                xxhash_rust::xxh3::xxh3_64_with_seed(b, 0),
                xxhash_rust::xxh3::xxh3_64(b)
            );
        }
        let mut long = vec![0u8; 4096];
        long.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (i * 13) as u8);
        assert_eq!(
            xxhash_rust::xxh3::xxh3_64_with_seed(&long, 0),
            xxhash_rust::xxh3::xxh3_64(&long)
        );
        let seeds: Vec<u16> = (1..=3000).collect();
        let c = Chunker::with(16, 64);
        assert_eq!(cut(&c.with_seed(0), &seeds), cut(&c, &seeds));
        assert_ne!(cut(&c.with_seed(0x1234_5678), &seeds), cut(&c, &seeds));
    }

    #[test]
    fn one_block_per_blob_for_large_blocks() {
        let c = Chunker::with(1, 1);
        assert_eq!(cut(&c, &[1, 2, 0, 3]), vec![0..1, 1..2, 3..4]);
    }

    #[test]
    fn unstored_blocks_split_and_max_bounds() {
        let c = Chunker::with(u64::MAX, 3); // no content cut ever (threshold 0 ... 1)
        assert_eq!(
            cut(&c, &[1, 2, 3, 4, 5, 0, 0, 6, 7]),
            vec![0..3, 3..5, 7..9]
        );
        assert_eq!(cut(&c, &[]), Vec::<Range<usize>>::new());
        assert_eq!(cut(&c, &[0, 0]), Vec::<Range<usize>>::new());
    }

    #[test]
    fn average_is_about_right() {
        let c = Chunker::with(16, 64);
        let seeds: Vec<u16> = (1..=20000).collect();
        let n = cut(&c, &seeds).len();
        // 20000 blocks / 16 = 1250 blobs expected; max cuts add a few.
        assert!((900..1700).contains(&n), "{n} blobs");
    }

    proptest! {
        /// The blobs cover exactly the stored blocks, in order, each within bounds; the same
        /// input gives the same blobs.
        #[test]
        fn blobs_cover_stored_blocks_exactly(
            seeds in proptest::collection::vec(0u16..400, 0..300),
            avg in 1u64..8, max in 1u64..20,
        ) {
            let c = Chunker::with(avg, max);
            let b = cut(&c, &seeds);
            let mut covered = vec![false; seeds.len()];
            let mut last_end = 0;
            for r in &b {
                prop_assert!(r.start < r.end && r.start >= last_end);
                prop_assert!((r.end - r.start) as u64 <= max);
                for i in r.clone() {
                    covered[i] = true;
                }
                last_end = r.end;
            }
            let stored: Vec<bool> = seeds.iter().map(|&s| s != 0).collect();
            prop_assert_eq!(covered, stored);
            prop_assert_eq!(b, cut(&c, &seeds));
        }

        /// The same content at another offset of a run (after other blocks) is cut into the
        /// same blobs from its first content-defined cut on (up to the content's end).
        #[test]
        fn shift_invariance(
            content in proptest::collection::vec(1u16..2000, 1..200),
            pre_a in proptest::collection::vec(0u16..2000, 0..40),
            pre_b in proptest::collection::vec(0u16..2000, 0..40),
            post in proptest::collection::vec(0u16..2000, 0..10),
            avg in 2u64..6, max in 2u64..12,
        ) {
            let c = Chunker::with(avg, max);
            let data = blocks(&content);
            let cutting = |i: usize| c.cuts_before(&data[i * BS..(i + 1) * BS]);
            // Blobs lying in the content, starting at a content-defined cut and ending before
            // the content's end, relative to the content's first block.
            let interior = |pre: &[u16]| {
                let all: Vec<u16> = pre.iter().chain(&content).chain(&post).copied().collect();
                cut(&c, &all)
                    .into_iter()
                    .filter(|r| r.start >= pre.len() && r.end < pre.len() + content.len())
                    .map(|r| (r.start - pre.len())..(r.end - pre.len()))
                    .filter(|r| cutting(r.start))
                    .collect::<Vec<_>>()
            };
            prop_assert_eq!(interior(&pre_a), interior(&pre_b));
        }
    }
}
