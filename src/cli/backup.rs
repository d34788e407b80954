//! `volback backup SOURCE REPO`: full the first time, incremental afterwards.

use super::Ctx;
use super::args::SnapshotKind;
use super::args::{BackupArgs, block_size_arg};
use super::display::{CliProgress, human_bytes, print_filesystem, print_volume};
use super::report::{BackupJson, print_json};
use anyhow::{Context, Result, bail};
use std::process::ExitCode;
use std::time::Duration;
use volback::backup::{BackupOptions, BackupReport, backup, plan};
use volback::platform::{self, windevice};
use volback::progress::Progress;
use volback::source::Source;

/// Backs up `a.source` into `a.repo`; exit code 3 when some ranges could not be read. With
/// `--snapshot vss` (the default for a Windows volume with NTFS mounted) the backup reads a
/// shadow copy of the volume, deleted when the backup ends, fails or is stopped.
pub fn run(a: BackupArgs, ctx: &Ctx) -> Result<ExitCode> {
    let snapshot = snapshot_kind(&a)?;
    let repository = super::password::open(&a.repo, &a.password)?;
    let progress = CliProgress::new(ctx.quiet);
    // A plan changes nothing on the system either: it looks at the live volume.
    let shadow = match snapshot {
        SnapshotKind::Vss if !a.dry_run => {
            let s = platform::take_shadow_copy(&a.source).with_context(|| {
                format!("cannot take a VSS shadow copy of {}", a.source.display())
            })?;
            if !ctx.quiet {
                eprintln!(
                    "volback: reading {} through the VSS shadow copy {}",
                    s.volume(),
                    s.device_path().display()
                );
            }
            Some(s)
        }
        _ => None,
    };
    let source_path = shadow
        .as_ref()
        .map_or(a.source.as_path(), |s| s.device_path());
    let src = Source::open(source_path)?;
    // A plan of a shadow-copy backup reads the live volume, whose bitmaps do not tell what
    // the shadow copy's would.
    let compare = !(a.dry_run && snapshot == SnapshotKind::Vss);
    let all_blocks = a.all_blocks || (compare && windows_bitmap_disagrees(&src, &progress));
    let opts = BackupOptions {
        block_size: block_size_arg(a.block_size)?,
        tags: a.tags,
        checkpoint_interval: Duration::from_secs_f64(a.checkpoint_secs.clamp(0.0, 3600.0)),
        threads: a.threads,
        restart: a.restart,
        all_blocks,
        allow_mounted: a.allow_mounted,
        rehash: a.rehash,
        cancel: Some(ctx.cancel.clone()),
    };
    if a.dry_run {
        let plan = plan(&repository, &src, &opts, &progress)?;
        if a.json {
            print_json(&plan)?;
        } else {
            print!("{plan}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    // On an error (or Ctrl-C, which ends the backup with one) `shadow` is dropped on the way
    // out, which deletes the shadow copy.
    let r = backup(&repository, &src, &opts, &progress)?;
    let volume_size = src.geometry().size;
    drop(src);
    if let Some(s) = shadow
        && let Err(e) = s.delete()
    {
        progress.warn(&format!("the backup is complete, but {e}"));
    }
    if a.json {
        print_json(&BackupJson::new(&r))?;
    } else {
        print_text(&r, volume_size, repository.config().block_size);
    }
    Ok(warn_unreadable(&r))
}

/// `--snapshot` as given, or its default: `vss` for a volume the system has NTFS mounted on
/// read-write (Windows), `none` otherwise. Refuses, before anything is done, a `vss` source of
/// which no shadow copy can be taken (and everything on systems without VSS), and a volume
/// mounted read-write read as it is without `--allow-mounted`.
fn snapshot_kind(a: &BackupArgs) -> Result<SnapshotKind> {
    let mounted = platform::mounted_filesystem(&a.source).filter(|(_, read_only)| !read_only);
    let kind = match (a.snapshot, &mounted) {
        (Some(kind), _) => kind,
        (None, Some((fs, _))) if fs.eq_ignore_ascii_case("NTFS") => SnapshotKind::Vss,
        (None, _) => SnapshotKind::None,
    };
    match (kind, mounted) {
        (SnapshotKind::Vss, _) => platform::check_shadow_copy_source(&a.source)?,
        (SnapshotKind::None, Some((fs, _))) if !a.allow_mounted => bail!(
            "{} has {fs} mounted read-write: its blocks change while they are read. Back up a \
             VSS shadow copy of it (--snapshot vss, NTFS and ReFS volumes), or pass \
             --allow-mounted to accept an inconsistent copy",
            a.source.display()
        ),
        (SnapshotKind::None, _) => {}
    }
    Ok(kind)
}

/// For an NTFS volume on Windows (**experimental**): whether the cluster bitmap Windows
/// reports (`FSCTL_GET_VOLUME_BITMAP`) marks clusters used that volback's own reading of
/// `$Bitmap` calls free. The backup's map comes from `$Bitmap`; such clusters would not be
/// read, so every block is read instead (a superset of both bitmaps: no used cluster is ever
/// skipped). Clusters only `$Bitmap` marks used are read anyway. Where either bitmap cannot be
/// read, says why and leaves the backup to `$Bitmap` (checked by the backup as on Linux).
fn windows_bitmap_disagrees(src: &Source, progress: &dyn Progress) -> bool {
    use volback::fs::ntfs::{BootSector, Mft};
    let path = src.path().display();
    let Ok(Some(boot)) = BootSector::read(src) else {
        return false;
    };
    let (windows, clusters) = match platform::volume_bitmap(src.file()) {
        Ok(Some(b)) => b,
        Ok(None) => return false,
        Err(e) => {
            progress.warn(&format!(
                "cannot read the cluster bitmap Windows keeps for {path} ({e}); the NTFS \
                 $Bitmap alone says which blocks are used"
            ));
            return false;
        }
    };
    let own = match Mft::open(src, &boot)
        .and_then(|m| m.bitmap(src, windevice::MAX_VOLUME_BITMAP_BYTES))
    {
        Ok(own) => own,
        Err(e) => {
            progress.warn(&format!(
                "cannot compare the NTFS $Bitmap of {path} with Windows' cluster bitmap: {e}"
            ));
            return false;
        }
    };
    let c = windevice::compare_bitmaps(&windows, &own, clusters);
    let why = if clusters != boot.clusters() {
        format!(
            "Windows counts {clusters} clusters on {path} where its NTFS boot sector counts {}",
            boot.clusters()
        )
    } else if let Some(first) = c.first_used_only_by_windows {
        format!(
            "Windows marks {} clusters of {path} used that its NTFS $Bitmap marks free (the \
             first: cluster {first})",
            c.used_only_by_windows
        )
    } else {
        return false;
    };
    progress.warn(&format!(
        "{why}: every block is read, so that no used cluster is skipped"
    ));
    true
}

/// The text report of a backup of a `volume_size`-byte volume in blocks of `block_size`.
fn print_text(r: &BackupReport, volume_size: u64, block_size: u32) {
    let kind = match (&r.parent, r.resumed) {
        (_, true) => "resumed",
        (Some(_), false) => "incremental",
        (None, false) => "full",
    };
    println!("snapshot {} ({kind})", r.snapshot_id);
    if let Some(p) = &r.parent {
        println!("  parent          {p}");
    }
    print_filesystem(r.filesystem.as_ref(), r.all_blocks, "read");
    if let Some(l) = &r.layout {
        println!("  partitions      {} table {}", l.table, l.id);
        for p in &l.partitions {
            let what = match (&p.filesystem, p.role.as_deref()) {
                (_, Some("extended")) => "extended partition".to_string(),
                (Some(fs), _) => format!(
                    "{} {}{}",
                    fs.fs_type,
                    fs.uuid,
                    if p.all_blocks {
                        " (all blocks read)"
                    } else {
                        ""
                    }
                ),
                (None, _) => "unknown content (all blocks read)".to_string(),
            };
            println!(
                "    #{:<3} {:>10} at {:>10}  {what}",
                p.number,
                human_bytes(p.size),
                human_bytes(p.start)
            );
        }
    }
    let s = &r.stats;
    print_volume(
        volume_size,
        s.data_blocks + s.zero_blocks + s.unused_blocks,
        block_size as u64,
        r.this_run.bytes_read,
    );
    if r.unread_blocks > 0 {
        println!(
            "  not read        {} blocks unchanged since the parent (ext4 inodes)",
            r.unread_blocks
        );
    }
    println!(
        "  new data        {} in {}, {} stored ({})",
        human_bytes(r.this_run.new_bytes),
        super::display::plural(r.this_run.new_chunks, "frame", "frames"),
        human_bytes(r.this_run.new_bytes_stored),
        super::display::plural(r.packs_written, "new pack", "new packs")
    );
    println!(
        "  blocks          {} data ({} unchanged, {} deduplicated), {} zero, {} unused",
        s.data_blocks, s.unchanged_blocks, s.deduplicated_blocks, s.zero_blocks, s.unused_blocks
    );
    println!("  time            {:.1} s", s.duration_secs);
}

/// Names the ranges that could not be read (stored as zeros); exit code 3 when there are any.
fn warn_unreadable(r: &BackupReport) -> ExitCode {
    if r.unreadable.is_empty() {
        return ExitCode::SUCCESS;
    }
    let bytes: u64 = r.unreadable.iter().map(|&(_, len)| len).sum();
    eprintln!(
        "volback: warning: {} bytes in {} ranges could not be read and were stored as \
         zeros (recorded in the snapshot as `unreadable`):",
        bytes,
        r.unreadable.len()
    );
    for (off, len) in r.unreadable.iter().take(20) {
        eprintln!("  offset {off}, {len} bytes");
    }
    if r.unreadable.len() > 20 {
        eprintln!("  … and {} more", r.unreadable.len() - 20);
    }
    ExitCode::from(3)
}
