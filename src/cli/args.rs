//! The command line: clap definitions of every command and its arguments, and the parsers of
//! argument values. Each command's handler is in its own module of `cli`.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use volback::copy::CopyFormat;
use volback::forget::KeepWithin;
use volback::hash::HashAlgorithm;
use volback::nbd::ListenAddr;

#[derive(Parser)]
#[command(name = "volback", version, about = "Block-level volume backup", long_about = None)]
pub struct Cli {
    /// Never show progress bars (`serve`: no per-client lines, only warnings and errors).
    #[arg(long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Show what is on a disk, partition or image: partition table, filesystems, sizes, UUIDs.
    Probe(ProbeArgs),
    /// Partition table backup and restore in `sfdisk --dump` text.
    Ptable(PtableArgs),
    /// Create a repository in a directory.
    Init(InitArgs),
    /// Back up a block device or image file: full the first time, incremental afterwards.
    Backup(BackupArgs),
    /// List snapshots.
    Snapshots(SnapshotsArgs),
    /// Write a snapshot (REPO SNAPSHOT TARGET) or a copy (COPY TARGET) to a block device or a
    /// file (sparse).
    #[command(
        override_usage = "volback restore [OPTIONS] REPO SNAPSHOT TARGET\n       \
                                volback restore [OPTIONS] COPY TARGET"
    )]
    Restore(RestoreArgs),
    /// Show a snapshot read-only without restoring it: the volume and each partition as image
    /// files in DIR (FUSE), and with --files the filesystems' files.
    #[cfg(target_os = "linux")]
    Mount(MountArgs),
    /// Undo `volback mount`: unmount the files, detach the loop devices, unmount the view.
    #[cfg(target_os = "linux")]
    Umount(UmountArgs),
    /// Serve a snapshot (REPO SNAPSHOT) or a copy (COPY) read-only over NBD until Ctrl-C
    /// (prints the URI to connect to).
    Serve(ServeArgs),
    /// Check snapshots and their chunks, or a copy (every block against its SHA-256).
    Verify(VerifyArgs),
    /// Copy a volume to plain image files (raw, BIN slices, VHD, VHDX, qcow2) with a SHA-256
    /// per block; `--update` rewrites only the blocks that changed.
    Copy(CopyArgs),
    /// Write a snapshot as a copy: plain image files with a SHA-256 per block.
    Export(ExportArgs),
    /// Remove snapshots: the ones named, or those a --keep-* policy does not keep (per
    /// volume). Their data stays in the repository until `prune`.
    #[command(override_usage = "volback forget [OPTIONS] REPO SNAPSHOT...\n       \
                                volback forget [OPTIONS] REPO --keep-* N [--source PATH]")]
    Forget(ForgetArgs),
    /// Remove data no snapshot uses any more (repacking partly used packs); backups may keep
    /// running meanwhile.
    Prune(PruneArgs),
    /// Show how much the repository, or one snapshot, stores.
    Stats(StatsArgs),
    /// Manage the passwords of an encrypted repository: its key slots.
    Key(KeyArgs),
}

/// Where the password of an encrypted repository comes from. Without these options:
/// the environment variable VOLBACK_PASSWORD_FILE (a file holding it), else
/// VOLBACK_PASSWORD, else a prompt on the terminal (never without one).
#[derive(Args, Clone, Debug, Default)]
pub struct PasswordArgs {
    /// Read the repository password from the first line of FILE.
    #[arg(long, value_name = "FILE", help_heading = "Encryption")]
    pub password_file: Option<PathBuf>,
    /// Run CMD through the shell (sh -c, cmd /C) and use the first line it prints as the
    /// repository password.
    #[arg(
        long,
        value_name = "CMD",
        conflicts_with = "password_file",
        help_heading = "Encryption"
    )]
    pub password_command: Option<String>,
}

/// Argon2id costs of a new key slot (defaults: 64 MiB, 3 passes, 4 lanes).
#[derive(Args, Clone, Debug)]
pub struct KdfArgs {
    /// Argon2id memory in MiB.
    #[arg(
        long,
        value_name = "MIB",
        default_value_t = 64,
        help_heading = "Encryption"
    )]
    pub kdf_memory: u32,
    /// Argon2id passes.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 3,
        help_heading = "Encryption"
    )]
    pub kdf_iterations: u32,
    /// Argon2id lanes (computed in parallel on the available cores).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 4,
        help_heading = "Encryption"
    )]
    pub kdf_parallelism: u32,
}

