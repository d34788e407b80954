//! The VHD footer and dynamic disk header: decoding, checking and encoding, no I/O.

use crate::bytes::{be_u16, be_u32, be_u64};
use crate::image::error::ParseError;
use crate::image::file::power_of_two_in;
use std::ops::RangeInclusive;

pub(crate) const SECTOR: u64 = 512;
pub(super) const FOOTER_SIZE: u64 = 512;
pub(crate) const COOKIE: &[u8; 8] = b"conectix";
const DYN_COOKIE: &[u8; 8] = b"cxsparse";
/// Features: bit 1 is "reserved, must be set".
const FEATURES: u32 = 0x0000_0002;
const FORMAT_VERSION: u32 = 0x0001_0000;
const HEADER_VERSION: u32 = 0x0001_0000;
/// Creator application. Hyper-V's value: qemu (block/vpc.c) and Windows then take the
/// virtual size from "current size" instead of the CHS geometry, which cannot express most
/// sizes exactly (qemu uses the geometry for the creators `vpc ` and `qemu`).
const CREATOR_APP: &[u8; 4] = b"win ";
/// Creator version 10.0.
const CREATOR_VERSION: u32 = 0x000a_0000;
/// Creator host OS "Wi2k" (Windows).
const CREATOR_OS: u32 = 0x5769_326B;
pub(crate) const DISK_FIXED: u32 = 2;
pub(super) const DISK_DYNAMIC: u32 = 3;
pub(super) const DISK_DIFFERENCING: u32 = 4;
/// Offset of the disk type in the footer.
pub(super) const DISK_TYPE_AT: usize = 60;
/// 2000-01-01T00:00:00Z in Unix seconds.
const VHD_EPOCH: i64 = 946_684_800;
/// Windows refuses VHDs larger than 2040 GiB.
pub(crate) const MAX_SIZE: u64 = 2040 << 30;
pub(super) const BAT_UNUSED: u32 = 0xFFFF_FFFF;
/// Where volback puts the dynamic header (right after the footer copy).
pub(super) const DYN_HEADER_OFFSET: u64 = 512;
pub(super) const DYN_HEADER_SIZE: usize = 1024;
/// Block sizes a dynamic VHD may have.
pub(super) const BLOCK_SIZES: RangeInclusive<u64> = 512..=(256 << 20);
/// The largest CHS geometry the footer can express (65535 × 16 × 255 sectors).
const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;

/// The footer, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Footer {
    pub features: u32,
    pub version: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: u32,
    pub original_size: u64,
    pub current_size: u64,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
    pub disk_type: u32,
    pub uuid: [u8; 16],
    pub saved_state: u8,
}

/// The VHD checksum: one's complement of the sum of all bytes, skipping the 4-byte checksum
/// field at `field`.
pub(crate) fn checksum(b: &[u8], field: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(x as u32));
    !sum
}

/// Stores the checksum of `b` in its field at `field`.
fn set_checksum(b: &mut [u8], field: usize) {
    let sum = checksum(b, field);
    b[field..field + 4].copy_from_slice(&sum.to_be_bytes());
}

/// Checks the stored checksum at `field` of the structure `b`.
fn check_sum(b: &[u8], field: usize) -> Result<(), ParseError> {
    ParseError::checksum("checksum", field, be_u32(b, field), checksum(b, field))
}

/// The 32-bit version at `at` (`field`), refused unless its major version is 1.
fn major_version_1(b: &[u8], at: usize, field: &'static str) -> Result<u32, ParseError> {
    let version = be_u32(b, at);
    if version >> 16 != 1 {
        return Err(ParseError::field(
            field,
            at,
            format!("unknown {field} {version:#010x}"),
        ));
    }
    Ok(version)
}

