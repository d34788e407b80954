//! VHD images ("Virtual Hard Disk Image Format Specification", Microsoft, version 1.0),
//! fixed and dynamic.
//!
//! All integers are big-endian.
//!
//! Footer (512 bytes; at the end of every VHD, and a copy at offset 0 of a dynamic one):
//!
//! | off | size | field                                                        |
//! |-----|------|--------------------------------------------------------------|
//! | 0   | 8    | cookie `conectix`                                            |
//! | 8   | 4    | features (bit 1 "reserved" always set: 0x00000002)           |
//! | 12  | 4    | file format version 0x00010000                               |
//! | 16  | 8    | data offset: dynamic header offset (512), all ones when fixed |
//! | 24  | 4    | time stamp, seconds since 2000-01-01 00:00:00 UTC            |
//! | 28  | 4    | creator application                                          |
//! | 32  | 4    | creator version                                              |
//! | 36  | 4    | creator host OS (`Wi2k`)                                     |
//! | 40  | 8    | original size                                                |
//! | 48  | 8    | current size (the virtual size in bytes)                     |
//! | 56  | 4    | geometry: cylinders (2), heads (1), sectors per track (1)    |
//! | 60  | 4    | disk type: 2 fixed, 3 dynamic, 4 differencing                |
//! | 64  | 4    | checksum: one's complement of the byte sum, this field zero  |
//! | 68  | 16   | unique id                                                    |
//! | 84  | 1    | saved state                                                  |
//! | 85  | 427  | zero                                                         |
//!
//! Dynamic disk header (1024 bytes at the footer's data offset): cookie `cxsparse` (8), data
//! offset (8, all ones), BAT offset (8), header version 0x00010000 (4), max table entries (4),
//! block size (4), checksum (4, as the footer's), then parent fields (differencing disks only).
//!
//! BAT: one 4-byte entry per block, the sector number (byte offset / 512) of the block's
//! sector bitmap, or 0xFFFFFFFF for a block that is not allocated (reads as zeros). A block
//! is its sector bitmap (one bit per 512-byte sector, most significant bit first, padded to
//! 512 bytes) followed by its data.
//!
//! Layout written by volback (dynamic): footer copy at 0, header at 512, BAT at 1536 (padded
//! to 512 bytes, 0xFF-filled), blocks appended in allocation order, footer at the end.

use super::file::{DirtyPages, ImageFile, round_up};
use super::mapped::{MappedVolume, Mapping, Unit};
use super::sparse::{Alloc, SparseWriter, UnitMap};
use super::{CreateOptions, ImageWriter};
use crate::bytes::{be_u16, be_u32, be_u64};
use crate::error::{Error, Result};
use crate::volume::Volume;
use std::ops::Range;
use std::path::Path;

