//! The prune plan: from the live set and the index, which packs to delete and which to repack.
//!
//! Pure: no I/O. A frame is dead when none of its blobs is live: all its bytes are dead. In a
//! frame with live blobs, the dead blobs' share of the frame's stored bytes (by raw length)
//! counts as dead too, since a repack copies only live blobs. A pack without live blobs is
//! condemned. Packs with dead bytes are repacked, most dead first (by dead fraction, then
//! by dead bytes), while the dead bytes left in the repository exceed `max_unused_percent`
//! of its pack bytes; a pack whose live bytes would take the bytes repacked past
//! `max_repack` is passed over (a smaller one may still fit).

use crate::hash::ChunkId;
use crate::repo::blob::BlobEntry;
use crate::repo::format::{BLOB_ENTRY_LEN, PACK_HEADER_LEN, PACK_TRAILER_LEN};
use std::collections::{BTreeMap, HashSet};

/// Limits of a plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanLimits {
    /// Dead bytes tolerated after the prune, as a percentage of all pack bytes (0 ..= 100).
    pub max_unused_percent: f64,
    /// Most live bytes copied by repacking.
    pub max_repack: u64,
}

impl Default for PlanLimits {
    fn default() -> Self {
        PlanLimits {
            max_unused_percent: 5.0,
            max_repack: u64::MAX,
        }
    }
}

/// Live and dead bytes of one pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackUsage {
    pub pack: ChunkId,
    /// Bytes of the pack file (header, frames, table, trailer).
    pub size: u64,
    /// Bytes of frames holding at least one live blob.
    pub live_bytes: u64,
    /// Everything else: dead frames, and the table entries of their blobs.
    pub dead_bytes: u64,
    pub live_blobs: u64,
    pub dead_blobs: u64,
}

/// What a prune does to the packs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Packs holding no live blob: deleted.
    pub condemn: Vec<ChunkId>,
    /// Packs whose live frames are copied into new packs, then deleted; most dead first.
    pub repack: Vec<ChunkId>,
    /// Per indexed pack, its usage (in pack id order).
    pub usage: Vec<PackUsage>,
    /// Sums over every pack.
    pub total_bytes: u64,
    pub dead_bytes: u64,
    pub live_blobs: u64,
    pub dead_blobs: u64,
    /// Bytes of the condemned packs.
    pub condemned_bytes: u64,
    /// Live bytes the repack copies, and the dead bytes it frees.
    pub repack_live_bytes: u64,
    pub repack_dead_bytes: u64,
}

impl Plan {
    /// Bytes the plan frees (condemned packs and the dead part of repacked ones).
    pub fn reclaimed_bytes(&self) -> u64 {
        self.condemned_bytes + self.repack_dead_bytes
    }

    /// True when the plan deletes or repacks nothing.
    pub fn is_empty(&self) -> bool {
        self.condemn.is_empty() && self.repack.is_empty()
    }
}

/// Length of the pack file whose table is `entries`: frames are back to back after the
/// header, the table (plus `table_overhead`, the bytes sealing adds to it in an encrypted
/// repository) and trailer follow the last one.
pub fn pack_file_len(entries: &[BlobEntry], table_overhead: u64) -> u64 {
    let frames_end = entries
        .iter()
        .map(|e| u64::from(e.frame_offset) + u64::from(e.frame_len))
        .max()
        .unwrap_or(PACK_HEADER_LEN as u64);
    frames_end + (entries.len() * BLOB_ENTRY_LEN) as u64 + table_overhead + PACK_TRAILER_LEN as u64
}

/// The frames of a pack: frame offset -> (frame length, indices of its entries).
pub fn frames(entries: &[BlobEntry]) -> BTreeMap<u32, (u32, Vec<usize>)> {
    let mut out: BTreeMap<u32, (u32, Vec<usize>)> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        out.entry(e.frame_offset)
            .or_insert_with(|| (e.frame_len, Vec::new()))
            .1
            .push(i);
    }
    out
}

/// Usage of one pack given the live set (`table_overhead`: [`pack_file_len`]).
pub fn pack_usage(
    pack: ChunkId,
    entries: &[BlobEntry],
    live: &HashSet<ChunkId>,
    table_overhead: u64,
) -> PackUsage {
    let size = pack_file_len(entries, table_overhead);
    let mut live_bytes = 0u64;
    let mut live_blobs = 0u64;
    for (_, (len, idx)) in frames(entries) {
        let (mut raw_live, mut raw_all, mut n_live) = (0u64, 0u64, 0u64);
        for &i in &idx {
            let raw = u64::from(entries[i].raw_len);
            raw_all += raw;
            if live.contains(&entries[i].id) {
                raw_live += raw;
                n_live += 1;
            }
        }
        if n_live > 0 {
            // The live blobs' share of the frame's stored bytes, rounded up.
            let share =
                (u128::from(len) * u128::from(raw_live)).div_ceil(u128::from(raw_all.max(1)));
            live_bytes += share.min(u128::from(len)) as u64 + n_live * BLOB_ENTRY_LEN as u64;
        }
        live_blobs += n_live;
    }
    if live_blobs > 0 {
        // The header, trailer and sealing of the table stay with the live part.
        live_bytes += (PACK_HEADER_LEN + PACK_TRAILER_LEN) as u64 + table_overhead;
    }
    let live_bytes = live_bytes.min(size);
    PackUsage {
        pack,
        size,
        live_bytes,
        dead_bytes: size - live_bytes,
        live_blobs,
        dead_blobs: entries.len() as u64 - live_blobs,
    }
}

