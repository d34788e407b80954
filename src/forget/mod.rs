//! `forget`: remove snapshot files, named ones or those a retention policy does not keep.
//!
//! Forgetting removes only snapshot files (`snapshots/<id>`); the data they alone referred to
//! stays in the repository until `prune` removes it. It takes the shared repository lock like
//! every command (a backup may run meanwhile) and works on repositories of format 1 and 2.
//!
//! Two modes, never mixed:
//! - named snapshots (ids, unique id prefixes, `latest`, `latest:SOURCE`): removed, even
//!   the newest of a volume, even when the file is damaged (a named id need not be readable);
//! - a [`Policy`] applied to the snapshots of each volume separately (grouped by the header's
//!   `volume_key`), or of one volume (`source` or `volume_key`): see [`policy`]. Damaged
//!   snapshot files are left alone with a warning. A snapshot that the journal of an
//!   interrupted backup names as its parent is kept too ([`Rule::Resume`]): removing it would
//!   make that backup start over instead of resuming.
//!
//! Plan, report, execute: [`forget`] decides everything first, then (unless `dry_run`) removes
//! the files and flushes the directory once.

pub mod policy;

use crate::error::{Error, Result, chain};
use crate::progress::Progress;
use crate::repo::journal::Journal;
use crate::repo::{Repository, SnapshotEntry};
pub use policy::{Decision, KeepWithin, Policy, Rule, Snap};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// What to forget.
#[derive(Debug, Clone, Default)]
pub struct ForgetRequest {
    /// Snapshot selectors to remove. Empty: apply `policy`.
    pub snapshots: Vec<String>,
    /// The retention policy (when no snapshot is named).
    pub policy: Policy,
    /// Apply the policy only to the volume backed up from this path.
    pub source: Option<PathBuf>,
    /// Apply the policy only to the volume with this key (`volume_key` of its snapshots).
    pub volume_key: Option<String>,
    /// Decide and report, remove nothing.
    pub dry_run: bool,
}

/// Keep or remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Keep,
    Remove,
}

/// The decision for one snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotDecision {
    pub id: String,
    /// RFC 3339 UTC; `None` for a named snapshot whose file cannot be read.
    pub time: Option<String>,
    pub time_unix: Option<i64>,
    pub volume_key: Option<String>,
    /// The source path recorded in the snapshot.
    pub source: Option<String>,
    pub tags: Vec<String>,
    pub action: Action,
    /// The rules that keep it ([`Rule::Named`] for a named snapshot that is removed).
    pub reasons: Vec<Rule>,
}

/// What [`forget`] decided (and did, unless `dry_run`).
#[derive(Debug, Clone, Serialize)]
pub struct ForgetReport {
    pub dry_run: bool,
    /// Every snapshot considered: per volume (volume keys in order), newest first; named
    /// snapshots in the order named.
    pub snapshots: Vec<SnapshotDecision>,
    /// Snapshots kept.
    pub kept: usize,
    /// Snapshots removed (to be removed in a dry run).
    pub removed: usize,
}

impl ForgetReport {
    /// Ids of the snapshots removed (or that a dry run would remove).
    pub fn removed_ids(&self) -> Vec<String> {
        self.snapshots
            .iter()
            .filter(|d| d.action == Action::Remove)
            .map(|d| d.id.clone())
            .collect()
    }
}

/// Plans the request (see the module doc) and, unless `request.dry_run`, removes the snapshot
/// files it condemns. Errors: [`Error::InvalidArgument`] for a request with neither names nor
/// rules, or with both; [`Error::SnapshotNotFound`] for a name or a source that matches
/// nothing.
pub fn forget(
    repo: &Repository,
    request: &ForgetRequest,
    progress: &dyn Progress,
) -> Result<ForgetReport> {
    let decisions = plan(repo, request, progress)?;
    let removed: Vec<&str> = decisions
        .iter()
        .filter(|d| d.action == Action::Remove)
        .map(|d| d.id.as_str())
        .collect();
    if !request.dry_run && !removed.is_empty() {
        remove_snapshot_files(repo, &removed)?;
    }
    let removed = removed.len();
    Ok(ForgetReport {
        dry_run: request.dry_run,
        kept: decisions.len() - removed,
        removed,
        snapshots: decisions,
    })
}

