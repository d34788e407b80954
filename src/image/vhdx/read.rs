//! Reading a VHDX through its BAT.

use super::bat::ENTRY_SIZE;
use super::check::{Bounds, parse};
use crate::bytes::le_u64;
use crate::error::Result;
use crate::image::file::ImageFile;
use crate::image::mapped::{MappedVolume, Mapping, Unit};
use crate::volume::Volume;
use std::path::Path;

struct VhdxMap {
    bat_offset: u64,
    bounds: Bounds,
}

impl Mapping for VhdxMap {
    fn unit_size(&self) -> u64 {
        self.bounds.geo.block_size
    }

    fn size(&self) -> u64 {
        self.bounds.geo.size
    }

    fn lookup(&self, file: &ImageFile, first: u64, max: u64, out: &mut Vec<Unit>) -> Result<()> {
        let geo = &self.bounds.geo;
        let n = max.min(geo.payload_blocks.saturating_sub(first));
        if n == 0 {
            return Err(file.corrupt("VHDX BAT", format!("block {first} is past the last block")));
        }
        let i0 = geo.index(first);
        let i1 = geo.index(first + n - 1);
        let mut raw = vec![0u8; ((i1 - i0 + 1) * ENTRY_SIZE) as usize];
        file.read_exact_at(self.bat_offset + i0 * ENTRY_SIZE, &mut raw, "VHDX BAT")?;
        for b in first..first + n {
            let at = ((geo.index(b) - i0) * ENTRY_SIZE) as usize;
            out.push(match self.bounds.payload(file, b, le_u64(&raw, at))? {
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
        bat_offset: p.bat_offset,
        bounds: p.bounds,
    };
    Ok(Box::new(MappedVolume::new(file, map)))
}
