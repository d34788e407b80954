//! VHDX images ([MS-VHDX] "Virtual Hard Disk v2 (VHDX) File Format"), dynamic.
//!
//! All integers are little-endian; GUIDs are stored as Windows stores them (first three
//! fields little-endian). Every structure is 1 MiB-aligned in the file.
//!
//! | offset  | size   | content                                                             |
//! |---------|--------|---------------------------------------------------------------------|
//! | 0       | 64 KiB | file type identifier: `vhdxfile`, creator (UTF-16LE, 512 bytes)     |
//! | 64 KiB  | 4 KiB  | header 1 (in a 64 KiB slot)                                         |
//! | 128 KiB | 4 KiB  | header 2                                                            |
//! | 192 KiB | 64 KiB | region table 1                                                      |
//! | 256 KiB | 64 KiB | region table 2 (identical)                                          |
//! | 1 MiB   | 1 MiB  | log (empty: every header's log GUID is zero)                        |
//! | 2 MiB   | 1 MiB  | metadata region: 64 KiB table, then the items                       |
//! | 3 MiB   | n MiB  | BAT                                                                 |
//! | …       |        | payload blocks, appended in allocation order                        |
//!
//! Header (CRC-32C over its 4 KiB with the checksum zeroed): `head` (4), checksum (4),
//! sequence number (8), file write GUID (16), data write GUID (16), log GUID (16), log version
//! (2, 0), version (2, 1), log length (4), log offset (8). The current header is the valid one
//! with the higher sequence number.
//!
//! Region table (CRC-32C over 64 KiB): `regi`, checksum, entry count (4), reserved (4), then
//! entries of GUID (16), file offset (8), length (4), required (4): the BAT region
//! (2DC27766-F623-4200-9D64-115E9BFD4A08) and the metadata region
//! (8B7CA206-4790-4B9A-B8FE-575F050F886E).
//!
//! Metadata table: `metadata` (8), reserved (2), entry count (2), reserved (20), then entries of
//! item GUID (16), offset in the region (4), length (4), flags (4: bit 0 IsUser, bit 1
//! IsVirtualDisk, bit 2 IsRequired), reserved (4). Items: file parameters (block size (4),
//! flags (4): bit 0 LeaveBlocksAllocated, bit 1 HasParent), virtual disk size (8), virtual disk
//! id / page 83 data (16), logical sector size (4), physical sector size (4).
//!
//! BAT entry (8 bytes): bits 0-2 state, bits 20-63 file offset in MiB. Payload states: 0 not
//! present, 1 undefined, 2 zero, 3 unmapped (all read as zeros here), 6 fully present, 7
//! partially present (differencing disks only). After every `chunk ratio` payload entries
//! (2^23 × logical sector size / block size) comes one sector-bitmap entry, never present in a
//! dynamic disk.

use super::file::{DirtyPages, ImageFile, round_up};
use super::mapped::{MappedVolume, Mapping, Unit};
use super::sparse::{Alloc, SparseWriter, UnitMap};
use super::{CreateOptions, ImageWriter};
use crate::bytes::{le_u16, le_u32, le_u64};
use crate::error::{Error, Result};
use crate::probe::crc32::{crc32c, crc32c_skipping};
use crate::probe::guid::Guid;
use crate::volume::Volume;
use std::ops::Range;
use std::path::Path;

const MIB: u64 = 1 << 20;
pub(crate) const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
const HEADER_SIGNATURE: &[u8; 4] = b"head";
const REGION_SIGNATURE: &[u8; 4] = b"regi";
const METADATA_SIGNATURE: &[u8; 8] = b"metadata";
const LOG_ENTRY_SIGNATURE: &[u8; 4] = b"loge";
const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
const HEADER_SIZE: usize = 4096;
const REGION_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
const TABLE_SIZE: usize = 64 << 10;
const HEADER_SECTION: u64 = MIB;
const LOG_OFFSET: u64 = MIB;
const LOG_LENGTH: u64 = MIB;
const METADATA_OFFSET: u64 = 2 * MIB;
const METADATA_LENGTH: u64 = MIB;
const BAT_OFFSET: u64 = 3 * MIB;
/// The format's limits.
pub(crate) const MAX_SIZE: u64 = 64 << 40;
const MIN_BLOCK: u64 = MIB;
const MAX_BLOCK: u64 = 256 * MIB;
/// Most BAT entries volback holds in memory to update an image (128 MiB).
const MAX_WRITER_BAT_ENTRIES: u64 = 1 << 24;
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

const META_IS_VIRTUAL_DISK: u32 = 2;
const META_IS_REQUIRED: u32 = 4;
const PARAM_LEAVE_ALLOCATED: u32 = 1;
const PARAM_HAS_PARENT: u32 = 2;

