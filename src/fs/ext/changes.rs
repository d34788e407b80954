//! Change tracking for ext4: which blocks cannot have changed since an earlier state of the
//! same filesystem (the parent snapshot, or the copy being updated), found from inodes and
//! extent trees instead of by reading the blocks.
//!
//! A block of the volume is *unchanged* when every filesystem block in it that is in use now
//! belongs to a file or directory whose inode is unchanged:
//!
//! - the inode slot holds the same bytes in both states, apart from the access time and the
//!   checksum (so the same size, block count, flags, generation, modification and change
//!   times, and extent tree root);
//! - its change time lies more than [`RACY_SECONDS`] before the earlier state's superblock
//!   write time (`s_wtime`), so that a write in the same clock tick as the earlier backup,
//!   which would leave the timestamps as they were, cannot hide;
//! - its extent trees (leaves included) list the same extents in both states;
//! - it is a regular file or directory with an extent tree, not an inode the filesystem
//!   keeps for itself (reserved numbers, journal, quota, orphan file, EA inodes).
//!
//! Everything else in use is read: filesystem metadata (superblocks, descriptors, bitmaps,
//! inode tables), extent tree blocks, the journal, blocks of changed files, and blocks that a
//! changed or unknown inode also claims. Free filesystem blocks inside an unchanged block
//! impose nothing: their content is not part of the filesystem.
//!
//! Memory: one bit per filesystem block (64 MiB at most: 2 TiB of 4 KiB blocks); larger
//! filesystems are not tracked.

use super::inode::{
    FL_EA_INODE, FL_EXTENTS, FL_INLINE_DATA, Inode, Node, S_IFDIR, S_IFMT, S_IFREG, walk_extents,
};
use super::{
    BG_INODE_UNINIT, Bits, DescReader, INCOMPAT_INLINE_DATA, RO_COMPAT_BIGALLOC, Superblock, Used,
    for_each_used,
};
use crate::fs::BlockMap;
use crate::fs::check::{Checked, bad, within};
use crate::volume::Volume;

/// Seconds before the earlier state's superblock write time within which a change time is
/// too close to trust (timestamps are coarse: whole seconds with 128-byte inodes).
pub const RACY_SECONDS: i64 = 3;

/// The most filesystem blocks tracked (one bit each: 64 MiB).
const MAX_TRACKED_BLOCKS: u64 = 1 << 29;

/// Inode table bytes read at a time.
const ITABLE_CHUNK: u64 = 1 << 20;

/// An extent tree larger than this is not compared (its file is read).
const MAX_TREE_BLOCKS: u64 = 1 << 16;

