//! The GUID partition table (UEFI specification 2.10, section 5.3).
//!
//! Layout (all little-endian; LBA = logical sector of the disk):
//!
//! - LBA 0: a protective MBR with one entry of type 0xEE covering the disk (see [`super::mbr`]).
//! - LBA 1: the primary header; the partition entry array follows it (usually at LBA 2).
//! - The last LBA: the backup header; its entry array sits just before it.
//!
//! Header (92 bytes used, the rest of the sector is zero):
//!
//! | offset | size | field                                                       |
//! |--------|------|-------------------------------------------------------------|
//! | 0      | 8    | signature `EFI PART`                                        |
//! | 8      | 4    | revision (0x00010000 = 1.0)                                 |
//! | 12     | 4    | header size (≥ 92, ≤ sector size)                           |
//! | 16     | 4    | CRC32 of the header (header size bytes, this field zeroed)  |
//! | 20     | 4    | reserved, zero                                              |
//! | 24     | 8    | LBA of this header                                          |
//! | 32     | 8    | LBA of the other header                                     |
//! | 40     | 8    | first usable LBA                                            |
//! | 48     | 8    | last usable LBA (inclusive)                                 |
//! | 56     | 16   | disk GUID                                                   |
//! | 72     | 8    | LBA of the partition entry array                            |
//! | 80     | 4    | number of entries                                           |
//! | 84     | 4    | size of one entry (128 × 2ⁿ)                                |
//! | 88     | 4    | CRC32 of the entry array (number × size bytes)              |
//!
//! Entry (the first 128 bytes of each `size`-byte slot): type GUID (16), unique GUID (16), first
//! LBA (8), last LBA (8, inclusive), attribute bits (8), name (72 bytes: 36 UTF-16LE code
//! units, NUL-padded). An all-zero type GUID marks an unused entry.
//!
//! Hostile input: the entry size must be a power of two from 128 to [`MAX_ENTRY_SIZE`] and the
//! whole array at most [`MAX_ARRAY_BYTES`]; both CRCs are checked before any entry is trusted.

use super::crc32::crc32;
use super::guid::Guid;
use crate::bytes::{le_u32 as u32_le, le_u64 as u64_le};
use crate::volume::Volume;

pub const SIGNATURE: [u8; 8] = *b"EFI PART";
pub const REVISION_1_0: u32 = 0x0001_0000;
/// Bytes of the header that the CRC covers when written by us (the UEFI 2.x header size).
pub const HEADER_LEN: u32 = 92;
/// Size of one entry as written by us and by every common tool.
pub const ENTRY_LEN: u32 = 128;
/// Entries in the array when a script does not say (`sfdisk` default; 16 KiB).
pub const DEFAULT_ENTRY_COUNT: u32 = 128;
/// Largest entry size accepted.
pub const MAX_ENTRY_SIZE: u32 = 4096;
/// Largest entry array accepted (8192 entries of 128 bytes).
pub const MAX_ARRAY_BYTES: u64 = 1 << 20;
/// UTF-16 code units in a partition name.
pub const NAME_UNITS: usize = 36;

/// Attribute bits with a name (UEFI table 5-8), in the order `sfdisk` prints them.
pub const ATTR_REQUIRED: u32 = 0;
pub const ATTR_NO_BLOCK_IO: u32 = 1;
pub const ATTR_LEGACY_BIOS_BOOTABLE: u32 = 2;
/// Bits 48–63 are defined by each partition type; `sfdisk` prints them as `GUID:n`.
pub const ATTR_TYPE_SPECIFIC_FIRST: u32 = 48;

fn guid_at(b: &[u8], o: usize) -> Guid {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[o..o + 16]);
    Guid(g)
}

/// A GPT header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub revision: u32,
    pub header_size: u32,
    pub my_lba: u64,
    pub alternate_lba: u64,
    pub first_usable_lba: u64,
    pub last_usable_lba: u64,
    pub disk_guid: Guid,
    pub entries_lba: u64,
    pub entry_count: u32,
    pub entry_size: u32,
    pub entries_crc: u32,
}

