//! The allocation map of a whole volume: a single filesystem, or a partitioned disk whose map
//! is composed from its parts.
//!
//! For a partitioned disk (MBR with extended and logical partitions, or GPT):
//! - every byte outside the data partitions is kept: the partition table sectors, the EBRs
//!   of an extended partition, the GPT entry arrays and backup header, and every gap between
//!   or after partitions (boot loaders such as GRUB's core image live in the gap before the
//!   first partition);
//! - each data partition contributes its own filesystem's map, moved to its offset; a
//!   partition without a recognised filesystem, or whose allocation data is unusable, is kept
//!   whole (with a warning naming the partition and why).
//!
//! Overlapping partitions (a damaged table) only make the map larger: a block is unused only
//! when nothing claims it.
//!
//! Change tracking ([`unchanged_volume`]) composes the same way: each partition's unchanged
//! blocks, moved to its offset; never for overlapping partitions or partitions not aligned to
//! the block size.

use super::{self as disk_probe, MbrRole, ProbeOptions, Slice};
use crate::error::Result;
use crate::fs::disk::{DiskLayout, PartitionLayout, VolumeMap};
use crate::fs::{BlockMap, Unchanged, probe, unchanged_blocks};
use crate::volume::Volume;

/// The largest power of two dividing `x`, at least 4 KiB and at most `cap`.
fn alignment(x: u64, cap: u64) -> u64 {
    let a = if x == 0 {
        cap
    } else {
        1u64 << x.trailing_zeros()
    };
    a.clamp(4096.min(cap), cap)
}

/// The partition table of `vol` (and what is wrong with it), without probing filesystems.
fn table_probe(vol: &dyn Volume, sector_size: u32) -> Result<disk_probe::ProbeReport> {
    disk_probe::probe(
        vol,
        sector_size,
        sector_size,
        &ProbeOptions { filesystems: false },
    )
}

/// Probes `vol` (logical sectors of `sector_size` bytes) and builds its allocation map at
/// `granularity` bytes per bit.
pub fn map_volume(vol: &dyn Volume, sector_size: u32, granularity: u64) -> Result<VolumeMap> {
    let report = table_probe(vol, sector_size)?;
    let Some(table) = report.partition_table else {
        let p = probe(vol, granularity)?;
        return Ok(VolumeMap {
            fs: p.fs,
            layout: None,
            map: p.map,
            warnings: p.warning.into_iter().collect(),
        });
    };

    let size = vol.size();
    let mut map = BlockMap::new(size, granularity);
    let mut warnings = report.warnings;
    // Start from "everything outside the data partitions is used".
    let mut data: Vec<(u64, u64)> = table
        .partitions
        .iter()
        .filter(|p| p.role != Some(MbrRole::Extended) && p.size > 0 && p.start < size)
        .map(|p| (p.start, p.start.saturating_add(p.size).min(size)))
        .collect();
    data.sort_unstable();
    let mut pos = 0u64;
    for &(start, end) in &data {
        if start > pos {
            map.mark_bytes(pos, start - pos);
        }
        pos = pos.max(end);
    }
    if pos < size {
        map.mark_bytes(pos, size - pos);
    }

    let mut partitions = Vec::with_capacity(table.partitions.len());
    for p in &table.partitions {
        let extended = p.role == Some(MbrRole::Extended);
        let mut layout = PartitionLayout {
            number: p.number,
            start: p.start,
            size: p.size,
            type_id: p.type_id.clone(),
            role: p.role.map(|r| {
                match r {
                    MbrRole::Primary => "primary",
                    MbrRole::Extended => "extended",
                    MbrRole::Logical => "logical",
                }
                .to_string()
            }),
            name: p.name.clone(),
            uuid: p.uuid.clone(),
            filesystem: None,
            all_blocks: false,
        };
        if !extended && p.size > 0 && p.start < size {
            let slice = Slice::new(vol, p.start, p.size);
            let g = alignment(p.start, granularity);
            let part = probe(&slice, g)?;
            layout.filesystem = part.fs.clone();
            match part.map {
                Some(pm) => {
                    for run in pm.used_runs() {
                        let from = p.start + run.start * g;
                        let len = (run.end - run.start) * g;
                        map.mark_bytes(from, len.min(slice.size().saturating_sub(run.start * g)));
                    }
                }
                None => {
                    layout.all_blocks = true;
                    map.mark_bytes(p.start, slice.size());
                    warnings.push(match (part.warning, &part.fs) {
                        (Some(w), _) => format!("partition {}: {w}", p.number),
                        (None, Some(fs)) => format!(
                            "partition {}: no allocation map for {}; reading every block",
                            p.number, fs.fs_type
                        ),
                        (None, None) => format!(
                            "partition {}: no recognised filesystem; reading every block",
                            p.number
                        ),
                    });
                }
            }
        }
        partitions.push(layout);
    }
    Ok(VolumeMap {
        fs: None,
        layout: Some(DiskLayout {
            table: table.kind.name().to_string(),
            id: table.id,
            sector_size: table.sector_size,
            partitions,
        }),
        map: Some(map),
        warnings,
    })
}

/// Change tracking for a whole volume (a filesystem or a partitioned disk) against
/// `earlier`, the same volume as a parent snapshot or copy holds it: the blocks known to be
/// unchanged, at `granularity` bytes.
pub fn unchanged_volume(
    vol: &dyn Volume,
    earlier: &dyn Volume,
    sector_size: u32,
    granularity: u64,
) -> Result<Unchanged> {
    let size = vol.size();
    if earlier.size() != size {
        return Ok(Unchanged::default());
    }
    let report = table_probe(vol, sector_size)?;
    let Some(table) = report.partition_table else {
        return unchanged_blocks(vol, earlier, granularity);
    };
    let mut parts: Vec<(u64, u64, u32)> = table
        .partitions
        .iter()
        .filter(|p| p.role != Some(MbrRole::Extended) && p.size > 0 && p.start < size)
        .map(|p| (p.start, p.start.saturating_add(p.size).min(size), p.number))
        .collect();
    parts.sort_unstable();
    if parts.windows(2).any(|w| w[0].1 > w[1].0) {
        return Ok(Unchanged {
            map: None,
            note: Some("overlapping partitions: no change tracking".into()),
        });
    }
    let mut known = BlockMap::new(size, granularity);
    let mut any = false;
    let mut notes = Vec::new();
    for (start, end, number) in parts {
        if !start.is_multiple_of(granularity) {
            continue;
        }
        let cur = Slice::new(vol, start, end - start);
        let old = Slice::new(earlier, start, end - start);
        let u = unchanged_blocks(&cur, &old, granularity)?;
        if let Some(note) = u.note {
            notes.push(format!("partition {number}: {note}"));
        }
        if let Some(pm) = u.map {
            any = true;
            for run in pm.used_runs() {
                known.mark_bytes(
                    start + run.start * granularity,
                    (run.end - run.start) * granularity,
                );
            }
        }
    }
    Ok(Unchanged {
        map: any.then_some(known),
        note: (!notes.is_empty()).then(|| notes.join("; ")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_a_clamped_power_of_two() {
        assert_eq!(alignment(1 << 20, 256 << 10), 256 << 10);
        assert_eq!(alignment(63 * 512, 256 << 10), 4096);
        assert_eq!(alignment(0, 256 << 10), 256 << 10);
        assert_eq!(alignment(3 * 65536, 256 << 10), 65536);
        assert_eq!(alignment(1 << 20, 1024), 1024);
    }
}
