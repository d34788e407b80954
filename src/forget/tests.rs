//! Tests of `forget` on a repository: grouping by volume, named snapshots, dry runs.

use super::*;
use crate::progress::Silent;
use crate::repo::InitOptions;
use crate::repo::format::BlockRef;
use crate::repo::snapshot::{SnapshotHeader, SnapshotStats, SnapshotWriter};

/// Writes a snapshot of volume `key` (source `/dev/<key>`) taken at `time`; returns its id.
fn add(repo: &Repository, key: &str, time: i64, tags: &[&str]) -> String {
    // Through JSON so that fields other branches add with defaults do not break this test.
    let header: SnapshotHeader = serde_json::from_value(serde_json::json!({
        "time": crate::time::rfc3339(time),
        "time_unix": time,
        "hostname": "h",
        "source": {"path": format!("/dev/{key}"), "kind": "file", "size": 4096,
                   "logical_sector_size": 512, "physical_sector_size": 512},
        "volume_key": key,
        "block_size": 4096,
        "block_count": 1,
        "chunk_hash": repo.config().chunk_hash,
        "parent": null,
        "tags": tags,
        "stats": SnapshotStats::default(),
    }))
    .unwrap();
    let mut w = SnapshotWriter::create(&repo.tmp_dir()).unwrap();
    w.push(BlockRef::Zero, 1).unwrap();
    w.finish(&header, &repo.snapshots_dir()).unwrap()
}

fn repo() -> (tempfile::TempDir, Repository) {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(&dir.path().join("repo"), &InitOptions::default()).unwrap();
    (dir, repo)
}

fn ids(repo: &Repository) -> Vec<String> {
    let mut v = repo.snapshot_ids().unwrap();
    v.sort();
    v
}

fn request(policy: Policy) -> ForgetRequest {
    ForgetRequest {
        policy,
        ..Default::default()
    }
}

#[test]
fn a_policy_applies_to_each_volume_and_keeps_its_newest() {
    let (_d, repo) = repo();
    let a: Vec<String> = (0..4).map(|i| add(&repo, "a", 1000 + i, &[])).collect();
    let b = add(&repo, "b", 10, &[]);
    let tagged = add(&repo, "a", 500, &["gold"]);
    let policy = Policy {
        keep_last: 2,
        keep_tags: vec!["gold".into()],
        ..Default::default()
    };
    // Dry run: decides, removes nothing.
    let mut req = request(policy.clone());
    req.dry_run = true;
    let report = forget(&repo, &req, &Silent).unwrap();
    assert!(report.dry_run);
    assert_eq!((report.kept, report.removed), (4, 2));
    assert_eq!(ids(&repo).len(), 6);
    let order: Vec<&str> = report.snapshots.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        order,
        [&a[3], &a[2], &a[1], &a[0], &tagged, &b]
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
    );
    let d = &report.snapshots[4];
    assert_eq!(
        (d.action, d.reasons.clone()),
        (Action::Keep, vec![Rule::Tag("gold".into())])
    );
    assert_eq!(report.snapshots[5].reasons, vec![Rule::Newest, Rule::Last]);
    assert_eq!(report.snapshots[2].action, Action::Remove);
    let mut removed = report.removed_ids();
    removed.sort();
    let mut want = vec![a[0].clone(), a[1].clone()];
    want.sort();
    assert_eq!(removed, want);
    // For real.
    let report = forget(&repo, &request(policy), &Silent).unwrap();
    assert_eq!(report.removed, 2);
    let mut left = vec![a[2].clone(), a[3].clone(), b, tagged];
    left.sort();
    assert_eq!(ids(&repo), left);
    // Forgetting again with the same policy removes nothing more.
    let again = forget(
        &repo,
        &request(Policy {
            keep_last: 2,
            keep_tags: vec!["gold".into()],
            ..Default::default()
        }),
        &Silent,
    )
    .unwrap();
    assert_eq!(again.removed, 0);
}

#[test]
fn source_and_volume_key_select_one_volume() {
    let (_d, repo) = repo();
    let a1 = add(&repo, "a", 100, &[]);
    let a2 = add(&repo, "a", 200, &[]);
    let b1 = add(&repo, "b", 100, &[]);
    let b2 = add(&repo, "b", 200, &[]);
    let policy = Policy {
        keep_last: 1,
        ..Default::default()
    };
    let mut req = request(policy.clone());
    req.source = Some("/dev/a".into());
    let report = forget(&repo, &req, &Silent).unwrap();
    assert_eq!(report.removed_ids(), vec![a1]);
    assert_eq!(report.snapshots.len(), 2);
    let mut req = request(policy.clone());
    req.volume_key = Some("b".into());
    assert_eq!(
        forget(&repo, &req, &Silent).unwrap().removed_ids(),
        vec![b1]
    );
    let mut left = vec![a2, b2];
    left.sort();
    assert_eq!(ids(&repo), left);
    let mut req = request(policy);
    req.source = Some("/dev/none".into());
    assert!(matches!(
        forget(&repo, &req, &Silent),
        Err(Error::SnapshotNotFound { .. })
    ));
}

