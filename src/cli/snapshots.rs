//! `volback snapshots REPO [--json]`: list snapshots.

use super::args::SnapshotsArgs;
use super::display::human_bytes;
use super::report::{SnapshotJson, print_json};
use anyhow::Result;
use std::process::ExitCode;

/// Lists the snapshots; unreadable snapshot files are named on stderr and make the exit
/// code 1.
pub fn run(a: SnapshotsArgs) -> Result<ExitCode> {
    let repository = super::password::open(&a.repo, &a.password)?;
    let (list, damaged) = repository.list_snapshots_lenient()?;
    for e in &damaged {
        eprintln!("volback: error: {}", volback::error::chain(e));
    }
    if a.json {
        let arr: Vec<_> = list.iter().map(SnapshotJson::new).collect();
        print_json(&arr)?;
    } else {
        // The tags column only when some snapshot has tags (`backup --tag`).
        let tags: Vec<String> = list.iter().map(|s| s.header.tags.join(",")).collect();
        let width = tags.iter().map(|t| t.chars().count()).max().unwrap_or(0);
        let tag_col = |t: &str| match width {
            0 => String::new(),
            w => format!("{t:<w$}  ", w = w.max(4)),
        };
        println!(
            "{:<12}  {:<20}  {:>10}  {:>10}  {:<12}  {}source",
            "id",
            "time",
            "size",
            "stored",
            "parent",
            tag_col("tags")
        );
        for (s, t) in list.iter().zip(&tags) {
            let h = &s.header;
            println!(
                "{:<12}  {:<20}  {:>10}  {:>10}  {:<12}  {}{}",
                &s.id[..12],
                h.time,
                human_bytes(h.source.size),
                human_bytes(h.stats.new_bytes_stored),
                h.parent.as_deref().map_or("-", |p| &p[..12.min(p.len())]),
                tag_col(t),
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
