//! The command-line surface: help, usage errors (exit 2), JSON output, and clear errors for
//! bad sources and repositories (exit 1).

use crate::util::*;

const SUBCOMMANDS: &[&str] = &["init", "backup", "snapshots", "restore", "verify"];

#[test]
fn help_and_version_exit_0() {
    let top = volback_ok(&["--help"]);
    top.stdout_has(&["usage"]);
    for sub in SUBCOMMANDS {
        top.stdout_has(&[sub]);
        volback_ok(&[sub, "--help"]).stdout_has(&["usage", &format!("volback {sub}")]);
        volback_ok(&["help", sub]).stdout_has(&["usage"]);
    }
    volback_ok(&["--version"]).stdout_has(&["volback"]);
}

#[test]
fn usage_errors_exit_2() {
    let t = TestDir::new();
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    let r = p(&repo);
    for args in [
        vec![],
        vec!["no-such-command"],
        vec!["init"],
        vec!["backup", "/dev/null"],
        vec!["backup", "--block-size", "12Q", "src.img", r],
        vec!["backup", "--threads", "many", "src.img", r],
        vec!["backup", "--no-such-flag", "src.img", r],
        vec!["restore", r, "latest"],
        vec!["snapshots"],
        vec!["verify", r, "latest", "extra"],
        vec!["init", "--hash", "md5", "x"],
    ] {
        let out = volback_code(&args, 2);
        assert!(
            !out.stderr.is_empty(),
            "usage error without a message: {args:?}"
        );
    }
}

#[test]
fn snapshots_json_lists_id_time_source_size_parent() {
    let t = TestDir::new();
    let repo = t.join("repo");
    let src = t.join("disk.img");
    init_repo(&repo, &[]);
    let empty = volback_ok(&["snapshots", "--json", p(&repo)]).json();
    assert_eq!(empty, serde_json::json!([]));
    volback_ok(&["snapshots", p(&repo)]).stdout_has(&["0 snapshots"]);

    random_file(&src, MIB + 5, 40);
    let b1 = backup_json(&src, &repo, &["--block-size", "64K", "--tag", "nightly"]);
    write_at(&src, 100, b"changed");
    let b2 = backup_json(&src, &repo, &["--block-size", "64K"]);

    let list = volback_ok(&["snapshots", "--json", p(&repo)]).json();
    let arr = list.as_array().expect("an array");
    assert_eq!(arr.len(), 2, "{list}");
    for (s, b) in arr.iter().zip([&b1, &b2]) {
        assert_eq!(s["id"], b["snapshot"], "oldest first: {list}");
        assert_eq!(jstr(s, "/id").len(), 64);
        let time = jstr(s, "/time");
        assert!(
            time.len() >= 20 && time.as_bytes()[4] == b'-' && time.contains('T'),
            "time is RFC 3339: {time}"
        );
        assert_eq!(jstr(s, "/source"), p(&src));
        assert_eq!(ju64(s, "/size"), MIB + 5);
        assert_eq!(ju64(s, "/block_size"), 64 * KIB);
        assert!(s.get("parent").is_some(), "parent field present: {s}");
    }
    assert!(arr[0]["parent"].is_null());
    assert_eq!(arr[1]["parent"], arr[0]["id"]);
    assert_eq!(arr[0]["tags"], serde_json::json!(["nightly"]));

    // The text listing shows both.
    let text = volback_ok(&["snapshots", p(&repo)]);
    text.stdout_has(&[
        &jstr(&b1, "/snapshot")[..12],
        &jstr(&b2, "/snapshot")[..12],
        "2 snapshots",
    ]);

    // verify --json is an object with counts and problems.
    let v = volback_ok(&["verify", "--json", p(&repo)]).json();
    assert_eq!(ju64(&v, "/snapshots_checked"), 2, "{v}");
    // Something was counted as checked (format 2: packs or blobs).
    let checked = ["/packs_checked", "/blobs_checked", "/chunks_checked"]
        .iter()
        .filter_map(|k| v.pointer(k).and_then(|x| x.as_u64()))
        .max()
        .unwrap_or(0);
    assert!(checked > 0, "{v}");
    assert_eq!(v["problems"], serde_json::json!([]));
}

#[test]
fn backup_text_output_names_the_snapshot() {
    let t = TestDir::new();
    let repo = t.join("repo");
    let src = t.join("disk.img");
    init_repo(&repo, &[]);
    random_file(&src, 3 * MIB, 41);
    let out = volback_ok(&["backup", p(&src), p(&repo)]);
    out.stdout_has(&["snapshot", "(full)"]);
    let id = &snapshot_ids(&repo)[0];
    out.stdout_has(&[id]);
    volback_ok(&["backup", p(&src), p(&repo)]).stdout_has(&["(incremental)", "parent", id]);
}