/// Decides for every snapshot concerned, changing nothing.
pub fn plan(
    repo: &Repository,
    request: &ForgetRequest,
    progress: &dyn Progress,
) -> Result<Vec<SnapshotDecision>> {
    let has_policy = !request.policy.is_empty();
    let selects_volume = request.source.is_some() || request.volume_key.is_some();
    if request.snapshots.is_empty() && !has_policy {
        return Err(Error::InvalidArgument(
            "nothing to forget: name snapshots or give a --keep-* rule".into(),
        ));
    }
    if !request.snapshots.is_empty() && (has_policy || selects_volume) {
        return Err(Error::InvalidArgument(
            "name snapshots or give --keep-* rules (with --source or --volume-key), not both"
                .into(),
        ));
    }
    if !request.snapshots.is_empty() {
        return plan_named(repo, &request.snapshots, progress);
    }
    let (list, damaged) = repo.list_snapshots_lenient()?;
    for e in &damaged {
        progress.warn(&format!("leaving unreadable snapshot alone: {}", chain(e)));
    }
    let list: Vec<SnapshotEntry> = match (&request.source, &request.volume_key) {
        (None, None) => list,
        (source, key) => {
            let mut matches = SourceMatcher::new(source.as_deref());
            let selected: Vec<SnapshotEntry> = list
                .into_iter()
                .filter(|s| key.as_ref().is_none_or(|k| &s.header.volume_key == k))
                .filter(|s| matches.matches(&s.header.source.path))
                .collect();
            if selected.is_empty() {
                let what = match (source, key) {
                    (Some(p), _) => format!("source {}", p.display()),
                    (None, Some(k)) => format!("volume key {k}"),
                    (None, None) => unreachable!("one of them is given"),
                };
                return Err(Error::SnapshotNotFound { selector: what });
            }
            selected
        }
    };
    let mut decisions = apply_by_volume(&request.policy, &list);
    let resume = resume_parents(repo, progress)?;
    for d in &mut decisions {
        if resume.contains(&d.id) {
            d.reasons.push(Rule::Resume);
            d.action = Action::Keep;
        }
    }
    Ok(decisions)
}

/// The parents named by the journals of interrupted backups. An unreadable journal is skipped
/// with a warning (its backup cannot resume anyway).
fn resume_parents(repo: &Repository, progress: &dyn Progress) -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    // `.tmp-*` files are journals being created (FORMAT §7), not interrupted backups: the
    // list leaves them out.
    for path in crate::prune::mark::journal_paths(repo)? {
        match Journal::read_header(repo.backend().as_ref(), &path, repo.sealer()) {
            Ok(Some(h)) => out.extend(h.parent),
            Ok(None) => {}
            Err(e) => progress.warn(&format!("skipping unreadable journal: {}", chain(&e))),
        }
    }
    Ok(out)
}

/// Applies `policy` to each volume of `list` separately: volumes in `volume_key` order, each
/// newest first.
pub fn apply_by_volume(policy: &Policy, list: &[SnapshotEntry]) -> Vec<SnapshotDecision> {
    let mut volumes: BTreeMap<&str, Vec<&SnapshotEntry>> = BTreeMap::new();
    for s in list {
        volumes
            .entry(s.header.volume_key.as_str())
            .or_default()
            .push(s);
    }
    let mut out = Vec::with_capacity(list.len());
    for entries in volumes.values() {
        let snaps: Vec<Snap> = entries
            .iter()
            .map(|s| Snap {
                id: s.id.clone(),
                time: s.header.time_unix,
                nanos: s.header.time_nanos,
                tags: s.header.tags.clone(),
                parent: s.header.parent.clone(),
            })
            .collect();
        let by_id: HashMap<&str, &SnapshotEntry> =
            entries.iter().map(|s| (s.id.as_str(), *s)).collect();
        for d in policy::apply(policy, &snaps) {
            let Some(s) = by_id.get(d.id.as_str()) else {
                continue;
            };
            out.push(decision(&d.id, Some(s), d.reasons));
        }
    }
    out
}

