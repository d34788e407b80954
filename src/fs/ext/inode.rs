//! ext2/3/4 inodes and extent trees, as far as change tracking needs them.
//!
//! Inode fields used (little-endian offsets into the slot): i_mode 0x00, i_atime 0x08,
//! i_size 0x04 (hi 0x6C), i_ctime 0x0C, i_dtime 0x14, i_links_count 0x1A, i_flags 0x20, i_block 0x28 (60 bytes: the
//! extent tree's root), i_file_acl 0x68 (hi 0x76), l_i_checksum_lo 0x7C, i_extra_isize 0x80, i_checksum_hi 0x82,
//! i_ctime_extra 0x84, i_atime_extra 0x8C.
//!
//! An extent tree node starts with a 12-byte header (magic 0xF30A at 0, entries at 2, max at
//! 4, depth at 6) followed by 12-byte entries. Leaves (depth 0): ee_block u32 at 0, ee_len u16
//! at 4 (above 32768: an unwritten extent of `ee_len - 32768` blocks), ee_start_hi u16 at 6,
//! ee_start_lo u32 at 8. Index entries: ei_block u32 at 0, ei_leaf_lo u32 at 4, ei_leaf_hi
//! u16 at 8. The root lives in i_block; every other node fills one block.

use super::Superblock;
use crate::bytes::{le_u16 as u16_at, le_u32 as u32_at};
use crate::fs::check::{Checked, bad, within};
use crate::volume::Volume;

const EXTENT_MAGIC: u16 = 0xF30A;
/// The kernel's limit on an extent tree's depth.
const MAX_DEPTH: u16 = 5;

pub const FL_EXTENTS: u32 = 0x8_0000;
pub const FL_EA_INODE: u32 = 0x20_0000;
pub const FL_INLINE_DATA: u32 = 0x1000_0000;
pub const S_IFMT: u16 = 0xF000;
pub const S_IFREG: u16 = 0x8000;
pub const S_IFDIR: u16 = 0x4000;
pub const S_IFLNK: u16 = 0xA000;

/// One inode slot's bytes.
#[derive(Clone, Copy)]
pub struct Inode<'a>(pub &'a [u8]);

impl Inode<'_> {
    pub fn mode(&self) -> u16 {
        u16_at(self.0, 0x00)
    }

    pub fn links(&self) -> u16 {
        u16_at(self.0, 0x1A)
    }

    pub fn dtime(&self) -> u32 {
        u32_at(self.0, 0x14)
    }

    pub fn flags(&self) -> u32 {
        u32_at(self.0, 0x20)
    }

    /// i_size_lo (0x04) and i_size_high (0x6C).
    pub fn size(&self) -> u64 {
        u32_at(self.0, 0x04) as u64 | (u32_at(self.0, 0x6C) as u64) << 32
    }

    /// The extended-attribute block (i_file_acl_lo 0x68, l_i_file_acl_high 0x76 with 64BIT);
    /// 0 when there is none.
    pub fn file_acl(&self, is64: bool) -> u64 {
        let hi = if is64 { u16_at(self.0, 0x76) as u64 } else { 0 };
        u32_at(self.0, 0x68) as u64 | hi << 32
    }

    /// Size of the fields past the first 128 bytes (0 for 128-byte inodes).
    fn extra_isize(&self) -> usize {
        if self.0.len() <= 128 {
            0
        } else {
            (u16_at(self.0, 0x80) as usize).min(self.0.len() - 128)
        }
    }

    /// True when the inode is in use: a file type, a link, no deletion time.
    pub fn in_use(&self) -> bool {
        self.mode() & S_IFMT != 0 && self.links() > 0 && self.dtime() == 0
    }

    /// Change time in whole seconds, with the epoch bits of i_ctime_extra when present.
    pub fn ctime(&self) -> i64 {
        let secs = u32_at(self.0, 0x0C) as i32 as i64;
        if self.extra_isize() >= 8 {
            secs + (((u32_at(self.0, 0x84) & 3) as i64) << 32)
        } else {
            secs
        }
    }

    /// The extent tree's root (i_block).
    pub fn root(&self) -> &[u8] {
        &self.0[0x28..0x28 + 60]
    }

    /// True when both slots hold the same inode apart from the access time and the
    /// checksum (which covers the access time).
    pub fn same_as(&self, other: &Inode<'_>) -> bool {
        let (a, b) = (self.0, other.0);
        if a.len() != b.len() {
            return false;
        }
        // Ranges ignored: i_atime, l_i_checksum_lo, i_checksum_hi, i_atime_extra.
        const SKIP: [(usize, usize); 4] = [(0x08, 0x0C), (0x7C, 0x7E), (0x82, 0x84), (0x8C, 0x90)];
        let mut pos = 0;
        for (s, e) in SKIP {
            if s >= a.len() {
                break;
            }
            if a[pos..s] != b[pos..s] {
                return false;
            }
            pos = e.min(a.len());
        }
        a[pos..] == b[pos..]
    }
}