/// Why a GPT header, an entry or an attribute text is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GptError {
    #[error("no \"EFI PART\" signature")]
    NoSignature,
    #[error("header size {size} is outside {HEADER_LEN}..={max}")]
    HeaderSize { size: u32, max: usize },
    #[error("header checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    HeaderChecksum { stored: u32, computed: u32 },
    /// A field out of its bounds, a value that cannot be written; the text says which.
    #[error("{0}")]
    Invalid(String),
}

/// `GptError::Invalid(format!(...))` in short.
macro_rules! invalid {
    ($($arg:tt)*) => {
        GptError::Invalid(format!($($arg)*))
    };
}

impl Header {
    /// Decodes and checks a header sector (signature, size, CRC, entry geometry bounds).
    pub fn parse(sector: &[u8]) -> Result<Header, GptError> {
        if sector.len() < HEADER_LEN as usize || sector[0..8] != SIGNATURE {
            return Err(GptError::NoSignature);
        }
        let header_size = u32_le(sector, 12);
        if header_size < HEADER_LEN || header_size as usize > sector.len() {
            return Err(GptError::HeaderSize {
                size: header_size,
                max: sector.len(),
            });
        }
        let stored = u32_le(sector, 16);
        let mut copy = sector[..header_size as usize].to_vec();
        copy[16..20].fill(0);
        let computed = crc32(&copy);
        if computed != stored {
            return Err(GptError::HeaderChecksum { stored, computed });
        }
        let h = Header {
            revision: u32_le(sector, 8),
            header_size,
            my_lba: u64_le(sector, 24),
            alternate_lba: u64_le(sector, 32),
            first_usable_lba: u64_le(sector, 40),
            last_usable_lba: u64_le(sector, 48),
            disk_guid: guid_at(sector, 56),
            entries_lba: u64_le(sector, 72),
            entry_count: u32_le(sector, 80),
            entry_size: u32_le(sector, 84),
            entries_crc: u32_le(sector, 88),
        };
        if !h.entry_size.is_power_of_two() || !(ENTRY_LEN..=MAX_ENTRY_SIZE).contains(&h.entry_size)
        {
            return Err(invalid!(
                "partition entry size {} is not a power of two from {ENTRY_LEN} to \
                 {MAX_ENTRY_SIZE}",
                h.entry_size
            ));
        }
        if h.array_bytes() > MAX_ARRAY_BYTES {
            return Err(invalid!(
                "{} partition entries of {} bytes ({} bytes) exceed the {MAX_ARRAY_BYTES}-byte \
                 limit",
                h.entry_count,
                h.entry_size,
                h.array_bytes()
            ));
        }
        if h.first_usable_lba > h.last_usable_lba.saturating_add(1) {
            return Err(invalid!(
                "first usable LBA {} is after last usable LBA {}",
                h.first_usable_lba,
                h.last_usable_lba
            ));
        }
        Ok(h)
    }

    /// Bytes of the entry array.
    pub fn array_bytes(&self) -> u64 {
        u64::from(self.entry_count) * u64::from(self.entry_size)
    }

    /// Sectors the entry array occupies.
    pub fn array_sectors(&self, sector_size: u64) -> u64 {
        self.array_bytes().div_ceil(sector_size)
    }

    /// Encodes a header sector of `sector_size` bytes (92-byte header, CRC computed).
    pub fn encode(&self, sector_size: usize) -> Vec<u8> {
        let mut s = vec![0u8; sector_size];
        s[0..8].copy_from_slice(&SIGNATURE);
        s[8..12].copy_from_slice(&self.revision.to_le_bytes());
        s[12..16].copy_from_slice(&HEADER_LEN.to_le_bytes());
        s[24..32].copy_from_slice(&self.my_lba.to_le_bytes());
        s[32..40].copy_from_slice(&self.alternate_lba.to_le_bytes());
        s[40..48].copy_from_slice(&self.first_usable_lba.to_le_bytes());
        s[48..56].copy_from_slice(&self.last_usable_lba.to_le_bytes());
        s[56..72].copy_from_slice(&self.disk_guid.0);
        s[72..80].copy_from_slice(&self.entries_lba.to_le_bytes());
        s[80..84].copy_from_slice(&self.entry_count.to_le_bytes());
        s[84..88].copy_from_slice(&self.entry_size.to_le_bytes());
        s[88..92].copy_from_slice(&self.entries_crc.to_le_bytes());
        let crc = crc32(&s[..HEADER_LEN as usize]);
        s[16..20].copy_from_slice(&crc.to_le_bytes());
        s
    }
}

