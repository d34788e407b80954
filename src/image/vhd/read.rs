//! Reading a VHD: a fixed one is the file itself, a dynamic one goes through its BAT.

use super::check::{BlockBounds, open_checked};
use super::footer::BAT_UNUSED;
use crate::error::Result;
use crate::image::file::ImageFile;
use crate::image::mapped::{MappedVolume, Mapping, Unit};
use crate::volume::Volume;
use std::ops::Range;
use std::path::Path;

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
    bat_offset: u64,
    entries: u64,
    bounds: BlockBounds,
}

impl Mapping for DynMap {
    fn unit_size(&self) -> u64 {
        self.bounds.block_size
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
        let bat = file.read_table(
            self.bat_offset + first * 4,
            n,
            "VHD block allocation table",
            u32::from_be_bytes,
        )?;
        for (i, sector) in bat.into_iter().enumerate() {
            if sector == BAT_UNUSED {
                out.push(Unit::Zero);
                continue;
            }
            let r = self.bounds.block_range(file, first + i as u64, sector)?;
            out.push(Unit::Sectors {
                host: r.start + self.bounds.bitmap_size,
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
    let Some(h) = &o.dynamic else {
        return Ok(Box::new(FixedVolume {
            file: o.file,
            size: o.size,
        }));
    };
    let map = DynMap {
        size: o.size,
        bat_offset: h.table_offset,
        entries: h.max_table_entries as u64,
        bounds: BlockBounds::new(&o, h),
    };
    Ok(Box::new(MappedVolume::new(o.file, map)))
}