/// Where a new password comes from (`key add`, `key passwd`). Without the option: the
/// environment variable VOLBACK_NEW_PASSWORD, else a prompt (twice) on the terminal.
#[derive(Args, Clone, Debug, Default)]
pub struct NewPasswordArgs {
    /// Read the new password from the first line of FILE.
    #[arg(long, value_name = "FILE", help_heading = "Encryption")]
    pub new_password_file: Option<PathBuf>,
}

// Arguments of `volback key`.
#[derive(Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    pub action: KeyCommand,
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// List the key slots (`*` marks the one the password opened).
    List {
        repo: PathBuf,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Add a key slot: another password that opens the repository.
    Add {
        repo: PathBuf,
        #[command(flatten)]
        password: PasswordArgs,
        #[command(flatten)]
        new_password: NewPasswordArgs,
        #[command(flatten)]
        kdf: KdfArgs,
    },
    /// Remove a key slot (not the last one, nor the one the password given opens).
    Remove {
        repo: PathBuf,
        /// The slot id (`volback key list`).
        id: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Change the password: a new slot replaces the one the current password opens.
    Passwd {
        repo: PathBuf,
        #[command(flatten)]
        password: PasswordArgs,
        #[command(flatten)]
        new_password: NewPasswordArgs,
        #[command(flatten)]
        kdf: KdfArgs,
    },
}

// Arguments of `volback probe`.
#[derive(Args)]
pub struct ProbeArgs {
    /// Block device or image file (opened read-only); without it, the machine's disks and
    /// volumes are listed with their sizes and what is on them.
    pub source: Option<PathBuf>,
    /// Print the report as JSON (schema in docs/PROBE.md).
    #[arg(long)]
    pub json: bool,
}

// Arguments of `volback ptable`.
#[derive(Args)]
pub struct PtableArgs {
    #[command(subcommand)]
    pub action: PtableCommand,
}

// Arguments of `volback init`.
#[derive(Args)]
pub struct InitArgs {
    /// Repository directory (created if missing; must be empty).
    pub repo: PathBuf,
    /// Chunk hash: blake3 (default, fastest here) or sha256.
    #[arg(long, default_value = "blake3")]
    pub hash: HashAlgorithm,
    /// zstd compression level for chunks.
    #[arg(long, default_value_t = 3)]
    pub zstd_level: i32,
    /// Default block size in bytes (power of two, 4 KiB to 16 MiB).
    #[arg(long, value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// Target size of the pack files that hold the compressed data (1M to 128M, default
    /// 16M).
    #[arg(long, value_parser = parse_size)]
    pub pack_size: Option<u64>,
    /// Create a plain repository: nothing encrypted, no password (readable by older
    /// volback versions).
    #[arg(long, help_heading = "Encryption", conflicts_with_all = [
        "password_file", "password_command", "kdf_memory", "kdf_iterations", "kdf_parallelism",
    ])]
    pub no_encryption: bool,
    /// The first password (prompted twice on a terminal when not given).
    #[command(flatten)]
    pub password: PasswordArgs,
    #[command(flatten)]
    pub kdf: KdfArgs,
}

// Arguments of `volback backup`.
#[derive(Args)]
pub struct BackupArgs {
    /// Block device or regular file to read (opened read-only).
    pub source: PathBuf,
    /// Repository directory.
    pub repo: PathBuf,
    /// Tag to attach to the snapshot (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Block size for this volume (default: the repository's).
    #[arg(long, value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// Seconds between checkpoints that an interrupted backup resumes from.
    #[arg(long, default_value_t = 5.0)]
    pub checkpoint_secs: f64,
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Start over instead of resuming an interrupted backup of this volume.
    #[arg(long)]
    pub restart: bool,
    /// Read every block, also those the filesystem does not use (forensic copy).
    #[arg(long)]
    pub all_blocks: bool,
    /// Back up even though the volume is mounted read-write (the copy may be inconsistent).
    #[arg(long)]
    pub allow_mounted: bool,
    /// Read the volume through a snapshot: `vss` takes a Windows shadow copy of the volume
    /// (\\.\X: or \\?\Volume{GUID}), backs the copy up and deletes it, also after an error
    /// or Ctrl-C (experimental; refused with the reason where VSS is missing: Linux, wine);
    /// `none` reads the volume as it is. Default: `vss` on Windows for a volume with NTFS
    /// mounted, `none` otherwise.
    #[arg(long, value_enum)]
    pub snapshot: Option<SnapshotKind>,
    /// Read and hash every used block, also those change tracking finds unchanged since
    /// the parent snapshot (ext4 inodes and extent trees).
    #[arg(long)]
    pub rehash: bool,
    /// Work out and print what the backup would do (parent, resume, change tracking, blocks
    /// to read), then stop: nothing is written to the repository or the source.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub password: PasswordArgs,
}