/// The blocks (at `granularity` bytes) of `vol` whose bytes equal those of `earlier`, an
/// earlier state of the same ext filesystem, in every filesystem block in use now. `Err` says
/// why nothing can be told (different filesystem or geometry, damaged structures…).
pub fn unchanged_blocks(
    vol: &dyn Volume,
    earlier: &dyn Volume,
    sb: &Superblock,
    granularity: u64,
) -> Checked<BlockMap> {
    let Some(old) =
        Superblock::read(earlier).map_err(|e| within(e, "reading the earlier superblock"))?
    else {
        return Err(bad!("the earlier state holds no ext filesystem"));
    };
    if old.uuid != sb.uuid
        || old.block_size != sb.block_size
        || old.blocks_count != sb.blocks_count
        || old.first_data_block != sb.first_data_block
        || old.blocks_per_group != sb.blocks_per_group
        || old.inodes_per_group != sb.inodes_per_group
        || old.inode_size != sb.inode_size
        || old.desc_size != sb.desc_size
        || vol.size() != earlier.size()
    {
        return Err(bad!(
            "the earlier state is another filesystem or has another geometry"
        ));
    }
    if sb.ro_compat & RO_COMPAT_BIGALLOC != 0 {
        return Err(bad!("bigalloc filesystems are not tracked"));
    }
    if sb.blocks_count > MAX_TRACKED_BLOCKS {
        return Err(bad!(
            "{} blocks are more than change tracking keeps in memory ({MAX_TRACKED_BLOCKS})",
            sb.blocks_count
        ));
    }
    // Both states must be consistent: the earlier one's journal clean too.
    super::check_fits(earlier, &old)?;
    super::check_fits(vol, sb)?;

    let bs = sb.block_size;
    let threshold = old.wtime - RACY_SECONDS;
    let mut claimed = Bits::new(sb.blocks_count);
    let mut tainted = BlockMap::new(vol.size(), granularity);
    let mut taint = |start: u64, len: u64| tainted.mark_bytes(start * bs, len * bs);

    let mut cur_descs = DescReader {
        vol,
        sb,
        cached: None,
    };
    let mut old_descs = DescReader {
        vol: earlier,
        sb: &old,
        cached: None,
    };
    let ipg = sb.inodes_per_group;
    let isz = sb.inode_size;
    let slots_in_use = |d: &super::Desc, s: &Superblock| -> u64 {
        if d.flags & BG_INODE_UNINIT != 0 && s.group_checksums() {
            0
        } else if s.group_checksums() {
            ipg.saturating_sub(d.itable_unused)
        } else {
            ipg
        }
    };
    let per_chunk = (ITABLE_CHUNK / isz).max(1);
    let mut cur_buf = vec![0u8; (per_chunk * isz) as usize];
    let mut old_buf = vec![0u8; (per_chunk * isz) as usize];
    let inline_possible = sb.incompat & INCOMPAT_INLINE_DATA != 0;
    // One inode's tree blocks and extents (reused from inode to inode).
    let mut extents = Vec::new();
    let mut nodes = Vec::new();

    for g in 0..sb.group_count() {
        let cd = cur_descs.get(g)?;
        let od = old_descs.get(g)?;
        if cd.inode_table != od.inode_table {
            return Err(bad!("the inode table of group {g} moved"));
        }
        let n = slots_in_use(&cd, sb);
        let on = slots_in_use(&od, &old);
        if cd
            .inode_table
            .checked_add(sb.itable_blocks())
            .is_none_or(|e| e > sb.blocks_count)
        {
            return Err(bad!("group {g}: inode table outside the filesystem"));
        }
        let mut first = 0u64;
        while first < n {
            let count = per_chunk.min(n - first);
            let bytes = (count * isz) as usize;
            let at = cd.inode_table * bs + first * isz;
            vol.read_at(at, &mut cur_buf[..bytes])
                .map_err(|e| within(e, format!("reading inode table of group {g}")))?;
            let old_count = on.saturating_sub(first).min(count);
            if old_count > 0 {
                earlier
                    .read_at(at, &mut old_buf[..(old_count * isz) as usize])
                    .map_err(|e| within(e, format!("reading earlier inode table of group {g}")))?;
            }
            for i in 0..count {
                let slot = (i * isz) as usize..((i + 1) * isz) as usize;
                let cur = Inode(&cur_buf[slot.clone()]);
                if !cur.in_use() || cur.flags() & FL_EXTENTS == 0 {
                    // Block-mapped files are not tracked: their blocks are unclaimed, so read.
                    continue;
                }
                if inline_possible && cur.flags() & FL_INLINE_DATA != 0 {
                    continue;
                }
                let ino = g * ipg + first + i + 1;
                let kind = cur.mode() & S_IFMT;
                let candidate = ino >= sb.first_ino.max(11)
                    && !sb.special_inodes.contains(&ino)
                    && (kind == S_IFREG || kind == S_IFDIR)
                    && cur.flags() & FL_EA_INODE == 0
                    && i < old_count
                    && cur.same_as(&Inode(&old_buf[slot]))
                    && cur.ctime() < threshold;
                extents.clear();
                nodes.clear();
                let walked = walk_extents(vol, sb, cur.root(), MAX_TREE_BLOCKS, &mut |n| match n {
                    Node::Block(b) => nodes.push(b),
                    Node::Extent(e) => extents.push(e),
                });
                let unchanged =
                    candidate
                        && walked.is_ok()
                        && (nodes.is_empty() || {
                            // The root is the same; the rest of the tree must be too.
                            let mut old_extents = Vec::with_capacity(extents.len());
                            let mut old_nodes = Vec::with_capacity(nodes.len());
                            walk_extents(earlier, &old, cur.root(), MAX_TREE_BLOCKS, &mut |n| {
                                match n {
                                    Node::Block(b) => old_nodes.push(b),
                                    Node::Extent(e) => old_extents.push(e),
                                }
                            })
                            .is_ok()
                                && old_extents == extents
                                && old_nodes == nodes
                        });
                for &b in &nodes {
                    taint(b, 1);
                }
                for e in &extents {
                    if unchanged {
                        claimed.set_run(e.start, e.len);
                    } else {
                        taint(e.start, e.len);
                    }
                }
            }
            first += count;
        }
    }

    // Unchanged: blocks wholly inside the filesystem where every block in use is claimed by
    // an unchanged inode, no metadata lies, and nothing changed claims a block.
    let fs_bytes = sb.blocks_count * bs;
    let mut known = BlockMap::new(vol.size(), granularity);
    known.mark_bytes(0, fs_bytes);
    if !fs_bytes.is_multiple_of(granularity) {
        known.unmark_bytes(fs_bytes, granularity);
    }
    for_each_used(vol, sb, |kind, start, len| {
        let end = (start + len).min(sb.blocks_count);
        match kind {
            Used::Metadata => known.unmark_bytes(start * bs, (end - start.min(end)) * bs),
            Used::Allocated => {
                for b in start..end {
                    if !claimed.get(b) {
                        known.unmark_bytes(b * bs, bs);
                    }
                }
            }
        }
    })?;
    for run in tainted.used_runs() {
        known.unmark_bytes(run.start * granularity, (run.end - run.start) * granularity);
    }
    Ok(known)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::fs::tests::Mem;

    /// A 4 MiB ext4 (1 KiB blocks, a two-level extent tree) and the same after some files
    /// changed: tests/fixtures/make-ext4-tracking.sh.
    fn fixture() -> (Vec<u8>, Vec<u8>) {
        let unpack = |z: &[u8]| zstd::decode_all(z).expect("fixture decompresses");
        (
            unpack(include_bytes!(
                "../../../tests/fixtures/ext4-tracking-earlier.img.zst"
            )),
            unpack(include_bytes!(
                "../../../tests/fixtures/ext4-tracking-current.img.zst"
            )),
        )
    }

    const G: u64 = 4096;

    /// Every filesystem block in use in `cur` inside a known block holds the earlier bytes.
    fn assert_sound(cur: &Mem, earlier: &Mem, known: &BlockMap) {
        let sb = Superblock::read(cur).unwrap().unwrap();
        let bs = sb.block_size as usize;
        for_each_used(cur, &sb, |_, start, len| {
            for b in start..(start + len).min(sb.blocks_count) {
                let at = b as usize * bs;
                if known.is_used(at as u64 / G) {
                    assert!(
                        cur.0[at..at + bs] == earlier.0[at..at + bs],
                        "filesystem block {b} changed inside a known block"
                    );
                }
            }
        })
        .unwrap();
    }

    /// Known blocks that hold something in use (wholly free blocks are known trivially; a
    /// scan never reads them anyway).
    fn known_in_use(cur: &Mem, known: &BlockMap) -> u64 {
        let sb = Superblock::read(cur).unwrap().unwrap();
        let map = super::super::allocation_map(cur, &sb, G).unwrap();
        (0..map.block_count())
            .filter(|&b| map.is_used(b) && known.is_used(b))
            .count() as u64
    }

    #[test]
    fn unchanged_files_are_known_and_changed_ones_are_not() {
        let (earlier, cur) = fixture();
        let (earlier, cur) = (Mem(earlier), Mem(cur));
        let sb = Superblock::read(&cur).unwrap().unwrap();
        let known = unchanged_blocks(&cur, &earlier, &sb, G).unwrap();
        assert!(known_in_use(&cur, &known) > 0, "nothing known");
        assert_sound(&cur, &earlier, &known);
        // The same state against itself: known blocks are exactly where nothing but data of
        // trusted files lies, and the superblock's block never is.
        let itself = unchanged_blocks(&earlier, &earlier, &sb, G).unwrap();
        assert!(!itself.is_used(0));
        // Another filesystem, or one whose journal needs recovery, is not tracked.
        let mut other = earlier.0.clone();
        other[1024 + 0x68] ^= 1;
        assert!(unchanged_blocks(&cur, &Mem(other), &sb, G).is_err());
        let mut dirty = earlier.0.clone();
        dirty[1024 + 0x60] |= 0x4;
        assert!(unchanged_blocks(&cur, &Mem(dirty), &sb, G).is_err());
    }

    /// The fixture's `ctime`s lie seconds before the earlier superblock's write time; moved
    /// to the write time, every file is racy and nothing is known.
    #[test]
    fn files_changed_near_the_earlier_write_time_are_not_trusted() {
        let (earlier, cur) = fixture();
        let mut late = earlier.clone();
        // s_wtime back by a day: every ctime is after it.
        let w = u32::from_le_bytes(late[1024 + 0x30..1024 + 0x34].try_into().unwrap());
        late[1024 + 0x30..1024 + 0x34].copy_from_slice(&(w - 86400).to_le_bytes());
        let (late, cur) = (Mem(late), Mem(cur));
        let sb = Superblock::read(&cur).unwrap().unwrap();
        let known = unchanged_blocks(&cur, &late, &sb, G).unwrap();
        assert_eq!(known_in_use(&cur, &known), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Damaged metadata (descriptors, bitmaps, inode tables, extent tree blocks) in
        /// either state never makes a changed block known, and nothing panics or hangs.
        #[test]
        fn damaged_metadata_never_makes_a_changed_block_known(
            patches in proptest::collection::vec((any::<u32>(), any::<u8>(), any::<bool>()), 1..60),
        ) {
            let (earlier, cur) = fixture();
            let (mut earlier, mut cur) = (Mem(earlier), Mem(cur));
            let sb = Superblock::read(&cur).unwrap().unwrap();
            let bs = sb.block_size;
            // Metadata blocks of the current state, and its extent tree blocks.
            let mut meta: Vec<u64> = Vec::new();
            for_each_used(&cur, &sb, |kind, start, len| {
                if kind == Used::Metadata {
                    meta.extend(start.max(1)..start + len);
                }
            })
            .unwrap();
            meta.push(1108);
            for (at, v, which) in patches {
                let blk = meta[at as usize % meta.len()];
                let off = (blk * bs + (at as u64 >> 8) % bs) as usize;
                if which { cur.0[off] ^= v | 1 } else { earlier.0[off] ^= v | 1 }
            }
            if let Ok(Some(sb)) = Superblock::read(&cur)
                && let Ok(known) = unchanged_blocks(&cur, &earlier, &sb, G)
            {
                assert_sound(&cur, &earlier, &known);
            }
        }

        /// Random bytes anywhere in the first blocks: an answer or an error, never a panic.
        #[test]
        fn hostile_bytes_anywhere(
            patches in proptest::collection::vec((0usize..(1 << 20), any::<u8>()), 1..200),
        ) {
            let (earlier, mut cur) = fixture();
            for (at, v) in patches { cur[at] = v; }
            let (earlier, cur) = (Mem(earlier), Mem(cur));
            if let Ok(Some(sb)) = Superblock::read(&cur) {
                let _ = unchanged_blocks(&cur, &earlier, &sb, G);
            }
        }
    }
}
