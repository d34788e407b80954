//! `volback restore REPO SNAPSHOT TARGET` and `volback restore COPY TARGET`.

use super::Ctx;
use super::args::{Cli, RestoreArgs};
use super::display::{CliProgress, print_restore};
use anyhow::Result;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::ExitCode;
use volback::open::{self, OpenOptions, Target};
use volback::restore::{RestoreOptions, plan_restore, restore};

/// Writes a snapshot or a copy to a device or file; never onto the files it reads from.
pub fn run(a: RestoreArgs, ctx: &Ctx) -> Result<ExitCode> {
    let quiet_progress = CliProgress::new(true);
    let (opened, target) = match a.target {
        Some(target) => {
            let args = [a.repo.as_os_str(), OsStr::new(&a.snapshot)];
            let opened = open::open_with(
                &args,
                &OpenOptions::default(),
                &super::password::source(&a.password)?,
                &quiet_progress,
            )?;
            (opened, target)
        }
        None => {
            // Two arguments: COPY TARGET.
            let Ok(found @ Target::Copy { .. }) = open::identify(&[&a.repo], &quiet_progress)
            else {
                use clap::CommandFactory;
                Cli::command()
                    .error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        format!(
                            "{} is not a volback copy; to restore a snapshot, give \
                             REPO SNAPSHOT TARGET",
                            a.repo.display()
                        ),
                    )
                    .exit();
            };
            (
                found.open(&OpenOptions::default())?,
                PathBuf::from(a.snapshot),
            )
        }
    };
    let volume = opened.volume.as_ref();
    let plan = plan_restore(&target, volume.size(), &opened.members)?;
    let opts = RestoreOptions {
        threads: a.threads,
        verify: a.verify,
        cancel: Some(ctx.cancel.clone()),
        only_changed: a.only_changed,
    };
    let progress = CliProgress::new(ctx.quiet);
    let r = restore(volume, &plan, &opts, &progress)?;
    print_restore(&opened.describe(), &plan.target, &r, &opts);
    Ok(ExitCode::SUCCESS)
}