/// How `backup --snapshot` reads the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SnapshotKind {
    /// The volume as it is.
    None,
    /// A Volume Shadow Copy Service snapshot (Windows).
    Vss,
}

// Arguments of `volback snapshots`.
#[derive(Args)]
pub struct SnapshotsArgs {
    pub repo: PathBuf,
    /// Print a JSON array.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub password: PasswordArgs,
}

// Arguments of `volback restore`.
#[derive(Args)]
pub struct RestoreArgs {
    /// Repository directory, or a copy (made by `copy` or `export`).
    #[arg(value_name = "REPO|COPY")]
    pub repo: PathBuf,
    /// Snapshot id, unique id prefix, `latest` or `latest:SOURCE`; for a copy, the target.
    #[arg(value_name = "SNAPSHOT|TARGET")]
    pub snapshot: String,
    /// Target block device or file (with a repository).
    pub target: Option<PathBuf>,
    /// After writing, flush and read every data block back from the target and compare it
    /// with the snapshot (chunks are always checked against their hashes).
    #[arg(long)]
    pub verify: bool,
    /// Read the target first and write only the blocks that differ (a target holding an
    /// older state of the volume is brought up to date with few writes); zero and unused
    /// ranges are zeroed only where the target is not zero.
    #[arg(long)]
    pub only_changed: bool,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub password: PasswordArgs,
}

// Arguments of `volback mount`.
#[cfg(target_os = "linux")]
#[derive(Args)]
pub struct MountArgs {
    /// REPO SNAPSHOT DIR.
    #[arg(num_args = 2..=3, required = true, value_name = "REPO SNAPSHOT DIR")]
    pub args: Vec<PathBuf>,
    /// Also mount the filesystem(s) inside read-only, without journal replay, here (a
    /// partitioned disk gets one directory per partition: part1, part5…).
    #[arg(long, value_name = "MOUNTPOINT")]
    pub files: Option<PathBuf>,
    /// Serve in this process until Ctrl-C instead of starting a background server.
    #[arg(long)]
    pub foreground: bool,
    /// Let other users (and root) read the view (needs user_allow_other in
    /// /etc/fuse.conf when not root).
    #[arg(long)]
    pub allow_other: bool,
    /// Print what was mounted as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub password: PasswordArgs,
}

// Arguments of `volback umount`.
#[cfg(target_os = "linux")]
#[derive(Args)]
pub struct UmountArgs {
    /// The view directory (or a --files mount point of it).
    pub dir: PathBuf,
}

// Arguments of `volback serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// REPO SNAPSHOT (id, unique id prefix, `latest` or `latest:SOURCE`), or COPY.
    #[arg(num_args = 1..=2, required = true, value_name = "REPO SNAPSHOT | COPY")]
    pub args: Vec<String>,
    /// Where to listen: HOST:PORT for TCP (port 0 picks a free port), or a Unix socket
    /// path, recognised by containing a `/` (./nbd.sock, /run/volback.sock).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen_addr)]
    pub nbd: ListenAddr,
    /// Export name (default: the snapshot's 12-character id; clients asking for the
    /// empty default name get it too).
    #[arg(long, value_name = "EXPORT")]
    pub name: Option<String>,
    /// Most clients connected at once; more connections are closed at once.
    #[arg(long, default_value_t = 16)]
    pub max_clients: usize,
    #[command(flatten)]
    pub password: PasswordArgs,
}

// Arguments of `volback verify`.
#[derive(Args)]
pub struct VerifyArgs {
    /// Repository directory, or a copy.
    #[arg(value_name = "REPO|COPY")]
    pub repo: PathBuf,
    /// Snapshot to check (default: all).
    pub snapshot: Option<String>,
    /// Read and re-hash every chunk.
    #[arg(long)]
    pub read_data: bool,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub password: PasswordArgs,
}

