//! The `volback` command line: argument definitions ([`args`]), one handler module per
//! command, terminal display ([`display`]) and reports ([`report`]). Handlers parse nothing
//! and compute nothing of their own: they call the library, display what it returns, and
//! choose the exit code.
//!
//! Exit codes: 0 success, 1 error, 2 usage error, 3 completed with unreadable sectors,
//! 130 interrupted (progress saved where the command supports resuming). `serve` runs until
//! Ctrl-C and then exits 0 (Ctrl-C is how it is meant to stop).

pub mod args;
mod backup;
mod copy;
mod display;
mod export;
mod forget;
mod init;
mod key;
#[cfg(target_os = "linux")]
mod mount;
mod password;
mod probe;
mod prune;
mod ptable;
mod report;
mod restore;
mod serve;
mod snapshots;
mod stats;
mod verify;

use anyhow::Result;
use args::{Cli, Command};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What every handler may need besides its own arguments.
pub struct Ctx {
    /// `--quiet`: no progress bars.
    pub quiet: bool,
    /// Set by Ctrl-C (and SIGTERM).
    pub cancel: Arc<AtomicBool>,
}

/// Runs the command `cli` names.
pub fn run(cli: Cli, cancel: Arc<AtomicBool>) -> Result<ExitCode> {
    let ctx = Ctx {
        quiet: cli.quiet,
        cancel,
    };
    match cli.command {
        Command::Probe(a) => probe::run(a),
        Command::Ptable(a) => ptable::run(a),
        Command::Init(a) => init::run(a),
        Command::Backup(a) => backup::run(a, &ctx),
        Command::Snapshots(a) => snapshots::run(a),
        Command::Restore(a) => restore::run(a, &ctx),
        #[cfg(target_os = "linux")]
        Command::Mount(a) => mount::mount(a, &ctx),
        #[cfg(target_os = "linux")]
        Command::Umount(a) => mount::umount(a),
        Command::Serve(a) => serve::run(a, &ctx),
        Command::Verify(a) => verify::run(a, &ctx),
        Command::Copy(a) => copy::run(a, &ctx),
        Command::Export(a) => export::run(a, &ctx),
        Command::Forget(a) => forget::run(a, &ctx),
        Command::Prune(a) => prune::run(a, &ctx),
        Command::Stats(a) => stats::run(a, &ctx),
        Command::Key(a) => key::run(a),
    }
}

/// Installs the Ctrl-C (and SIGTERM) handler: the first sets the returned flag, which the
/// library polls; a second leaves at once with exit code 130.
pub fn install_ctrl_c() -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    cancel
}

/// The exit code for a command that failed with `e`: 130 when it was interrupted, else 1.
pub fn exit_code(e: &anyhow::Error) -> ExitCode {
    match e.downcast_ref::<volback::Error>() {
        Some(volback::Error::Interrupted { .. }) => ExitCode::from(130),
        _ => ExitCode::from(1),
    }
}