/// CHS geometry for `total_sectors`, as the VHD specification's appendix computes it.
pub(crate) fn geometry(total_sectors: u64) -> (u16, u8, u8) {
    let total = total_sectors.min(MAX_CHS_SECTORS);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

impl Footer {
    /// The footer volback writes for a disk of `size` bytes (a multiple of 512).
    pub fn new(size: u64, disk_type: u32) -> Footer {
        let (c, h, s) = geometry(size / SECTOR);
        Footer {
            features: FEATURES,
            version: FORMAT_VERSION,
            data_offset: if disk_type == DISK_FIXED {
                u64::MAX
            } else {
                DYN_HEADER_OFFSET
            },
            timestamp: (crate::time::now_unix() - VHD_EPOCH) as u32,
            creator_app: *CREATOR_APP,
            creator_version: CREATOR_VERSION,
            creator_os: CREATOR_OS,
            original_size: size,
            current_size: size,
            cylinders: c,
            heads: h,
            sectors: s,
            disk_type,
            uuid: crate::probe::guid::Guid::random().0,
            saved_state: 0,
        }
    }

    pub fn encode(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_os.to_be_bytes());
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.cylinders.to_be_bytes());
        b[58] = self.heads;
        b[59] = self.sectors;
        b[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        b[68..84].copy_from_slice(&self.uuid);
        b[84] = self.saved_state;
        set_checksum(&mut b, 64);
        b
    }

    /// Decodes and checks a footer.
    pub fn parse(b: &[u8]) -> Result<Footer, ParseError> {
        ParseError::need("footer", b, FOOTER_SIZE as usize)?;
        let b = &b[..FOOTER_SIZE as usize];
        ParseError::magic("cookie", b, 0, COOKIE, "\"conectix\"")?;
        check_sum(b, 64)?;
        let version = major_version_1(b, 12, "format version")?;
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&b[28..32]);
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[68..84]);
        let f = Footer {
            features: be_u32(b, 8),
            version,
            data_offset: be_u64(b, 16),
            timestamp: be_u32(b, 24),
            creator_app,
            creator_version: be_u32(b, 32),
            creator_os: be_u32(b, 36),
            original_size: be_u64(b, 40),
            current_size: be_u64(b, 48),
            cylinders: be_u16(b, 56),
            heads: b[58],
            sectors: b[59],
            disk_type: be_u32(b, DISK_TYPE_AT),
            uuid,
            saved_state: b[84],
        };
        if ![DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING].contains(&f.disk_type) {
            return Err(ParseError::field(
                "disk type",
                DISK_TYPE_AT,
                format!("unknown disk type {}", f.disk_type),
            ));
        }
        Ok(f)
    }

    /// The virtual size: images from Virtual PC and from qemu without `force_size` (creators
    /// `vpc ` and `qemu`) are as large as their CHS geometry says unless it is the maximum
    /// geometry (as qemu reads them); all others (Hyper-V, Windows, disk2vhd, volback…) by
    /// "current size", rounded down to whole sectors (as Windows reads every VHD).
    pub fn disk_size(&self) -> u64 {
        let chs = self.cylinders as u64 * self.heads as u64 * self.sectors as u64;
        if (&self.creator_app == b"vpc " || &self.creator_app == b"qemu") && chs != MAX_CHS_SECTORS
        {
            chs * SECTOR
        } else {
            self.current_size / SECTOR * SECTOR
        }
    }
}

/// The dynamic disk header, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DynHeader {
    pub table_offset: u64,
    pub max_table_entries: u32,
    pub block_size: u32,
}

impl DynHeader {
    pub fn encode(&self) -> [u8; DYN_HEADER_SIZE] {
        let mut b = [0u8; DYN_HEADER_SIZE];
        b[0..8].copy_from_slice(DYN_COOKIE);
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&HEADER_VERSION.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        set_checksum(&mut b, 36);
        b
    }

    /// Decodes and checks a dynamic disk header.
    pub fn parse(b: &[u8]) -> Result<DynHeader, ParseError> {
        ParseError::need("header", b, DYN_HEADER_SIZE)?;
        let b = &b[..DYN_HEADER_SIZE];
        ParseError::magic("cookie", b, 0, DYN_COOKIE, "\"cxsparse\"")?;
        check_sum(b, 36)?;
        major_version_1(b, 24, "header version")?;
        let h = DynHeader {
            table_offset: be_u64(b, 16),
            max_table_entries: be_u32(b, 28),
            block_size: be_u32(b, 32),
        };
        if !power_of_two_in(h.block_size as u64, BLOCK_SIZES) {
            return Err(ParseError::field(
                "block size",
                32,
                format!(
                    "block size {} is not a power of two between 512 bytes and 256 MiB",
                    h.block_size
                ),
            ));
        }
        Ok(h)
    }

