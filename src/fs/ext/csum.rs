//! The checksums ext2/3/4 keeps over the metadata the allocation map trusts.
//!
//! - `gdt_csum` (RO_COMPAT 0x10, "uninit_bg"): each group descriptor's `bg_checksum` (u16 at
//!   0x1E) is CRC-16 (the ANSI polynomial 0x8005, reflected 0xA001, initial value 0xFFFF, no
//!   final XOR: the kernel's `crc16()`) over the filesystem UUID, the group number as a
//!   little-endian u32, the descriptor up to the checksum field and, with 64BIT, the rest of the
//!   descriptor after it.
//! - `metadata_csum` (RO_COMPAT 0x400): CRC-32C chained without inversions (the kernel's
//!   `ext4_chksum`). The seed is `s_checksum_seed` (0x270) with INCOMPAT_CSUM_SEED, otherwise
//!   the chain from 0xFFFFFFFF over the UUID. The superblock's `s_checksum` (0x3FC) chains from
//!   0xFFFFFFFF over the 1020 bytes before it. A descriptor's `bg_checksum` is the low 16 bits
//!   of the chain from the seed over the group number (le32) and the descriptor with its
//!   checksum field taken as zero. A block bitmap's checksum (`bg_block_bitmap_csum_lo` at
//!   0x18, `_hi` at 0x38 when the descriptor reaches 0x3A) chains from the seed over the
//!   group's bitmap bytes (clusters per group / 8); only the low 16 bits count when there is
//!   no high half. An inode bitmap's checksum (`bg_inode_bitmap_csum_lo` at 0x1A, `_hi` at
//!   0x3A when the descriptor reaches 0x3C) is the same chain over inodes per group / 8 bytes.

use crate::bytes::le_u32 as u32_at;
use crate::fs::crc32::crc32c_update;

/// Offset of `bg_checksum` in a group descriptor.
pub const BG_CHECKSUM: usize = 0x1E;
/// Offset of `s_checksum` in the superblock.
pub const SB_CHECKSUM: usize = 0x3FC;
/// A descriptor holds `bg_block_bitmap_csum_hi` when it is at least this long.
pub const BITMAP_CSUM_HI_END: usize = 0x3A;
/// A descriptor holds `bg_inode_bitmap_csum_hi` when it is at least this long.
pub const INODE_BITMAP_CSUM_HI_END: usize = 0x3C;

const fn crc16_table() -> [u16; 256] {
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u16;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xA001 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

const CRC16: [u16; 256] = crc16_table();

/// The kernel's `crc16(crc, data)`: no inversions.
pub fn crc16(mut crc: u16, data: &[u8]) -> u16 {
    for &b in data {
        crc = (crc >> 8) ^ CRC16[((crc ^ b as u16) & 0xFF) as usize];
    }
    crc
}

/// How the descriptors and bitmaps of one filesystem are checksummed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// No group checksums (ext2, ext3, ext4 without uninit_bg).
    None,
    /// `gdt_csum`: CRC-16 of descriptors over this UUID.
    Crc16([u8; 16]),
    /// `metadata_csum`: CRC-32C from this seed.
    Crc32c(u32),
}

impl Scheme {
    /// The metadata_csum seed for a filesystem: `explicit` (s_checksum_seed) when the
    /// CSUM_SEED feature is on, else derived from the UUID.
    pub fn seed(uuid: &[u8; 16], explicit: Option<u32>) -> u32 {
        explicit.unwrap_or_else(|| crc32c_update(!0, uuid))
    }

    /// The checksum group `group`'s descriptor `desc` should carry (`None` without group
    /// checksums).
    pub fn descriptor(&self, group: u64, desc: &[u8]) -> Option<u16> {
        let le_group = (group as u32).to_le_bytes();
        let (head, rest) = desc.split_at(BG_CHECKSUM.min(desc.len()));
        let tail = rest.get(2..).unwrap_or(&[]);
        match *self {
            Scheme::None => None,
            Scheme::Crc16(uuid) => {
                let c = crc16(0xFFFF, &uuid);
                let c = crc16(c, &le_group);
                let c = crc16(c, head);
                // Only 64-byte (64BIT) descriptors extend the CRC-16 past the field; a 32-byte
                // descriptor has nothing after it anyway.
                Some(crc16(c, tail))
            }
            Scheme::Crc32c(seed) => {
                let c = crc32c_update(seed, &le_group);
                let c = crc32c_update(c, head);
                let c = crc32c_update(c, &[0, 0]);
                Some((crc32c_update(c, tail) & 0xFFFF) as u16)
            }
        }
    }

    /// The block bitmap checksum a descriptor records: lo and, when the descriptor reaches
    /// it, hi half (`None` for the hi half otherwise).
    pub fn recorded_bitmap_csum(desc: &[u8]) -> (u16, Option<u16>) {
        let lo = u16::from_le_bytes([desc[0x18], desc[0x19]]);
        let hi = (desc.len() >= BITMAP_CSUM_HI_END)
            .then(|| u16::from_le_bytes([desc[0x38], desc[0x39]]));
        (lo, hi)
    }

    /// The inode bitmap checksum a descriptor records: `bg_inode_bitmap_csum_lo` (0x1A) and,
    /// when the descriptor reaches it, `_hi` (0x3A).
    pub fn recorded_inode_bitmap_csum(desc: &[u8]) -> (u16, Option<u16>) {
        let lo = u16::from_le_bytes([desc[0x1A], desc[0x1B]]);
        let hi = (desc.len() >= INODE_BITMAP_CSUM_HI_END)
            .then(|| u16::from_le_bytes([desc[0x3A], desc[0x3B]]));
        (lo, hi)
    }

    /// Whether a block bitmap's bytes (`clusters_per_group / 8` of them) match `recorded`
    /// (from [`Scheme::recorded_bitmap_csum`]); `true` without metadata_csum.
    pub fn bitmap_ok(&self, recorded: (u16, Option<u16>), bitmap: &[u8]) -> bool {
        let Scheme::Crc32c(seed) = *self else {
            return true;
        };
        let calc = crc32c_update(seed, bitmap);
        match recorded {
            (lo, Some(hi)) => calc == lo as u32 | (hi as u32) << 16,
            (lo, None) => calc & 0xFFFF == lo as u32,
        }
    }
}

/// Whether a metadata_csum superblock (1024 bytes) carries its own checksum.
pub fn superblock_ok(sb: &[u8]) -> bool {
    crc32c_update(!0, &sb[..SB_CHECKSUM]) == u32_at(sb, SB_CHECKSUM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_check_value() {
        // CRC-16/ARC ("123456789") is 0xBB3D with initial value 0; the kernel's crc16 with
        // initial value 0 is that CRC.
        assert_eq!(crc16(0, b"123456789"), 0xBB3D);
    }

    #[test]
    fn descriptor_checksum_ignores_its_own_field() {
        let mut d: Vec<u8> = (0..64u8).collect();
        for s in [Scheme::Crc16([7; 16]), Scheme::Crc32c(0x1234_5678)] {
            let a = s.descriptor(3, &d);
            d[BG_CHECKSUM] ^= 0xFF;
            assert_eq!(a, s.descriptor(3, &d));
            d[0] ^= 1;
            assert_ne!(a, s.descriptor(3, &d));
            assert_ne!(s.descriptor(3, &d), s.descriptor(4, &d));
        }
        assert_eq!(Scheme::None.descriptor(0, &d), None);
    }
}
