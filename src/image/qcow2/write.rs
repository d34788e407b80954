//! Writing a qcow2 image: creating one, updating one in place (refcounts rebuilt from the
//! tables), allocating clusters, caching L2 tables, writing the refcounts at the end.

use super::check::parse;
use super::header::{
    AUTOCLEAR_BITMAPS, DEFAULT_CLUSTER_BITS, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_FEATURE_TABLE,
    Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_CLUSTER_BITS, MAX_SIZE, MIN_CLUSTER_BITS,
    REFCOUNT_ORDER, V3_HEADER_LEN, VERSION,
};
use super::table::{
    COPIED, ENTRY_SIZE, L2, MAX_L1_BYTES, MAX_RT_BYTES, OFFSET_MASK, ZERO_FLAG, refcount_block,
    set_refcount,
};
use crate::bytes::be_u64;
use crate::error::{Error, Result};
use crate::image::file::{
    BitSet, DirtyPages, ImageFile, check_virtual_size, power_of_two_in, round_up, whole_sectors,
};
use crate::image::sparse::{Alloc, MAX_PENDING, SparseWriter, UnitMap};
use crate::image::{CreateOptions, ImageWriter};
use std::collections::HashMap;
use std::path::Path;

/// Most file clusters volback tracks to write or update an image: one bit each in memory, so
/// at most 256 MiB for a file of 2^31 clusters (128 TiB with 64 KiB clusters); the bitmap
/// only grows as far as the file does.
const MAX_CLUSTERS: u64 = 1 << 31;
/// Memory for cached L2 tables while writing.
const L2_CACHE_BYTES: u64 = 16 << 20;

/// Virtual size of a qcow2 for a volume of `size` bytes: whole 512-byte sectors (qemu ignores
/// a partial last sector).
pub(crate) fn image_size(size: u64) -> Result<u64> {
    whole_sectors(size, MAX_SIZE)
        .ok_or_else(|| Error::InvalidArgument(format!("{size} bytes is too large for qcow2")))
}

struct CachedL2 {
    entries: Vec<u64>,
    dirty: bool,
    stamp: u64,
}

struct Qcow2Writer {
    header: Header,
    cs: u64,
    size: u64,
    l1: Vec<u64>,
    l1_dirty: DirtyPages,
    /// Refcount table entries (offsets of refcount blocks).
    rt: Vec<u64>,
    /// Clusters in use (referenced, or deallocated and not yet durable).
    used: BitSet,
    /// Clusters below this are inside the file; above it the file is empty.
    end: u64,
    /// File length set so far (grown in steps ahead of `end`).
    file_len: u64,
    /// Where the search for a free cluster resumes.
    cursor: u64,
    /// Clusters deallocated since the last flush.
    pending: Vec<u64>,
    cache: HashMap<u64, CachedL2>,
    cache_capacity: usize,
    clock: u64,
}

impl Qcow2Writer {
    fn l2_entries(&self) -> u64 {
        self.cs / 8
    }

    /// Takes a free cluster: a hole left by a deallocation whose unmapping is durable, or a new
    /// one at the end of the file.
    fn alloc_cluster(&mut self, file: &ImageFile) -> Result<(u64, bool)> {
        if let Some(c) = self.used.first_clear(self.cursor).filter(|&c| c < self.end) {
            self.used.set(c);
            self.cursor = c + 1;
            return Ok((c, false));
        }
        // No hole left: later searches start at the end (until something is freed).
        self.cursor = self.end;
        let c = self.end;
        if c >= MAX_CLUSTERS {
            return Err(Error::InvalidArgument(format!(
                "qcow2 image {} would exceed {MAX_CLUSTERS} clusters; use a larger cluster size",
                file.path().display()
            )));
        }
        self.end += 1;
        self.used.set(c);
        let need = self.end * self.cs;
        if need > self.file_len {
            // Grow the file in steps: an allocated cluster is always inside the file (qemu
            // checks that), without one ftruncate per cluster.
            let step = (8 << 20u64).max(self.cs);
            self.file_len = round_up(need, step).unwrap_or(need);
            file.set_len(self.file_len)?;
        }
        Ok((c, true))
    }