    /// Bytes of the sector bitmap in front of each block.
    pub fn bitmap_size(&self) -> u64 {
        bitmap_size(self.block_size as u64)
    }
}

/// Bytes of the sector bitmap in front of each block of `block_size` bytes.
fn bitmap_size(block_size: u64) -> u64 {
    (block_size / SECTOR).div_ceil(8).div_ceil(SECTOR) * SECTOR
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn geometry_follows_the_specification() {
        // 40 MiB + 3 sectors: 17 sectors per track path.
        let (c, h, s) = geometry((40 << 20) / 512 + 3);
        assert_eq!((h, s), (5, 17));
        assert_eq!(c, 963);
        // 127 GiB and more: the 255-sector geometry, capped.
        assert_eq!(geometry(u64::MAX), (65535, 16, 255));
        let (c, h, s) = geometry((1u64 << 40) / 512);
        assert_eq!((c, h, s), (65535, 16, 255));
        // A 1 GiB disk.
        assert_eq!(geometry((1 << 30) / 512), (2080, 16, 63));
    }

    #[test]
    fn footer_roundtrip_and_checksum() {
        let f = Footer::new(5 << 30, DISK_DYNAMIC);
        let b = f.encode();
        assert_eq!(Footer::parse(&b).unwrap(), f);
        assert_eq!(f.disk_size(), 5 << 30);
        let mut bad = b;
        bad[50] ^= 1;
        assert!(matches!(
            Footer::parse(&bad),
            Err(ParseError::Checksum { offset: 64, .. })
        ));
        let mut bad = b;
        bad[0] = b'C';
        assert!(matches!(
            Footer::parse(&bad),
            Err(ParseError::Magic { offset: 0, .. })
        ));
        assert!(matches!(
            Footer::parse(&b[..511]),
            Err(ParseError::Short { need: 512, .. })
        ));
    }

    #[test]
    fn dynamic_header_roundtrip_and_checks() {
        let h = DynHeader {
            table_offset: 1536,
            max_table_entries: 10,
            block_size: 2 << 20,
        };
        let b = h.encode();
        assert_eq!(DynHeader::parse(&b).unwrap(), h);
        assert_eq!(h.bitmap_size(), 512);
        let odd = DynHeader {
            block_size: 3000,
            ..h.clone()
        };
        assert!(matches!(
            DynHeader::parse(&odd.encode()),
            Err(ParseError::Field { offset: 32, .. })
        ));
        let mut bad = b;
        bad[24] = 2;
        set_checksum(&mut bad, 36);
        assert!(matches!(
            DynHeader::parse(&bad),
            Err(ParseError::Field { offset: 24, .. })
        ));
    }

    #[test]
    fn disk_size_rule() {
        let mut f = Footer::new(1000 * 512, DISK_FIXED);
        f.creator_app = *b"qemu";
        let (c, h, s) = (f.cylinders as u64, f.heads as u64, f.sectors as u64);
        assert_eq!(f.disk_size(), c * h * s * 512);
        f.creator_app = *b"win ";
        assert_eq!(f.disk_size(), 1000 * 512);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
            let _ = Footer::parse(&bytes);
            let _ = DynHeader::parse(&bytes);
        }

        #[test]
        fn mutated_footers_never_panic(pos in 0usize..512, val in any::<u8>(), fix in any::<bool>()) {
            let mut b = Footer::new(12345 * 512, DISK_DYNAMIC).encode();
            b[pos] = val;
            if fix {
                set_checksum(&mut b, 64);
            }
            if let Ok(f) = Footer::parse(&b) {
                let _ = f.disk_size();
            }
        }

        #[test]
        fn mutated_dynamic_headers_never_panic(pos in 0usize..1024, val in any::<u8>(), fix in any::<bool>()) {
            let h = DynHeader { table_offset: 1536, max_table_entries: 99, block_size: 4096 };
            let mut b = h.encode();
            b[pos] = val;
            if fix {
                set_checksum(&mut b, 36);
            }
            if let Ok(h) = DynHeader::parse(&b) {
                let _ = h.bitmap_size();
            }
        }
    }
}