/// 2DC27766-F623-4200-9D64-115E9BFD4A08
const BAT_GUID: [u8; 16] = [
    0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08,
];
/// 8B7CA206-4790-4B9A-B8FE-575F050F886E
const METADATA_GUID: [u8; 16] = [
    0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e,
];
/// CAA16737-FA36-4D43-B3B6-33F0AA44E76B
const FILE_PARAMETERS_GUID: [u8; 16] = [
    0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b,
];
/// 2FA54224-CD1B-4876-B211-5DBED83BF4B8
const VIRTUAL_DISK_SIZE_GUID: [u8; 16] = [
    0x24, 0x42, 0xa5, 0x2f, 0x1b, 0xcd, 0x76, 0x48, 0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8,
];
/// BECA12AB-B2E6-4523-93EF-C309E000C746
const PAGE83_GUID: [u8; 16] = [
    0xab, 0x12, 0xca, 0xbe, 0xe6, 0xb2, 0x23, 0x45, 0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46,
];
/// 8141BF1D-A96F-4709-BA47-F233A8FAAB5F
const LOGICAL_SECTOR_SIZE_GUID: [u8; 16] = [
    0x1d, 0xbf, 0x41, 0x81, 0x6f, 0xa9, 0x09, 0x47, 0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f,
];
/// CDA348C7-445D-4471-9CC9-E9885251C556
const PHYSICAL_SECTOR_SIZE_GUID: [u8; 16] = [
    0xc7, 0x48, 0xa3, 0xcd, 0x5d, 0x44, 0x71, 0x44, 0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56,
];
/// A8D35F2D-B30B-454D-ABF7-D3D84834AB0C
const PARENT_LOCATOR_GUID: [u8; 16] = [
    0x2d, 0x5f, 0xd3, 0xa8, 0x0b, 0xb3, 0x4d, 0x45, 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c,
];

fn guid16(b: &[u8], at: usize) -> [u8; 16] {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[at..at + 16]);
    g
}

/// One of the two headers, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub seq: u64,
    pub file_write: [u8; 16],
    pub data_write: [u8; 16],
    pub log_guid: [u8; 16],
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(HEADER_SIGNATURE);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write);
        b[32..48].copy_from_slice(&self.data_write);
        b[48..64].copy_from_slice(&self.log_guid);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        let crc = crc32c(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a header slot; the error is a detail for [`Error::Corrupt`].
    pub fn parse(b: &[u8]) -> std::result::Result<Header, String> {
        if b.len() < HEADER_SIZE {
            return Err(format!(
                "header is {} bytes, expected {HEADER_SIZE}",
                b.len()
            ));
        }
        let b = &b[..HEADER_SIZE];
        if &b[0..4] != HEADER_SIGNATURE {
            return Err("no \"head\" signature".into());
        }
        let stored = le_u32(b, 4);
        let computed = crc32c_skipping(b, 4);
        if stored != computed {
            return Err(format!(
                "CRC-32C mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        let h = Header {
            seq: le_u64(b, 8),
            file_write: guid16(b, 16),
            data_write: guid16(b, 32),
            log_guid: guid16(b, 48),
            log_version: le_u16(b, 64),
            version: le_u16(b, 66),
            log_length: le_u32(b, 68),
            log_offset: le_u64(b, 72),
        };
        if h.version != 1 {
            return Err(format!("unknown VHDX version {}", h.version));
        }
        Ok(h)
    }
}

/// A region table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Region {
    pub guid: [u8; 16],
    pub offset: u64,
    pub length: u32,
    pub required: bool,
}

fn encode_region_table(regions: &[Region]) -> Vec<u8> {
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

/// Decodes a region table (64 KiB); the error is a detail for [`Error::Corrupt`].
pub(crate) fn parse_region_table(b: &[u8]) -> std::result::Result<Vec<Region>, String> {
    if b.len() < TABLE_SIZE {
        return Err(format!("region table is {} bytes, expected 65536", b.len()));
    }
    let b = &b[..TABLE_SIZE];
    if &b[0..4] != REGION_SIGNATURE {
        return Err("no \"regi\" signature".into());
    }
    let stored = le_u32(b, 4);
    let computed = crc32c_skipping(b, 4);
    if stored != computed {
        return Err(format!(
            "CRC-32C mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    let count = le_u32(b, 8) as usize;
    if count > 2047 {
        return Err(format!("{count} entries (at most 2047 allowed)"));
    }
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
            return Err(format!(
                "region {i} at offset {} with length {} is not 1 MiB-aligned after the header \
                 section",
                r.offset, r.length
            ));
        }
        if out.iter().any(|o| o.guid == r.guid) {
            return Err(format!("region {} appears twice", Guid(r.guid)));
        }
        out.push(r);
    }
    Ok(out)
}

/// A metadata table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MetaEntry {
    pub guid: [u8; 16],
    pub offset: u32,
    pub length: u32,
    pub flags: u32,
}

/// Decodes the metadata table (the first 64 KiB of a metadata region of `region_len` bytes).
pub(crate) fn parse_metadata_table(
    b: &[u8],
    region_len: u64,
) -> std::result::Result<Vec<MetaEntry>, String> {
    if b.len() < TABLE_SIZE {
        return Err(format!(
            "metadata table is {} bytes, expected 65536",
            b.len()
        ));
    }
    if &b[0..8] != METADATA_SIGNATURE {
        return Err("no \"metadata\" signature".into());
    }
    let count = le_u16(b, 10) as usize;
    if count > 2047 {
        return Err(format!("{count} entries (at most 2047 allowed)"));
    }
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
            return Err(format!(
                "item {} ({} bytes at {}) is not inside the metadata region",
                Guid(e.guid),
                e.length,
                e.offset
            ));
        }
        let user = e.flags & 1;
        if out.iter().any(|o| o.guid == e.guid && o.flags & 1 == user) {
            return Err(format!("item {} appears twice", Guid(e.guid)));
        }
        out.push(e);
    }
    Ok(out)
}

