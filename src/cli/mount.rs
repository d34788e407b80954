//! `volback mount` and `volback umount`.
//!
//! `mount` starts a server process (this same binary with `--foreground`, in its own process
//! group) that serves the FUSE view and, with `--files`, mounts the filesystems inside it;
//! the command returns once the server reports that everything is in place, printing where
//! to look. `--foreground` runs the server in the calling process instead (Ctrl-C undoes the
//! mounts).

use super::Ctx;
use super::args::{MountArgs, PasswordArgs, UmountArgs};
use super::display::{CliProgress, human_bytes};
use super::password;
use super::report::{MountImageJson, MountJson, print_json};
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use volback::mount::{self, ViewEntry};
use volback::open::{self, OpenOptions};
use volback::repo::keys::PasswordSource;
use volback::repo::reader::CacheOptions;
use volback::volume::Volume;

/// The line a server prints on stdout when the view (and the files) are mounted.
const READY: &str = "volback-mount-ready";

/// Opens what `args` name (`REPO SNAPSHOT`, a copy, an image file or a device) for a view.
fn open_volume(args: &[PathBuf], passwords: &PasswordArgs) -> Result<(Arc<dyn Volume>, String)> {
    let options = OpenOptions {
        snapshot_cache: Some(CacheOptions::default()),
    };
    let opened = open::open_with(
        args,
        &options,
        &password::source(passwords)?,
        &CliProgress::new(true),
    )?;
    let what = match &opened.snapshot {
        Some(snap) => format!("snapshot {}", snap.id),
        None => opened.describe(),
    };
    Ok((opened.volume, what))
}

/// `volback mount REPO SNAPSHOT DIR` (or `COPY DIR`): starts a server (or, with
/// `--foreground`, is one).
pub fn mount(a: MountArgs, ctx: &Ctx) -> Result<ExitCode> {
    let Some((dir, source)) = a.args.split_last() else {
        bail!("usage: volback mount REPO SNAPSHOT DIR, or volback mount COPY DIR");
    };
    if !dir.is_dir() {
        bail!("mount point {} is not a directory", dir.display());
    }
    if a.foreground {
        serve(
            source,
            &a.password,
            dir,
            a.files.as_deref(),
            a.allow_other,
            a.json,
            ctx.cancel.clone(),
        )
    } else {
        spawn_server(&a)
    }
}