#[test]
fn backup_of_missing_empty_or_odd_sources_fails_clearly() {
    let t = TestDir::new();
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    let r = p(&repo);

    let missing = t.join("no-such-disk.img");
    volback_code(&["backup", p(&missing), r], 1).stderr_has(&["no-such-disk.img", "no such file"]);

    let empty = t.join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    volback_code(&["backup", p(&empty), r], 1).stderr_has(&["empty.img", "empty"]);

    let dir = t.join("a-directory");
    std::fs::create_dir(&dir).unwrap();
    volback_code(&["backup", p(&dir), r], 1).stderr_has(&["a-directory"]);

    let src = t.join("ok.img");
    random_file(&src, MIB, 42);
    volback_code(&["backup", "--block-size", "3000", p(&src), r], 1).stderr_has(&["block size"]);
    volback_code(&["backup", "--block-size", "64M", p(&src), r], 1).stderr_has(&["block size"]);

    let not_repo = t.join("not-a-repo");
    std::fs::create_dir(&not_repo).unwrap();
    volback_code(&["backup", p(&src), p(&not_repo)], 1)
        .stderr_has(&["not a volback repository", "volback init"]);

    // Nothing was recorded by the failed runs.
    assert!(snapshot_ids(&repo).is_empty());
    assert!(journals(&repo).is_empty());
}

#[test]
fn init_refuses_non_empty_directories_and_bad_options() {
    let t = TestDir::new();
    let repo = t.join("repo");
    init_repo(&repo, &[]);
    // New repositories are encrypted (format 3: format 2 sealed), with 4 KiB blocks by
    // default; `--no-encryption` makes format 2.
    let cfg = repo_config(&repo);
    assert_eq!(ju64(&cfg, "/version"), 3, "{cfg}");
    assert_eq!(ju64(&cfg, "/block_size"), 4096, "{cfg}");
    volback_code(&["init", p(&repo)], 1).stderr_has(&["already holds a repository"]);

    let full = t.join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("precious.txt"), b"x").unwrap();
    volback_code(&["init", p(&full)], 1).stderr_has(&["not empty"]);
    assert_eq!(std::fs::read(full.join("precious.txt")).unwrap(), b"x");

    volback_code(&["init", "--block-size", "1000", p(&t.join("r2"))], 1)
        .stderr_has(&["block size"]);
    volback_code(&["init", "--zstd-level", "99", p(&t.join("r3"))], 1).stderr_has(&["zstd level"]);
    assert!(!t.join("r2").join("config").exists());
    assert!(!t.join("r3").join("config").exists());

    let created = volback_ok(&["init", "--block-size", "1M", p(&t.join("r4"))]);
    created.stdout_has(&["created repository", "(encrypted,"]);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.join("r4/config")).unwrap()).unwrap();
    assert_eq!(ju64(&cfg, "/block_size"), MIB);
}

#[test]
fn a_path_that_is_no_volume_is_named_with_what_was_tried() {
    let t = TestDir::new();
    let missing = t.join("no-such.img");
    let sock = t.join("x.sock");
    volback_code(&["serve", p(&missing), "--nbd", p(&sock)], 1).stderr_has(&[
        "no-such.img",
        "not a volume volback can read",
        "does not exist",
        "block device",
    ]);
}

/// restic-style remote addresses and URLs are refused by name; nothing is created where the
/// command runs (`init s3:http://…` used to make a local directory named `s3:http:`), and
/// `local:` names a local directory that merely looks like an address.
#[test]
fn remote_addresses_are_refused_and_create_nothing() {
    let t = TestDir::new();
    let in_dir = |args: &[&str]| {
        let mut c = volback_command(args);
        c.current_dir(t.path());
        run_command(c, &format!("volback {}", args.join(" ")))
    };
    for args in [
        &["init", "--no-encryption", "https://example.org/repo"][..],
        &["snapshots", "sftp:user@host:/srv/repo"],
    ] {
        in_dir(args)
            .expect_code(1)
            .stderr_has(&["remote repository address", "S3 buckets"]);
    }
    // An S3 address is served: without credentials (or without a server) it fails saying so,
    // and creates nothing locally.
    let mut c = volback_command(&["init", "s3:http://127.0.0.1:9/bucket/prefix"]);
    c.current_dir(t.path());
    for v in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
    ] {
        c.env_remove(v);
    }
    c.env("AWS_SHARED_CREDENTIALS_FILE", t.path().join("none"))
        .env("AWS_CONFIG_FILE", t.path().join("none"))
        .env("HOME", t.path().join("home"));
    run_command(c, "volback init s3:… without credentials")
        .expect_code(1)
        .stderr_has(&["127.0.0.1:9"]);
    // The AWS CLI's form names the one volback reads.
    in_dir(&["init", "s3://bucket/prefix"])
        .expect_code(1)
        .stderr_has(&["s3:https://s3.amazonaws.com/bucket"]);
    assert!(
        std::fs::read_dir(t.path()).unwrap().next().is_none(),
        "a refused address left something behind"
    );
    in_dir(&["init", "--no-encryption", "local:s3:odd"]).expect_code(0);
    assert!(t.join("s3:odd").join("config").is_file());
    in_dir(&["snapshots", "local:s3:odd"]).expect_code(0);
}
