//! Validation of a VHD against its file: which footer counts, the dynamic header and the
//! BAT inside the file, blocks clear of the image's own structures.

use super::footer::{
    COOKIE, DISK_DIFFERENCING, DISK_FIXED, DISK_TYPE_AT, DYN_HEADER_SIZE, DynHeader, FOOTER_SIZE,
    Footer, SECTOR,
};
use crate::bytes::be_u32;
use crate::error::Result;
use crate::image::file::{ImageFile, round_up};
use std::ops::Range;

/// A VHD opened and checked: its footer, and for a dynamic disk its header.
pub(super) struct Opened {
    pub file: ImageFile,
    pub file_len: u64,
    pub footer: Footer,
    pub dynamic: Option<DynHeader>,
    pub size: u64,
}

pub(super) fn open_checked(file: ImageFile) -> Result<Opened> {
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
    let footer = if &head[0..8] == COOKIE && be_u32(&head, DISK_TYPE_AT) != DISK_FIXED {
        match Footer::parse(&head) {
            Ok(f) => f,
            Err(e) => {
                Footer::parse(&tail).map_err(|_| file.rejected("VHD footer copy at offset 0", e))?
            }
        }
    } else {
        Footer::parse(&tail).map_err(|e| file.rejected("VHD footer", e))?
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
    let header = DynHeader::parse(&hb).map_err(|e| file.rejected("VHD dynamic header", e))?;
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
pub(super) fn reserved_ranges(footer: &Footer, h: &DynHeader) -> [Range<u64>; 3] {
    let bat_len = round_up(h.max_table_entries as u64 * 4, SECTOR).unwrap_or(u64::MAX);
    [
        0..FOOTER_SIZE,
        footer.data_offset..footer.data_offset + DYN_HEADER_SIZE as u64,
        h.table_offset..h.table_offset.saturating_add(bat_len),
    ]
}

/// Where the blocks of a dynamic VHD may be: the checks every BAT entry passes.
pub(super) struct BlockBounds {
    pub bitmap_size: u64,
    pub block_size: u64,
    pub file_len: u64,
    pub reserved: [Range<u64>; 3],
}

impl BlockBounds {
    pub fn new(o: &Opened, h: &DynHeader) -> BlockBounds {
        BlockBounds {
            bitmap_size: h.bitmap_size(),
            block_size: h.block_size as u64,
            file_len: o.file_len,
            reserved: reserved_ranges(&o.footer, h),
        }
    }

    /// Checks a BAT entry (`sector`) of block `index`; returns the block's file range
    /// (bitmap and data).
    pub fn block_range(&self, file: &ImageFile, index: u64, sector: u32) -> Result<Range<u64>> {
        let start = sector as u64 * SECTOR;
        let len = self.bitmap_size + self.block_size;
        file.check_placement(
            || format!("VHD block allocation table entry {index}"),
            "block",
            start,
            (len, len),
            self.file_len,
            &self.reserved,
        )?;
        Ok(start..start + len)
    }
}
