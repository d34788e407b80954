//! The VHDX region table (decoding, checking, encoding; no I/O).

use super::header::{HEADER_SECTION, MIB, TABLE_SIZE, guid16, table_entry_count};
use crate::bytes::{le_u32, le_u64};
use crate::image::error::ParseError;
use crate::probe::crc32::{crc32c, crc32c_skipping};
use crate::probe::guid::Guid;

const REGION_SIGNATURE: &[u8; 4] = b"regi";
/// The two copies of the region table.
pub(super) const REGION_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];

/// 2DC27766-F623-4200-9D64-115E9BFD4A08
pub(super) const BAT_GUID: [u8; 16] = [
    0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08,
];
/// 8B7CA206-4790-4B9A-B8FE-575F050F886E
pub(super) const METADATA_GUID: [u8; 16] = [
    0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e,
];

/// A region table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Region {
    pub guid: [u8; 16],
    pub offset: u64,
    pub length: u32,
    pub required: bool,
}

impl Region {
    /// The region's place in the file.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset.saturating_add(self.length as u64)
    }
}

pub(super) fn encode_region_table(regions: &[Region]) -> Vec<u8> {
    let mut b = vec![0u8; TABLE_SIZE];
    b[0..4].copy_from_slice(REGION_SIGNATURE);
    b[8..12].copy_from_slice(&(regions.len() as u32).to_le_bytes());
    for (i, r) in regions.iter().enumerate() {
        let at = 16 + i * 32;
        b[at..at + 16].copy_from_slice(&r.guid);
        b[at + 16..at + 24].copy_from_slice(&r.offset.to_le_bytes());
        b[at + 24..at + 28].copy_from_slice(&r.length.to_le_bytes());
        b[at + 28..at + 32].copy_from_slice(&(r.required as u32).to_le_bytes());
    }
    let crc = crc32c(&b);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes and checks a region table (64 KiB).
pub(crate) fn parse_region_table(b: &[u8]) -> Result<Vec<Region>, ParseError> {
    ParseError::need("region table", b, TABLE_SIZE)?;
    let b = &b[..TABLE_SIZE];
    ParseError::magic("signature", b, 0, REGION_SIGNATURE, "\"regi\"")?;
    ParseError::checksum("CRC-32C", 4, le_u32(b, 4), crc32c_skipping(b, 4))?;
    let count = table_entry_count(le_u32(b, 8) as usize, 8)?;
    let mut out: Vec<Region> = Vec::with_capacity(count);
    for i in 0..count {
        let at = 16 + i * 32;
        let r = Region {
            guid: guid16(b, at),
            offset: le_u64(b, at + 16),
            length: le_u32(b, at + 24),
            required: le_u32(b, at + 28) & 1 != 0,
        };
        if r.offset < HEADER_SECTION
            || !r.offset.is_multiple_of(MIB)
            || !(r.length as u64).is_multiple_of(MIB)
        {
            return Err(ParseError::field(
                "region table entry",
                at,
                format!(
                    "region {i} at offset {} with length {} is not 1 MiB-aligned after the \
                     header section",
                    r.offset, r.length
                ),
            ));
        }
        if out.iter().any(|o| o.guid == r.guid) {
            return Err(ParseError::field(
                "region table entry",
                at,
                format!("region {} appears twice", Guid(r.guid)),
            ));
        }
        out.push(r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<Region> {
        vec![
            Region {
                guid: BAT_GUID,
                offset: 3 * MIB,
                length: MIB as u32,
                required: true,
            },
            Region {
                guid: METADATA_GUID,
                offset: 2 * MIB,
                length: MIB as u32,
                required: true,
            },
        ]
    }

    #[test]
    fn region_table_roundtrip_and_checks() {
        let r = sample();
        assert_eq!(parse_region_table(&encode_region_table(&r)).unwrap(), r);
        let mut twice = r.clone();
        twice[1].guid = BAT_GUID;
        assert!(matches!(
            parse_region_table(&encode_region_table(&twice)),
            Err(ParseError::Field { offset: 48, .. })
        ));
        let mut odd = r;
        odd[0].offset = 3 * MIB + 4096;
        assert!(matches!(
            parse_region_table(&encode_region_table(&odd)),
            Err(ParseError::Field { offset: 16, .. })
        ));
    }

    proptest! {
        #[test]
        fn mutated_region_tables_never_panic(pos in 0usize..200, val in any::<u8>()) {
            let mut b = encode_region_table(&sample());
            b[pos] = val;
            let crc = crc32c_skipping(&b, 4);
            b[4..8].copy_from_slice(&crc.to_le_bytes());
            if let Ok(r) = parse_region_table(&b) {
                let _ = r.iter().map(Region::range).count();
            }
        }
    }
}
