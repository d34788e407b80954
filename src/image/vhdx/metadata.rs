//! The VHDX metadata region: its table and the items volback knows (decoding, checking,
//! encoding; no I/O).

use super::header::{MIB, TABLE_SIZE, guid16, table_entry_count};
use crate::bytes::{le_u16, le_u32};
use crate::image::error::ParseError;
use crate::probe::guid::Guid;

const METADATA_SIGNATURE: &[u8; 8] = b"metadata";

/// Entry flags.
pub(super) const META_IS_USER: u32 = 1;
pub(super) const META_IS_VIRTUAL_DISK: u32 = 2;
pub(super) const META_IS_REQUIRED: u32 = 4;
/// File parameters flags.
pub(super) const PARAM_LEAVE_ALLOCATED: u32 = 1;
pub(super) const PARAM_HAS_PARENT: u32 = 2;
/// The format's limits.
pub(crate) const MAX_SIZE: u64 = 64 << 40;
pub(super) const MIN_BLOCK: u64 = MIB;
pub(super) const MAX_BLOCK: u64 = 256 * MIB;

/// CAA16737-FA36-4D43-B3B6-33F0AA44E76B
pub(super) const FILE_PARAMETERS_GUID: [u8; 16] = [
    0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b,
];
/// 2FA54224-CD1B-4876-B211-5DBED83BF4B8
pub(super) const VIRTUAL_DISK_SIZE_GUID: [u8; 16] = [
    0x24, 0x42, 0xa5, 0x2f, 0x1b, 0xcd, 0x76, 0x48, 0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8,
];
/// BECA12AB-B2E6-4523-93EF-C309E000C746
pub(super) const PAGE83_GUID: [u8; 16] = [
    0xab, 0x12, 0xca, 0xbe, 0xe6, 0xb2, 0x23, 0x45, 0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46,
];
/// 8141BF1D-A96F-4709-BA47-F233A8FAAB5F
pub(super) const LOGICAL_SECTOR_SIZE_GUID: [u8; 16] = [
    0x1d, 0xbf, 0x41, 0x81, 0x6f, 0xa9, 0x09, 0x47, 0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f,
];
/// CDA348C7-445D-4471-9CC9-E9885251C556
pub(super) const PHYSICAL_SECTOR_SIZE_GUID: [u8; 16] = [
    0xc7, 0x48, 0xa3, 0xcd, 0x5d, 0x44, 0x71, 0x44, 0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56,
];
/// A8D35F2D-B30B-454D-ABF7-D3D84834AB0C
pub(super) const PARENT_LOCATOR_GUID: [u8; 16] = [
    0x2d, 0x5f, 0xd3, 0xa8, 0x0b, 0xb3, 0x4d, 0x45, 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c,
];

/// The items volback reads (and a parent locator, which it recognises to refuse).
pub(super) const KNOWN_ITEMS: [[u8; 16]; 6] = [
    FILE_PARAMETERS_GUID,
    VIRTUAL_DISK_SIZE_GUID,
    LOGICAL_SECTOR_SIZE_GUID,
    PHYSICAL_SECTOR_SIZE_GUID,
    PAGE83_GUID,
    PARENT_LOCATOR_GUID,
];

/// A metadata table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MetaEntry {
    pub guid: [u8; 16],
    pub offset: u32,
    pub length: u32,
    pub flags: u32,
}

/// Decodes and checks the metadata table (the first 64 KiB of a metadata region of
/// `region_len` bytes).
pub(crate) fn parse_metadata_table(
    b: &[u8],
    region_len: u64,
) -> Result<Vec<MetaEntry>, ParseError> {
    ParseError::need("metadata table", b, TABLE_SIZE)?;
    ParseError::magic("signature", b, 0, METADATA_SIGNATURE, "\"metadata\"")?;
    let count = table_entry_count(le_u16(b, 10) as usize, 10)?;
    let mut out: Vec<MetaEntry> = Vec::with_capacity(count);
    for i in 0..count {
        let at = 32 + i * 32;
        let e = MetaEntry {
            guid: guid16(b, at),
            offset: le_u32(b, at + 16),
            length: le_u32(b, at + 20),
            flags: le_u32(b, at + 24),
        };
        let end = e.offset as u64 + e.length as u64;
        let placed = e.length == 0 && e.offset == 0
            || (e.offset as u64 >= TABLE_SIZE as u64
                && end <= region_len
                && e.length as u64 <= MIB);
        if !placed {
            return Err(ParseError::field(
                "metadata table entry",
                at,
                format!(
                    "item {} ({} bytes at {}) is not inside the metadata region",
                    Guid(e.guid),
                    e.length,
                    e.offset
                ),
            ));
        }
        let user = e.flags & META_IS_USER;
        if out
            .iter()
            .any(|o| o.guid == e.guid && o.flags & META_IS_USER == user)
        {
            return Err(ParseError::field(
                "metadata table entry",
                at,
                format!("item {} appears twice", Guid(e.guid)),
            ));
        }
        out.push(e);
    }
    Ok(out)
}