// Arguments of `volback copy`.
#[derive(Args)]
pub struct CopyArgs {
    /// Block device or regular file to read (opened read-only).
    pub source: PathBuf,
    /// The copy: an image file (raw, vhd, vhdx, qcow2; raw slices are DEST.000, …) or a
    /// directory (bin).
    pub dest: PathBuf,
    /// raw, bin, vhd, vhd-dynamic, vhdx or qcow2 (required for a new copy).
    #[arg(long, required_unless_present = "update")]
    pub format: Option<CopyFormat>,
    /// Update an existing copy in place (or finish an interrupted copy or update).
    #[arg(long)]
    pub update: bool,
    /// Split a raw or bin copy into files of this size (a multiple of the block size).
    #[arg(long, value_parser = parse_size, conflicts_with = "update")]
    pub slice_size: Option<u64>,
    /// Block size of a new copy (default 256 KiB): the unit of hashing and of updates.
    #[arg(long, value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// Copy every block, also those the filesystem does not use (forensic copy).
    #[arg(long)]
    pub all_blocks: bool,
    /// Read the volume even though it is mounted read-write (the copy may be inconsistent).
    #[arg(long)]
    pub allow_mounted: bool,
    /// Read and hash every used block, also those change tracking finds unchanged since
    /// the copy was last written (ext4 inodes and extent trees).
    #[arg(long)]
    pub rehash: bool,
    /// Seconds between checkpoints that an interrupted run continues from.
    #[arg(long, default_value_t = 5.0)]
    pub checkpoint_secs: f64,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

// Arguments of `volback export`.
#[derive(Args)]
pub struct ExportArgs {
    pub repo: PathBuf,
    /// Snapshot id, unique id prefix, `latest` or `latest:SOURCE`.
    pub snapshot: String,
    /// Output image file (raw, vhd, vhdx, qcow2) or directory (bin).
    pub out: PathBuf,
    /// raw, bin, vhd, vhd-dynamic, vhdx or qcow2.
    #[arg(long, required = true)]
    pub format: Option<CopyFormat>,
    /// Split a raw or bin copy into files of this size (a multiple of the block size).
    #[arg(long, value_parser = parse_size)]
    pub slice_size: Option<u64>,
    /// Block size of the copy (default: the snapshot's).
    #[arg(long, value_parser = parse_size)]
    pub block_size: Option<u64>,
    #[arg(long, default_value_t = 5.0)]
    pub checkpoint_secs: f64,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub password: PasswordArgs,
}

// Arguments of `volback forget`.
#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// Repository directory.
    pub repo: PathBuf,
    /// Snapshots to remove: ids, unique id prefixes, `latest` or `latest:SOURCE` (removed
    /// even when they are the newest of their volume). Without them, a --keep-* policy.
    #[arg(value_name = "SNAPSHOT", conflicts_with_all = [
        "keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly",
        "keep_within", "keep_tags", "source", "volume_key",
    ])]
    pub snapshots: Vec<String>,
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N", help_heading = "Policy")]
    pub keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last N hours that have one (UTC).
    #[arg(long, value_name = "N", help_heading = "Policy")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest snapshot of each of the last N days that have one (UTC).
    #[arg(long, value_name = "N", help_heading = "Policy")]
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the last N ISO weeks that have one (UTC).
    #[arg(long, value_name = "N", help_heading = "Policy")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the last N months that have one (UTC).
    #[arg(long, value_name = "N", help_heading = "Policy")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest snapshot of each of the last N years that have one (UTC).
    #[arg(long, value_name = "N", help_heading = "Policy")]
    pub keep_yearly: Option<u32>,
    /// Keep every snapshot at most DURATION older than the volume's newest snapshot:
    /// numbers with units y, m (months), w, d, h, e.g. 30d, 12h, 1y6m.
    #[arg(long, value_name = "DURATION", value_parser = parse_keep_within, help_heading = "Policy")]
    pub keep_within: Option<KeepWithin>,
    /// Keep every snapshot with this tag (repeatable: any of them).
    #[arg(long = "keep-tag", value_name = "TAG", help_heading = "Policy")]
    pub keep_tags: Vec<String>,
    /// Apply the policy only to the volume backed up from this path (as `backup` named it).
    #[arg(long, value_name = "PATH", help_heading = "Policy")]
    pub source: Option<PathBuf>,
    /// Apply the policy only to the volume with this key (`snapshots --json` shows it).
    #[arg(long, value_name = "KEY", help_heading = "Policy")]
    pub volume_key: Option<String>,
    /// Show what would be removed and why each snapshot is kept; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run `prune` afterwards (with the prune options below).
    #[arg(long)]
    pub prune: bool,
    #[command(flatten)]
    pub prune_opts: PruneOptions,
    /// Print the result as JSON (with --prune: one JSON line each for forget and prune).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub password: PasswordArgs,
}

