//! `volback ptable dump|restore`: partition tables as `sfdisk --dump` text.

use super::args::{PtableArgs, PtableCommand};
use super::probe::open;
use anyhow::{Context, Result};
use std::io::Read;
use std::path::Path;
use std::process::ExitCode;
use volback::platform::ObjectKind;
use volback::ptable;

/// `volback ptable ACTION`.
pub fn run(a: PtableArgs) -> Result<ExitCode> {
    match a.action {
        PtableCommand::Dump { disk } => dump(&disk),
        PtableCommand::Restore {
            disk,
            file,
            dry_run,
        } => restore(&disk, &file, dry_run),
    }
}

/// `volback ptable dump DISK`.
fn dump(disk: &Path) -> Result<ExitCode> {
    let src = open(disk)?;
    let d = ptable::dump(&src)?;
    for w in &d.warnings {
        eprintln!("volback: warning: {w}");
    }
    print!("{}", d.text);
    Ok(ExitCode::SUCCESS)
}

/// `volback ptable restore DISK FILE [--dry-run]`.
fn restore(disk: &Path, file: &Path, dry_run: bool) -> Result<ExitCode> {
    let text = if file == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("read the partition table from standard input")?;
        s
    } else {
        std::fs::read_to_string(file)
            .with_context(|| format!("read the partition table file {}", file.display()))?
    };
    let script = ptable::parse_script(&text, file)?;
    let plan = ptable::plan_restore(disk, &script, file)?;
    for w in &plan.warnings {
        eprintln!("volback: warning: {w}");
    }
    let kind = plan.table.label.name();
    let n = plan.table.partitions.len();
    if dry_run {
        println!(
            "would write a {kind} partition table with {n} partitions to {} ({} bytes in {} \
             places):",
            disk.display(),
            plan.bytes_to_write(),
            plan.writes.len()
        );
        print!("{}", plan.table.render());
        return Ok(ExitCode::SUCCESS);
    }
    let r = ptable::restore(&plan)?;
    println!(
        "wrote a {kind} partition table with {} partitions to {} ({} bytes), verified",
        r.partitions,
        disk.display(),
        r.bytes_written
    );
    if plan.target_kind == ObjectKind::BlockDevice {
        println!(
            "the kernel still lists the old partitions: run `partx -u {0}` or `blockdev \
             --rereadpt {0}`",
            disk.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