/// The geometry of a VHDX: block size, chunk ratio and BAT size for a virtual size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    size: u64,
    block_size: u64,
    chunk_ratio: u64,
    payload_blocks: u64,
    bat_entries: u64,
}

impl Geometry {
    fn new(size: u64, block_size: u64, logical_sector: u64) -> Geometry {
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
    fn index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }
}

/// A VHDX opened and checked.
struct Parsed {
    file_len: u64,
    /// Slot (0 or 1) of the current header.
    slot: usize,
    header: Header,
    geo: Geometry,
    bat_offset: u64,
    leave_allocated: bool,
    /// File ranges that belong to the format's own structures.
    reserved: Vec<Range<u64>>,
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

fn read_header_slot(file: &ImageFile, slot: usize) -> Result<std::result::Result<Header, String>> {
    let mut b = vec![0u8; HEADER_SIZE];
    file.read_exact_at(HEADER_OFFSETS[slot], &mut b, "VHDX header")?;
    Ok(Header::parse(&b))
}

fn parse(file: &ImageFile) -> Result<Parsed> {
    let file_len = file.len()?;
    let mut sig = [0u8; 8];
    file.read_exact_at(0, &mut sig, "VHDX file type identifier")?;
    if &sig != FILE_SIGNATURE {
        return Err(file.corrupt("VHDX file type identifier", "no \"vhdxfile\" signature"));
    }
    let h = [read_header_slot(file, 0)?, read_header_slot(file, 1)?];
    let (slot, header) = match (&h[0], &h[1]) {
        (Ok(a), Ok(b)) if a.seq > b.seq => (0, a.clone()),
        (Ok(a), Ok(b)) if b.seq > a.seq => (1, b.clone()),
        (Ok(a), Ok(b)) if a == b => (0, a.clone()),
        (Ok(_), Ok(_)) => {
            return Err(file.corrupt(
                "VHDX headers",
                "both headers are valid, differ, and have the same sequence number",
            ));
        }
        (Ok(a), Err(_)) => (0, a.clone()),
        (Err(_), Ok(b)) => (1, b.clone()),
        (Err(a), Err(b)) => {
            return Err(file.corrupt(
                "VHDX headers",
                format!("neither header is valid (header 1: {a}; header 2: {b})"),
            ));
        }
    };
    let log = header.log_offset..header.log_offset.saturating_add(header.log_length as u64);
    if header.log_length > 0
        && (header.log_offset < HEADER_SECTION
            || header.log_offset % MIB != 0
            || !(header.log_length as u64).is_multiple_of(MIB)
            || log.end > file_len)
    {
        return Err(file.corrupt(
            "VHDX header",
            format!(
                "log of {} bytes at offset {} is not a 1 MiB-aligned range inside the file",
                header.log_length, header.log_offset
            ),
        ));
    }
    if header.log_guid != [0; 16] {
        if header.log_version != 0 {
            return Err(file.unsupported(format!(
                "its log has format version {}, which volback does not know",
                header.log_version
            )));
        }
        if log_has_entries(file, &header, &log)? {
            return Err(file.unsupported(
                "its log holds updates that were never applied (the program writing it \
                 stopped); attach it once in Windows or run `qemu-img check -r all` on it to \
                 replay the log",
            ));
        }
    }
    // Region table: the first valid copy.
    let mut regions = None;
    let mut why = Vec::new();
    for off in REGION_OFFSETS {
        let mut b = vec![0u8; TABLE_SIZE];
        file.read_exact_at(off, &mut b, "VHDX region table")?;
        match parse_region_table(&b) {
            Ok(r) => {
                regions = Some(r);
                break;
            }
            Err(e) => why.push(e),
        }
    }
    let Some(regions) = regions else {
        return Err(file.corrupt("VHDX region tables", why.join("; ")));
    };
    let mut reserved: Vec<Range<u64>> = Vec::new();
    reserved.push(0..HEADER_SECTION);
    if header.log_length > 0 {
        reserved.push(log.clone());
    }
    let (mut bat, mut meta) = (None, None);
    for r in &regions {
        let range = r.offset..r.offset.saturating_add(r.length as u64);
        if range.end > file_len {
            return Err(file.corrupt(
                "VHDX region table",
                format!(
                    "region {} ({} bytes at {}) extends past the end of the file ({file_len} \
                     bytes)",
                    Guid(r.guid),
                    r.length,
                    r.offset
                ),
            ));
        }
        if let Some(o) = reserved.iter().find(|o| overlaps(o, &range)) {
            return Err(file.corrupt(
                "VHDX region table",
                format!(
                    "region {} at {}..{} overlaps another structure at {}..{}",
                    Guid(r.guid),
                    range.start,
                    range.end,
                    o.start,
                    o.end
                ),
            ));
        }
        reserved.push(range.clone());
        if r.guid == BAT_GUID {
            bat = Some(range);
        } else if r.guid == METADATA_GUID {
            meta = Some(range);
        } else if r.required {
            return Err(file.unsupported(format!(
                "it has a required region {} that volback does not know",
                Guid(r.guid)
            )));
        }
    }
    let (Some(bat), Some(meta)) = (bat, meta) else {
        return Err(file.corrupt(
            "VHDX region table",
            "the BAT or the metadata region is missing",
        ));
    };
    // Metadata.
    let mut table = vec![0u8; TABLE_SIZE];
    let meta_len = meta.end - meta.start;
    if meta_len < TABLE_SIZE as u64 {
        return Err(file.corrupt(
            "VHDX metadata region",
            format!("{meta_len} bytes, too small for its table"),
        ));
    }
    file.read_exact_at(meta.start, &mut table, "VHDX metadata table")?;
    let entries = parse_metadata_table(&table, meta_len)
        .map_err(|e| file.corrupt("VHDX metadata table", e))?;
    let item = |guid: &[u8; 16], name: &str, len: usize| -> Result<Vec<u8>> {
        let Some(e) = entries.iter().find(|e| &e.guid == guid && e.flags & 1 == 0) else {
            return Err(file.corrupt(
                "VHDX metadata table",
                format!("the required {name} item is missing"),
            ));
        };
        if (e.length as usize) < len {
            return Err(file.corrupt(
                format!("VHDX {name} metadata item"),
                format!("{} bytes, expected {len}", e.length),
            ));
        }
        let mut b = vec![0u8; len];
        file.read_exact_at(meta.start + e.offset as u64, &mut b, "VHDX metadata item")?;
        Ok(b)
    };
    let params = item(&FILE_PARAMETERS_GUID, "file parameters", 8)?;
    let size = le_u64(&item(&VIRTUAL_DISK_SIZE_GUID, "virtual disk size", 8)?, 0);
    let logical = le_u32(
        &item(&LOGICAL_SECTOR_SIZE_GUID, "logical sector size", 4)?,
        0,
    );
    let physical = le_u32(
        &item(&PHYSICAL_SECTOR_SIZE_GUID, "physical sector size", 4)?,
        0,
    );
    item(&PAGE83_GUID, "virtual disk id", 16)?;
    let known = [
        FILE_PARAMETERS_GUID,
        VIRTUAL_DISK_SIZE_GUID,
        LOGICAL_SECTOR_SIZE_GUID,
        PHYSICAL_SECTOR_SIZE_GUID,
        PAGE83_GUID,
        PARENT_LOCATOR_GUID,
    ];
    let block_size = le_u32(&params, 0) as u64;
    let flags = le_u32(&params, 4);
    if flags & PARAM_HAS_PARENT != 0 || entries.iter().any(|e| e.guid == PARENT_LOCATOR_GUID) {
        return Err(file.unsupported(
            "it is a differencing VHDX (its data depends on a parent image); merge it into its \
             parent first",
        ));
    }
    if let Some(e) = entries
        .iter()
        .find(|e| e.flags & META_IS_REQUIRED != 0 && !known.contains(&e.guid))
    {
        return Err(file.unsupported(format!(
            "it has a required metadata item {} that volback does not know",
            Guid(e.guid)
        )));
    }
    if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        return Err(file.corrupt(
            "VHDX file parameters",
            format!("block size {block_size} is not a power of two from 1 MiB to 256 MiB"),
        ));
    }
    if logical != 512 && logical != 4096 {
        return Err(file.corrupt(
            "VHDX logical sector size",
            format!("{logical} (must be 512 or 4096)"),
        ));
    }
    if physical != 512 && physical != 4096 {
        return Err(file.corrupt(
            "VHDX physical sector size",
            format!("{physical} (must be 512 or 4096)"),
        ));
    }
    if size > MAX_SIZE || !size.is_multiple_of(logical as u64) {
        return Err(file.corrupt(
            "VHDX virtual disk size",
            format!("{size} is larger than 64 TiB or not a multiple of the {logical}-byte sector"),
        ));
    }
    let geo = Geometry::new(size, block_size, logical as u64);
    if geo.bat_entries * 8 > bat.end - bat.start {
        return Err(file.corrupt(
            "VHDX region table",
            format!(
                "the BAT region ({} bytes) is too small for the {} entries a disk of {size} \
                 bytes needs",
                bat.end - bat.start,
                geo.bat_entries
            ),
        ));
    }
    Ok(Parsed {
        file_len,
        slot,
        header,
        geo,
        bat_offset: bat.start,
        leave_allocated: flags & PARAM_LEAVE_ALLOCATED != 0,
        reserved,
    })
}

