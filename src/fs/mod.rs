//! What is on a volume: filesystem detection and allocation maps.
//!
//! An allocation map says which blocks of a volume hold data the filesystem uses; a backup
//! reads and stores only those and records the rest as unused (restored as zeros). Maps are
//! read from the filesystem's own structures, never by mounting it. Anything unknown or
//! damaged falls back to "every block is used", with a warning that says why.

mod alloc;
pub mod btrfs;
pub mod check;
pub mod crc32;
pub mod detect;
pub mod disk;
pub mod exfat;
pub mod ext;
pub mod fat;
pub mod ntfs;
pub mod xfs;

use crate::error::Result;
use crate::volume::Volume;
use check::Checked;
pub use check::MapCheck;
use serde::{Deserialize, Serialize};

/// What a probe found on a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsInfo {
    /// "ext2", "ext3", "ext4", "xfs", "btrfs", "ntfs", "vfat", "exfat" (`blkid`'s TYPE).
    #[serde(rename = "type")]
    pub fs_type: String,
    /// As `volback probe` reports it: "FAT12", "FAT16", "FAT32" for vfat, the revision
    /// ("1.0") for exfat; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub uuid: String,
    pub label: String,
    /// Filesystem block size in bytes.
    pub block_size: u32,
    /// Size the filesystem spans, in bytes.
    pub size: u64,
    /// Bytes the filesystem reports as used (NTFS, FAT, exFAT: clusters in use; the whole
    /// size when their allocation data is unusable).
    pub used_bytes: u64,
}

/// Which blocks (of a chosen granularity) of a volume are in use. One bit per block, so a
/// 1 TiB volume at 256 KiB granularity needs 512 KiB whatever the filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMap {
    granularity: u64,
    blocks: u64,
    bits: Vec<u64>,
}

impl BlockMap {
    /// A map of `size` bytes in blocks of `granularity` bytes, all unused.
    pub fn new(size: u64, granularity: u64) -> BlockMap {
        let blocks = size.div_ceil(granularity);
        BlockMap {
            granularity,
            blocks,
            bits: vec![0; blocks.div_ceil(64) as usize],
        }
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    pub fn block_count(&self) -> u64 {
        self.blocks
    }

    /// Marks the byte range `[start, start+len)` used (clipped to the map).
    pub fn mark_bytes(&mut self, start: u64, len: u64) {
        if len == 0 || self.blocks == 0 {
            return;
        }
        let first = start / self.granularity;
        let last = (start.saturating_add(len) - 1) / self.granularity;
        let last = last.min(self.blocks - 1);
        let mut b = first;
        while b <= last {
            if b.is_multiple_of(64) && b + 63 <= last {
                self.bits[(b / 64) as usize] = u64::MAX;
                b += 64;
            } else {
                self.bits[(b / 64) as usize] |= 1 << (b % 64);
                b += 1;
            }
        }
    }

    /// Marks every block that overlaps `[start, start+len)` unused (clipped to the map).
    pub fn unmark_bytes(&mut self, start: u64, len: u64) {
        if len == 0 || self.blocks == 0 {
            return;
        }
        let first = start / self.granularity;
        let last = ((start.saturating_add(len) - 1) / self.granularity).min(self.blocks - 1);
        let mut b = first;
        while b <= last {
            if b.is_multiple_of(64) && b + 63 <= last {
                self.bits[(b / 64) as usize] = 0;
                b += 64;
            } else {
                self.bits[(b / 64) as usize] &= !(1 << (b % 64));
                b += 1;
            }
        }
    }

    pub fn is_used(&self, block: u64) -> bool {
        block < self.blocks && self.bits[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Number of used blocks.
    pub fn used_blocks(&self) -> u64 {
        self.bits.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// The runs of used blocks, in order, as block index ranges.
    pub fn used_runs(&self) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
        let mut b = 0u64;
        std::iter::from_fn(move || {
            let start = self.next_with(b, true)?;
            let end = self.next_with(start, false).unwrap_or(self.blocks);
            b = end;
            Some(start..end)
        })
    }

    /// The first block at or after `from` whose state is `used`.
    fn next_with(&self, from: u64, used: bool) -> Option<u64> {
        let mut b = from;
        while b < self.blocks {
            let word = self.bits[(b / 64) as usize];
            let word = (if used { word } else { !word }) >> (b % 64);
            if word != 0 {
                let found = b + word.trailing_zeros() as u64;
                return (found < self.blocks).then_some(found);
            }
            b = (b / 64 + 1) * 64;
        }
        None
    }
}

/// Result of probing a volume for an allocation map.
#[derive(Debug, Clone)]
pub struct Probe {
    pub fs: Option<FsInfo>,
    /// `None`: every block must be read.
    pub map: Option<BlockMap>,
    /// Why there is no map although a filesystem was recognised (damaged structures…), or
    /// what the map does not cover (an XFS realtime device).
    pub warning: Option<String>,
}

/// Detects the filesystem on `vol` and, when supported, builds its allocation map at
/// `granularity` bytes per bit. The format is the first match of [`detect::RECOGNISERS`]
/// (see [`detect`] for the rule when a volume carries several signatures).
pub fn probe(vol: &dyn Volume, granularity: u64) -> Result<Probe> {
    detect::map(vol, granularity)
}

/// What change tracking found: the blocks of a volume known to be unchanged since an
/// earlier state of it, without reading them.
#[derive(Debug, Clone, Default)]
pub struct Unchanged {
    /// Blocks (at the requested granularity) whose bytes equal the earlier state's in every
    /// filesystem block in use; `None`: nothing is known, every used block is read.
    pub map: Option<BlockMap>,
    /// Why a recognised filesystem could not be tracked.
    pub note: Option<String>,
}

/// Change tracking for the filesystem spanning `vol`, against `earlier` (the same volume as
/// a parent snapshot or a copy holds it). Only ext4 (extent-mapped files) is tracked; other
/// filesystems give an empty answer without a note.
pub fn unchanged_blocks(
    vol: &dyn Volume,
    earlier: &dyn Volume,
    granularity: u64,
) -> Result<Unchanged> {
    if let Some(sb) = ext::Superblock::read(vol)? {
        return Ok(
            match ext::changes::unchanged_blocks(vol, earlier, &sb, granularity) {
                Ok(map) => Unchanged {
                    map: Some(map),
                    note: None,
                },
                Err(why) => Unchanged {
                    map: None,
                    note: Some(format!(
                        "{}: no change tracking ({})",
                        sb.fs_type(),
                        crate::error::chain(&why)
                    )),
                },
            },
        );
    }
    Ok(Unchanged::default())
}

/// A 16-byte UUID in its usual text form (`8-4-4-4-12` hex digits, bytes in order).
pub fn uuid_string(b: &[u8; 16]) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        hex::encode(&b[0..4]),
        hex::encode(&b[4..6]),
        hex::encode(&b[6..8]),
        hex::encode(&b[8..10]),
        hex::encode(&b[10..16])
    )
}

/// The 16 bytes at `at` of `b` (a UUID field of a superblock).
pub(crate) fn uuid_at(b: &[u8], at: usize) -> [u8; 16] {
    let mut u = [0u8; 16];
    u.copy_from_slice(&b[at..at + 16]);
    u
}

impl Probe {
    /// A recognised filesystem with its map, or without one and a warning saying why.
    fn mapped(info: FsInfo, map: Checked<BlockMap>) -> Probe {
        let warning = map.as_ref().err().map(|why| {
            let name = match &info.version {
                Some(v) if info.fs_type == "vfat" => format!("{} ({v})", info.fs_type),
                _ => info.fs_type.clone(),
            };
            format!(
                "{name} allocation data is unusable ({}); reading every block",
                crate::error::chain(why)
            )
        });
        Probe {
            fs: Some(info),
            map: map.ok(),
            warning,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::error::Error;

    /// An in-memory volume.
    pub struct Mem(pub Vec<u8>);

    impl Volume for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            let len = buf.len() as u64;
            let end = offset
                .checked_add(len)
                .filter(|&e| e <= self.0.len() as u64)
                .ok_or_else(|| Error::read_out_of_range("mem", offset, len, self.size()))?;
            buf.copy_from_slice(&self.0[offset as usize..end as usize]);
            Ok(())
        }
        fn describe(&self) -> String {
            "mem".into()
        }
    }

