//! Every magic number and fixed layout of the repository format, in one place.
//!
//! All integers are little-endian. `docs/FORMAT.md` is the normative description; this module
//! is its implementation. Bump a `*_VERSION` whenever a layout changes incompatibly: readers
//! reject versions they do not know with [`crate::Error::UnsupportedVersion`].

use crate::hash::ChunkId;

/// Version of the repository as a whole (the `config` file, the directory layout) written by
/// `init`. Version 1 (chunk files) is still read; see [`REPO_VERSIONS_READ`].
pub const REPO_VERSION: u32 = 2;
/// Version of an encrypted repository: format 2 with every object sealed and key slots in
/// `keys/` (docs/FORMAT.md §F3). `init` writes it unless asked for a plain repository.
pub const REPO_VERSION_ENCRYPTED: u32 = 3;
/// Repository versions this build opens: 1 (chunk files, read-only), 2 (packs and index) and
/// 3 (format 2, encrypted).
pub const REPO_VERSIONS_READ: std::ops::RangeInclusive<u32> = 1..=3;
/// `format` field of the `config` file.
pub const REPO_FORMAT_NAME: &str = "volback-repository";

/// Chunk file: `"VBCK"`, then a version byte.
pub const CHUNK_MAGIC: [u8; 4] = *b"VBCK";
pub const CHUNK_VERSION: u8 = 1;
/// Chunk header: magic(4) version(1) codec(1) reserved(2) raw_len(4) stored_len(4).
pub const CHUNK_HEADER_LEN: usize = 16;
/// Chunk payload codecs.
pub const CODEC_RAW: u8 = 0;
pub const CODEC_ZSTD: u8 = 1;

/// Snapshot file: `"VBSNAP"` + CR LF (catches text-mode mangling), then a u32 version.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"VBSNAP\r\n";
/// Version written. Version 2 added SLICE records (blocks stored in pack chunks); a version 1
/// snapshot is a version 2 snapshot without them. Version 3 (repository format 2) has no
/// segments: its header names the root of a tree of blobs (`super::tree`). Readers accept all
/// three.
pub const SNAPSHOT_VERSION: u32 = 3;
/// Version of snapshots with manifest segments (format 1 repositories), still written by
/// [`super::snapshot::SnapshotWriter`] for old-format tests and tools.
pub const SNAPSHOT_SEGMENTS_VERSION: u32 = 2;
/// First version whose block map is a tree (no segments; header field `tree`).
pub const SNAPSHOT_TREE_VERSION: u32 = 3;
pub const SNAPSHOT_VERSIONS_READ: std::ops::RangeInclusive<u32> = 1..=3;
/// magic(8) version(4).
pub const SNAPSHOT_PREAMBLE_LEN: usize = 12;
/// Trailer: header_offset u64, header_len u32, segment_count u32, directory_offset u64,
/// reserved u64, checksum [32].
pub const SNAPSHOT_TRAILER_LEN: usize = 64;
/// Directory entry: offset u64, stored_len u32, block_count u32, blake3 [32].
pub const SEGMENT_DIR_ENTRY_LEN: usize = 48;
/// Blocks per manifest segment (the last one may hold fewer).
pub const SEGMENT_BLOCKS: u64 = 65_536;
/// Upper bound of a snapshot header (JSON), against hostile files.
pub const MAX_HEADER_LEN: u32 = 16 << 20;

/// Resume journal: `"VBJRNL"` + CR LF, then a u32 version.
pub const JOURNAL_MAGIC: [u8; 8] = *b"VBJRNL\r\n";
/// Version written. Version 2 added SLICE records, version 3 the unreadable ranges of each
/// batch, version 4 (repository format 2) PART records; readers accept all four.
pub const JOURNAL_VERSION: u32 = 4;
pub const JOURNAL_VERSIONS_READ: std::ops::RangeInclusive<u32> = 1..=4;
/// Most unreadable ranges one journal batch may list (against hostile files).
pub const MAX_BATCH_UNREADABLE: u32 = 1 << 20;
/// Upper bound of one journal record payload.
pub const MAX_JOURNAL_RECORD: u32 = 64 << 20;

/// Smallest and largest block size a repository accepts.
pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 16 << 20;

// ---- format 2: packs and index (docs/FORMAT.md, "Repository format 2") ----

