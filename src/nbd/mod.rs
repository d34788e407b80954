//! A read-only NBD (Network Block Device) server over any [`Volume`].
//!
//! The server knows nothing of repositories: it serves one [`Export`] — a name, a description
//! and an `Arc<dyn Volume>` — on a TCP address or a Unix socket, to several clients at once
//! (one thread each, at most [`ServerOptions::max_clients`]). It reports what happens through
//! [`Events`] and never prints.
//!
//! Protocol (see docs/NBD.md for the full table):
//! - fixed newstyle handshake with `NBD_FLAG_NO_ZEROES`; options `EXPORT_NAME`, `ABORT`,
//!   `LIST`, `INFO`, `GO` (`NBD_INFO_EXPORT`, `NAME`, `DESCRIPTION`, `BLOCK_SIZE`),
//!   `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` (`base:allocation`);
//!   anything else is answered `NBD_REP_ERR_UNSUP`;
//! - transmission: `READ` (simple, or structured with holes sent as `OFFSET_HOLE`),
//!   `BLOCK_STATUS` (from [`Volume::next_data`]), `FLUSH` and `CACHE` (no-ops), `DISC`;
//!   writes, trims and write-zeroes fail with `NBD_EPERM` (the export is flagged read-only).
//!
//! Limits against hostile clients: option data above [`MAX_OPTION_LEN`] is refused
//! (`NBD_REP_ERR_TOO_BIG`, then the connection is closed: its data cannot be skipped safely),
//! at most [`MAX_OPTIONS`] options per handshake, the handshake must finish within
//! [`ServerOptions::handshake_timeout`], reads and writes above [`MAX_PAYLOAD`] are refused
//! (advertised as the maximum block size), a block status reply holds at most
//! [`MAX_EXTENTS`] extents. Reads are served in pieces of [`READ_PIECE`], so a client costs
//! at most one piece of memory whatever it asks. A simple reply cannot report an error after
//! its header: a read error in the first piece is answered `NBD_EIO`, one in a later piece
//! closes the connection (structured replies report both as error chunks).
//! A protocol violation (bad magic, oversized write) closes that client's connection only.

mod handshake;
mod proto;
mod server;
mod session;
#[cfg(test)]
mod testing;
mod transmission;

pub use server::{ListenAddr, Server};

use crate::error::Error;
use crate::volume::Volume;
use std::sync::Arc;
use std::time::Duration;

/// Largest read (and write) payload a client may request; advertised as the maximum block
/// size. The protocol's default maximum, which every client honours.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest option data accepted during the handshake.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Most options one handshake may send.
pub const MAX_OPTIONS: usize = 1024;
/// Reads are read from the volume and sent in pieces of at most this size.
pub const READ_PIECE: usize = 2 << 20;
/// Most extents in one block status reply (the client asks again for the rest).
pub const MAX_EXTENTS: usize = 1 << 16;

/// What one server serves.
pub struct Export {
    /// The export name clients ask for; the empty name (the default export) also selects it.
    pub name: String,
    /// Shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION` (may be empty).
    pub description: String,
    pub volume: Arc<dyn Volume>,
}

impl Export {
    /// True when a client's export name selects this export.
    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Most clients connected at once; connections beyond are closed at once.
    pub max_clients: usize,
    /// A client that has not finished its handshake after this long is disconnected.
    pub handshake_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_clients: 16,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// One connected client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// Numbered from 1 in order of connection.
    pub id: u64,
    /// The peer address (`127.0.0.1:41234`), or `unix socket` for a local client.
    pub peer: String,
}

/// How a client's session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The client sent `NBD_CMD_DISC` (the normal end).
    Disconnected,
    /// The client sent `NBD_OPT_ABORT` during the handshake (e.g. after listing exports).
    Aborted,
    /// The client closed the connection between two messages.
    Closed,
    /// The server was stopped.
    Stopped,
    /// The connection failed or the client broke the protocol; the connection was closed.
    Failed(Error),
}

/// What one client did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Whether the client reached the transmission phase.
    pub transmission: bool,
    /// Requests answered.
    pub requests: u64,
    /// Bytes of the volume sent (holes count at their length).
    pub bytes_read: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

/// What a server run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeSummary {
    /// Clients accepted.
    pub clients: u64,
    /// Connections closed at once because [`ServerOptions::max_clients`] were connected.
    pub refused: u64,
}

/// Receives what the server does, from any thread. All methods have silent defaults.
pub trait Events: Send + Sync {
    /// A client connected (before its handshake).
    fn connected(&self, _client: &Client) {}
    /// A connection was closed at once (too many clients).
    fn refused(&self, _peer: &str, _reason: &str) {}
    /// A client's session ended.
    fn disconnected(&self, _client: &Client, _end: &SessionEnd, _stats: &SessionStats) {}
    /// A request failed on the server side (the volume could not be read); the client got
    /// an `NBD_EIO` error and its connection stays open.
    fn request_failed(&self, _client: &Client, _error: &Error) {}
    /// Accepting a connection failed (the server goes on).
    fn accept_failed(&self, _error: &Error) {}
}

/// [`Events`] that reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Quiet;

impl Events for Quiet {}