    /// The cached L2 table for L1 index `l1i`, loading it (and evicting another) if needed.
    fn table(&mut self, file: &ImageFile, l1i: u64) -> Result<&mut CachedL2> {
        self.clock += 1;
        if !self.cache.contains_key(&l1i) {
            if self.cache.len() >= self.cache_capacity {
                self.evict(file)?;
            }
            let off = self.l1[l1i as usize] & OFFSET_MASK;
            let entries =
                file.read_table(off, self.l2_entries(), "qcow2 L2 table", u64::from_be_bytes)?;
            self.cache.insert(
                l1i,
                CachedL2 {
                    entries,
                    dirty: false,
                    stamp: 0,
                },
            );
        }
        let clock = self.clock;
        let Some(t) = self.cache.get_mut(&l1i) else {
            return Err(Error::internal(
                "qcow2 writer",
                format!("the L2 table of L1 entry {l1i} is missing from the cache"),
            ));
        };
        t.stamp = clock;
        Ok(t)
    }

    /// Drops the least recently used table; a modified one is written first, after the data
    /// it points to is durable.
    fn evict(&mut self, file: &ImageFile) -> Result<()> {
        let Some((&victim, _)) = self.cache.iter().min_by_key(|(_, t)| t.stamp) else {
            return Ok(());
        };
        if let Some(t) = self.cache.remove(&victim)
            && t.dirty
        {
            file.sync()?;
            self.write_table(file, victim, &t.entries)?;
        }
        Ok(())
    }

    fn write_table(&self, file: &ImageFile, l1i: u64, entries: &[u64]) -> Result<()> {
        let off = self.l1[l1i as usize] & OFFSET_MASK;
        let raw: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        file.write_all_at(off, &raw)
    }

    fn set_incompatible(&mut self, file: &ImageFile, value: u64) -> Result<()> {
        self.header.incompatible = value;
        file.write_all_at(72, &value.to_be_bytes())
    }

    /// Writes refcount blocks for every cluster from `used`, growing or moving the refcount
    /// table if the file outgrew it.
    fn write_refcounts(&mut self, file: &ImageFile) -> Result<()> {
        let cs = self.cs;
        let bits = 1u64 << self.header.refcount_order;
        let per_block = cs * 8 / bits;
        let mut released = Vec::new();
        loop {
            let n = self.used.end();
            let blocks = n.div_ceil(per_block);
            let need = (blocks * 8).div_ceil(cs).max(1);
            if need > self.header.refcount_table_clusters as u64 {
                // A larger table at the end of the file, with room to grow.
                let clusters = need + need / 4 + 1;
                if clusters * cs > MAX_RT_BYTES {
                    return Err(Error::InvalidArgument(format!(
                        "qcow2 image {} needs a refcount table larger than 8 MiB; use a larger \
                         cluster size",
                        file.path().display()
                    )));
                }
                let old = self.header.refcount_table_offset / cs;
                released.extend(old..old + self.header.refcount_table_clusters as u64);
                let start = self.end;
                for c in start..start + clusters {
                    self.used.set(c);
                }
                self.end += clusters;
                self.header.refcount_table_offset = start * cs;
                self.header.refcount_table_clusters = clusters as u32;
                self.rt.resize((clusters * cs / 8) as usize, 0);
                continue;
            }
            let mut added = false;
            for i in 0..blocks {
                if self.rt[i as usize] == 0 && self.used.any_in(i * per_block, (i + 1) * per_block)
                {
                    // New blocks go at the end, never into a hole, so that what `used` says
                    // about the holes stays true while the loop runs.
                    let c = self.end;
                    self.end += 1;
                    self.used.set(c);
                    self.rt[i as usize] = c * cs;
                    added = true;
                }
            }
            if !added {
                break;
            }
        }
        for c in released {
            self.used.clear(c);
        }
        let file_end = self.used.end() * cs;
        file.set_len(file_end)?;
        self.file_len = file_end;
        let mut block = vec![0u8; cs as usize];
        for (i, &off) in self.rt.iter().enumerate() {
            if off == 0 {
                continue;
            }
            block.fill(0);
            let first = i as u64 * per_block;
            for j in 0..per_block {
                if self.used.get(first + j) {
                    set_refcount(&mut block, bits, j, 1);
                }
            }
            file.write_all_at(off, &block)?;
        }
        let raw: Vec<u8> = self.rt.iter().flat_map(|e| e.to_be_bytes()).collect();
        file.write_all_at(self.header.refcount_table_offset, &raw)?;
        file.sync()?;
        let mut fields = [0u8; 12];
        fields[0..8].copy_from_slice(&self.header.refcount_table_offset.to_be_bytes());
        fields[8..12].copy_from_slice(&self.header.refcount_table_clusters.to_be_bytes());
        file.write_all_at(48, &fields)
    }
}