/// Pack file: `"VBPACK"` + CR LF, then a u32 version and 4 reserved bytes.
pub const PACK_MAGIC: [u8; 8] = *b"VBPACK\r\n";
pub const PACK_VERSION: u32 = 1;
/// magic(8) version(4) reserved(4).
pub const PACK_HEADER_LEN: usize = 16;
/// Pack trailer: table offset u64, entry count u32, reserved u32, BLAKE3 of the table [32],
/// end magic [8].
pub const PACK_TRAILER_LEN: usize = 56;
/// Last 8 bytes of a pack file.
pub const PACK_END_MAGIC: [u8; 8] = *b"VBPKEND\n";
/// Blob-table entry (pack tables and index files): id [32], kind u8, reserved [3], frame
/// offset u32, frame length u32, raw offset u32, raw length u32.
pub const BLOB_ENTRY_LEN: usize = 52;
/// Largest raw content of one frame, and so of one blob (a tree node may approach it).
pub const MAX_FRAME_RAW: u32 = MAX_BLOCK_SIZE;
/// Smallest, default and largest `pack_size` of a format-2 repository.
pub const MIN_PACK_SIZE_V2: u32 = 1 << 20;
pub const DEFAULT_PACK_SIZE_V2: u32 = 16 << 20;
pub const MAX_PACK_SIZE_V2: u32 = 128 << 20;
/// Default block size of a format-2 repository.
pub const DEFAULT_BLOCK_SIZE_V2: u32 = 4096;

/// Index file: `"VBINDEX\n"`, u32 version, u32 pack count; ends with the BLAKE3 of all bytes
/// before it (whose hex is the file name).
pub const INDEX_MAGIC: [u8; 8] = *b"VBINDEX\n";
pub const INDEX_VERSION: u32 = 1;
/// magic(8) version(4) pack_count(4).
pub const INDEX_HEADER_LEN: usize = 16;
/// Per pack: pack id [32], entry count u32.
pub const INDEX_PACK_HEADER_LEN: usize = 36;
/// Trailing BLAKE3.
pub const INDEX_TRAILER_LEN: usize = 32;
/// Largest index file a reader accepts (against hostile files).
pub const MAX_INDEX_FILE: u64 = 1 << 30;

/// Block-reference record tags, used in manifest segments and journal batches.
pub const REC_ZERO: u8 = 0;
pub const REC_UNUSED: u8 = 1;
pub const REC_CHUNK: u8 = 2;
pub const REC_SLICE: u8 = 3;
/// Format 2: `n` consecutive blocks are consecutive pieces of one blob (tree leaves, journal
/// version 4).
pub const REC_PART: u8 = 4;
/// Bytes per record: tag + u32 count; tag + 32-byte id; tag + 32-byte content hash + 32-byte
/// pack id + u8 index; tag + u32 count + 32-byte blob id + u32 first piece.
pub const REC_RUN_LEN: usize = 5;
pub const REC_CHUNK_LEN: usize = 33;
pub const REC_SLICE_LEN: usize = 66;
pub const REC_PART_LEN: usize = 41;
/// The longest record per block: bounds a decoded segment.
pub const REC_MAX_LEN: usize = REC_SLICE_LEN;

/// Most blocks one pack chunk holds (an index is one byte; a pack is also at most
/// [`MAX_BLOCK_SIZE`] bytes).
pub const MAX_PACK_BLOCKS: u64 = 64;

/// Format 2, tree nodes (blob kind tree; docs/FORMAT.md §F2.5): `"VBTN"`, a
/// version byte, the level byte, 2 reserved bytes, the u64 number of blocks covered, then the
/// records of a leaf (ZERO, UNUSED, PART) or, for an interior node, a u32 child count and the
/// children's 32-byte ids.
pub const NODE_MAGIC: [u8; 4] = *b"VBTN";
pub const NODE_VERSION: u8 = 1;
pub const NODE_HEADER_LEN: usize = 16;
/// Blocks one leaf covers (the last leaf of a tree may cover fewer).
pub const LEAF_BLOCKS: u64 = 16384;
/// Children of one interior node (the last node of a level may have fewer).
pub const FANOUT: u64 = 1024;
/// The tallest tree: `LEAF_BLOCKS · FANOUT^5` exceeds any u64 block count.
pub const MAX_TREE_HEIGHT: u32 = 5;

/// What one block of a snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockRef {
    /// All zeros; nothing stored.
    Zero,
    /// Not used by the filesystem; restored as zeros.
    Unused,
    /// Content stored in this chunk.
    Chunk(ChunkId),
    /// Content stored as block `index` of a pack chunk: bytes `[index · block_size, …)` of
    /// chunk `pack`, whose content is several consecutive blocks compressed together. `hash`
    /// is the hash of the block's own content (what its chunk id would be).
    Slice {
        hash: ChunkId,
        pack: ChunkId,
        index: u8,
    },
    /// Format 2: content stored as piece `index` of data blob `blob`: bytes
    /// `[index · block_size, index · block_size + len)` of the blob's content, where `len` is
    /// the block's length. In a run of `n` blocks (records, `for_each_run`) the blocks are
    /// pieces `index .. index + n` (see [`BlockRef::advance`]).
    Part { blob: ChunkId, index: u32 },
}