/// One leaf extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u32,
    pub start: u64,
    pub len: u64,
    pub unwritten: bool,
}

/// What a walk of an extent tree met.
pub enum Node {
    /// A tree block (index or leaf) other than the root.
    Block(u64),
    Extent(Extent),
}

/// Walks the extent tree whose root is `root` (an inode's i_block), calling `visit` for every
/// tree block and every leaf extent in order. Every block number is checked against the
/// filesystem; a tree of more than `max_nodes` blocks, a depth that does not decrease by one
/// per level, or a bad magic number is an error.
pub fn walk_extents(
    vol: &dyn Volume,
    sb: &Superblock,
    root: &[u8],
    max_nodes: u64,
    visit: &mut dyn FnMut(Node),
) -> Checked<()> {
    let mut nodes = 0u64;
    let mut buf = Vec::new();
    walk_node(vol, sb, root, None, &mut nodes, max_nodes, &mut buf, visit)
}

#[allow(clippy::too_many_arguments)]
fn walk_node(
    vol: &dyn Volume,
    sb: &Superblock,
    node: &[u8],
    expect_depth: Option<u16>,
    nodes: &mut u64,
    max_nodes: u64,
    scratch: &mut Vec<Vec<u8>>,
    visit: &mut dyn FnMut(Node),
) -> Checked<()> {
    if node.len() < 12 || u16_at(node, 0) != EXTENT_MAGIC {
        return Err(bad!("extent node without its magic number"));
    }
    let entries = u16_at(node, 2) as usize;
    let max = u16_at(node, 4) as usize;
    let depth = u16_at(node, 6);
    if depth > MAX_DEPTH || expect_depth.is_some_and(|d| d != depth) {
        return Err(bad!("extent node of depth {depth} out of place"));
    }
    if entries > max || 12 + max * 12 > node.len() {
        return Err(bad!("extent node with {entries} of {max} entries"));
    }
    let in_fs = |start: u64, len: u64| {
        start >= sb.first_data_block && start.checked_add(len).is_some_and(|e| e <= sb.blocks_count)
    };
    for i in 0..entries {
        let e = &node[12 + i * 12..24 + i * 12];
        if depth == 0 {
            let raw_len = u16_at(e, 4) as u64;
            let (len, unwritten) = if raw_len > 32768 {
                (raw_len - 32768, true)
            } else {
                (raw_len, false)
            };
            let start = (u16_at(e, 6) as u64) << 32 | u32_at(e, 8) as u64;
            if len == 0 {
                continue;
            }
            if !in_fs(start, len) {
                return Err(bad!(
                    "extent at block {start} (+{len}) is outside the filesystem"
                ));
            }
            visit(Node::Extent(Extent {
                logical: u32_at(e, 0),
                start,
                len,
                unwritten,
            }));
        } else {
            let child = (u16_at(e, 8) as u64) << 32 | u32_at(e, 4) as u64;
            if !in_fs(child, 1) {
                return Err(bad!("extent tree block {child} is outside the filesystem"));
            }
            *nodes += 1;
            if *nodes > max_nodes {
                return Err(bad!("extent tree larger than {max_nodes} blocks"));
            }
            visit(Node::Block(child));
            // One buffer per level, reused.
            let mut buf = scratch.pop().unwrap_or_default();
            buf.resize(sb.block_size as usize, 0);
            vol.read_at(child * sb.block_size, &mut buf)
                .map_err(|err| within(err, format!("reading extent tree block {child}")))?;
            let r = walk_node(
                vol,
                sb,
                &buf,
                Some(depth - 1),
                nodes,
                max_nodes,
                scratch,
                visit,
            );
            scratch.push(buf);
            r?;
        }
    }
    Ok(())
}