/// One partition entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub type_guid: Guid,
    pub unique_guid: Guid,
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
    pub attributes: u64,
    pub name: String,
}

impl Entry {
    /// Decodes the first 128 bytes of `b`.
    pub fn parse(b: &[u8]) -> Entry {
        let units: Vec<u16> = b[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        Entry {
            type_guid: guid_at(b, 0),
            unique_guid: guid_at(b, 16),
            first_lba: u64_le(b, 32),
            last_lba: u64_le(b, 40),
            attributes: u64_le(b, 48),
            name: String::from_utf16_lossy(&units),
        }
    }

    pub fn is_used(&self) -> bool {
        !self.type_guid.is_zero()
    }

    /// Encodes into the first 128 bytes of `out`. Fails when the name does not fit in 36
    /// UTF-16 code units.
    pub fn encode(&self, out: &mut [u8]) -> Result<(), GptError> {
        let units: Vec<u16> = self.name.encode_utf16().collect();
        if units.len() > NAME_UNITS {
            return Err(invalid!(
                "partition name {:?} is longer than {NAME_UNITS} UTF-16 code units",
                self.name
            ));
        }
        out[..128].fill(0);
        out[0..16].copy_from_slice(&self.type_guid.0);
        out[16..32].copy_from_slice(&self.unique_guid.0);
        out[32..40].copy_from_slice(&self.first_lba.to_le_bytes());
        out[40..48].copy_from_slice(&self.last_lba.to_le_bytes());
        out[48..56].copy_from_slice(&self.attributes.to_le_bytes());
        for (i, u) in units.iter().enumerate() {
            out[56 + 2 * i..58 + 2 * i].copy_from_slice(&u.to_le_bytes());
        }
        Ok(())
    }
}

/// The used entries of an entry array, with their 0-based slot index.
pub fn parse_entries(array: &[u8], entry_size: u32) -> Vec<(u32, Entry)> {
    let size = (entry_size as usize).max(ENTRY_LEN as usize);
    array
        .chunks_exact(size)
        .enumerate()
        .map(|(i, c)| (i as u32, Entry::parse(c)))
        .filter(|(_, e)| e.is_used())
        .collect()
}

/// Attribute bits as `sfdisk` prints them: `RequiredPartition NoBlockIOProtocol
/// LegacyBIOSBootable GUID:48,60`. Bits 3–47 (reserved by UEFI) have no text form.
pub fn attrs_to_string(a: u64) -> String {
    let mut parts: Vec<String> = Vec::new();
    for (bit, name) in [
        (ATTR_REQUIRED, "RequiredPartition"),
        (ATTR_NO_BLOCK_IO, "NoBlockIOProtocol"),
        (ATTR_LEGACY_BIOS_BOOTABLE, "LegacyBIOSBootable"),
    ] {
        if a & (1 << bit) != 0 {
            parts.push(name.into());
        }
    }
    let guid_bits: Vec<String> = (ATTR_TYPE_SPECIFIC_FIRST..64)
        .filter(|b| a & (1 << b) != 0)
        .map(|b| b.to_string())
        .collect();
    if !guid_bits.is_empty() {
        parts.push(format!("GUID:{}", guid_bits.join(",")));
    }
    parts.join(" ")
}

/// Parses the `sfdisk` attribute text (names, `GUID:n[,m…]`, bare bit numbers 0–2 and
/// 48–63, separated by blanks or commas).
pub fn attrs_from_string(s: &str) -> Result<u64, GptError> {
    let mut bits = 0u64;
    let mut guid_list = false;
    for item in s.split([' ', '\t', ',']).filter(|x| !x.is_empty()) {
        let (num, is_guid) = match item {
            "RequiredPartition" | "RequiredPartiton" => {
                bits |= 1 << ATTR_REQUIRED;
                guid_list = false;
                continue;
            }
            "NoBlockIOProtocol" => {
                bits |= 1 << ATTR_NO_BLOCK_IO;
                guid_list = false;
                continue;
            }
            "LegacyBIOSBootable" => {
                bits |= 1 << ATTR_LEGACY_BIOS_BOOTABLE;
                guid_list = false;
                continue;
            }
            x => match x.strip_prefix("GUID:") {
                Some(n) => {
                    guid_list = true;
                    (n, true)
                }
                None => (x, guid_list),
            },
        };
        let n: u32 = num
            .parse()
            .map_err(|_| invalid!("unknown partition attribute {item:?}"))?;
        let ok = (ATTR_TYPE_SPECIFIC_FIRST..64).contains(&n) || (!is_guid && n <= 2);
        if !ok {
            return Err(invalid!(
                "attribute bit {n} cannot be set (bits 0-2 and 48-63 only)"
            ));
        }
        bits |= 1 << n;
    }
    Ok(bits)
}

/// What one header location holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderState {
    /// A header with good CRCs and its entry array.
    Valid { header: Header, array: Vec<u8> },
    /// No signature there (or the location is past the end of the volume).
    Missing(String),
    /// A signature, but the header or its entry array is damaged.
    Corrupt(String),
}

