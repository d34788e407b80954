//! The `volback` command: parses arguments, calls the library, displays, chooses exit codes.
//!
//! Exit codes: 0 success, 1 error, 2 usage error, 3 completed with unreadable sectors,
//! 130 interrupted (progress saved where the command supports resuming). `serve` runs until
//! Ctrl-C and then exits 0 (Ctrl-C is how it is meant to stop).

mod copy_cli;
mod display;
#[cfg(target_os = "linux")]
mod mount_cli;
mod probe_cli;
mod serve_cli;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use display::{CliProgress, human_bytes};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use volback::backup::{BackupOptions, backup};
use volback::copy::CopyFormat;
use volback::hash::HashAlgorithm;
use volback::nbd::ListenAddr;
use volback::repo::{InitOptions, Repository};
use volback::restore::{RestoreOptions, plan_restore, restore};
use volback::source::Source;
use volback::verify::{VerifyOptions, verify};

#[derive(Parser)]
#[command(name = "volback", version, about = "Block-level volume backup", long_about = None)]
struct Cli {
    /// Never show progress bars (`serve`: no per-client lines, only warnings and errors).
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what is on a disk, partition or image: partition table, filesystems, sizes, UUIDs.
    Probe {
        /// Block device or image file (opened read-only).
        source: PathBuf,
        /// Print the report as JSON (schema in docs/PROBE.md).
        #[arg(long)]
        json: bool,
    },
    /// Partition table backup and restore in `sfdisk --dump` text.
    Ptable {
        #[command(subcommand)]
        action: PtableCommand,
    },
    /// Create a repository in a directory.
    Init {
        /// Repository directory (created if missing; must be empty).
        repo: PathBuf,
        /// Chunk hash: blake3 (default, fastest here) or sha256.
        #[arg(long, default_value = "blake3")]
        hash: HashAlgorithm,
        /// zstd compression level for chunks.
        #[arg(long, default_value_t = 3)]
        zstd_level: i32,
        /// Default block size in bytes (power of two, 4 KiB to 16 MiB).
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
        /// Largest pack: the blocks a backup stores from one read of consecutive blocks are
        /// compressed together, up to this size (default 4M; 0 or at most one block: every
        /// block compressed alone, which makes random reads through mount/serve cheaper).
        #[arg(long, value_parser = parse_size)]
        pack_size: Option<u64>,
    },
    /// Back up a block device or image file: full the first time, incremental afterwards.
    Backup {
        /// Block device or regular file to read (opened read-only).
        source: PathBuf,
        /// Repository directory.
        repo: PathBuf,
        /// Tag to attach to the snapshot (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Block size for this volume (default: the repository's).
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
        /// Seconds between checkpoints that an interrupted backup resumes from.
        #[arg(long, default_value_t = 5.0)]
        checkpoint_secs: f64,
        /// Worker threads (default: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Start over instead of resuming an interrupted backup of this volume.
        #[arg(long)]
        restart: bool,
        /// Read every block, also those the filesystem does not use (forensic copy).
        #[arg(long)]
        all_blocks: bool,
        /// Back up even though the volume is mounted read-write (the copy may be inconsistent).
        #[arg(long)]
        allow_mounted: bool,
        /// Read and hash every used block, also those change tracking finds unchanged since
        /// the parent snapshot (ext4 inodes and extent trees).
        #[arg(long)]
        rehash: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List snapshots.
    Snapshots {
        repo: PathBuf,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Write a snapshot (REPO SNAPSHOT TARGET) or a copy (COPY TARGET) to a block device or a
    /// file (sparse).
    #[command(
        override_usage = "volback restore [OPTIONS] REPO SNAPSHOT TARGET\n       \
                                volback restore [OPTIONS] COPY TARGET"
    )]
    Restore {
        /// Repository directory, or a copy (made by `copy` or `export`).
        #[arg(value_name = "REPO|COPY")]
        repo: PathBuf,
        /// Snapshot id, unique id prefix, `latest` or `latest:SOURCE`; for a copy, the target.
        #[arg(value_name = "SNAPSHOT|TARGET")]
        snapshot: String,
        /// Target block device or file (with a repository).
        target: Option<PathBuf>,
        /// After writing, flush and read every data block back from the target and compare it
        /// with the snapshot (chunks are always checked against their hashes).
        #[arg(long)]
        verify: bool,
        /// Read the target first and write only the blocks that differ (a target holding an
        /// older state of the volume is brought up to date with few writes); zero and unused
        /// ranges are zeroed only where the target is not zero.
        #[arg(long)]
        only_changed: bool,
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Show a snapshot read-only without restoring it: the volume and each partition as image
    /// files in DIR (FUSE), and with --files the filesystems' files.
    #[cfg(target_os = "linux")]
    Mount {
        /// REPO SNAPSHOT DIR.
        #[arg(num_args = 2..=3, required = true, value_name = "REPO SNAPSHOT DIR")]
        args: Vec<PathBuf>,
        /// Also mount the filesystem(s) inside read-only, without journal replay, here (a
        /// partitioned disk gets one directory per partition: part1, part5…).
        #[arg(long, value_name = "MOUNTPOINT")]
        files: Option<PathBuf>,
        /// Serve in this process until Ctrl-C instead of starting a background server.
        #[arg(long)]
        foreground: bool,
        /// Let other users (and root) read the view (needs user_allow_other in
        /// /etc/fuse.conf when not root).
        #[arg(long)]
        allow_other: bool,
        /// Print what was mounted as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Undo `volback mount`: unmount the files, detach the loop devices, unmount the view.
    #[cfg(target_os = "linux")]
    Umount {
        /// The view directory (or a --files mount point of it).
        dir: PathBuf,
    },
    /// Serve a snapshot (REPO SNAPSHOT) or a copy (COPY) read-only over NBD until Ctrl-C
    /// (prints the URI to connect to).
    Serve {
        /// REPO SNAPSHOT (id, unique id prefix, `latest` or `latest:SOURCE`), or COPY.
        #[arg(num_args = 1..=2, required = true, value_name = "REPO SNAPSHOT | COPY")]
        args: Vec<String>,
        /// Where to listen: HOST:PORT for TCP (port 0 picks a free port), or a Unix socket
        /// path, recognised by containing a `/` (./nbd.sock, /run/volback.sock).
        #[arg(long, value_name = "ADDR", value_parser = parse_listen_addr)]
        nbd: ListenAddr,
        /// Export name (default: the snapshot's 12-character id; clients asking for the
        /// empty default name get it too).
        #[arg(long, value_name = "EXPORT")]
        name: Option<String>,
        /// Most clients connected at once; more connections are closed at once.
        #[arg(long, default_value_t = 16)]
        max_clients: usize,
    },
    /// Check snapshots and their chunks, or a copy (every block against its SHA-256).
    Verify {
        /// Repository directory, or a copy.
        #[arg(value_name = "REPO|COPY")]
        repo: PathBuf,
        /// Snapshot to check (default: all).
        snapshot: Option<String>,
        /// Read and re-hash every chunk.
        #[arg(long)]
        read_data: bool,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long)]
        json: bool,
    },
    /// Copy a volume to plain image files (raw, BIN slices, VHD, VHDX, qcow2) with a SHA-256
    /// per block; `--update` rewrites only the blocks that changed.
    Copy {
        /// Block device or regular file to read (opened read-only).
        source: PathBuf,
        /// The copy: an image file (raw, vhd, vhdx, qcow2; raw slices are DEST.000, …) or a
        /// directory (bin).
        dest: PathBuf,
        /// raw, bin, vhd, vhd-dynamic, vhdx or qcow2 (required for a new copy).
        #[arg(long, required_unless_present = "update")]
        format: Option<CopyFormat>,
        /// Update an existing copy in place (or finish an interrupted copy or update).
        #[arg(long)]
        update: bool,
        /// Split a raw or bin copy into files of this size (a multiple of the block size).
        #[arg(long, value_parser = parse_size, conflicts_with = "update")]
        slice_size: Option<u64>,
        /// Block size of a new copy (default 256 KiB): the unit of hashing and of updates.
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
        /// Copy every block, also those the filesystem does not use (forensic copy).
        #[arg(long)]
        all_blocks: bool,
        /// Read the volume even though it is mounted read-write (the copy may be inconsistent).
        #[arg(long)]
        allow_mounted: bool,
        /// Read and hash every used block, also those change tracking finds unchanged since
        /// the copy was last written (ext4 inodes and extent trees).
        #[arg(long)]
        rehash: bool,
        /// Seconds between checkpoints that an interrupted run continues from.
        #[arg(long, default_value_t = 5.0)]
        checkpoint_secs: f64,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a snapshot as a copy: plain image files with a SHA-256 per block.
    Export {
        repo: PathBuf,
        /// Snapshot id, unique id prefix, `latest` or `latest:SOURCE`.
        snapshot: String,
        /// Output image file (raw, vhd, vhdx, qcow2) or directory (bin).
        out: PathBuf,
        /// raw, bin, vhd, vhd-dynamic, vhdx or qcow2.
        #[arg(long, required = true)]
        format: Option<CopyFormat>,
        /// Split a raw or bin copy into files of this size (a multiple of the block size).
        #[arg(long, value_parser = parse_size)]
        slice_size: Option<u64>,
        /// Block size of the copy (default: the snapshot's).
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
        #[arg(long, default_value_t = 5.0)]
        checkpoint_secs: f64,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PtableCommand {
    /// Print the partition table of DISK as `sfdisk --dump` text (which `sfdisk` reads back).
    Dump {
        /// Block device or disk image (opened read-only).
        disk: PathBuf,
    },
    /// Write the partition table in FILE (`sfdisk --dump` text) to DISK.
    Restore {
        /// Block device or disk image to write (must not be mounted).
        disk: PathBuf,
        /// The dump to restore; `-` reads standard input.
        file: PathBuf,
        /// Check everything and show the table, but write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Parses sizes like `262144`, `256K`, `256KiB`, `4M`, `1G`.
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        u => return Err(format!("unknown size unit {u:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses `--nbd ADDR` (a usage error when malformed).
fn parse_listen_addr(s: &str) -> std::result::Result<ListenAddr, String> {
    ListenAddr::parse(s).map_err(|e| e.to_string())
}

fn block_size_arg(v: Option<u64>) -> Result<Option<u32>> {
    v.map(|b| u32::try_from(b).context("block size too large"))
        .transpose()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        let _ = ctrlc::set_handler(move || {
            if cancel.swap(true, Ordering::SeqCst) {
                // Second Ctrl-C: leave at once.
                std::process::exit(130);
            }
        });
    }
    match run(cli, cancel) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("volback: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            if let Some(volback::Error::Interrupted { .. }) = e.downcast_ref::<volback::Error>() {
                return ExitCode::from(130);
            }
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli, cancel: Arc<AtomicBool>) -> Result<ExitCode> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Probe { source, json } => probe_cli::probe(&source, json),
        Command::Ptable { action } => match action {
            PtableCommand::Dump { disk } => probe_cli::ptable_dump(&disk),
            PtableCommand::Restore {
                disk,
                file,
                dry_run,
            } => probe_cli::ptable_restore(&disk, &file, dry_run),
        },
        #[cfg(target_os = "linux")]
        Command::Mount {
            args,
            files,
            foreground,
            allow_other,
            json,
        } => mount_cli::mount(
            mount_cli::MountArgs {
                args,
                files,
                foreground,
                allow_other,
                json,
            },
            cancel,
        ),
        #[cfg(target_os = "linux")]
        Command::Umount { dir } => mount_cli::umount(&dir),
        Command::Init {
            repo,
            hash,
            zstd_level,
            block_size,
            pack_size,
        } => {
            let mut opts = InitOptions {
                chunk_hash: hash,
                zstd_level,
                ..InitOptions::default()
            };
            if let Some(bs) = block_size_arg(block_size)? {
                opts.block_size = bs;
            }
            if let Some(ps) = pack_size {
                opts.pack_size = u32::try_from(ps).context("pack size too large")?;
            }
            let r = Repository::init(&repo, &opts)?;
            println!(
                "created repository {} at {} ({} chunks, {} blocks, zstd {})",
                r.config().id,
                repo.display(),
                r.config().chunk_hash.name(),
                human_bytes(r.config().block_size as u64),
                r.config().zstd_level
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup {
            source,
            repo,
            tags,
            block_size,
            checkpoint_secs,
            threads,
            restart,
            all_blocks,
            allow_mounted,
            rehash,
            json,
        } => {
            let repository = Repository::open(&repo)?;
            let src = Source::open(&source)?;
            let opts = BackupOptions {
                block_size: block_size_arg(block_size)?,
                tags,
                checkpoint_interval: Duration::from_secs_f64(checkpoint_secs.clamp(0.0, 3600.0)),
                threads,
                restart,
                all_blocks,
                allow_mounted,
                rehash,
                cancel: Some(cancel),
            };
            let progress = CliProgress::new(quiet);
            let r = backup(&repository, &src, &opts, &progress)?;
            if json {
                let v = serde_json::json!({
                    "snapshot": r.snapshot_id,
                    "parent": r.parent,
                    "resumed": r.resumed,
                    "filesystem": r.filesystem,
                    "layout": r.layout,
                    "all_blocks": r.all_blocks,
                    "unreadable": r.unreadable,
                    "bytes_read": r.this_run.bytes_read,
                    "unread_blocks": r.unread_blocks,
                    "new_chunks": r.this_run.new_chunks,
                    "new_bytes": r.this_run.new_bytes,
                    "new_bytes_stored": r.this_run.new_bytes_stored,
                    "stats": r.stats,
                });
                println!("{v}");
            } else {
                let kind = match (&r.parent, r.resumed) {
                    (_, true) => "resumed",
                    (Some(_), false) => "incremental",
                    (None, false) => "full",
                };
                println!("snapshot {} ({kind})", r.snapshot_id);
                if let Some(p) = &r.parent {
                    println!("  parent          {p}");
                }
                if let Some(fs) = &r.filesystem {
                    println!(
                        "  filesystem      {}{} {} {}, {} used{}",
                        fs.fs_type,
                        match (&fs.version, fs.fs_type.as_str()) {
                            (Some(v), "vfat") => format!(" ({v})"),
                            _ => String::new(),
                        },
                        fs.uuid,
                        if fs.label.is_empty() {
                            "(no label)"
                        } else {
                            &fs.label
                        },
                        human_bytes(fs.used_bytes),
                        if r.all_blocks {
                            " (all blocks read)"
                        } else {
                            ""
                        }
                    );
                }
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
                println!(
                    "  volume          {} in {} blocks of {}",
                    human_bytes(src.geometry().size),
                    s.data_blocks + s.zero_blocks + s.unused_blocks,
                    human_bytes(repository.config().block_size as u64)
                );
                println!("  read            {}", human_bytes(r.this_run.bytes_read));
                if r.unread_blocks > 0 {
                    println!(
                        "  not read        {} blocks unchanged since the parent (ext4 inodes)",
                        r.unread_blocks
                    );
                }
                println!(
                    "  new data        {} in {} chunks, {} stored",
                    human_bytes(r.this_run.new_bytes),
                    r.this_run.new_chunks,
                    human_bytes(r.this_run.new_bytes_stored)
                );
                println!(
                    "  blocks          {} data ({} unchanged, {} deduplicated), {} zero, {} unused",
                    s.data_blocks,
                    s.unchanged_blocks,
                    s.deduplicated_blocks,
                    s.zero_blocks,
                    s.unused_blocks
                );
                println!("  time            {:.1} s", s.duration_secs);
            }
            if r.unreadable.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
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
                Ok(ExitCode::from(3))
            }
        }
        Command::Snapshots { repo, json } => {
            let repository = Repository::open(&repo)?;
            let (list, damaged) = repository.list_snapshots_lenient()?;
            for e in &damaged {
                eprintln!("volback: error: {e}");
            }
            if json {
                let arr: Vec<_> = list
                    .iter()
                    .map(|s| {
                        let h = &s.header;
                        serde_json::json!({
                            "id": s.id,
                            "time": h.time,
                            "source": h.source.path,
                            "size": h.source.size,
                            "parent": h.parent,
                            "block_size": h.block_size,
                            "hostname": h.hostname,
                            "tags": h.tags,
                            "stored_bytes": h.stats.new_bytes_stored,
                            "stats": h.stats,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(arr));
            } else {
                println!(
                    "{:<12}  {:<20}  {:>10}  {:>10}  {:<12}  source",
                    "id", "time", "size", "stored", "parent"
                );
                for s in &list {
                    let h = &s.header;
                    println!(
                        "{:<12}  {:<20}  {:>10}  {:>10}  {:<12}  {}",
                        &s.id[..12],
                        h.time,
                        human_bytes(h.source.size),
                        human_bytes(h.stats.new_bytes_stored),
                        h.parent.as_deref().map_or("-", |p| &p[..12.min(p.len())]),
                        h.source.path
                    );
                }
                println!("{} snapshots", list.len());
            }
            Ok(if damaged.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Restore {
            repo,
            snapshot,
            target,
            verify,
            only_changed,
            threads,
        } => {
            let Some(target) = target else {
                // Two arguments: COPY TARGET.
                if volback::copy::locate(&repo).is_none() {
                    use clap::CommandFactory;
                    Cli::command()
                        .error(
                            clap::error::ErrorKind::MissingRequiredArgument,
                            format!(
                                "{} is not a volback copy; to restore a snapshot, give \
                                 REPO SNAPSHOT TARGET",
                                repo.display()
                            ),
                        )
                        .exit();
                }
                return copy_cli::restore_copy(
                    &repo,
                    std::path::Path::new(&snapshot),
                    verify,
                    only_changed,
                    threads,
                    quiet,
                    cancel,
                );
            };
            let repository = Repository::open(&repo)?;
            let id = repository.resolve_warn(&snapshot, &CliProgress::new(true))?;
            let snap = repository.open_snapshot(&id)?;
            let volume =
                volback::repo::reader::SnapshotVolume::new(snap, repository.chunks().clone());
            use volback::volume::Volume;
            let plan = plan_restore(&target, volume.size(), std::slice::from_ref(&repo))?;
            let opts = RestoreOptions {
                threads,
                verify,
                cancel: Some(cancel),
                only_changed,
            };
            let progress = CliProgress::new(quiet);
            let r = restore(&volume, &plan, &opts, &progress)?;
            let what = format!("snapshot {}", &id[..12]);
            display::print_restore(&what, &plan.target, &r, &opts);
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            args,
            nbd,
            name,
            max_clients,
        } => serve_cli::serve(
            serve_cli::ServeArgs {
                args: &args,
                nbd,
                name,
                max_clients,
                quiet,
            },
            &cancel,
        ),
        Command::Verify {
            repo,
            snapshot,
            read_data,
            threads,
            json,
        } => {
            if snapshot.is_none() && volback::copy::locate(&repo).is_some() {
                return copy_cli::verify_copy(&repo, threads, json, quiet, cancel);
            }
            let repository = Repository::open(&repo)?;
            let ids = match snapshot {
                Some(s) => vec![repository.resolve_warn(&s, &CliProgress::new(true))?],
                None => Vec::new(),
            };
            let progress = CliProgress::new(quiet);
            let r = verify(
                &repository,
                &ids,
                &VerifyOptions { read_data, threads },
                &progress,
            )?;
            if json {
                let problems: Vec<_> = r
                    .problems
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "chunk": p.chunk,
                            "snapshot": p.snapshot,
                            "detail": p.detail,
                            "affected": p.affected.iter().map(|(s, o)| serde_json::json!({"snapshot": s, "offset": o})).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({
                        "snapshots_checked": r.snapshots_checked,
                        "chunks_checked": r.chunks_checked,
                        "bytes_checked": r.bytes_checked,
                        "problems": problems,
                    })
                );
            } else {
                for p in &r.problems {
                    match (&p.chunk, &p.snapshot) {
                        (Some(c), _) => println!("BAD chunk {c}: {}", p.detail),
                        (None, Some(s)) => println!("BAD snapshot {s}: {}", p.detail),
                        _ => println!("BAD: {}", p.detail),
                    }
                    // Per snapshot, in the order found: its first offset and how many more
                    // blocks (a pack's damage reaches all of its blocks).
                    const SHOW: usize = 20;
                    let mut groups: Vec<(&str, u64, u64, usize)> = Vec::new();
                    for (s, off) in &p.affected {
                        match groups.iter_mut().find(|g| g.0 == s.as_str()) {
                            Some(g) => {
                                g.2 = g.2.max(*off);
                                g.3 += 1;
                            }
                            None => groups.push((s, *off, *off, 1)),
                        }
                    }
                    for &(s, first, last, n) in groups.iter().take(SHOW) {
                        let s = &s[..12.min(s.len())];
                        if n == 1 {
                            println!("    affects snapshot {s} at offset {first}");
                        } else {
                            println!(
                                "    affects snapshot {s} at offset {first} and {} more blocks \
                                 up to offset {last}",
                                n - 1
                            );
                        }
                    }
                    if groups.len() > SHOW {
                        println!("    … and {} more snapshots", groups.len() - SHOW);
                    }
                }
                println!(
                    "checked {} snapshots, {} chunks{}: {}",
                    r.snapshots_checked,
                    r.chunks_checked,
                    if read_data {
                        format!(" ({} re-hashed)", human_bytes(r.bytes_checked))
                    } else {
                        String::new()
                    },
                    if r.problems.is_empty() {
                        "no problems".to_string()
                    } else {
                        format!("{} problems", r.problems.len())
                    }
                );
            }
            Ok(if r.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Copy {
            source,
            dest,
            format,
            update,
            slice_size,
            block_size,
            all_blocks,
            allow_mounted,
            rehash,
            checkpoint_secs,
            threads,
            json,
        } => {
            let common = copy_cli::Common {
                format,
                slice_size,
                block_size: block_size_arg(block_size)?,
                threads,
                checkpoint_secs,
                json,
                quiet,
            };
            copy_cli::copy(
                &source,
                &dest,
                update,
                copy_cli::SourceFlags {
                    all_blocks,
                    allow_mounted,
                    rehash,
                },
                &common,
                cancel,
            )
        }
        Command::Export {
            repo,
            snapshot,
            out,
            format,
            slice_size,
            block_size,
            checkpoint_secs,
            threads,
            json,
        } => {
            let common = copy_cli::Common {
                format,
                slice_size,
                block_size: block_size_arg(block_size)?,
                threads,
                checkpoint_secs,
                json,
                quiet,
            };
            copy_cli::export(&repo, &snapshot, &out, &common, cancel)
        }
    }
}