/// Plans a prune of the packs `packs` (id, entries) given the live blobs
/// (`table_overhead`: [`pack_file_len`]).
pub fn plan<'a>(
    packs: impl IntoIterator<Item = (&'a ChunkId, &'a [BlobEntry])>,
    live: &HashSet<ChunkId>,
    limits: &PlanLimits,
    table_overhead: u64,
) -> Plan {
    let mut usage: Vec<PackUsage> = packs
        .into_iter()
        .map(|(id, entries)| pack_usage(*id, entries, live, table_overhead))
        .collect();
    usage.sort_by_key(|u| u.pack.0);
    let mut p = Plan::default();
    for u in &usage {
        p.total_bytes += u.size;
        p.dead_bytes += u.dead_bytes;
        p.live_blobs += u.live_blobs;
        p.dead_blobs += u.dead_blobs;
        if u.live_blobs == 0 {
            p.condemn.push(u.pack);
            p.condemned_bytes += u.size;
        }
    }
    // After deleting the condemned packs: what is left, and how much of it is dead.
    let mut total = p.total_bytes - p.condemned_bytes;
    let mut dead = p.dead_bytes - p.condemned_bytes;
    let mut candidates: Vec<&PackUsage> = usage
        .iter()
        .filter(|u| u.live_blobs > 0 && u.dead_bytes > 0)
        .collect();
    // Most dead first: by dead fraction (cross-multiplied, exact), then dead bytes, then id.
    candidates.sort_by(|a, b| {
        let fa = u128::from(a.dead_bytes) * u128::from(b.size);
        let fb = u128::from(b.dead_bytes) * u128::from(a.size);
        fb.cmp(&fa)
            .then(b.dead_bytes.cmp(&a.dead_bytes))
            .then(a.pack.0.cmp(&b.pack.0))
    });
    let pct = limits.max_unused_percent.clamp(0.0, 100.0);
    for u in candidates {
        if (dead as f64) <= total as f64 * pct / 100.0 {
            break;
        }
        if p.repack_live_bytes.saturating_add(u.live_bytes) > limits.max_repack {
            continue;
        }
        p.repack.push(u.pack);
        p.repack_live_bytes += u.live_bytes;
        p.repack_dead_bytes += u.dead_bytes;
        dead -= u.dead_bytes;
        total -= u.dead_bytes;
    }
    p.usage = usage;
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::blob::BlobKind;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    /// A pack whose frames are given as lists of blob numbers, each frame `frame_len` bytes.
    fn pack(frames: &[&[u8]], frame_len: u32) -> Vec<BlobEntry> {
        let mut out = Vec::new();
        let mut off = PACK_HEADER_LEN as u32;
        for f in frames {
            for (k, &b) in f.iter().enumerate() {
                out.push(BlobEntry {
                    id: id(b),
                    kind: BlobKind::Data,
                    frame_offset: off,
                    frame_len,
                    raw_offset: k as u32 * 10,
                    raw_len: 10,
                });
            }
            off += frame_len;
        }
        out
    }

    fn live(ids: &[u8]) -> HashSet<ChunkId> {
        ids.iter().map(|&n| id(n)).collect()
    }

    #[test]
    fn dead_frames_and_dead_shares_of_live_frames() {
        let e = pack(&[&[1, 2], &[3], &[4, 5, 6]], 1000);
        let u = pack_usage(id(100), &e, &live(&[2, 4]), 0);
        assert_eq!(u.size, 16 + 3000 + 6 * 52 + 56);
        // Half of the first frame, a third of the last; their live entries, header, trailer.
        assert_eq!(u.live_bytes, 500 + 334 + 2 * 52 + 16 + 56);
        assert_eq!(u.dead_bytes, u.size - u.live_bytes);
        assert_eq!((u.live_blobs, u.dead_blobs), (2, 4));
        let u = pack_usage(id(100), &e, &live(&[]), 0);
        assert_eq!((u.live_bytes, u.dead_bytes), (0, u.size));
        let u = pack_usage(id(100), &e, &live(&[1, 2, 3, 4, 5, 6]), 0);
        assert_eq!((u.live_bytes, u.dead_bytes), (u.size, 0));
        let u = pack_usage(id(100), &e, &live(&[1, 3, 5]), 0);
        assert!(u.dead_bytes > 0 && u.live_bytes > 0);
    }

    /// Each row: pack frames (one blob per frame here: blob numbers), live blobs, limits,
    /// expected condemned packs and repacked packs (by pack number, in order).
    #[test]
    fn plan_table() {
        struct Row {
            packs: Vec<(u8, Vec<u8>)>,
            live: Vec<u8>,
            max_unused: f64,
            max_repack: u64,
            condemn: Vec<u8>,
            repack: Vec<u8>,
        }
        let rows = [
            // Nothing dead: nothing to do.
            Row {
                packs: vec![(100, vec![1, 2]), (101, vec![3])],
                live: vec![1, 2, 3],
                max_unused: 0.0,
                max_repack: u64::MAX,
                condemn: vec![],
                repack: vec![],
            },
            // A fully dead pack is condemned whatever the limits.
            Row {
                packs: vec![(100, vec![1, 2]), (101, vec![3])],
                live: vec![1, 2],
                max_unused: 100.0,
                max_repack: 0,
                condemn: vec![101],
                repack: vec![],
            },
            // Partly dead packs are repacked most dead first while above the threshold.
            Row {
                packs: vec![
                    (100, vec![1, 2, 3, 4]), // 1 of 4 dead
                    (101, vec![5, 6, 7, 8]), // 3 of 4 dead
                    (102, vec![9, 10, 11, 12]),
                ],
                live: vec![1, 2, 3, 5, 9, 10, 11, 12],
                max_unused: 0.0,
                max_repack: u64::MAX,
                condemn: vec![],
                repack: vec![101, 100],
            },
            // A generous threshold stops after the worst pack.
            Row {
                packs: vec![
                    (100, vec![1, 2, 3, 4]),
                    (101, vec![5, 6, 7, 8]),
                    (102, vec![9, 10, 11, 12]),
                ],
                live: vec![1, 2, 3, 5, 9, 10, 11, 12],
                max_unused: 15.0,
                max_repack: u64::MAX,
                condemn: vec![],
                repack: vec![101],
            },
            // Dead bytes under the threshold: no repack at all.
            Row {
                packs: vec![(100, vec![1, 2, 3, 4]), (102, vec![9, 10, 11, 12])],
                live: vec![1, 2, 3, 9, 10, 11, 12],
                max_unused: 20.0,
                max_repack: u64::MAX,
                condemn: vec![],
                repack: vec![],
            },
            // max_repack passes over a pack whose live part does not fit, takes a smaller one.
            Row {
                packs: vec![
                    (100, vec![1, 2, 3, 4, 5, 6, 7, 8]), // 4 live of 8: most dead
                    (101, vec![9, 10, 11, 12]),          // 3 live of 4
                ],
                live: vec![1, 2, 3, 4, 9, 10, 11],
                max_unused: 0.0,
                max_repack: 3500,
                condemn: vec![],
                repack: vec![101],
            },
            // Condemned and repacked together.
            Row {
                packs: vec![(100, vec![1, 2]), (101, vec![3, 4]), (102, vec![5])],
                live: vec![1, 5],
                max_unused: 0.0,
                max_repack: u64::MAX,
                condemn: vec![101],
                repack: vec![100],
            },
        ];
        for (n, r) in rows.iter().enumerate() {
            let tables: Vec<(ChunkId, Vec<BlobEntry>)> = r
                .packs
                .iter()
                .map(|(p, blobs)| {
                    let frames: Vec<&[u8]> = blobs.iter().map(std::slice::from_ref).collect();
                    (id(*p), pack(&frames, 1000))
                })
                .collect();
            let got = plan(
                tables.iter().map(|(p, e)| (p, &e[..])),
                &live(&r.live),
                &PlanLimits {
                    max_unused_percent: r.max_unused,
                    max_repack: r.max_repack,
                },
                0,
            );
            let ids = |v: &[u8]| v.iter().map(|&p| id(p)).collect::<Vec<_>>();
            assert_eq!(got.condemn, ids(&r.condemn), "row {n}: condemned");
            assert_eq!(got.repack, ids(&r.repack), "row {n}: repacked");
            assert!(got.repack_live_bytes <= r.max_repack, "row {n}");
            let dead: u64 = got.usage.iter().map(|u| u.dead_bytes).sum();
            assert_eq!(dead, got.dead_bytes, "row {n}");
        }
    }

    #[test]
    fn empty_repository_plans_nothing() {
        let p = plan(
            std::iter::empty(),
            &HashSet::new(),
            &PlanLimits::default(),
            40,
        );
        assert!(p.is_empty());
        assert_eq!(p.total_bytes, 0);
    }
}