impl HeaderState {
    pub fn valid(&self) -> Option<(&Header, &[u8])> {
        match self {
            HeaderState::Valid { header, array } => Some((header, array)),
            _ => None,
        }
    }
}

/// Reads and checks the header at `lba` and its entry array. Errors from the volume are
/// reported as `Corrupt` (unreadable) states: probing goes on.
pub fn read_header_at(vol: &dyn Volume, sector_size: u64, lba: u64) -> HeaderState {
    let Some(offset) = lba
        .checked_mul(sector_size)
        .filter(|o| o.checked_add(sector_size).is_some_and(|e| e <= vol.size()))
    else {
        return HeaderState::Missing(format!("LBA {lba} is past the end of the volume"));
    };
    let mut sector = vec![0u8; sector_size as usize];
    if let Err(e) = vol.read_at(offset, &mut sector) {
        return HeaderState::Corrupt(format!("cannot read LBA {lba}: {e}"));
    }
    if sector[0..8] != SIGNATURE {
        return HeaderState::Missing(format!("no GPT signature at LBA {lba}"));
    }
    let header = match Header::parse(&sector) {
        Ok(h) => h,
        Err(e) => return HeaderState::Corrupt(e.to_string()),
    };
    if header.my_lba != lba {
        return HeaderState::Corrupt(format!(
            "the header at LBA {lba} says it is at LBA {}",
            header.my_lba
        ));
    }
    let bytes = header.array_bytes();
    let Some(array_offset) = header
        .entries_lba
        .checked_mul(sector_size)
        .filter(|o| o.checked_add(bytes).is_some_and(|e| e <= vol.size()))
    else {
        return HeaderState::Corrupt(format!(
            "its partition entry array (LBA {}, {bytes} bytes) is past the end of the volume",
            header.entries_lba
        ));
    };
    let mut array = vec![0u8; bytes as usize];
    if let Err(e) = vol.read_at(array_offset, &mut array) {
        return HeaderState::Corrupt(format!(
            "cannot read its partition entry array at LBA {}: {e}",
            header.entries_lba
        ));
    }
    let computed = crc32(&array);
    if computed != header.entries_crc {
        return HeaderState::Corrupt(format!(
            "partition entry array checksum mismatch (stored {:08x}, computed {computed:08x})",
            header.entries_crc
        ));
    }
    HeaderState::Valid { header, array }
}