/// True when the log region holds at least one valid entry of the current log (same log GUID,
/// correct CRC-32C): the image then needs a log replay before it can be read.
fn log_has_entries(file: &ImageFile, header: &Header, log: &Range<u64>) -> Result<bool> {
    let len = log.end - log.start;
    let mut head = [0u8; 64];
    let mut pos = 0;
    while pos < len {
        file.read_exact_at(log.start + pos, &mut head, "VHDX log")?;
        let entry_len = le_u32(&head, 8) as u64;
        if &head[0..4] == LOG_ENTRY_SIGNATURE
            && head[32..48] == header.log_guid
            && entry_len > 0
            && entry_len.is_multiple_of(4096)
            && entry_len <= len
        {
            // The entry may wrap around the end of the circular log.
            let mut entry = vec![0u8; entry_len as usize];
            let first = entry_len.min(len - pos) as usize;
            file.read_exact_at(log.start + pos, &mut entry[..first], "VHDX log")?;
            file.read_exact_at(log.start, &mut entry[first..], "VHDX log")?;
            if crc32c_skipping(&entry, 4) == le_u32(&head, 4) {
                return Ok(true);
            }
        }
        pos += 4096;
    }
    Ok(false)
}

/// Checks a fully present BAT entry of payload block `block`; returns its file offset.
fn present_block(
    file: &ImageFile,
    p_file_len: u64,
    geo: &Geometry,
    reserved: &[Range<u64>],
    block: u64,
    entry: u64,
) -> Result<u64> {
    let off = entry & OFFSET_MASK;
    // The last block may be short in files written by old qemu versions: only its virtual
    // part has to be in the file.
    let vlen = geo.block_size.min(geo.size - block * geo.block_size);
    let r = off..off.saturating_add(geo.block_size);
    let what = || format!("VHDX BAT entry of block {block}");
    if off.saturating_add(vlen) > p_file_len {
        return Err(file.corrupt(
            what(),
            format!("block at offset {off} extends past the end of the file ({p_file_len} bytes)"),
        ));
    }
    if let Some(o) = reserved.iter().find(|o| overlaps(o, &r)) {
        return Err(file.corrupt(
            what(),
            format!(
                "block at offset {off} overlaps the image's own structures at {}..{}",
                o.start, o.end
            ),
        ));
    }
    Ok(off)
}