pub(crate) const SECTOR: u64 = 512;
const FOOTER_SIZE: u64 = 512;
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
const DISK_FIXED: u32 = 2;
const DISK_DYNAMIC: u32 = 3;
const DISK_DIFFERENCING: u32 = 4;
/// 2000-01-01T00:00:00Z in Unix seconds.
const VHD_EPOCH: i64 = 946_684_800;
/// Block size Windows and qemu use for dynamic VHDs.
pub(crate) const DEFAULT_BLOCK_SIZE: u64 = 2 << 20;
/// Windows refuses VHDs larger than 2040 GiB.
pub(crate) const MAX_SIZE: u64 = 2040 << 30;
const BAT_UNUSED: u32 = 0xFFFF_FFFF;
const DYN_HEADER_OFFSET: u64 = 512;
const DYN_HEADER_SIZE: usize = 1024;
const BAT_OFFSET: u64 = 1536;
/// Largest BAT volback loads into memory to update an image (64 MiB).
const MAX_WRITER_BAT_ENTRIES: u64 = 1 << 24;
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
    fn new(size: u64, disk_type: u32) -> Footer {
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
        let sum = checksum(&b, 64);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Decodes and checks a footer; the error is a detail for [`Error::Corrupt`].
    pub fn parse(b: &[u8]) -> std::result::Result<Footer, String> {
        if b.len() < 512 {
            return Err(format!("footer is {} bytes, expected 512", b.len()));
        }
        if &b[0..8] != COOKIE {
            return Err("no \"conectix\" cookie".into());
        }
        let stored = be_u32(b, 64);
        let computed = checksum(&b[..512], 64);
        if stored != computed {
            return Err(format!(
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        let version = be_u32(b, 12);
        if version >> 16 != 1 {
            return Err(format!("unknown format version {version:#010x}"));
        }
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
            disk_type: be_u32(b, 60),
            uuid,
            saved_state: b[84],
        };
        if ![DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING].contains(&f.disk_type) {
            return Err(format!("unknown disk type {}", f.disk_type));
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
    fn encode(&self) -> [u8; DYN_HEADER_SIZE] {
        let mut b = [0u8; DYN_HEADER_SIZE];
        b[0..8].copy_from_slice(DYN_COOKIE);
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&HEADER_VERSION.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        let sum = checksum(&b, 36);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
        b
    }

    pub fn parse(b: &[u8]) -> std::result::Result<DynHeader, String> {
        if b.len() < DYN_HEADER_SIZE {
            return Err(format!("header is {} bytes, expected 1024", b.len()));
        }
        if &b[0..8] != DYN_COOKIE {
            return Err("no \"cxsparse\" cookie".into());
        }
        let stored = be_u32(b, 36);
        let computed = checksum(&b[..DYN_HEADER_SIZE], 36);
        if stored != computed {
            return Err(format!(
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        let version = be_u32(b, 24);
        if version >> 16 != 1 {
            return Err(format!("unknown header version {version:#010x}"));
        }
        let h = DynHeader {
            table_offset: be_u64(b, 16),
            max_table_entries: be_u32(b, 28),
            block_size: be_u32(b, 32),
        };
        if !h.block_size.is_power_of_two() || !(512..=(256 << 20)).contains(&h.block_size) {
            return Err(format!(
                "block size {} is not a power of two between 512 bytes and 256 MiB",
                h.block_size
            ));
        }
        Ok(h)
    }

    /// Bytes of the sector bitmap in front of each block.
    fn bitmap_size(&self) -> u64 {
        bitmap_size(self.block_size as u64)
    }
}

fn bitmap_size(block_size: u64) -> u64 {
    (block_size / SECTOR).div_ceil(8).div_ceil(SECTOR) * SECTOR
}

/// A VHD opened and checked: its footer, and for a dynamic disk its header.
struct Opened {
    file: ImageFile,
    file_len: u64,
    footer: Footer,
    dynamic: Option<DynHeader>,
    size: u64,
}

fn open_checked(file: ImageFile) -> Result<Opened> {
    let file_len = file.len()?;
    if file_len < FOOTER_SIZE {
        return Err(file.corrupt(
            "VHD footer",
            format!("the file is {file_len} bytes long, too short for a VHD"),
        ));
    }
    // A dynamic disk has a copy of the footer at offset 0 (read first, as qemu does: it is
    // there even when the process writing the image died before rewriting the last one).
    let mut head = [0u8; 512];
    file.read_exact_at(0, &mut head, "VHD footer copy")?;
    let mut tail = [0u8; 512];
    file.read_exact_at(file_len - FOOTER_SIZE, &mut tail, "VHD footer")?;
    // (A fixed disk has no copy: its first sector is disk data that could look like one.)
    let footer = if &head[0..8] == COOKIE && be_u32(&head, 60) != DISK_FIXED {
        match Footer::parse(&head) {
            Ok(f) => f,
            Err(e) => {
                Footer::parse(&tail).map_err(|_| file.corrupt("VHD footer copy at offset 0", e))?
            }
        }
    } else {
        Footer::parse(&tail).map_err(|e| file.corrupt("VHD footer", e))?
    };
    match footer.disk_type {
        DISK_DIFFERENCING => {
            return Err(file.unsupported(
                "it is a differencing VHD (its data depends on a parent image); \
                 merge it into its parent first",
            ));
        }
        DISK_FIXED => {
            let size = footer.disk_size();
            if size > file_len - FOOTER_SIZE {
                return Err(file.corrupt(
                    "VHD footer",
                    format!(
                        "virtual size {size} does not fit in the file ({file_len} bytes with \
                         the footer)"
                    ),
                ));
            }
            return Ok(Opened {
                file,
                file_len,
                footer,
                dynamic: None,
                size,
            });
        }
        _ => {}
    }
    let hoff = footer.data_offset;
    if hoff < 512 || hoff % 512 != 0 || hoff.saturating_add(DYN_HEADER_SIZE as u64) > file_len {
        return Err(file.corrupt(
            "VHD footer",
            format!("dynamic header offset {hoff} is not a sector inside the file"),
        ));
    }
    let mut hb = [0u8; DYN_HEADER_SIZE];
    file.read_exact_at(hoff, &mut hb, "VHD dynamic header")?;
    let header = DynHeader::parse(&hb).map_err(|e| file.corrupt("VHD dynamic header", e))?;
    let size = footer.disk_size();
    let covered = header.max_table_entries as u64 * header.block_size as u64;
    if covered < size {
        return Err(file.corrupt(
            "VHD dynamic header",
            format!(
                "its {} blocks of {} bytes do not cover the virtual size {size}",
                header.max_table_entries, header.block_size
            ),
        ));
    }
    let bat_end = header
        .table_offset
        .checked_add(header.max_table_entries as u64 * 4)
        .filter(|&e| e <= file_len);
    if bat_end.is_none() || header.table_offset < 512 {
        return Err(file.corrupt(
            "VHD dynamic header",
            format!(
                "the block allocation table ({} entries at offset {}) is not inside the file \
                 ({file_len} bytes)",
                header.max_table_entries, header.table_offset
            ),
        ));
    }
    Ok(Opened {
        file,
        file_len,
        footer,
        dynamic: Some(header),
        size,
    })
}

/// Ranges of the file a data block must not overlap: the footer copy, the dynamic header and
/// the BAT.
fn reserved_ranges(footer: &Footer, h: &DynHeader) -> [Range<u64>; 3] {
    let bat_len = round_up(h.max_table_entries as u64 * 4, SECTOR).unwrap_or(u64::MAX);
    [
        0..FOOTER_SIZE,
        footer.data_offset..footer.data_offset + DYN_HEADER_SIZE as u64,
        h.table_offset..h.table_offset.saturating_add(bat_len),
    ]
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Checks a BAT entry (`sector`) of block `index`; returns the block's file range
/// (bitmap and data).
fn block_range(
    file: &ImageFile,
    reserved: &[Range<u64>; 3],
    bitmap_size: u64,
    block_size: u64,
    file_len: u64,
    index: u64,
    sector: u32,
) -> Result<Range<u64>> {
    let start = sector as u64 * SECTOR;
    let r = start..start + bitmap_size + block_size;
    if r.end > file_len {
        return Err(file.corrupt(
            format!("VHD block allocation table entry {index}"),
            format!(
                "block at offset {start} ends at {} past the end of the file ({file_len} bytes)",
                r.end
            ),
        ));
    }
    if let Some(x) = reserved.iter().find(|x| overlaps(&r, x)) {
        return Err(file.corrupt(
            format!("VHD block allocation table entry {index}"),
            format!(
                "block at offset {start} overlaps the image's own structures at {}..{}",
                x.start, x.end
            ),
        ));
    }
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Reading

/// A fixed VHD: the raw disk followed by the footer.
struct FixedVolume {
    file: ImageFile,
    size: u64,
}

impl Volume for FixedVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        crate::volume::check_read(self.size, offset, buf.len(), || self.describe())?;
        self.file.read_exact_at(offset, buf, "VHD data")
    }

    fn next_data(&self, offset: u64, end: u64) -> Result<Option<Range<u64>>> {
        let end = end.min(self.size);
        Ok(self.file.next_data(offset, end)?.map(|(s, e)| s..e))
    }

    fn describe(&self) -> String {
        format!("VHD image {}", self.file.path().display())
    }
}

/// The BAT of a dynamic VHD, read on demand.
struct DynMap {
    size: u64,
    block_size: u64,
    bitmap_size: u64,
    bat_offset: u64,
    entries: u64,
    file_len: u64,
    reserved: [Range<u64>; 3],
}

impl Mapping for DynMap {
    fn unit_size(&self) -> u64 {
        self.block_size
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn lookup(&self, file: &ImageFile, first: u64, max: u64, out: &mut Vec<Unit>) -> Result<()> {
        let n = max.min(self.entries.saturating_sub(first));
        if n == 0 {
            return Err(file.corrupt(
                "VHD block allocation table",
                format!("block {first} is past its {} entries", self.entries),
            ));
        }
        let mut raw = vec![0u8; (n * 4) as usize];
        file.read_exact_at(
            self.bat_offset + first * 4,
            &mut raw,
            "VHD block allocation table",
        )?;
        for (i, e) in raw.chunks_exact(4).enumerate() {
            let sector = be_u32(e, 0);
            if sector == BAT_UNUSED {
                out.push(Unit::Zero);
                continue;
            }
            let r = block_range(
                file,
                &self.reserved,
                self.bitmap_size,
                self.block_size,
                self.file_len,
                first + i as u64,
                sector,
            )?;
            out.push(Unit::Sectors {
                host: r.start + self.bitmap_size,
                bitmap: r.start,
            });
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "VHD image"
    }
}

/// Opens a fixed or dynamic VHD read-only.
pub(crate) fn open(path: &Path) -> Result<Box<dyn Volume>> {
    let o = open_checked(ImageFile::open_ro(path)?)?;
    let Some(h) = o.dynamic else {
        return Ok(Box::new(FixedVolume {
            file: o.file,
            size: o.size,
        }));
    };
    let map = DynMap {
        size: o.size,
        block_size: h.block_size as u64,
        bitmap_size: h.bitmap_size(),
        bat_offset: h.table_offset,
        entries: h.max_table_entries as u64,
        file_len: o.file_len,
        reserved: reserved_ranges(&o.footer, &h),
    };
    Ok(Box::new(MappedVolume::new(o.file, map)))
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Virtual size of a VHD for a volume of `size` bytes: whole sectors.
pub(crate) fn image_size(path: &Path, size: u64) -> Result<u64> {
    match round_up(size, SECTOR) {
        Some(s) if s <= MAX_SIZE => Ok(s),
        _ => Err(Error::InvalidArgument(format!(
            "cannot make {} a VHD of {size} bytes: VHD images hold at most 2040 GiB \
             ({MAX_SIZE} bytes); use VHDX or qcow2",
            path.display()
        ))),
    }
}

/// A fixed VHD writer: writes go straight to the file; zeros are holes.
struct FixedWriter {
    file: ImageFile,
    size: u64,
}

impl FixedWriter {
    fn check(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::InvalidArgument(format!(
                "write of {len} bytes at offset {offset} is past the end of image {} ({} bytes)",
                self.file.path().display(),
                self.size
            )));
        }
        Ok(())
    }
}

impl ImageWriter for FixedWriter {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        if crate::volume::is_zero(data) {
            return self.file.zero(offset, data.len() as u64);
        }
        self.file.write_all_at(offset, data)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.file.zero(offset, len)
    }

    fn sync(&mut self) -> Result<()> {
        self.file.sync()
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.file.sync()
    }
}

/// Creates a fixed VHD: a sparse file of the virtual size followed by the footer.
pub(crate) fn create_fixed(path: &Path, size: u64) -> Result<Box<dyn ImageWriter>> {
    let size = image_size(path, size)?;
    let file = ImageFile::create_new(path)?;
    file.set_len(size + FOOTER_SIZE)?;
    file.write_all_at(size, &Footer::new(size, DISK_FIXED).encode())?;
    file.sync()?;
    Ok(Box::new(FixedWriter { file, size }))
}

/// The in-memory state of a dynamic VHD being written.
struct DynWriter {
    footer: [u8; 512],
    size: u64,
    block_size: u64,
    bitmap_size: u64,
    bat_offset: u64,
    bat: Vec<u32>,
    dirty: DirtyPages,
    /// Where the next block goes; the footer is written here at each flush.
    data_end: u64,
    /// Where the last flush wrote the footer.
    footer_at: u64,
    /// Bitmap offsets of blocks deallocated since the last flush.
    pending: Vec<u64>,
    /// Bitmap offsets of deallocated blocks whose unmapping is durable.
    free: Vec<u64>,
    /// Blocks known to have every bit of their sector bitmap set.
    full_bitmap: super::file::BitSet,
}

impl DynWriter {
    fn all_ones_bitmap(&self) -> Vec<u8> {
        vec![0xFF; self.bitmap_size as usize]
    }

    /// Makes every sector of an existing block "present": sectors whose bit is clear may hold
    /// anything but must read as zeros, so they are zeroed before the bitmap says otherwise.
    /// (Blocks written by volback and qemu always have a full bitmap.)
    fn fill_bitmap(&mut self, file: &ImageFile, unit: u64, start: u64) -> Result<()> {
        let mut bits = vec![0u8; self.bitmap_size as usize];
        file.read_exact_at(start, &mut bits, "VHD sector bitmap")?;
        let sectors = self.block_size / SECTOR;
        let bit = |s: u64| bits[(s / 8) as usize] & (0x80 >> (s % 8)) != 0;
        let mut changed = false;
        let mut s = 0;
        while s < sectors {
            if bit(s) {
                s += 1;
                continue;
            }
            let from = s;
            while s < sectors && !bit(s) {
                s += 1;
            }
            file.zero(
                start + self.bitmap_size + from * SECTOR,
                (s - from) * SECTOR,
            )?;
            changed = true;
        }
        if changed {
            file.sync()?;
            file.write_all_at(start, &self.all_ones_bitmap())?;
        }
        self.full_bitmap.set(unit);
        Ok(())
    }
}

impl UnitMap for DynWriter {
    fn unit_size(&self) -> u64 {
        self.block_size
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn lookup(&mut self, file: &ImageFile, unit: u64) -> Result<Option<u64>> {
        let Some(&e) = self.bat.get(unit as usize) else {
            return Ok(None);
        };
        if e == BAT_UNUSED {
            return Ok(None);
        }
        let start = e as u64 * SECTOR;
        if !self.full_bitmap.get(unit) {
            self.fill_bitmap(file, unit, start)?;
        }
        Ok(Some(start + self.bitmap_size))
    }

    fn allocate(&mut self, file: &ImageFile, unit: u64) -> Result<Alloc> {
        let (start, fresh) = match self.free.pop() {
            Some(s) => (s, false),
            None => (self.data_end, true),
        };
        let sector = u32::try_from(start / SECTOR)
            .ok()
            .filter(|&s| s != BAT_UNUSED)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "VHD image {} would grow past the 2 TiB a VHD can address",
                    file.path().display()
                ))
            })?;
        file.write_all_at(start, &self.all_ones_bitmap())?;
        if fresh {
            self.data_end = start + self.bitmap_size + self.block_size;
            // Extend now: the next data sync then covers the length too, so a BAT entry
            // written after it never points past the end of the file.
            file.set_len(self.data_end)?;
        }
        self.bat[unit as usize] = sector;
        self.dirty.mark(unit * 4, SECTOR);
        self.full_bitmap.set(unit);
        Ok(Alloc {
            host: start + self.bitmap_size,
            fresh,
        })
    }

    fn deallocate(&mut self, _file: &ImageFile, unit: u64) -> Result<Option<u64>> {
        let Some(e) = self.bat.get_mut(unit as usize) else {
            return Ok(None);
        };
        if *e == BAT_UNUSED {
            return Ok(None);
        }
        let start = *e as u64 * SECTOR;
        *e = BAT_UNUSED;
        self.dirty.mark(unit * 4, SECTOR);
        self.pending.push(start);
        Ok(Some(start + self.bitmap_size))
    }

    fn flush(&mut self, file: &ImageFile) -> Result<()> {
        if self.footer_at != self.data_end {
            file.write_all_at(self.data_end, &self.footer)?;
            self.footer_at = self.data_end;
        }
        self.dirty
            .write_back(file, self.bat_offset, SECTOR, &self.bat, u32::to_be_bytes)
    }

    fn durable(&mut self) {
        self.free.append(&mut self.pending);
    }

    fn wants_sync(&self) -> bool {
        self.pending.len() > 65536
    }
}

/// Creates a dynamic VHD with blocks of `options.block_size` (default 2 MiB).
pub(crate) fn create_dynamic(
    path: &Path,
    size: u64,
    options: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    let size = image_size(path, size)?;
    let block_size = options.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    if !block_size.is_power_of_two() || !(512..=(256 << 20)).contains(&block_size) {
        return Err(Error::InvalidArgument(format!(
            "VHD block size {block_size} is not a power of two between 512 bytes and 256 MiB \
             (Windows and qemu use 2 MiB)"
        )));
    }
    let entries = size.div_ceil(block_size);
    let footer = Footer::new(size, DISK_DYNAMIC).encode();
    let header = DynHeader {
        table_offset: BAT_OFFSET,
        max_table_entries: entries as u32,
        block_size: block_size as u32,
    };
    let bat_len = round_up(entries * 4, SECTOR).unwrap_or(0);
    let data_end = BAT_OFFSET + bat_len;
    let file = ImageFile::create_new(path)?;
    file.write_all_at(0, &footer)?;
    file.write_all_at(DYN_HEADER_OFFSET, &header.encode())?;
    file.write_all_at(BAT_OFFSET, &vec![0xFF; bat_len as usize])?;
    file.write_all_at(data_end, &footer)?;
    file.sync()?;
    let map = DynWriter {
        footer,
        size,
        block_size,
        bitmap_size: bitmap_size(block_size),
        bat_offset: BAT_OFFSET,
        bat: vec![BAT_UNUSED; entries as usize],
        dirty: DirtyPages::default(),
        data_end,
        footer_at: data_end,
        pending: Vec::new(),
        free: Vec::new(),
        full_bitmap: super::file::BitSet::new(entries),
    };
    Ok(Box::new(SparseWriter::new(file, map)))
}

/// Opens a VHD of the given kind for update.
pub(crate) fn open_for_update(
    path: &Path,
    size: u64,
    dynamic: bool,
) -> Result<Box<dyn ImageWriter>> {
    let expected = image_size(path, size)?;
    let o = open_checked(ImageFile::open_rw(path)?)?;
    let kind = |d: bool| if d { "dynamic" } else { "fixed" };
    if o.dynamic.is_some() != dynamic {
        return Err(Error::InvalidArgument(format!(
            "{} is a {} VHD, not a {} one",
            path.display(),
            kind(o.dynamic.is_some()),
            kind(dynamic)
        )));
    }
    if o.size != expected {
        return Err(Error::ImageSizeMismatch {
            path: path.to_path_buf(),
            found: o.size,
            expected,
        });
    }
    let Some(h) = o.dynamic.clone() else {
        if o.file_len != o.size + FOOTER_SIZE {
            return Err(o.file.corrupt(
                "VHD footer",
                format!(
                    "a fixed VHD of {} bytes should be {} bytes long, the file is {}",
                    o.size,
                    o.size + FOOTER_SIZE,
                    o.file_len
                ),
            ));
        }
        return Ok(Box::new(FixedWriter {
            file: o.file,
            size: o.size,
        }));
    };
    let entries = h.max_table_entries as u64;
    if entries > MAX_WRITER_BAT_ENTRIES {
        return Err(o.file.unsupported(format!(
            "its block allocation table has {entries} entries; volback updates VHDs of at \
             most {MAX_WRITER_BAT_ENTRIES}"
        )));
    }
    let block_size = h.block_size as u64;
    let bmp = h.bitmap_size();
    let mut raw = vec![0u8; (entries * 4) as usize];
    o.file
        .read_exact_at(h.table_offset, &mut raw, "VHD block allocation table")?;
    let bat: Vec<u32> = raw.chunks_exact(4).map(|c| be_u32(c, 0)).collect();
    let reserved = reserved_ranges(&o.footer, &h);
    // Every block inside the file, clear of the headers and of every other block.
    let mut blocks: Vec<(u64, u64)> = Vec::new();
    let mut data_end = reserved.iter().map(|r| r.end).max().unwrap_or(0);
    data_end = round_up(data_end, SECTOR).unwrap_or(data_end);
    for (i, &e) in bat.iter().enumerate() {
        if e != BAT_UNUSED {
            let r = block_range(&o.file, &reserved, bmp, block_size, o.file_len, i as u64, e)?;
            data_end = data_end.max(r.end);
            blocks.push((r.start, i as u64));
        }
    }
    blocks.sort_unstable();
    for w in blocks.windows(2) {
        if w[0].0 + bmp + block_size > w[1].0 {
            return Err(o.file.corrupt(
                "VHD block allocation table",
                format!("blocks {} and {} overlap", w[0].1, w[1].1),
            ));
        }
    }
    let footer: [u8; 512] = {
        let mut f = [0u8; 512];
        o.file.read_exact_at(0, &mut f, "VHD footer copy")?;
        if Footer::parse(&f).is_ok() {
            f
        } else {
            // The copy at offset 0 is damaged (the footer at the end was used): repair it,
            // qemu reads that one first.
            let f = o.footer.encode();
            o.file.write_all_at(0, &f)?;
            f
        }
    };
    // Anything past the last block is an unreferenced leftover (or the old footer): cut it
    // and put the footer right after the last block.
    o.file.set_len(data_end)?;
    o.file.write_all_at(data_end, &footer)?;
    o.file.sync()?;
    let map = DynWriter {
        footer,
        size: o.size,
        block_size,
        bitmap_size: bmp,
        bat_offset: h.table_offset,
        bat,
        dirty: DirtyPages::default(),
        data_end,
        footer_at: data_end,
        pending: Vec::new(),
        free: Vec::new(),
        full_bitmap: super::file::BitSet::new(entries),
    };
    Ok(Box::new(SparseWriter::new(o.file, map)))
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
        assert!(Footer::parse(&bad).unwrap_err().contains("checksum"));
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
                let sum = checksum(&b, 64);
                b[64..68].copy_from_slice(&sum.to_be_bytes());
            }
            if let Ok(f) = Footer::parse(&b) {
                let _ = f.disk_size();
            }
        }
    }
}
