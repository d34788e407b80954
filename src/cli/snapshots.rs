//! `volback snapshots REPO [--json]`: list snapshots.

use super::args::SnapshotsArgs;
use super::display::human_bytes;
use super::report::{SnapshotJson, print_json};
use anyhow::Result;
use std::process::ExitCode;
use volback::repo::Repository;

/// Lists the snapshots; unreadable snapshot files are named on stderr and make the exit
/// code 1.
pub fn run(a: SnapshotsArgs) -> Result<ExitCode> {
    let repository = Repository::open(&a.repo)?;
    let (list, damaged) = repository.list_snapshots_lenient()?;
    for e in &damaged {
        eprintln!("volback: error: {}", volback::error::chain(e));
    }
    if a.json {
        let arr: Vec<_> = list.iter().map(SnapshotJson::new).collect();
        print_json(&arr)?;
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