/// Options shared by `prune` and `forget --prune`.
#[derive(Args, Clone, Debug)]
pub struct PruneOptions {
    /// Repack partly used packs until at most this percentage of the packs' bytes is unused.
    #[arg(long, value_name = "PERCENT", default_value_t = 5.0, value_parser = parse_percent, help_heading = "Prune")]
    pub max_unused: f64,
    /// Repack at most this many bytes in one run (default: no limit).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, help_heading = "Prune")]
    pub max_repack: Option<u64>,
}

// Arguments of `volback prune`.
#[derive(Args, Clone, Debug)]
pub struct PruneArgs {
    /// Repository directory.
    pub repo: PathBuf,
    #[command(flatten)]
    pub opts: PruneOptions,
    /// Show what would be removed and repacked; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub password: PasswordArgs,
    /// Not an option: snapshots `forget --dry-run --prune` would remove, which a dry run of
    /// prune may treat as gone (empty otherwise).
    #[arg(skip)]
    pub assume_removed: Vec<String>,
}

// Arguments of `volback stats`.
#[derive(Args, Clone, Debug)]
pub struct StatsArgs {
    /// Repository directory.
    pub repo: PathBuf,
    /// Snapshot id, unique id prefix, `latest` or `latest:SOURCE` (default: the whole
    /// repository).
    pub snapshot: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub password: PasswordArgs,
}

#[derive(Subcommand)]
pub enum PtableCommand {
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
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
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

/// Parses `--keep-within DURATION` (a usage error when malformed).
fn parse_keep_within(s: &str) -> std::result::Result<KeepWithin, String> {
    KeepWithin::parse(s).map_err(|e| e.to_string())
}

/// Parses a percentage from 0 to 100.
fn parse_percent(s: &str) -> std::result::Result<f64, String> {
    let t = s.trim().trim_end_matches('%');
    match t.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 0 to 100")),
    }
}

/// Parses `--nbd ADDR` (a usage error when malformed).
fn parse_listen_addr(s: &str) -> std::result::Result<ListenAddr, String> {
    ListenAddr::parse(s).map_err(|e| e.to_string())
}

impl KdfArgs {
    /// The Argon2id parameters these options ask for (checked by the library).
    pub fn params(&self) -> Result<volback::crypto::keyslot::KdfParams> {
        Ok(volback::crypto::keyslot::KdfParams {
            memory_kib: self
                .kdf_memory
                .checked_mul(1024)
                .context("--kdf-memory is too large")?,
            iterations: self.kdf_iterations,
            parallelism: self.kdf_parallelism,
        })
    }
}