    /// A filesystem module's `probe`.
    type ProbeFn = fn(&dyn Volume, u64) -> Result<Option<(FsInfo, Checked<BlockMap>)>>;

    /// Why `probe` (a filesystem module's) refuses to map `img` at a 4 KiB granularity; panics
    /// when the image is not recognised or is mapped.
    pub fn refusal(probe: ProbeFn, img: Vec<u8>) -> MapCheck {
        probe(&Mem(img), 4096).unwrap().unwrap().1.unwrap_err()
    }

    /// Asserts that `probe` refuses to map `img` with an error that mentions `what`.
    pub fn assert_refused(probe: ProbeFn, img: Vec<u8>, what: &str) {
        let err = refusal(probe, img);
        assert!(err.contains(what), "{err}");
    }

    #[test]
    fn fs_info_without_version_reads_and_writes_as_before() {
        let old =
            r#"{"type":"ext4","uuid":"u","label":"","block_size":4096,"size":1,"used_bytes":1}"#;
        let info: FsInfo = serde_json::from_str(old).unwrap();
        assert_eq!(info.version, None);
        assert_eq!(serde_json::to_string(&info).unwrap(), old);
    }

    #[test]
    fn block_map_marks_ranges() {
        let mut m = BlockMap::new(1000 * 4096, 4096);
        m.mark_bytes(4096 * 10, 1);
        m.mark_bytes(4096 * 64, 4096 * 128);
        m.mark_bytes(4096 * 999, 1 << 40);
        assert!(m.is_used(10) && !m.is_used(9) && !m.is_used(11));
        assert!(m.is_used(64) && m.is_used(191) && !m.is_used(192));
        assert!(m.is_used(999) && !m.is_used(1000));
        assert_eq!(m.used_blocks(), 1 + 128 + 1);
        let runs: Vec<_> = m.used_runs().collect();
        assert_eq!(runs, vec![10..11, 64..192, 999..1000]);
        let mut full = BlockMap::new(130 * 4096, 4096);
        full.mark_bytes(0, 130 * 4096);
        assert_eq!(full.used_runs().collect::<Vec<_>>(), vec![0..130]);
        assert_eq!(BlockMap::new(0, 4096).used_runs().count(), 0);
    }
}