impl UnitMap for Qcow2Writer {
    fn unit_size(&self) -> u64 {
        self.cs
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn lookup(&mut self, file: &ImageFile, unit: u64) -> Result<Option<u64>> {
        let l2e = self.l2_entries();
        let l1i = unit / l2e;
        if self.l1[l1i as usize] & OFFSET_MASK == 0 {
            return Ok(None);
        }
        let e = self.table(file, l1i)?.entries[(unit % l2e) as usize];
        if e & ZERO_FLAG != 0 {
            return Ok(None);
        }
        let off = e & OFFSET_MASK;
        Ok((off != 0).then_some(off))
    }

    fn allocate(&mut self, file: &ImageFile, unit: u64) -> Result<Alloc> {
        let l2e = self.l2_entries();
        let l1i = unit / l2e;
        if self.l1[l1i as usize] & OFFSET_MASK == 0 {
            let (c, _) = self.alloc_cluster(file)?;
            self.l1[l1i as usize] = (c * self.cs) | COPIED;
            self.l1_dirty.mark(l1i * 8, 4096);
            if self.cache.len() >= self.cache_capacity {
                self.evict(file)?;
            }
            self.cache.insert(
                l1i,
                CachedL2 {
                    entries: vec![0; l2e as usize],
                    dirty: true,
                    stamp: self.clock,
                },
            );
        }
        let (c, fresh) = self.alloc_cluster(file)?;
        let host = c * self.cs;
        let t = self.table(file, l1i)?;
        let old = t.entries[(unit % l2e) as usize];
        t.entries[(unit % l2e) as usize] = host | COPIED;
        t.dirty = true;
        // A "zero" cluster that kept its allocation: its old cluster is free now.
        let old_off = old & OFFSET_MASK;
        if old_off != 0 {
            self.pending.push(old_off / self.cs);
        }
        Ok(Alloc { host, fresh })
    }

    fn deallocate(&mut self, file: &ImageFile, unit: u64) -> Result<Option<u64>> {
        let l2e = self.l2_entries();
        let l1i = unit / l2e;
        if self.l1[l1i as usize] & OFFSET_MASK == 0 {
            return Ok(None);
        }
        let t = self.table(file, l1i)?;
        let e = t.entries[(unit % l2e) as usize];
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        t.entries[(unit % l2e) as usize] = 0;
        t.dirty = true;
        self.pending.push(off / self.cs);
        Ok((e & ZERO_FLAG == 0).then_some(off))
    }

    fn flush(&mut self, file: &ImageFile) -> Result<()> {
        let mut dirty: Vec<u64> = self
            .cache
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&k, _)| k)
            .collect();
        dirty.sort_unstable();
        for l1i in dirty {
            if let Some(t) = self.cache.get(&l1i) {
                self.write_table(file, l1i, &t.entries)?;
            }
            if let Some(t) = self.cache.get_mut(&l1i) {
                t.dirty = false;
            }
        }
        if !self.l1_dirty.is_empty() {
            // New L2 tables are durable before the L1 entries that point at them.
            file.sync()?;
            let offset = self.header.l1_table_offset;
            self.l1_dirty
                .write_back(file, offset, 4096, &self.l1, u64::to_be_bytes)?;
        }
        Ok(())
    }

    fn durable(&mut self) {
        for c in self.pending.drain(..) {
            self.used.clear(c);
            self.cursor = self.cursor.min(c);
        }
    }

    fn finish(&mut self, file: &ImageFile) -> Result<()> {
        self.write_refcounts(file)?;
        file.sync()?;
        let clean = self.header.incompatible & !INCOMPAT_DIRTY;
        self.set_incompatible(file, clean)
    }

    fn wants_sync(&self) -> bool {
        self.pending.len() > MAX_PENDING
    }
}

fn cache_capacity(cs: u64) -> usize {
    (L2_CACHE_BYTES / cs).max(4) as usize
}

