//! `volback serve REPO SNAPSHOT --nbd ADDR` / `volback serve COPY --nbd ADDR`: a snapshot or a
//! copy (or an image file or device) served read-only over NBD.

use super::Ctx;
use super::args::ServeArgs;
use super::display::{CliProgress, human_bytes};
use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;
use volback::error::chain;
use volback::nbd::{self, Client, Events, Export, Server, ServerOptions, SessionEnd};
use volback::open::{self, OpenOptions};
use volback::repo::reader::CacheOptions;

/// Connection events as lines on stderr (errors even with `--quiet`).
struct CliEvents {
    quiet: bool,
}

impl Events for CliEvents {
    fn connected(&self, client: &Client) {
        if !self.quiet {
            eprintln!("client {} connected ({})", client.id, client.peer);
        }
    }

    fn refused(&self, peer: &str, reason: &str) {
        eprintln!("volback: warning: refused a connection from {peer}: {reason}");
    }

    fn disconnected(&self, client: &Client, end: &SessionEnd, stats: &nbd::SessionStats) {
        let how = match end {
            SessionEnd::Disconnected => "disconnected".to_string(),
            SessionEnd::Aborted => "ended its handshake".to_string(),
            SessionEnd::Closed => "closed the connection".to_string(),
            SessionEnd::Stopped => "disconnected by the server stopping".to_string(),
            SessionEnd::Failed(e) => {
                eprintln!(
                    "volback: warning: dropped client {}: {}",
                    client.id,
                    chain(e)
                );
                return;
            }
        };
        if !self.quiet && !stats.transmission {
            eprintln!("client {} {how}", client.id);
        } else if !self.quiet {
            eprintln!(
                "client {} {how}: {} requests, {} read{}",
                client.id,
                stats.requests,
                human_bytes(stats.bytes_read),
                if stats.errors > 0 {
                    format!(", {} errors", stats.errors)
                } else {
                    String::new()
                }
            );
        }
    }

    fn request_failed(&self, client: &Client, error: &volback::Error) {
        eprintln!("volback: error: client {}: {}", client.id, chain(error));
    }

    fn accept_failed(&self, error: &volback::Error) {
        eprintln!("volback: warning: {}", chain(error));
    }
}

/// `volback serve REPO SNAPSHOT --nbd ADDR [--name EXPORT]` (or `COPY`, or any volume the
/// opener accepts): serves until Ctrl-C.
pub fn run(a: ServeArgs, ctx: &Ctx) -> Result<ExitCode> {
    // Clients read small pieces and come back to the same blocks: decoded-block cache and
    // read-ahead.
    let options = OpenOptions {
        snapshot_cache: Some(CacheOptions::default()),
    };
    let opened = open::open_with(
        &a.args,
        &options,
        &super::password::source(&a.password)?,
        &CliProgress::new(true),
    )?;
    let size = opened.volume.size();
    let (short, description) = match (&opened.snapshot, &opened.copy) {
        (Some(snap), _) => {
            let header = &snap.header;
            let description = format!(
                "volback snapshot {} of {} ({}, {})",
                opened.name,
                header.source.path,
                header.time,
                human_bytes(header.source.size)
            );
            (opened.name.clone(), description)
        }
        (None, copy) => {
            let path = match copy {
                Some(c) => c.paths.dest(),
                None => PathBuf::from(&opened.name),
            };
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "copy".into());
            let description = format!(
                "volback {} {} of {}",
                opened.kind,
                path.display(),
                human_bytes(size)
            );
            (name, description)
        }
    };
    let volume = opened.volume;
    let export = Export {
        name: a.name.unwrap_or_else(|| short.clone()),
        description,
        volume,
    };
    let name = export.name.clone();
    let options = ServerOptions {
        max_clients: a.max_clients,
        ..ServerOptions::default()
    };
    let server = Server::bind(&a.nbd, export, options)?;
    eprintln!(
        "serving {short} ({}) read-only as export {name:?} on {}; Ctrl-C stops",
        human_bytes(size),
        server.address()
    );
    // The URI alone on standard output, for scripts.
    println!("{}", server.uri());
    let summary = server.run(&ctx.cancel, &CliEvents { quiet: ctx.quiet })?;
    eprintln!(
        "stopped after serving {} clients{}",
        summary.clients,
        if summary.refused > 0 {
            format!(" ({} connections refused)", summary.refused)
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}