/// The metadata table and the item bytes that follow it (at the table's end) for a dynamic
/// disk of `size` bytes with blocks of `block_size`, 512-byte logical and 4096-byte physical
/// sectors, and virtual disk id `disk_id`.
pub(super) fn encode_metadata(block_size: u64, size: u64, disk_id: [u8; 16]) -> (Vec<u8>, Vec<u8>) {
    let mut params = [0u8; 8];
    params[0..4].copy_from_slice(&(block_size as u32).to_le_bytes());
    let disk = META_IS_REQUIRED | META_IS_VIRTUAL_DISK;
    let items: [([u8; 16], u32, Vec<u8>); 5] = [
        (FILE_PARAMETERS_GUID, META_IS_REQUIRED, params.to_vec()),
        (VIRTUAL_DISK_SIZE_GUID, disk, size.to_le_bytes().to_vec()),
        (PAGE83_GUID, disk, disk_id.to_vec()),
        (
            LOGICAL_SECTOR_SIZE_GUID,
            disk,
            512u32.to_le_bytes().to_vec(),
        ),
        (
            PHYSICAL_SECTOR_SIZE_GUID,
            disk,
            4096u32.to_le_bytes().to_vec(),
        ),
    ];
    let mut table = vec![0u8; TABLE_SIZE];
    table[0..8].copy_from_slice(METADATA_SIGNATURE);
    table[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
    let mut data = Vec::new();
    for (i, (guid, flags, value)) in items.iter().enumerate() {
        let at = 32 + i * 32;
        let offset = TABLE_SIZE + data.len();
        table[at..at + 16].copy_from_slice(guid);
        table[at + 16..at + 20].copy_from_slice(&(offset as u32).to_le_bytes());
        table[at + 20..at + 24].copy_from_slice(&(value.len() as u32).to_le_bytes());
        table[at + 24..at + 28].copy_from_slice(&flags.to_le_bytes());
        data.extend_from_slice(value);
    }
    (table, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn guid_constants_match_the_specification() {
        for (c, s) in [
            (FILE_PARAMETERS_GUID, "CAA16737-FA36-4D43-B3B6-33F0AA44E76B"),
            (
                VIRTUAL_DISK_SIZE_GUID,
                "2FA54224-CD1B-4876-B211-5DBED83BF4B8",
            ),
            (PAGE83_GUID, "BECA12AB-B2E6-4523-93EF-C309E000C746"),
            (
                LOGICAL_SECTOR_SIZE_GUID,
                "8141BF1D-A96F-4709-BA47-F233A8FAAB5F",
            ),
            (
                PHYSICAL_SECTOR_SIZE_GUID,
                "CDA348C7-445D-4471-9CC9-E9885251C556",
            ),
            (PARENT_LOCATOR_GUID, "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C"),
        ] {
            assert_eq!(Guid::parse(s).unwrap().0, c, "{s}");
        }
    }

    #[test]
    fn metadata_roundtrip() {
        let (table, data) = encode_metadata(2 * MIB, 5 << 30, [7; 16]);
        let entries = parse_metadata_table(&table, MIB).unwrap();
        assert_eq!(entries.len(), 5);
        let size = entries
            .iter()
            .find(|e| e.guid == VIRTUAL_DISK_SIZE_GUID)
            .unwrap();
        let at = size.offset as usize - TABLE_SIZE;
        assert_eq!(data[at..at + 8], (5u64 << 30).to_le_bytes());
        // The region is too short for the items.
        assert!(matches!(
            parse_metadata_table(&table, TABLE_SIZE as u64),
            Err(ParseError::Field { offset: 32, .. })
        ));
    }

    proptest! {
        #[test]
        fn mutated_metadata_tables_never_panic(pos in 0usize..200, val in any::<u8>(),
                                               region_len in any::<u64>()) {
            let (mut table, _) = encode_metadata(2 * MIB, 5 << 30, [7; 16]);
            table[pos] = val;
            let _ = parse_metadata_table(&table, region_len);
        }
    }
}