#[test]
fn named_snapshots_are_removed_even_the_newest() {
    let (_d, repo) = repo();
    let old = add(&repo, "a", 100, &[]);
    let new = add(&repo, "a", 200, &[]);
    let req = ForgetRequest {
        snapshots: vec!["latest".into(), new[..8].to_string()],
        ..Default::default()
    };
    let report = forget(&repo, &req, &Silent).unwrap();
    assert_eq!(report.snapshots.len(), 1, "named twice, listed once");
    let d = &report.snapshots[0];
    assert_eq!((d.id.as_str(), d.action), (new.as_str(), Action::Remove));
    assert_eq!(d.reasons, vec![Rule::Named]);
    assert_eq!(d.time_unix, Some(200));
    assert_eq!(ids(&repo), vec![old.clone()]);
    // A damaged snapshot file can be removed by its id.
    std::fs::write(repo.snapshots_dir().join(&old), b"garbage").unwrap();
    let req = ForgetRequest {
        snapshots: vec![old.clone()],
        ..Default::default()
    };
    let report = forget(&repo, &req, &Silent).unwrap();
    assert_eq!(report.snapshots[0].time, None);
    assert!(ids(&repo).is_empty());
    // Unknown names are errors.
    let req = ForgetRequest {
        snapshots: vec!["abcdef".into()],
        ..Default::default()
    };
    assert!(matches!(
        forget(&repo, &req, &Silent),
        Err(Error::SnapshotNotFound { .. })
    ));
}

#[test]
fn refuses_requests_without_rules_or_with_names_and_rules() {
    let (_d, repo) = repo();
    add(&repo, "a", 100, &[]);
    let e = forget(&repo, &ForgetRequest::default(), &Silent).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("nothing to forget")),
        "{e}"
    );
    let req = ForgetRequest {
        snapshots: vec!["latest".into()],
        policy: Policy {
            keep_last: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(matches!(
        forget(&repo, &req, &Silent),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(ids(&repo).len(), 1);
}

/// Runs `forget --keep-last 1` on `repo`.
fn forget_keep_last_1(repo: &Repository) -> ForgetReport {
    let policy = Policy {
        keep_last: 1,
        ..Default::default()
    };
    forget(repo, &request(policy), &Silent).unwrap()
}

#[test]
fn damaged_snapshots_are_left_alone_by_a_policy() {
    let (_d, repo) = repo();
    add(&repo, "a", 100, &[]);
    add(&repo, "a", 200, &[]);
    let bad = "ab".repeat(32);
    std::fs::write(repo.snapshots_dir().join(&bad), b"garbage").unwrap();
    let report = forget_keep_last_1(&repo);
    assert_eq!(report.removed, 1);
    assert!(ids(&repo).contains(&bad));
    assert_eq!(ids(&repo).len(), 2);
}

#[test]
fn report_serialises_for_json() {
    let (_d, repo) = repo();
    add(&repo, "a", 100, &["t"]);
    let mut req = request(Policy {
        keep_tags: vec!["t".into()],
        ..Default::default()
    });
    req.dry_run = true;
    let report = forget(&repo, &req, &Silent).unwrap();
    let v = serde_json::to_value(&report).unwrap();
    assert_eq!(v["snapshots"][0]["action"], "keep");
    assert_eq!(
        v["snapshots"][0]["reasons"],
        serde_json::json!(["newest", "tag:t"])
    );
    assert_eq!(v["removed"], 0);
}

#[test]
fn the_parent_of_an_interrupted_backup_is_kept() {
    use crate::repo::journal::{Journal, JournalHeader};
    let (_d, repo) = repo();
    let old = add(&repo, "a", 100, &[]);
    add(&repo, "a", 200, &[]);
    add(&repo, "a", 300, &[]);
    let header: JournalHeader = serde_json::from_value(serde_json::json!({
        "source": {"path": "/dev/a", "kind": "file", "size": 4096,
                   "logical_sector_size": 512, "physical_sector_size": 512},
        "volume_key": "a",
        "block_size": 4096,
        "block_count": 1,
        "chunk_hash": repo.config().chunk_hash,
        "parent": old,
        "time": "2026-12-04T00:00:00Z",
        "time_unix": 400,
        "tags": [],
    }))
    .unwrap();
    let journal = Journal::create(
        repo.backend().as_ref(),
        "journals/a.journal",
        &header,
        repo.sealer(),
    )
    .unwrap();
    // A damaged journal is skipped with a warning, a temporary one ignored.
    std::fs::write(repo.journals_dir().join("b.journal"), b"garbage").unwrap();
    std::fs::write(repo.journals_dir().join(".tmp-x.journal"), b"garbage").unwrap();
    let report = forget_keep_last_1(&repo);
    assert_eq!(report.removed, 1);
    let d = report.snapshots.iter().find(|d| d.id == old).unwrap();
    assert_eq!(
        (d.action, d.reasons.clone()),
        (Action::Keep, vec![Rule::Resume])
    );
    drop(journal);
}
