//! `volback serve REPO SNAPSHOT --nbd ADDR` / `volback serve COPY --nbd ADDR`: a snapshot or a
//! copy served read-only over NBD.

use crate::display::human_bytes;
use anyhow::Result;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use volback::nbd::{self, Client, Events, Export, ListenAddr, Server, ServerOptions, SessionEnd};
use volback::repo::Repository;
use volback::repo::reader::{CacheOptions, SnapshotVolume};
use volback::volume::Volume;

/// What `volback serve` was asked to do.
pub struct ServeArgs<'a> {
    /// `[REPO, SNAPSHOT]` or `[COPY]`.
    pub args: &'a [String],
    pub nbd: ListenAddr,
    pub name: Option<String>,
    pub max_clients: usize,
    pub quiet: bool,
}

/// Connection events as lines on stderr (errors even with `--quiet`).
struct CliEvents {
    quiet: bool,
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
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

/// `volback serve REPO SNAPSHOT --nbd ADDR [--name EXPORT]`: serves until `cancel`.
pub fn serve(args: ServeArgs<'_>, cancel: &AtomicBool) -> Result<ExitCode> {
    let (volume, short, description): (Arc<dyn Volume>, String, String) = match args.args {
        [repo, snapshot] => {
            let repository = Repository::open(Path::new(repo))?;
            let id = repository.resolve_warn(snapshot, &crate::display::CliProgress::new(true))?;
            let snap = repository.open_snapshot(&id)?;
            let short = id[..12.min(id.len())].to_string();
            let header = snap.header();
            let description = format!(
                "volback snapshot {short} of {} ({}, {})",
                header.source.path,
                header.time,
                human_bytes(header.source.size)
            );
            // Clients read small pieces and come back to the same blocks: decoded-block
            // cache and read-ahead.
            let volume = SnapshotVolume::with_cache(
                snap,
                repository.chunks().clone(),
                CacheOptions::default(),
            );
            (Arc::new(volume), short, description)
        }
        [copy] => {
            let opened = volback::copy::open_copy(Path::new(copy))?;
            let dest = opened.paths.dest();
            let name = dest
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "copy".into());
            let description = format!(
                "volback copy {} of {}",
                dest.display(),
                human_bytes(opened.volume.size())
            );
            (Arc::new(opened.volume), name, description)
        }
        _ => anyhow::bail!("usage: volback serve REPO SNAPSHOT --nbd ADDR, or COPY --nbd ADDR"),
    };
    let size = volume.size();
    let export = Export {
        name: args.name.unwrap_or_else(|| short.clone()),
        description,
        volume,
    };
    let name = export.name.clone();
    let options = ServerOptions {
        max_clients: args.max_clients,
        ..ServerOptions::default()
    };
    let server = Server::bind(&args.nbd, export, options)?;
    eprintln!(
        "serving {short} ({}) read-only as export {name:?} on {}; Ctrl-C stops",
        human_bytes(size),
        server.address()
    );
    // The URI alone on standard output, for scripts.
    println!("{}", server.uri());
    let summary = server.run(cancel, &CliEvents { quiet: args.quiet })?;
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
