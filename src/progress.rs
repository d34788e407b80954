//! Progress reporting from long operations.
//!
//! The library never prints. Long operations take a `&dyn Progress` and call it from any
//! thread; the binary implements it with a terminal progress bar, or not at all.

/// Receives progress of one long operation. All methods have silent defaults.
pub trait Progress: Send + Sync {
    /// A new phase starts ("backup", "restore", "verify"), measured in `total` bytes.
    fn start(&self, _phase: &str, _total: u64) {}
    /// `bytes` more of the current phase are done.
    fn advance(&self, _bytes: u64) {}
    /// The current phase ended.
    fn finish(&self) {}
    /// A non-fatal condition the user should hear about.
    fn warn(&self, _message: &str) {}
}

/// A [`Progress`] that reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {}
