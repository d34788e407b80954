//! The VHDX block allocation table: its geometry (payload entries interleaved with sector
//! bitmap entries) and its entries (pure, no I/O).

use super::header::MIB;

/// Sectors described by one sector bitmap block.
const CHUNK_SECTORS: u64 = 1 << 23;

const PAYLOAD_NOT_PRESENT: u64 = 0;
const PAYLOAD_UNDEFINED: u64 = 1;
const PAYLOAD_ZERO: u64 = 2;
const PAYLOAD_UNMAPPED: u64 = 3;
const PAYLOAD_FULLY_PRESENT: u64 = 6;
const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
const STATE_MASK: u64 = 7;
const OFFSET_MASK: u64 = !(MIB - 1);

/// The entry of a payload block that reads as zeros ("zero" state: its offset field is 0).
pub(super) const ZERO_ENTRY: u64 = PAYLOAD_ZERO;
/// Bytes per BAT entry.
pub(super) const ENTRY_SIZE: u64 = 8;

/// The entry of a payload block fully present at file offset `host` (1 MiB-aligned).
pub(super) fn present_entry(host: u64) -> u64 {
    host | PAYLOAD_FULLY_PRESENT
}

/// What a payload BAT entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Payload {
    /// Not present, undefined, zero or unmapped: reads as zeros.
    Zero,
    /// Fully present at this file offset.
    Present(u64),
    /// Partially present: valid only in differencing disks.
    Partial,
    /// A reserved state.
    Reserved(u64),
}

pub(super) fn decode_payload(entry: u64) -> Payload {
    match entry & STATE_MASK {
        PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => Payload::Zero,
        PAYLOAD_FULLY_PRESENT => Payload::Present(entry & OFFSET_MASK),
        PAYLOAD_PARTIALLY_PRESENT => Payload::Partial,
        s => Payload::Reserved(s),
    }
}

/// True when a sector bitmap entry says its block is present (never in a dynamic disk).
pub(super) fn bitmap_present(entry: u64) -> bool {
    entry & STATE_MASK != 0
}

/// The geometry of a VHDX: block size, chunk ratio and BAT size for a virtual size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Geometry {
    pub size: u64,
    pub block_size: u64,
    pub chunk_ratio: u64,
    pub payload_blocks: u64,
    pub bat_entries: u64,
}

impl Geometry {
    pub fn new(size: u64, block_size: u64, logical_sector: u64) -> Geometry {
        let chunk_ratio = CHUNK_SECTORS * logical_sector / block_size;
        let payload_blocks = size.div_ceil(block_size);
        let bat_entries = if payload_blocks == 0 {
            0
        } else {
            payload_blocks + (payload_blocks - 1) / chunk_ratio
        };
        Geometry {
            size,
            block_size,
            chunk_ratio,
            payload_blocks,
            bat_entries,
        }
    }

    /// BAT index of payload block `block`.
    pub fn index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT indexes of the sector bitmap entries (after every `chunk_ratio` payload entries).
    pub fn bitmap_indexes(&self) -> impl Iterator<Item = u64> + '_ {
        let step = self.chunk_ratio + 1;
        let end = self.bat_entries;
        (0..end.div_ceil(step))
            .map(move |c| c * step + step - 1)
            .filter(move |&i| i < end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bat_interleaving() {
        // 2 MiB blocks, 512-byte sectors: chunk ratio 2048.
        let g = Geometry::new(5 << 30, 2 * MIB, 512);
        assert_eq!(g.chunk_ratio, 2048);
        assert_eq!(g.payload_blocks, 2560);
        assert_eq!(g.bat_entries, 2561);
        assert_eq!(g.index(2047), 2047);
        assert_eq!(g.index(2048), 2049);
        assert_eq!(g.bitmap_indexes().collect::<Vec<_>>(), vec![2048]);
        let g = Geometry::new(0, 2 * MIB, 512);
        assert_eq!(g.bat_entries, 0);
        assert_eq!(g.bitmap_indexes().count(), 0);
    }

    #[test]
    fn entries() {
        assert_eq!(decode_payload(ZERO_ENTRY), Payload::Zero);
        assert_eq!(decode_payload(0), Payload::Zero);
        assert_eq!(
            decode_payload(present_entry(5 * MIB)),
            Payload::Present(5 * MIB)
        );
        assert_eq!(decode_payload(7), Payload::Partial);
        assert_eq!(decode_payload(4 | (3 * MIB)), Payload::Reserved(4));
        assert!(!bitmap_present(0));
        assert!(bitmap_present(6));
    }
}