/// A `--block-size` value as the library takes it.
pub fn block_size_arg(v: Option<u64>) -> Result<Option<u32>> {
    v.map(|b| u32::try_from(b).context("block size too large"))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("volback").chain(args.iter().copied()))
    }

    #[test]
    fn forget_arguments() {
        let cli = parse(&[
            "forget",
            "r",
            "--keep-daily",
            "7",
            "--keep-within",
            "1y2m",
            "--keep-tag",
            "a",
            "--keep-tag",
            "b",
            "--prune",
            "--max-unused",
            "10%",
            "--max-repack",
            "1G",
        ])
        .unwrap();
        let Command::Forget(a) = cli.command else {
            panic!("not forget")
        };
        assert_eq!(a.keep_daily, Some(7));
        assert_eq!(a.keep_last, None);
        assert_eq!(a.keep_within.unwrap().months, 14);
        assert_eq!(a.keep_tags, vec!["a", "b"]);
        assert!(a.prune && a.snapshots.is_empty());
        assert_eq!(a.prune_opts.max_unused, 10.0);
        assert_eq!(a.prune_opts.max_repack, Some(1 << 30));
        assert!(parse(&["forget", "r", "--keep-within", "30"]).is_err());
        assert!(parse(&["forget", "r", "--keep-daily", "-1"]).is_err());
        let Command::Forget(a) = parse(&["forget", "r", "abc", "latest"]).unwrap().command else {
            panic!("not forget")
        };
        assert_eq!(a.snapshots, vec!["abc", "latest"]);
        // Names and a policy are not mixed: a usage error.
        let e = parse(&["forget", "r", "abc", "--keep-last", "1"])
            .err()
            .unwrap();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        assert!(parse(&["forget", "r", "abc", "--source", "/dev/x"]).is_err());
    }

    #[test]
    fn password_and_key_arguments() {
        let Command::Init(a) = parse(&["init", "r", "--kdf-memory", "1", "--kdf-iterations", "1"])
            .unwrap()
            .command
        else {
            panic!("not init")
        };
        assert!(!a.no_encryption);
        let p = a.kdf.params().unwrap();
        assert_eq!((p.memory_kib, p.iterations, p.parallelism), (1024, 1, 4));
        let Command::Init(a) = parse(&["init", "r"]).unwrap().command else {
            panic!("not init")
        };
        assert_eq!(
            a.kdf.params().unwrap(),
            volback::crypto::keyslot::KdfParams::default()
        );
        // A plain repository takes no password and no key derivation costs.
        for extra in [
            &["--password-file", "f"][..],
            &["--password-command", "c"],
            &["--kdf-memory", "1"],
        ] {
            let mut args = vec!["init", "r", "--no-encryption"];
            args.extend_from_slice(extra);
            assert!(parse(&args).is_err(), "{extra:?}");
        }
        assert!(parse(&["init", "r", "--kdf-memory", "4194304"]).is_ok());
        let Command::Init(a) = parse(&["init", "r", "--kdf-memory", "4194304"])
            .unwrap()
            .command
        else {
            panic!("not init")
        };
        assert!(a.kdf.params().is_err(), "MiB to KiB overflows");
        // One password source option at a time.
        assert!(
            parse(&[
                "snapshots",
                "r",
                "--password-file",
                "f",
                "--password-command",
                "c"
            ])
            .is_err()
        );
        for cmd in [
            &["backup", "s", "r"][..],
            &["snapshots", "r"],
            &["restore", "r", "latest", "t"],
            &["verify", "r"],
            &["export", "r", "latest", "o", "--format", "raw"],
            &["forget", "r", "x"],
            &["prune", "r"],
            &["stats", "r"],
            &["serve", "r", "latest", "--nbd", "./s"],
            &["key", "list", "r"],
            &["key", "add", "r"],
            &["key", "remove", "r", "0123456789abcdef"],
            &["key", "passwd", "r"],
        ] {
            let mut args = cmd.to_vec();
            args.extend_from_slice(&["--password-file", "f"]);
            assert!(parse(&args).is_ok(), "{cmd:?}");
        }
        let Command::Key(k) = parse(&[
            "key",
            "passwd",
            "r",
            "--new-password-file",
            "n",
            "--kdf-iterations",
            "2",
        ])
        .unwrap()
        .command
        else {
            panic!("not key")
        };
        let KeyCommand::Passwd {
            new_password, kdf, ..
        } = k.action
        else {
            panic!("not passwd")
        };
        assert_eq!(new_password.new_password_file, Some(PathBuf::from("n")));
        assert_eq!(kdf.kdf_iterations, 2);
        assert!(parse(&["key", "remove", "r"]).is_err());
    }

    #[test]
    fn prune_and_stats_arguments() {
        let Command::Prune(a) = parse(&["prune", "r", "--dry-run"]).unwrap().command else {
            panic!("not prune")
        };
        assert_eq!((a.opts.max_unused, a.opts.max_repack), (5.0, None));
        assert!(a.dry_run && !a.json && a.assume_removed.is_empty());
        assert!(parse(&["prune", "r", "--max-unused", "101"]).is_err());
        let Command::Stats(a) = parse(&["stats", "r", "latest", "--json"]).unwrap().command else {
            panic!("not stats")
        };
        assert_eq!(a.snapshot.as_deref(), Some("latest"));
        assert!(a.json);
    }
}