impl BlockRef {
    /// True for blocks whose content is stored (a chunk, a slice of a pack, a piece of a
    /// blob).
    pub fn is_data(&self) -> bool {
        matches!(
            self,
            BlockRef::Chunk(_) | BlockRef::Slice { .. } | BlockRef::Part { .. }
        )
    }

    /// The hash of the block's content, for blocks of format 1 (chunks and slices). A piece
    /// of a blob has no hash of its own: `None`.
    pub fn content_hash(&self) -> Option<ChunkId> {
        match *self {
            BlockRef::Chunk(id) => Some(id),
            BlockRef::Slice { hash, .. } => Some(hash),
            BlockRef::Zero | BlockRef::Unused | BlockRef::Part { .. } => None,
        }
    }

    /// The chunk file that holds the block's content (format 1 only).
    pub fn chunk(&self) -> Option<ChunkId> {
        match *self {
            BlockRef::Chunk(id) => Some(id),
            BlockRef::Slice { pack, .. } => Some(pack),
            BlockRef::Zero | BlockRef::Unused | BlockRef::Part { .. } => None,
        }
    }

    /// The data blob that holds the block's content (format 2 only).
    pub fn blob(&self) -> Option<ChunkId> {
        match *self {
            BlockRef::Part { blob, .. } => Some(blob),
            _ => None,
        }
    }

    /// The reference of the block `k` blocks further in a run that starts with `self`: for a
    /// piece of a blob, the piece `k` further (saturating: runs are checked to fit a u32 when
    /// decoded); every other reference is the same for each block of its run.
    pub fn advance(self, k: u64) -> BlockRef {
        match self {
            BlockRef::Part { blob, index } => BlockRef::Part {
                blob,
                index: u32::try_from(k).map_or(u32::MAX, |k| index.saturating_add(k)),
            },
            r => r,
        }
    }

    /// True when a run of `n` blocks starting with `self` continues with `next`: equal
    /// references, or the next piece of the same blob.
    pub fn continues(&self, n: u64, next: &BlockRef) -> bool {
        match (self, next) {
            (
                BlockRef::Part { blob, index },
                BlockRef::Part {
                    blob: b2,
                    index: i2,
                },
            ) => blob == b2 && u64::from(*index) + n == u64::from(*i2),
            (a, b) => a == b,
        }
    }
}

