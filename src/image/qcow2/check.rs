//! Validation of a qcow2 image against its file: the header's tables inside the file and
//! apart, L1 and L2 entries that point at clusters inside the file and clear of the header,
//! the L1 table and the refcount table.

use super::header::{Header, MAGIC, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use super::table::{L2, MAX_L1_BYTES, MAX_RT_BYTES, l1_entry, l2_entry};
use crate::bytes::be_u32;
use crate::error::Result;
use crate::image::file::{ImageFile, overlaps};
use std::ops::Range;

/// A qcow2 image opened and checked.
pub(super) struct Parsed {
    pub header: Header,
    pub file_len: u64,
    /// Ranges of the file holding the header, the L1 table and the refcount table.
    pub reserved: Vec<Range<u64>>,
}

pub(super) fn parse(file: &ImageFile) -> Result<Parsed> {
    let file_len = file.len()?;
    let mut first = [0u8; 24];
    let n = file.read_at_most(0, &mut first)?;
    if n < first.len() || &first[0..4] != MAGIC {
        return Err(file.corrupt(
            "qcow2 header",
            if n < first.len() {
                "the file is too short for a qcow2 header (truncated image)"
            } else {
                "no qcow2 magic"
            },
        ));
    }
    // The header and its extensions fill (part of) the first cluster.
    let bits = be_u32(&first, 20).clamp(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS);
    let mut cluster0 = vec![0u8; 1 << bits];
    let n = file.read_at_most(0, &mut cluster0)?;
    cluster0.truncate(n);
    let header = Header::parse(&cluster0).map_err(|e| file.rejected("qcow2 header", e))?;
    if let Some(why) = header.unsupported() {
        return Err(file.rejected("qcow2 header", why));
    }
    let cs = header.cluster_size();
    let corrupt = |d: String| file.corrupt("qcow2 header", d);
    let l1_needed = header.size.div_ceil(header.l2_coverage());
    if (header.l1_size as u64) < l1_needed {
        return Err(corrupt(format!(
            "the L1 table has {} entries but a disk of {} bytes needs {l1_needed}",
            header.l1_size, header.size
        )));
    }
    let l1_bytes = header.l1_size as u64 * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(corrupt(format!(
            "the L1 table of {} entries is larger than 32 MiB",
            header.l1_size
        )));
    }
    let l1 = header.l1_table_offset..header.l1_table_offset.saturating_add(l1_bytes);
    if header.l1_size > 0 && (l1.start % cs != 0 || l1.start < cs || l1.end > file_len) {
        return Err(corrupt(format!(
            "the L1 table ({l1_bytes} bytes at offset {}) is not a cluster-aligned range inside \
             the file ({file_len} bytes) after the header",
            l1.start
        )));
    }
    let rt_bytes = header.refcount_table_clusters as u64 * cs;
    let rt = header.refcount_table_offset..header.refcount_table_offset.saturating_add(rt_bytes);
    if rt_bytes > MAX_RT_BYTES
        || rt.start % cs != 0
        || rt.start < cs
        || rt.end > file_len
        || overlaps(&rt, &l1)
    {
        return Err(corrupt(format!(
            "the refcount table ({} clusters at offset {}) is not a cluster-aligned range of at \
             most 8 MiB inside the file, clear of the header and the L1 table",
            header.refcount_table_clusters, rt.start
        )));
    }
    Ok(Parsed {
        reserved: vec![0..cs, l1, rt],
        header,
        file_len,
    })
}

impl Parsed {
    /// Checks L1 entry `index`; returns the L2 table's offset (0: none).
    pub fn l2_offset(&self, file: &ImageFile, index: u64, e: u64) -> Result<u64> {
        let what = || format!("qcow2 L1 entry {index}");
        let Some(off) = l1_entry(e) else {
            return Err(file.corrupt(what(), format!("reserved bits are set ({e:#018x})")));
        };
        if off != 0 {
            self.check_cluster(file, off, self.header.cluster_size(), &what)?;
        }
        Ok(off)
    }

    /// Checks that a cluster at `off` (`len` bytes of it used) lies inside the file, aligned,
    /// clear of the header, L1 and refcount tables.
    fn check_cluster(
        &self,
        file: &ImageFile,
        off: u64,
        len: u64,
        what: &dyn Fn() -> String,
    ) -> Result<()> {
        let cs = self.header.cluster_size();
        if !off.is_multiple_of(cs) {
            return Err(file.corrupt(what(), format!("offset {off} is not cluster-aligned")));
        }
        file.check_placement(
            what,
            "cluster",
            off,
            (len, cs),
            self.file_len,
            &self.reserved,
        )
    }

    /// Decodes and checks the L2 entry `e` of virtual cluster `v`.
    pub fn l2(&self, file: &ImageFile, v: u64, e: u64) -> Result<L2> {
        let what = || format!("qcow2 L2 entry of virtual cluster {v}");
        let Some(l2) = l2_entry(e, self.header.version) else {
            return Err(file.corrupt(what(), format!("reserved bits are set ({e:#018x})")));
        };
        if let L2::Data(off) | L2::ZeroAllocated(off) = l2 {
            // Only the virtual part of the last cluster has to be in the file.
            let cs = self.header.cluster_size();
            let used = cs.min(self.header.size.saturating_sub(v * cs));
            self.check_cluster(file, off, used, &what)?;
        }
        Ok(l2)
    }
}