/// The report line of a snapshot.
fn decision(id: &str, entry: Option<&SnapshotEntry>, reasons: Vec<Rule>) -> SnapshotDecision {
    let action = match reasons.is_empty() || reasons == [Rule::Named] {
        true => Action::Remove,
        false => Action::Keep,
    };
    let h = entry.map(|e| &e.header);
    SnapshotDecision {
        id: id.to_string(),
        time: h.map(|h| h.time.clone()),
        time_unix: h.map(|h| h.time_unix),
        volume_key: h.map(|h| h.volume_key.clone()),
        source: h.map(|h| h.source.path.clone()),
        tags: h.map(|h| h.tags.clone()).unwrap_or_default(),
        action,
        reasons,
    }
}

/// Resolves the named snapshots (each once, in the order named).
fn plan_named(
    repo: &Repository,
    selectors: &[String],
    progress: &dyn Progress,
) -> Result<Vec<SnapshotDecision>> {
    let mut out: Vec<SnapshotDecision> = Vec::new();
    for sel in selectors {
        let id = repo.resolve_warn(sel, progress)?;
        if out.iter().any(|d| d.id == id) {
            continue;
        }
        // A damaged file named by its id is still removed; its header is just unknown.
        let entry = match repo.open_snapshot(&id) {
            Ok(snap) => Some(SnapshotEntry {
                id: id.clone(),
                header: snap.header().clone(),
            }),
            Err(e) => {
                progress.warn(&format!("removing unreadable snapshot: {}", chain(&e)));
                None
            }
        };
        out.push(decision(&id, entry.as_ref(), vec![Rule::Named]));
    }
    Ok(out)
}

/// Removes snapshot objects, durably. One already gone (another `forget`) is not an error.
fn remove_snapshot_files(repo: &Repository, ids: &[&str]) -> Result<()> {
    for id in ids {
        repo.backend().delete(&format!("snapshots/{id}"))?;
    }
    Ok(())
}

/// Whether a recorded source path names the volume of `--source PATH`: equal to the path as
/// given, made absolute, or canonical, or (snapshots recorded before paths were canonical)
/// resolving to the same file now. The same rule as `latest:SOURCE`.
struct SourceMatcher {
    given: Option<(String, String, Option<PathBuf>)>,
    canonical: HashMap<String, Option<PathBuf>>,
}

impl SourceMatcher {
    fn new(path: Option<&Path>) -> SourceMatcher {
        let given = path.map(|p| {
            let as_given = p.to_string_lossy().into_owned();
            let abs = std::path::absolute(p)
                .map(|a| a.to_string_lossy().into_owned())
                .unwrap_or_else(|_| as_given.clone());
            (as_given, abs, std::fs::canonicalize(p).ok())
        });
        SourceMatcher {
            given,
            canonical: HashMap::new(),
        }
    }

    fn matches(&mut self, recorded: &str) -> bool {
        let Some((as_given, abs, canonical)) = &self.given else {
            return true;
        };
        if recorded == as_given || recorded == abs {
            return true;
        }
        let Some(c) = canonical else {
            return false;
        };
        if Path::new(recorded) == c.as_path() {
            return true;
        }
        self.canonical
            .entry(recorded.to_string())
            .or_insert_with(|| std::fs::canonicalize(recorded).ok())
            .as_ref()
            == Some(c)
    }
}

#[cfg(test)]
mod tests;