/// The bytes of slot `slot` of a decoded pack whose blocks are `block_size` bytes, for a
/// block of `len` bytes; `None` when the pack is too short for it.
pub fn pack_slice(pack: &[u8], slot: u8, block_size: u64, len: u64) -> Option<&[u8]> {
    let start = u64::from(slot).checked_mul(block_size)?;
    let end = start.checked_add(len)?;
    pack.get(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
}

/// Appends a run of `count` blocks starting with `r` to `out` in record encoding: `count`
/// copies of `r`, or for a piece of a blob, pieces `index .. index + count` (the caller keeps
/// them within a u32).
pub fn encode_run(out: &mut Vec<u8>, r: BlockRef, mut count: u64) {
    match r {
        BlockRef::Part { blob, mut index } => {
            while count > 0 {
                let n = count.min(u32::MAX as u64) as u32;
                out.push(REC_PART);
                out.extend_from_slice(&n.to_le_bytes());
                out.extend_from_slice(&blob.0);
                out.extend_from_slice(&index.to_le_bytes());
                index = index.saturating_add(n);
                count -= n as u64;
            }
        }
        BlockRef::Chunk(id) => {
            for _ in 0..count {
                out.push(REC_CHUNK);
                out.extend_from_slice(&id.0);
            }
        }
        BlockRef::Slice { hash, pack, index } => {
            for _ in 0..count {
                out.push(REC_SLICE);
                out.extend_from_slice(&hash.0);
                out.extend_from_slice(&pack.0);
                out.push(index);
            }
        }
        BlockRef::Zero | BlockRef::Unused => {
            let tag = if r == BlockRef::Zero {
                REC_ZERO
            } else {
                REC_UNUSED
            };
            while count > 0 {
                let n = count.min(u32::MAX as u64);
                out.push(tag);
                out.extend_from_slice(&(n as u32).to_le_bytes());
                count -= n;
            }
        }
    }
}

/// Why a sequence of block-reference records was rejected. The caller wraps it into an
/// [`crate::Error::Corrupt`] naming the segment or journal batch it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRecords {
    /// A record ends before its last field; the kind is "run", "chunk" or "slice".
    #[error("truncated {0} record")]
    Truncated(&'static str),
    #[error("run record of length 0")]
    EmptyRun,
    #[error("slice index {0} out of range")]
    SliceIndex(u8),
    #[error("piece range {first} + {n} does not fit 32 bits")]
    PieceRange { first: u32, n: u32 },
    #[error("unknown record tag {0}")]
    UnknownTag(u8),
    #[error("records cover more than the {expected} blocks expected")]
    TooMany { expected: u64 },
    #[error("records cover {seen} blocks, {expected} expected")]
    TooFew { seen: u64, expected: u64 },
}

/// The `detail` of the [`crate::Error::Corrupt`] that reports it.
impl From<BadRecords> for String {
    fn from(e: BadRecords) -> String {
        e.to_string()
    }
}

/// Decodes records, expecting exactly `expected` blocks. Calls `f(ref, count)` per record (a
/// run: for a PART record, pieces `first .. first + count`; see [`BlockRef::advance`]).
pub fn decode_records(
    mut data: &[u8],
    expected: u64,
    mut f: impl FnMut(BlockRef, u64),
) -> Result<(), BadRecords> {
    let mut seen = 0u64;
    while let Some((&tag, rest)) = data.split_first() {
        let (r, count, rest) = match tag {
            REC_ZERO | REC_UNUSED => {
                let Some((n, rest)) = rest.split_first_chunk::<4>() else {
                    return Err(BadRecords::Truncated("run"));
                };
                let n = u32::from_le_bytes(*n) as u64;
                if n == 0 {
                    return Err(BadRecords::EmptyRun);
                }
                let r = if tag == REC_ZERO {
                    BlockRef::Zero
                } else {
                    BlockRef::Unused
                };
                (r, n, rest)
            }
            REC_CHUNK => {
                let Some((id, rest)) = rest.split_first_chunk::<32>() else {
                    return Err(BadRecords::Truncated("chunk"));
                };
                (BlockRef::Chunk(ChunkId(*id)), 1, rest)
            }
            REC_SLICE => {
                let Some((hash, rest)) = rest.split_first_chunk::<32>() else {
                    return Err(BadRecords::Truncated("slice"));
                };
                let Some((pack, rest)) = rest.split_first_chunk::<32>() else {
                    return Err(BadRecords::Truncated("slice"));
                };
                let Some((&index, rest)) = rest.split_first() else {
                    return Err(BadRecords::Truncated("slice"));
                };
                if u64::from(index) >= MAX_PACK_BLOCKS {
                    return Err(BadRecords::SliceIndex(index));
                }
                let r = BlockRef::Slice {
                    hash: ChunkId(*hash),
                    pack: ChunkId(*pack),
                    index,
                };
                (r, 1, rest)
            }
            REC_PART => {
                let Some((n, rest)) = rest.split_first_chunk::<4>() else {
                    return Err(BadRecords::Truncated("part"));
                };
                let Some((blob, rest)) = rest.split_first_chunk::<32>() else {
                    return Err(BadRecords::Truncated("part"));
                };
                let Some((first, rest)) = rest.split_first_chunk::<4>() else {
                    return Err(BadRecords::Truncated("part"));
                };
                let n = u32::from_le_bytes(*n);
                let first = u32::from_le_bytes(*first);
                if n == 0 {
                    return Err(BadRecords::EmptyRun);
                }
                // The end of the piece range must be a u32, so that arithmetic on it never
                // overflows.
                if first.checked_add(n).is_none() {
                    return Err(BadRecords::PieceRange { first, n });
                }
                let r = BlockRef::Part {
                    blob: ChunkId(*blob),
                    index: first,
                };
                (r, n as u64, rest)
            }
            t => return Err(BadRecords::UnknownTag(t)),
        };
        seen = seen.saturating_add(count);
        if seen > expected {
            return Err(BadRecords::TooMany { expected });
        }
        f(r, count);
        data = rest;
    }
    if seen != expected {
        return Err(BadRecords::TooFew { seen, expected });
    }
    Ok(())
}

pub use crate::bytes::{le_u32, le_u64};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_ref() -> impl Strategy<Value = BlockRef> {
        prop_oneof![
            Just(BlockRef::Zero),
            Just(BlockRef::Unused),
            any::<[u8; 32]>().prop_map(|b| BlockRef::Chunk(ChunkId(b))),
            (any::<[u8; 32]>(), any::<[u8; 32]>(), 0u8..64).prop_map(|(h, p, index)| {
                BlockRef::Slice {
                    hash: ChunkId(h),
                    pack: ChunkId(p),
                    index,
                }
            }),
            (any::<[u8; 32]>(), 0u32..1000).prop_map(|(b, index)| BlockRef::Part {
                blob: ChunkId(b),
                index,
            }),
        ]
    }

    #[test]
    fn part_records_are_runs_of_pieces() {
        let blob = ChunkId([7; 32]);
        let r = BlockRef::Part { blob, index: 5 };
        let mut enc = Vec::new();
        encode_run(&mut enc, r, 3);
        assert_eq!(enc.len(), REC_PART_LEN);
        assert_eq!(enc[0], REC_PART);
        let mut got = Vec::new();
        decode_records(&enc, 3, |r, n| got.push((r, n))).unwrap();
        assert_eq!(got, vec![(r, 3)]);
        assert_eq!(r.advance(2), BlockRef::Part { blob, index: 7 });
        assert!(r.continues(3, &BlockRef::Part { blob, index: 8 }));
        assert!(!r.continues(2, &BlockRef::Part { blob, index: 8 }));
        assert!(!r.continues(
            3,
            &BlockRef::Part {
                blob: ChunkId([8; 32]),
                index: 8
            }
        ));
        assert!(BlockRef::Zero.continues(9, &BlockRef::Zero));
        assert_eq!(BlockRef::Zero.advance(4), BlockRef::Zero);
        assert!(r.is_data());
        assert_eq!(r.content_hash(), None);
        assert_eq!(r.chunk(), None);
        assert_eq!(r.blob(), Some(blob));
        assert_eq!(BlockRef::Chunk(blob).blob(), None);
        // Truncated at every length.
        for cut in 1..enc.len() {
            assert_eq!(
                decode_records(&enc[..cut], 3, |_, _| {}),
                Err(BadRecords::Truncated("part"))
            );
        }
        // n = 0, and a piece range past u32::MAX.
        let mut zero = enc.clone();
        zero[1..5].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            decode_records(&zero, 0, |_, _| {}),
            Err(BadRecords::EmptyRun)
        );
        let mut far = enc.clone();
        far[37..41].copy_from_slice(&(u32::MAX - 1).to_le_bytes());
        assert_eq!(
            decode_records(&far, 3, |_, _| {}),
            Err(BadRecords::PieceRange {
                first: u32::MAX - 1,
                n: 3
            })
        );
        far[37..41].copy_from_slice(&(u32::MAX - 3).to_le_bytes());
        assert!(decode_records(&far, 3, |_, _| {}).is_ok());
    }

    #[test]
    fn slice_records_are_checked() {
        let mut enc = Vec::new();
        let r = BlockRef::Slice {
            hash: ChunkId([1; 32]),
            pack: ChunkId([2; 32]),
            index: 63,
        };
        encode_run(&mut enc, r, 2);
        assert_eq!(enc.len(), 2 * REC_SLICE_LEN);
        let mut got = Vec::new();
        decode_records(&enc, 2, |r, n| got.push((r, n))).unwrap();
        assert_eq!(got, vec![(r, 1), (r, 1)]);
        let mut bad = enc.clone();
        bad[REC_SLICE_LEN - 1] = 64;
        assert_eq!(
            decode_records(&bad, 2, |_, _| {}),
            Err(BadRecords::SliceIndex(64))
        );
        assert_eq!(
            decode_records(&enc[..REC_SLICE_LEN + 40], 2, |_, _| {}),
            Err(BadRecords::Truncated("slice"))
        );
        assert_eq!(
            decode_records(&enc, 3, |_, _| {}),
            Err(BadRecords::TooFew {
                seen: 2,
                expected: 3
            })
        );
    }

    proptest! {
        #[test]
        fn records_round_trip(runs in proptest::collection::vec((arb_ref(), 1u64..5), 0..50)) {
            let mut enc = Vec::new();
            let mut expected = Vec::new();
            for (r, n) in &runs {
                encode_run(&mut enc, *r, *n);
                expected.extend((0..*n).map(|k| r.advance(k)));
            }
            let mut got = Vec::new();
            decode_records(&enc, expected.len() as u64, |r, n| {
                got.extend((0..n).map(|k| r.advance(k)))
            }).unwrap();
            prop_assert_eq!(got, expected);
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200), n in 0u64..1000) {
            let _ = decode_records(&data, n, |_, _| {});
        }
    }
}
