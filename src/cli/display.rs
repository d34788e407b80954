//! Terminal output: progress bars, human-readable sizes, and the lines several commands share.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use volback::progress::Progress;

/// Formats a byte count with binary units ("256.0 KiB").
pub fn human_bytes(n: u64) -> String {
    volback::bytes::human(n, false)
}

/// Progress shown as a bar on a terminal; nothing but warnings otherwise.
pub struct CliProgress {
    enabled: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl CliProgress {
    pub fn new(quiet: bool) -> CliProgress {
        CliProgress {
            enabled: !quiet && std::io::stderr().is_terminal(),
            bar: Mutex::new(None),
        }
    }
}

impl Progress for CliProgress {
    fn start(&self, phase: &str, total: u64) {
        if !self.enabled {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(phase.to_string());
        *self.bar.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar);
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            b.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).take() {
            b.finish_and_clear();
        }
    }

    fn warn(&self, message: &str) {
        let guard = self.bar.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(b) => b.println(format!("volback: warning: {message}")),
            None => eprintln!("volback: warning: {message}"),
        }
    }
}

/// The summary line of a restore: `what` ("snapshot 3fa2…", "copy /x") to `target`.
pub fn print_restore(
    what: &str,
    target: &std::path::Path,
    r: &volback::restore::RestoreReport,
    opts: &volback::restore::RestoreOptions,
) {
    let mut line = format!(
        "restored {what} to {}: {} written, {} zero",
        target.display(),
        human_bytes(r.bytes_written),
        human_bytes(r.zero_bytes)
    );
    if opts.only_changed {
        line.push_str(&format!(
            " ({} of it zeroed), {} already up to date",
            human_bytes(r.zeroed_bytes),
            human_bytes(r.unchanged_bytes)
        ));
    }
    if opts.verify {
        line.push_str(", read back and verified");
    }
    println!("{line}");
}

/// The `filesystem` line of a backup or copy report (none without a filesystem), noting
/// "(all blocks `done`)" when every block was read.
pub fn print_filesystem(fs: Option<&volback::fs::FsInfo>, all_blocks: bool, done: &str) {
    if let Some(fs) = fs {
        let note = if all_blocks {
            format!(" (all blocks {done})")
        } else {
            String::new()
        };
        println!("  filesystem      {}", filesystem_line(fs, &note));
    }
}

/// The `volume` and `read` lines of a backup or copy report.
pub fn print_volume(size: u64, blocks: u64, block_size: u64, bytes_read: u64) {
    println!(
        "  volume          {} in {} blocks of {}",
        human_bytes(size),
        blocks,
        human_bytes(block_size)
    );
    println!("  read            {}", human_bytes(bytes_read));
}

/// A filesystem as the reports show it: `ext4 UUID LABEL, 1.2 GiB used` (FAT with its version:
/// `vfat (FAT32) …`), then `note` (" (all blocks read)").
pub fn filesystem_line(fs: &volback::fs::FsInfo, note: &str) -> String {
    format!(
        "{}{} {} {}, {} used{note}",
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
    )
}

/// `n` followed by the singular or plural noun.
pub fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}