/// Walks a block-mapped inode's i_block (twelve direct pointers, then the single, double and
/// triple indirect blocks), calling `visit(block)` for every data and indirect block it names.
/// Zero pointers are holes. Every pointer is checked against the filesystem; more than
/// `max_nodes` indirect blocks is an error.
pub fn walk_block_map(
    vol: &dyn Volume,
    sb: &Superblock,
    iblock: &[u8],
    max_nodes: u64,
    visit: &mut dyn FnMut(u64),
) -> Checked<()> {
    let mut nodes = 0u64;
    for i in 0..15 {
        let ptr = u32_at(iblock, i * 4) as u64;
        let level = i.saturating_sub(11) as u32;
        walk_pointer(vol, sb, ptr, level, &mut nodes, max_nodes, visit)?;
    }
    Ok(())
}

/// One pointer of a block map: a data block (`level` 0) or an indirect block `level` levels
/// above the data.
fn walk_pointer(
    vol: &dyn Volume,
    sb: &Superblock,
    ptr: u64,
    level: u32,
    nodes: &mut u64,
    max_nodes: u64,
    visit: &mut dyn FnMut(u64),
) -> Checked<()> {
    if ptr == 0 {
        return Ok(());
    }
    if ptr < sb.first_data_block || ptr >= sb.blocks_count {
        return Err(bad!("block pointer {ptr} is outside the filesystem"));
    }
    visit(ptr);
    if level == 0 {
        return Ok(());
    }
    *nodes += 1;
    if *nodes > max_nodes {
        return Err(bad!("block map larger than {max_nodes} indirect blocks"));
    }
    let mut buf = vec![0u8; sb.block_size as usize];
    vol.read_at(ptr * sb.block_size, &mut buf)
        .map_err(|err| within(err, format!("reading indirect block {ptr}")))?;
    for c in buf.chunks_exact(4) {
        let child = u32_at(c, 0) as u64;
        walk_pointer(vol, sb, child, level - 1, nodes, max_nodes, visit)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_as_ignores_access_time_and_checksum_only() {
        let a = vec![7u8; 256];
        let mut b = a.clone();
        for o in [0x08, 0x0B, 0x7C, 0x7D, 0x82, 0x83, 0x8C, 0x8F] {
            b[o] ^= 0xFF;
        }
        assert!(Inode(&a).same_as(&Inode(&b)));
        for o in [0x00, 0x0C, 0x28, 0x64, 0x7E, 0x84, 0x90, 0xFF] {
            let mut c = a.clone();
            c[o] ^= 1;
            assert!(!Inode(&a).same_as(&Inode(&c)), "byte {o:#x}");
        }
        let short = vec![7u8; 128];
        let mut s2 = short.clone();
        s2[0x7C] = 0;
        assert!(Inode(&short).same_as(&Inode(&s2)));
        assert!(!Inode(&short).same_as(&Inode(&a)));
    }
}