/// Decodes a payload BAT entry: `Some(offset)` when the block is present, `None` when it reads
/// as zeros.
fn payload(
    file: &ImageFile,
    p: (u64, &Geometry, &[Range<u64>]),
    block: u64,
    entry: u64,
) -> Result<Option<u64>> {
    match entry & STATE_MASK {
        PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => Ok(None),
        PAYLOAD_FULLY_PRESENT => present_block(file, p.0, p.1, p.2, block, entry).map(Some),
        PAYLOAD_PARTIALLY_PRESENT => Err(file.corrupt(
            format!("VHDX BAT entry of block {block}"),
            "state \"partially present\" is only valid in differencing disks",
        )),
        s => Err(file.corrupt(
            format!("VHDX BAT entry of block {block}"),
            format!("reserved state {s}"),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

struct VhdxMap {
    file_len: u64,
    geo: Geometry,
    bat_offset: u64,
    reserved: Vec<Range<u64>>,
}

impl Mapping for VhdxMap {
    fn unit_size(&self) -> u64 {
        self.geo.block_size
    }

    fn size(&self) -> u64 {
        self.geo.size
    }

    fn lookup(&self, file: &ImageFile, first: u64, max: u64, out: &mut Vec<Unit>) -> Result<()> {
        let n = max.min(self.geo.payload_blocks.saturating_sub(first));
        if n == 0 {
            return Err(file.corrupt("VHDX BAT", format!("block {first} is past the last block")));
        }
        let i0 = self.geo.index(first);
        let i1 = self.geo.index(first + n - 1);
        let mut raw = vec![0u8; ((i1 - i0 + 1) * 8) as usize];
        file.read_exact_at(self.bat_offset + i0 * 8, &mut raw, "VHDX BAT")?;
        for b in first..first + n {
            let at = ((self.geo.index(b) - i0) * 8) as usize;
            let e = le_u64(&raw, at);
            let p = (self.file_len, &self.geo, &self.reserved[..]);
            out.push(match payload(file, p, b, e)? {
                Some(off) => Unit::Data(off),
                None => Unit::Zero,
            });
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "VHDX image"
    }
}

/// Opens a VHDX read-only.
pub(crate) fn open(path: &Path) -> Result<Box<dyn Volume>> {
    let file = ImageFile::open_ro(path)?;
    let p = parse(&file)?;
    let map = VhdxMap {
        file_len: p.file_len,
        geo: p.geo,
        bat_offset: p.bat_offset,
        reserved: p.reserved,
    };
    Ok(Box::new(MappedVolume::new(file, map)))
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Virtual size of a VHDX for a volume of `size` bytes: whole 512-byte logical sectors.
pub(crate) fn image_size(path: &Path, size: u64) -> Result<u64> {
    match round_up(size, 512) {
        Some(s) if s <= MAX_SIZE => Ok(s),
        _ => Err(Error::InvalidArgument(format!(
            "cannot make {} a VHDX of {size} bytes: VHDX images hold at most 64 TiB",
            path.display()
        ))),
    }
}

/// The default block size: 2 MiB (sparse at a fine grain, a BAT of 8 bytes per 2 MiB), larger
/// for disks above 2 TiB so that the BAT stays near a million entries.
fn default_block_size(size: u64) -> u64 {
    (size >> 20).next_power_of_two().clamp(2 * MIB, 64 * MIB)
}

struct VhdxWriter {
    geo: Geometry,
    bat_offset: u64,
    bat: Vec<u64>,
    dirty: DirtyPages,
    /// Where the next block goes (1 MiB-aligned).
    data_end: u64,
    leave_allocated: bool,
    pending: Vec<u64>,
    free: Vec<u64>,
}

impl UnitMap for VhdxWriter {
    fn unit_size(&self) -> u64 {
        self.geo.block_size
    }

    fn size(&self) -> u64 {
        self.geo.size
    }

    fn lookup(&mut self, _file: &ImageFile, unit: u64) -> Result<Option<u64>> {
        let e = self.bat[self.geo.index(unit) as usize];
        Ok((e & STATE_MASK == PAYLOAD_FULLY_PRESENT).then_some(e & OFFSET_MASK))
    }

    fn allocate(&mut self, file: &ImageFile, unit: u64) -> Result<Alloc> {
        let (host, fresh) = match self.free.pop() {
            Some(h) => (h, false),
            None => {
                let h = self.data_end;
                self.data_end += self.geo.block_size;
                // Extend now so that the data sync before the BAT write covers the length.
                file.set_len(self.data_end)?;
                (h, true)
            }
        };
        let i = self.geo.index(unit);
        self.bat[i as usize] = host | PAYLOAD_FULLY_PRESENT;
        self.dirty.mark(i * 8, 4096);
        Ok(Alloc { host, fresh })
    }

    fn deallocate(&mut self, file: &ImageFile, unit: u64) -> Result<Option<u64>> {
        let i = self.geo.index(unit);
        let e = self.bat[i as usize];
        if e & STATE_MASK != PAYLOAD_FULLY_PRESENT {
            return Ok(None);
        }
        let host = e & OFFSET_MASK;
        if self.leave_allocated {
            // A fixed VHDX keeps every block: zero it in place.
            file.zero(host, self.geo.block_size)?;
            return Ok(None);
        }
        // "Zero" state: the block reads as zeros (its offset field must be 0).
        self.bat[i as usize] = PAYLOAD_ZERO;
        self.dirty.mark(i * 8, 4096);
        self.pending.push(host);
        Ok(Some(host))
    }

    fn flush(&mut self, file: &ImageFile) -> Result<()> {
        self.dirty
            .write_back(file, self.bat_offset, 4096, &self.bat, u64::to_le_bytes)
    }

    fn durable(&mut self) {
        self.free.append(&mut self.pending);
    }

    fn wants_sync(&self) -> bool {
        self.pending.len() > 65536
    }
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Creates a dynamic VHDX.
pub(crate) fn create(
    path: &Path,
    size: u64,
    options: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    let size = image_size(path, size)?;
    let block_size = options
        .block_size
        .unwrap_or_else(|| default_block_size(size));
    if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        return Err(Error::InvalidArgument(format!(
            "VHDX block size {block_size} is not a power of two from 1 MiB to 256 MiB"
        )));
    }
    let geo = Geometry::new(size, block_size, 512);
    let bat_len = round_up((geo.bat_entries * 8).max(1), MIB).unwrap_or(MIB);
    let data_end = BAT_OFFSET + bat_len;
    let file = ImageFile::create_new(path)?;

    let mut id = Vec::with_capacity(8 + 512);
    id.extend_from_slice(FILE_SIGNATURE);
    let creator = utf16(concat!("volback ", env!("CARGO_PKG_VERSION")));
    id.extend_from_slice(&creator);
    file.write_all_at(0, &id)?;

    let header = Header {
        seq: 1,
        file_write: Guid::random().0,
        data_write: Guid::random().0,
        log_guid: [0; 16],
        log_version: 0,
        version: 1,
        log_length: LOG_LENGTH as u32,
        log_offset: LOG_OFFSET,
    };
    file.write_all_at(HEADER_OFFSETS[0], &header.encode())?;
    let second = Header { seq: 2, ..header };
    file.write_all_at(HEADER_OFFSETS[1], &second.encode())?;

    let regions = [
        Region {
            guid: BAT_GUID,
            offset: BAT_OFFSET,
            length: bat_len as u32,
            required: true,
        },
        Region {
            guid: METADATA_GUID,
            offset: METADATA_OFFSET,
            length: METADATA_LENGTH as u32,
            required: true,
        },
    ];
    let rt = encode_region_table(&regions);
    for off in REGION_OFFSETS {
        file.write_all_at(off, &rt)?;
    }

    // Metadata table and items.
    let mut params = [0u8; 8];
    params[0..4].copy_from_slice(&(block_size as u32).to_le_bytes());
    let items: [([u8; 16], u32, Vec<u8>); 5] = [
        (FILE_PARAMETERS_GUID, META_IS_REQUIRED, params.to_vec()),
        (
            VIRTUAL_DISK_SIZE_GUID,
            META_IS_REQUIRED | META_IS_VIRTUAL_DISK,
            size.to_le_bytes().to_vec(),
        ),
        (
            PAGE83_GUID,
            META_IS_REQUIRED | META_IS_VIRTUAL_DISK,
            Guid::random().0.to_vec(),
        ),
        (
            LOGICAL_SECTOR_SIZE_GUID,
            META_IS_REQUIRED | META_IS_VIRTUAL_DISK,
            512u32.to_le_bytes().to_vec(),
        ),
        (
            PHYSICAL_SECTOR_SIZE_GUID,
            META_IS_REQUIRED | META_IS_VIRTUAL_DISK,
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
    file.write_all_at(METADATA_OFFSET, &table)?;
    file.write_all_at(METADATA_OFFSET + TABLE_SIZE as u64, &data)?;

    // BAT: every payload block in the "zero" state (reads as zeros, as qemu does by
    // default); sector bitmap entries "not present".
    let mut bat = vec![0u64; geo.bat_entries as usize];
    for b in 0..geo.payload_blocks {
        bat[geo.index(b) as usize] = PAYLOAD_ZERO;
    }
    let mut dirty = DirtyPages::default();
    for i in 0..geo.bat_entries {
        if i % 512 == 0 {
            dirty.mark(i * 8, 4096);
        }
    }
    file.set_len(data_end)?;
    let mut map = VhdxWriter {
        geo,
        bat_offset: BAT_OFFSET,
        bat,
        dirty,
        data_end,
        leave_allocated: false,
        pending: Vec::new(),
        free: Vec::new(),
    };
    map.flush(&file)?;
    file.sync()?;
    Ok(Box::new(SparseWriter::new(file, map)))
}

/// Opens a VHDX for update.
pub(crate) fn open_for_update(path: &Path, size: u64) -> Result<Box<dyn ImageWriter>> {
    let expected = image_size(path, size)?;
    let file = ImageFile::open_rw(path)?;
    let p = parse(&file)?;
    if p.geo.size != expected {
        return Err(Error::ImageSizeMismatch {
            path: path.to_path_buf(),
            found: p.geo.size,
            expected,
        });
    }
    if p.geo.bat_entries > MAX_WRITER_BAT_ENTRIES {
        return Err(file.unsupported(format!(
            "its BAT has {} entries; volback updates VHDX images of at most \
             {MAX_WRITER_BAT_ENTRIES} (use larger blocks)",
            p.geo.bat_entries
        )));
    }
    let mut raw = vec![0u8; (p.geo.bat_entries * 8) as usize];
    file.read_exact_at(p.bat_offset, &mut raw, "VHDX BAT")?;
    let bat: Vec<u64> = raw.chunks_exact(8).map(|c| le_u64(c, 0)).collect();
    drop(raw);
    let mut data_end = p
        .reserved
        .iter()
        .map(|r| r.end)
        .max()
        .unwrap_or(HEADER_SECTION);
    let mut blocks = Vec::new();
    for b in 0..p.geo.payload_blocks {
        let e = bat[p.geo.index(b) as usize];
        if let Some(off) = payload(&file, (p.file_len, &p.geo, &p.reserved), b, e)? {
            data_end = data_end.max(off + p.geo.block_size);
            blocks.push((off, b));
        }
    }
    for c in 0..p.geo.bat_entries.div_ceil(p.geo.chunk_ratio + 1) {
        let i = c * (p.geo.chunk_ratio + 1) + p.geo.chunk_ratio;
        if let Some(&e) = bat.get(i as usize)
            && e & STATE_MASK != 0
        {
            return Err(file.corrupt(
                format!("VHDX BAT entry {i}"),
                "a sector bitmap block is present in a non-differencing disk",
            ));
        }
    }
    blocks.sort_unstable();
    for w in blocks.windows(2) {
        if w[0].0 + p.geo.block_size > w[1].0 {
            return Err(file.corrupt(
                "VHDX BAT",
                format!("blocks {} and {} overlap", w[0].1, w[1].1),
            ));
        }
    }
    let data_end = round_up(data_end, MIB).unwrap_or(data_end);
    // Anything past the last structure is an unreferenced leftover of an interrupted run.
    file.set_len(data_end)?;
    // Header update before anything else changes (MS-VHDX 2.2.2.1), twice so that both
    // copies are current. The log is empty (checked above), so its GUID is cleared.
    let mut header = p.header.clone();
    header.file_write = Guid::random().0;
    header.data_write = Guid::random().0;
    header.log_guid = [0; 16];
    let mut slot = p.slot;
    for _ in 0..2 {
        header.seq = header.seq.wrapping_add(1);
        slot = 1 - slot;
        file.write_all_at(HEADER_OFFSETS[slot], &header.encode())?;
        file.sync()?;
    }
    let map = VhdxWriter {
        geo: p.geo,
        bat_offset: p.bat_offset,
        bat,
        dirty: DirtyPages::default(),
        data_end,
        leave_allocated: p.leave_allocated,
        pending: Vec::new(),
        free: Vec::new(),
    };
    Ok(Box::new(SparseWriter::new(file, map)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn guid_constants_match_the_specification() {
        for (c, s) in [
            (BAT_GUID, "2DC27766-F623-4200-9D64-115E9BFD4A08"),
            (METADATA_GUID, "8B7CA206-4790-4B9A-B8FE-575F050F886E"),
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
    fn bat_interleaving() {
        // 2 MiB blocks, 512-byte sectors: chunk ratio 2048.
        let g = Geometry::new(5 << 30, 2 * MIB, 512);
        assert_eq!(g.chunk_ratio, 2048);
        assert_eq!(g.payload_blocks, 2560);
        assert_eq!(g.bat_entries, 2561);
        assert_eq!(g.index(2047), 2047);
        assert_eq!(g.index(2048), 2049);
        let g = Geometry::new(0, 2 * MIB, 512);
        assert_eq!(g.bat_entries, 0);
    }

    #[test]
    fn header_and_region_roundtrip() {
        let h = Header {
            seq: 7,
            file_write: [1; 16],
            data_write: [2; 16],
            log_guid: [0; 16],
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let b = h.encode();
        assert_eq!(Header::parse(&b).unwrap(), h);
        let mut bad = b.clone();
        bad[100] = 1;
        assert!(Header::parse(&bad).unwrap_err().contains("CRC"));
        let r = vec![Region {
            guid: BAT_GUID,
            offset: 3 * MIB,
            length: MIB as u32,
            required: true,
        }];
        assert_eq!(parse_region_table(&encode_region_table(&r)).unwrap(), r);
    }

    #[test]
    fn default_block_sizes() {
        assert_eq!(default_block_size(40 << 20), 2 * MIB);
        assert_eq!(default_block_size(2 << 40), 2 * MIB);
        assert_eq!(default_block_size(64 << 40), 64 * MIB);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..70000),
                               region_len in any::<u64>()) {
            let _ = Header::parse(&bytes);
            let _ = parse_region_table(&bytes);
            let _ = parse_metadata_table(&bytes, region_len);
        }

        #[test]
        fn mutated_region_tables_never_panic(pos in 0usize..200, val in any::<u8>()) {
            let r = vec![
                Region { guid: BAT_GUID, offset: 3 * MIB, length: MIB as u32, required: true },
                Region { guid: METADATA_GUID, offset: 2 * MIB, length: MIB as u32, required: true },
            ];
            let mut b = encode_region_table(&r);
            b[pos] = val;
            let crc = crc32c_skipping(&b, 4);
            b[4..8].copy_from_slice(&crc.to_le_bytes());
            let _ = parse_region_table(&b);
        }
    }
}
