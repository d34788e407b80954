//! Reading a qcow2 image through its L1 and L2 tables.

use super::check::{Parsed, parse};
use super::table::{ENTRY_SIZE, L2};
use crate::bytes::be_u64;
use crate::error::Result;
use crate::image::file::ImageFile;
use crate::image::mapped::{MappedVolume, Mapping, Unit};
use crate::volume::Volume;
use std::path::Path;

struct Qcow2Map {
    p: Parsed,
    size: u64,
}

impl Mapping for Qcow2Map {
    fn unit_size(&self) -> u64 {
        self.p.header.cluster_size()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn lookup(&self, file: &ImageFile, first: u64, max: u64, out: &mut Vec<Unit>) -> Result<()> {
        let cs = self.p.header.cluster_size();
        let l2e = cs / ENTRY_SIZE;
        let clusters = self.size.div_ceil(cs);
        let n = max
            .min(l2e - first % l2e)
            .min(clusters.saturating_sub(first));
        let l1i = first / l2e;
        if n == 0 || l1i >= self.p.header.l1_size as u64 {
            return Err(file.corrupt(
                "qcow2 L1 table",
                format!("virtual cluster {first} is past its end"),
            ));
        }
        let mut e = [0u8; 8];
        file.read_exact_at(
            self.p.header.l1_table_offset + l1i * ENTRY_SIZE,
            &mut e,
            "qcow2 L1 table",
        )?;
        let l2 = self.p.l2_offset(file, l1i, u64::from_be_bytes(e))?;
        if l2 == 0 {
            out.extend(std::iter::repeat_n(Unit::Zero, n as usize));
            return Ok(());
        }
        let mut raw = vec![0u8; (n * ENTRY_SIZE) as usize];
        file.read_exact_at(l2 + (first % l2e) * ENTRY_SIZE, &mut raw, "qcow2 L2 table")?;
        for (i, c) in raw.chunks_exact(8).enumerate() {
            let v = first + i as u64;
            out.push(match self.p.l2(file, v, be_u64(c, 0))? {
                L2::Zero | L2::ZeroAllocated(_) => Unit::Zero,
                L2::Data(off) => Unit::Data(off),
                L2::Compressed => Unit::Unsupported("a compressed cluster"),
            });
        }
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "qcow2 image"
    }
}

/// Opens a qcow2 image read-only.
pub(crate) fn open(path: &Path) -> Result<Box<dyn Volume>> {
    let file = ImageFile::open_ro(path)?;
    let p = parse(&file)?;
    // qemu sees whole sectors only.
    let size = p.header.size / 512 * 512;
    Ok(Box::new(MappedVolume::new(file, Qcow2Map { p, size })))
}
