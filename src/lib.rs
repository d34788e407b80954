//! volback: block-level volume backup.
//!
//! The library does all the work and reports through [`progress::Progress`]; the `volback`
//! binary only parses arguments, displays and chooses exit codes.
//!
//! - [`source`]: open a device or image file read-only.
//! - [`fs`]: filesystem detection and allocation maps.
//! - [`volume`]: the random-access read interface every volume implements.
//! - [`repo`]: the repository format (chunks, snapshots, journals, locking).
//! - [`scan`]: the parallel read pipeline shared by backup, copy and export.
//! - [`backup`], [`restore`], [`verify`]: the operations.
//! - [`forget`]: remove snapshots, named or by a retention policy ([`forget::policy`]).
//! - [`copy`]: plain copies (raw, BIN slices, VHD, VHDX, qcow2) with a SHA-256 per block,
//!   updated in place; exports of snapshots.
//! - [`nbd`]: a read-only NBD server over any volume.
//! - [`open`]: one opener for a device, an image file, a copy or a snapshot.
//! - [`platform`]: the operating-system layer (Linux, Windows).

pub mod backup;
pub mod buffer;
pub mod bytes;
pub mod copy;
pub mod crypto;
pub mod error;
pub mod forget;
pub mod fs;
pub mod hash;
pub mod image;
pub mod job;
#[cfg(target_os = "linux")]
pub mod mount;
pub mod nbd;
pub mod open;
pub mod platform;
pub mod probe;
pub mod progress;
pub mod prune;
pub mod ptable;
pub mod repo;
pub mod restore;
pub mod scan;
pub mod source;
pub mod source_state;
pub mod stats;
pub mod time;
pub mod verify;
pub mod volume;

pub use error::{Error, Result};