/// Differences between a primary and a backup header that should agree.
pub fn header_mismatches(primary: &Header, backup: &Header) -> Vec<String> {
    let mut d = Vec::new();
    if primary.disk_guid != backup.disk_guid {
        d.push("disk GUID".to_string());
    }
    if primary.first_usable_lba != backup.first_usable_lba
        || primary.last_usable_lba != backup.last_usable_lba
    {
        d.push("usable LBA range".into());
    }
    if primary.entry_count != backup.entry_count || primary.entry_size != backup.entry_size {
        d.push("entry count or size".into());
    }
    if primary.entries_crc != backup.entries_crc {
        d.push("partition entries".into());
    }
    if backup.alternate_lba != primary.my_lba {
        d.push(format!(
            "alternate LBA (the backup points to LBA {})",
            backup.alternate_lba
        ));
    }
    d
}

/// A complete GPT to write: what [`encode_table`] needs.
#[derive(Debug, Clone)]
pub struct NewTable {
    pub sector_size: u64,
    /// Sectors of the disk.
    pub disk_sectors: u64,
    pub disk_guid: Guid,
    pub first_usable_lba: u64,
    pub last_usable_lba: u64,
    pub entry_count: u32,
    /// Entries by 0-based slot.
    pub entries: Vec<(u32, Entry)>,
}