/// Creates a qcow2 (version 3) image with clusters of `options.block_size` (default 64 KiB).
pub(crate) fn create(
    path: &Path,
    size: u64,
    options: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    let size = image_size(size)?;
    let cs = options.block_size.unwrap_or(1 << DEFAULT_CLUSTER_BITS);
    if !power_of_two_in(cs, (1 << MIN_CLUSTER_BITS)..=(1 << MAX_CLUSTER_BITS)) {
        return Err(Error::InvalidArgument(format!(
            "qcow2 cluster size {cs} is not a power of two from 512 bytes to 2 MiB"
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    let l2e = cs / 8;
    let l1_size = size.div_ceil(cs * l2e);
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    // The most clusters the file can need: every data cluster, every L2 table, and the
    // refcount blocks for all of them.
    let data = size.div_ceil(cs) + l1_size + 1 + l1_clusters;
    let per_block = cs * 8 / 16;
    let est = data + data.div_ceil(per_block) + 16;
    let rt_clusters = (est.div_ceil(per_block) * 8).div_ceil(cs).max(1);
    if l1_size * 8 > MAX_L1_BYTES || rt_clusters * cs > MAX_RT_BYTES || est > MAX_CLUSTERS {
        return Err(Error::InvalidArgument(format!(
            "a qcow2 image of {size} bytes needs larger clusters than {cs} bytes"
        )));
    }
    let header = Header {
        version: VERSION,
        backing_file_offset: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: (1 + rt_clusters) * cs,
        refcount_table_offset: cs,
        refcount_table_clusters: rt_clusters as u32,
        nb_snapshots: 0,
        // Dirty until `finish` has written the refcounts.
        incompatible: INCOMPAT_DIRTY,
        compatible: 0,
        autoclear: 0,
        refcount_order: REFCOUNT_ORDER,
        header_length: V3_HEADER_LEN,
        extensions: Vec::new(),
    };
    let end = 1 + rt_clusters + l1_clusters;
    let file = ImageFile::create_new(path)?;
    file.write_all_at(0, &header.encode())?;
    file.set_len(end * cs)?;
    file.sync()?;
    let mut used = BitSet::new(end);
    for c in 0..end {
        used.set(c);
    }
    let map = Qcow2Writer {
        header,
        cs,
        size,
        l1: vec![0; l1_size as usize],
        l1_dirty: DirtyPages::default(),
        rt: vec![0; (rt_clusters * cs / 8) as usize],
        used,
        end,
        file_len: end * cs,
        cursor: end,
        pending: Vec::new(),
        cache: HashMap::new(),
        cache_capacity: cache_capacity(cs),
        clock: 0,
    };
    Ok(Box::new(SparseWriter::new(file, map)))
}

/// Opens a qcow2 image for update. The refcounts are rebuilt from the L1 and L2 tables (the
/// image may be dirty after an interrupted run) and written again by `finish`.
pub(crate) fn open_for_update(path: &Path, size: u64) -> Result<Box<dyn ImageWriter>> {
    let expected = image_size(size)?;
    let file = ImageFile::open_rw(path)?;
    let p = parse(&file)?;
    let h = p.header.clone();
    check_virtual_size(path, h.size, expected)?;
    let refuse = |why: &str| Err(file.unsupported(format!("{why}; volback cannot update it")));
    if h.version < 3 {
        return refuse(
            "it is a version 2 (compat=0.10) image (upgrade it with \
             `qemu-img amend -o compat=1.1`)",
        );
    }
    if h.nb_snapshots > 0 {
        return refuse("it has internal snapshots");
    }
    if h.incompatible & INCOMPAT_CORRUPT != 0 {
        return refuse("qemu marked it corrupt (repair it with `qemu-img check -r all`)");
    }
    if h.autoclear & AUTOCLEAR_BITMAPS != 0 || h.extensions.contains(&EXT_BITMAPS) {
        return refuse("it has persistent dirty bitmaps");
    }
    if let Some(t) = h
        .extensions
        .iter()
        .find(|&&t| t != EXT_FEATURE_TABLE && t != EXT_BACKING_FORMAT)
    {
        return refuse(&format!(
            "it has a header extension {t:#010x} volback does not know"
        ));
    }
    let cs = h.cluster_size();
    let clusters = p.file_len.div_ceil(cs);
    if clusters > MAX_CLUSTERS {
        return refuse(&format!("it has more than {MAX_CLUSTERS} clusters"));
    }
    // Dirty first: from here on the refcounts on disk may be stale.
    let mut header = h.clone();
    header.incompatible |= INCOMPAT_DIRTY;
    header.autoclear = 0;
    file.write_all_at(72, &header.incompatible.to_be_bytes())?;
    file.write_all_at(88, &0u64.to_be_bytes())?;
    file.sync()?;

    let mut used = BitSet::new(clusters);
    let mark = |used: &mut BitSet, c: u64, what: &dyn Fn() -> String| -> Result<()> {
        if c >= clusters {
            return Err(file.corrupt(what(), format!("cluster {c} is past the end of the file")));
        }
        if used.set(c) {
            return Err(file.corrupt(
                what(),
                format!("cluster {c} is used twice (the image's tables overlap)"),
            ));
        }
        Ok(())
    };
    mark(&mut used, 0, &|| "qcow2 header".into())?;
    let rt_first = h.refcount_table_offset / cs;
    for c in rt_first..rt_first + h.refcount_table_clusters as u64 {
        mark(&mut used, c, &|| "qcow2 refcount table".into())?;
    }
    let l1_first = h.l1_table_offset / cs;
    let l1_clusters = (h.l1_size as u64 * 8).div_ceil(cs);
    for c in l1_first..l1_first + l1_clusters {
        mark(&mut used, c, &|| "qcow2 L1 table".into())?;
    }
    let mut l1 = file.read_table(
        h.l1_table_offset,
        h.l1_size as u64,
        "qcow2 L1 table",
        u64::from_be_bytes,
    )?;
    let mut l1_dirty = DirtyPages::default();
    let l2e = cs / 8;
    let mut table = vec![0u8; cs as usize];
    for (i, l1e) in l1.iter_mut().enumerate() {
        let off = p.l2_offset(&file, i as u64, *l1e)?;
        if off == 0 {
            continue;
        }
        mark(&mut used, off / cs, &|| format!("qcow2 L1 entry {i}"))?;
        if *l1e & COPIED == 0 {
            *l1e |= COPIED;
            l1_dirty.mark(i as u64 * 8, 4096);
        }
        file.read_exact_at(off, &mut table, "qcow2 L2 table")?;
        let mut fixed = false;
        for j in 0..l2e {
            let at = (j * 8) as usize;
            let e = be_u64(&table, at);
            let v = i as u64 * l2e + j;
            match p.l2(&file, v, e)? {
                L2::Compressed => {
                    return refuse("it has compressed clusters");
                }
                L2::Zero => {}
                L2::Data(o) | L2::ZeroAllocated(o) => {
                    mark(&mut used, o / cs, &|| {
                        format!("qcow2 L2 entry of virtual cluster {v}")
                    })?;
                    if e & COPIED == 0 {
                        table[at..at + 8].copy_from_slice(&(e | COPIED).to_be_bytes());
                        fixed = true;
                    }
                }
            }
        }
        if fixed {
            // Every cluster has exactly one reference now: say so, as qemu expects.
            file.write_all_at(off, &table)?;
        }
    }
    // Refcount blocks the table lists keep their place when they are sound.
    let mut rt = file.read_table(
        h.refcount_table_offset,
        h.refcount_table_clusters as u64 * cs / ENTRY_SIZE,
        "qcow2 refcount table",
        u64::from_be_bytes,
    )?;
    for e in rt.iter_mut() {
        match refcount_block(*e, cs).filter(|&off| off / cs < clusters && !used.get(off / cs)) {
            Some(off) => {
                used.set(off / cs);
            }
            None => *e = 0,
        }
    }
    let end = used.end();
    file.set_len(end * cs)?;
    file.sync()?;
    let map = Qcow2Writer {
        header,
        cs,
        size: h.size,
        l1,
        l1_dirty,
        rt,
        used,
        end,
        file_len: end * cs,
        cursor: 0,
        pending: Vec::new(),
        cache: HashMap::new(),
        cache_capacity: cache_capacity(cs),
        clock: 0,
    };
    Ok(Box::new(SparseWriter::new(file, map)))
}