/// Runs `volback mount … --foreground` as a detached server and waits for it to be ready.
fn spawn_server(a: &MountArgs) -> Result<ExitCode> {
    // The repository is opened here first: its errors show at once, and a password asked
    // for on the terminal is handed to the server on its standard input (it has no
    // terminal). A password given by option is passed on; the environment is inherited.
    let passwords = password::source(&a.password)?;
    let Some((_, source)) = a.args.split_last() else {
        bail!("usage: volback mount REPO SNAPSHOT DIR, or volback mount COPY DIR");
    };
    drop(open::identify_with(
        source,
        &passwords,
        &CliProgress::new(true),
    )?);
    let typed = match passwords.given() {
        true => None,
        false => passwords.cached(),
    };
    let exe = std::env::current_exe().context("find the volback executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--quiet")
        .arg("mount")
        .args(&a.args)
        .arg("--foreground");
    if let Some(f) = &a.password.password_file {
        cmd.arg("--password-file").arg(f);
    }
    if let Some(c) = &a.password.password_command {
        cmd.arg("--password-command").arg(c);
    }
    if typed.is_some() {
        cmd.arg("--password-file").arg("/dev/stdin");
    }
    if let Some(f) = &a.files {
        cmd.arg("--files").arg(f);
    }
    if a.allow_other {
        cmd.arg("--allow-other");
    }
    if a.json {
        cmd.arg("--json");
    }
    cmd.env("VOLBACK_MOUNT_NOTIFY", "1")
        .stdin(match typed {
            Some(_) => Stdio::piped(),
            None => Stdio::null(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    {
        use std::os::unix::process::CommandExt;
        // Its own process group: a Ctrl-C in this terminal does not take the view down.
        cmd.process_group(0);
    }
    let mut child = cmd.spawn().context("start the mount server")?;
    if let (Some(pw), Some(mut stdin)) = (typed, child.stdin.take()) {
        let mut line = zeroize::Zeroizing::new(pw.as_bytes().to_vec());
        line.push(b'\n');
        stdin
            .write_all(&line)
            .context("pass the password to the mount server")?;
    }
    let out = child.stdout.take().context("mount server stdout")?;
    let mut ready = false;
    for line in BufReader::new(out).lines() {
        let line = line.context("read from the mount server")?;
        if line == READY {
            ready = true;
            break;
        }
        println!("{line}");
    }
    if ready {
        return Ok(ExitCode::SUCCESS);
    }
    let status = child.wait().context("wait for the mount server")?;
    bail!("the mount server stopped before the view was ready ({status})")
}

fn serve(
    source: &[PathBuf],
    passwords: &PasswordArgs,
    dir: &Path,
    files: Option<&Path>,
    allow_other: bool,
    json: bool,
    cancel: Arc<AtomicBool>,
) -> Result<ExitCode> {
    let (vol, what) = open_volume(source, passwords)?;
    let entries = mount::view_entries(vol.as_ref())?;
    let session = mount::mount_view(vol, entries.clone(), dir, allow_other)?;
    let background = session
        .spawn()
        .with_context(|| format!("serve the view at {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());

    let mut attached = Vec::new();
    if let Some(files) = files {
        match mount::attach_files(&dir, &entries, files) {
            Ok((a, warnings)) => {
                for w in warnings {
                    eprintln!("volback: warning: {w}");
                }
                attached = a;
            }
            Err(e) => {
                let _ = mount::unmount(&dir);
                let _ = background.join();
                return Err(e.into());
            }
        }
    }
    report(&what, &dir, &entries, &attached, json);
    if std::env::var_os("VOLBACK_MOUNT_NOTIFY").is_some() {
        println!("{READY}");
        let _ = std::io::stdout().flush();
        // Nothing more goes to the (soon closed) pipe, nor to the caller's stderr: a caller
        // that captures our output must see it end when `volback mount` returns.
        silence_output();
    }

    // Ctrl-C / SIGTERM: undo everything; `volback umount` from elsewhere ends the session too.
    let watcher_dir = dir.clone();
    std::thread::spawn(move || {
        loop {
            if cancel.load(Ordering::SeqCst) {
                if let Err(e) = mount::unmount(&watcher_dir) {
                    eprintln!("volback: error: {e}");
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    background
        .join()
        .with_context(|| format!("serving the view at {}", dir.display()))?;
    Ok(ExitCode::SUCCESS)
}

fn silence_output() {
    let _ = std::io::stderr().flush();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto fds 1 and 2 with a valid open descriptor; both were flushed.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
            libc::dup2(null.as_raw_fd(), 2);
        }
    }
}

fn report(
    what: &str,
    dir: &Path,
    entries: &[ViewEntry],
    attached: &[mount::AttachedFiles],
    json: bool,
) {
    if json {
        let images = entries
            .iter()
            .map(|e| MountImageJson {
                path: dir.join(&e.name),
                start: e.start,
                size: e.size,
                filesystem: e.fs_type.as_deref(),
            })
            .collect();
        let report = MountJson {
            source: what,
            view: dir,
            images,
            files: attached,
        };
        if let Err(e) = print_json(&report) {
            eprintln!("volback: error: {}", volback::error::chain(e.as_ref()));
        }
        return;
    }
    println!("mounted {what} at {}", dir.display());
    for e in entries {
        println!(
            "  {:<14} {:>10}  {}",
            e.name,
            human_bytes(e.size),
            e.fs_type.as_deref().unwrap_or("")
        );
    }
    for a in attached {
        println!(
            "  files of {} ({}) at {}",
            a.image
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            a.fs_type,
            a.mount_point.display()
        );
    }
    println!("undo with: volback umount {}", dir.display());
}

/// `volback umount DIR`.
pub fn umount(UmountArgs { dir }: UmountArgs) -> Result<ExitCode> {
    let r = mount::unmount(&dir)?;
    for m in &r.inner {
        println!("unmounted {}", m.display());
    }
    for l in &r.loops {
        println!("detached {}", l.display());
    }
    println!("unmounted view at {}", dir.display());
    Ok(ExitCode::SUCCESS)
}