/// The sectors a GPT occupies, as (LBA, bytes) writes: primary header at LBA 1, primary array
/// at LBA 2, backup array before the last LBA, backup header at the last LBA. The protective
/// MBR is not included (it shares sector 0 with boot code).
pub fn encode_table(t: &NewTable) -> Result<Vec<(u64, Vec<u8>)>, GptError> {
    let ss = t.sector_size;
    let mut array = vec![0u8; (t.entry_count as usize) * ENTRY_LEN as usize];
    for (slot, e) in &t.entries {
        if *slot >= t.entry_count {
            return Err(invalid!(
                "partition {} does not fit a table of {} entries",
                slot + 1,
                t.entry_count
            ));
        }
        let o = *slot as usize * ENTRY_LEN as usize;
        e.encode(&mut array[o..o + ENTRY_LEN as usize])?;
    }
    let array_sectors = (array.len() as u64).div_ceil(ss);
    let last = t
        .disk_sectors
        .checked_sub(1)
        .ok_or(GptError::Invalid("the disk has no sectors".into()))?;
    let backup_array_lba = last
        .checked_sub(array_sectors)
        .filter(|&l| l > 1 + array_sectors)
        .ok_or(GptError::Invalid("the disk is too small for a GPT".into()))?;
    if t.first_usable_lba < 2 + array_sectors || t.last_usable_lba >= backup_array_lba {
        return Err(invalid!(
            "usable LBAs {}..={} overlap the GPT structures (allowed {}..={})",
            t.first_usable_lba,
            t.last_usable_lba,
            2 + array_sectors,
            backup_array_lba - 1
        ));
    }
    let entries_crc = crc32(&array);
    let mut header = Header {
        revision: REVISION_1_0,
        header_size: HEADER_LEN,
        my_lba: 1,
        alternate_lba: last,
        first_usable_lba: t.first_usable_lba,
        last_usable_lba: t.last_usable_lba,
        disk_guid: t.disk_guid,
        entries_lba: 2,
        entry_count: t.entry_count,
        entry_size: ENTRY_LEN,
        entries_crc,
    };
    let mut padded = array;
    padded.resize((array_sectors * ss) as usize, 0);
    let mut out = vec![(1, header.encode(ss as usize)), (2, padded.clone())];
    header.my_lba = last;
    header.alternate_lba = 1;
    header.entries_lba = backup_array_lba;
    out.push((backup_array_lba, padded));
    out.push((last, header.encode(ss as usize)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::tests::Mem;
    use proptest::prelude::*;

    fn sample(disk_sectors: u64) -> Vec<u8> {
        let t = NewTable {
            sector_size: 512,
            disk_sectors,
            disk_guid: Guid::random(),
            first_usable_lba: 34,
            last_usable_lba: disk_sectors - 34,
            entry_count: 128,
            entries: vec![(
                0,
                Entry {
                    type_guid: Guid::parse("0FC63DAF-8483-4772-8E79-3D69D8477DE4").unwrap(),
                    unique_guid: Guid::random(),
                    first_lba: 40,
                    last_lba: 99,
                    attributes: 1 | (1 << 60),
                    name: "root ü".into(),
                },
            )],
        };
        let mut img = vec![0u8; disk_sectors as usize * 512];
        for (lba, b) in encode_table(&t).unwrap() {
            img[lba as usize * 512..lba as usize * 512 + b.len()].copy_from_slice(&b);
        }
        img
    }

    #[test]
    fn encoded_table_reads_back() {
        let img = sample(200);
        let vol = Mem(img);
        let p = read_header_at(&vol, 512, 1);
        let (h, array) = p.valid().expect("primary valid");
        assert_eq!(h.alternate_lba, 199);
        let b = read_header_at(&vol, 512, 199);
        let (hb, _) = b.valid().expect("backup valid");
        assert!(header_mismatches(h, hb).is_empty());
        let e = parse_entries(array, h.entry_size);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].1.name, "root ü");
        assert_eq!(
            attrs_to_string(e[0].1.attributes),
            "RequiredPartition GUID:60"
        );
    }

    #[test]
    fn damaged_headers_are_named() {
        let mut img = sample(200);
        img[512 + 40] ^= 1; // first usable LBA: header CRC now wrong
        let vol = Mem(img.clone());
        match read_header_at(&vol, 512, 1) {
            HeaderState::Corrupt(e) => assert!(e.contains("header checksum"), "{e}"),
            s => panic!("{s:?}"),
        }
        // Entry array damaged.
        let mut img2 = sample(200);
        img2[1024 + 60] ^= 1;
        match read_header_at(&Mem(img2), 512, 1) {
            HeaderState::Corrupt(e) => assert!(e.contains("entry array checksum"), "{e}"),
            s => panic!("{s:?}"),
        }
        // Absurd entry count with a correct CRC.
        let mut img3 = sample(200);
        img3[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
        let crc = {
            let mut h = img3[512..512 + 92].to_vec();
            h[16..20].fill(0);
            crc32(&h)
        };
        img3[512 + 16..512 + 20].copy_from_slice(&crc.to_le_bytes());
        match read_header_at(&Mem(img3), 512, 1) {
            HeaderState::Corrupt(e) => assert!(e.contains("exceed"), "{e}"),
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn attribute_text_round_trips() {
        for s in [
            "RequiredPartition",
            "RequiredPartition NoBlockIOProtocol LegacyBIOSBootable GUID:48,63",
            "GUID:60",
            "",
        ] {
            assert_eq!(attrs_to_string(attrs_from_string(s).unwrap()), s);
        }
        assert!(attrs_from_string("GUID:5").is_err());
        assert!(attrs_from_string("Bogus").is_err());
        assert_eq!(attrs_from_string("2 60").unwrap(), 4 | 1 << 60);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// Random header and array bytes (with the signature, and sometimes a valid header
        /// CRC) never panic, and never allocate more than the cap.
        #[test]
        fn random_headers_never_panic(
            header in proptest::collection::vec(any::<u8>(), 512),
            rest in proptest::collection::vec(any::<u8>(), 0..4096),
            fix_crc in any::<bool>(),
            header_size in 0u32..600,
        ) {
            let mut img = vec![0u8; 512];
            let mut h = header;
            h[0..8].copy_from_slice(&SIGNATURE);
            if fix_crc {
                h[12..16].copy_from_slice(&header_size.to_le_bytes());
                let n = (header_size as usize).clamp(92, 512);
                let mut c = h[..n].to_vec();
                c[16..20].fill(0);
                let crc = crc32(&c);
                h[16..20].copy_from_slice(&crc.to_le_bytes());
            }
            img.extend_from_slice(&h);
            img.extend_from_slice(&rest);
            let vol = Mem(img);
            if let HeaderState::Valid { header, array } = read_header_at(&vol, 512, 1) {
                prop_assert!(array.len() as u64 <= MAX_ARRAY_BYTES);
                let _ = parse_entries(&array, header.entry_size);
            }
        }

        #[test]
        fn random_attribute_text_never_panics(s in "\\PC{0,40}") {
            let _ = attrs_from_string(&s);
        }
    }
}
