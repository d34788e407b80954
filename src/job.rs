//! What the long jobs over a source share: [`crate::backup`] and [`crate::copy`] both refuse
//! a source mounted read-write ([`check_mounts`]), skip the blocks change tracking knows to be
//! unchanged since their base ([`track_changes`]) and run one worker per core
//! ([`worker_threads`]).

use crate::error::{Error, Result};
use crate::fs::BlockMap;
use crate::progress::Progress;
use crate::source::Source;
use crate::volume::Volume;

/// Worker threads for `requested` (0: one per core).
pub fn worker_threads(requested: usize) -> usize {
    if requested == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        requested
    }
}

/// What change tracking found (see [`track_changes`]).
#[derive(Debug, Clone, Default)]
pub struct Tracked {
    /// The blocks known to be unchanged; `None` when nothing is known.
    pub map: Option<BlockMap>,
    /// Why a recognised filesystem was not tracked.
    pub note: Option<String>,
}

/// Change tracking against `base`, an earlier state of `source` (parent snapshot, copy):
/// the blocks known to be unchanged, with `avoid` ranges (offset, length) taken out, and why
/// a recognised filesystem was not tracked. Warns nothing (see [`track_changes`]).
pub fn changes_since(
    source: &Source,
    base: &dyn Volume,
    block_size: u64,
    avoid: &[(u64, u64)],
) -> Result<Tracked> {
    let u = crate::probe::disk::unchanged_volume(
        source,
        base,
        source.geometry().logical_sector_size,
        block_size,
    )?;
    Ok(Tracked {
        map: u.map.map(|mut m| {
            for &(off, len) in avoid {
                m.unmark_bytes(off, len);
            }
            m
        }),
        note: u.note,
    })
}

/// The warning for a [`Tracked::note`].
pub(crate) fn tracking_warning(note: &str) -> String {
    format!("{note}; reading every used block")
}

/// Change tracking against `base`, an earlier state of `source` (parent snapshot, copy):
/// the blocks known to be unchanged, with `avoid` ranges (offset, length) taken out. `None`
/// when nothing is known; a warning says why a recognised filesystem was not tracked.
pub fn track_changes(
    source: &Source,
    base: &dyn Volume,
    block_size: u64,
    avoid: &[(u64, u64)],
    progress: &dyn Progress,
) -> Result<Option<BlockMap>> {
    let t = changes_since(source, base, block_size, avoid)?;
    if let Some(n) = &t.note {
        progress.warn(&tracking_warning(n));
    }
    Ok(t.map)
}

/// Checks how `source` is mounted. A source mounted read-write is refused (its blocks change
/// while they are read) unless `allow_mounted`. Returns whether the source is consistent: not
/// mounted read-write, so what is read is one point in time (change tracking trusts only
/// such snapshots and copies).
pub fn check_mounts(source: &Source, allow_mounted: bool) -> Result<bool> {
    let mounted = crate::platform::mount_point_of(source.path())
        .map_err(|e| Error::io("check mounts of", source.path(), e))?;
    let Some(m) = mounted.filter(|m| !m.read_only) else {
        return Ok(true);
    };
    if allow_mounted {
        return Ok(false);
    }
    Err(Error::BadSource {
        path: source.path().to_path_buf(),
        detail: format!(
            "it is mounted read-write at {}: its blocks change while they are read. \
             Back up a snapshot of it instead (lvcreate --snapshot, then back up the \
             snapshot device), or freeze it (fsfreeze --freeze {}) and pass \
             --allow-mounted, or pass --allow-mounted to accept an inconsistent copy",
            m.point, m.point
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_zero_means_one_per_core() {
        assert_eq!(worker_threads(3), 3);
        assert!(worker_threads(0) >= 1);
    }
}
