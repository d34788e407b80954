//! Why a filesystem's allocation data is not trusted: the error every map validation returns.
//!
//! A map is built only from structures that passed their checks; the first check that fails
//! becomes a [`MapCheck`], and the backup reads every block with a warning that quotes it
//! (through [`crate::error::chain`], so an I/O error behind a failed read is kept).

use crate::error::Error;

/// A failed check on a filesystem's own structures. Its text names the structure ("AG 3
/// AGF", "block group 12 bitmap", "MFT record 37"), where it is, and what disagreed.
#[derive(Debug, thiserror::Error)]
pub enum MapCheck {
    /// A structure the filesystem points to lies (partly) past the end of the volume.
    #[error("{what} (bytes {offset}..{end}) lies past the end of the volume ({size} bytes)")]
    PastEnd {
        what: String,
        offset: u64,
        end: u64,
        size: u64,
    },
    /// A structure's position plus its length overflows a byte offset.
    #[error("{what} at byte {offset} overflows")]
    Overflow { what: String, offset: u64 },
    /// The volume could not be read where a structure lies.
    #[error("reading {what} at byte {offset}: {source}")]
    Read {
        what: String,
        offset: u64,
        #[source]
        source: Box<Error>,
    },
    /// A checksum stored in a structure does not match its contents.
    #[error("{what}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        what: String,
        stored: u32,
        computed: u32,
    },
    /// A bitmap marks free a unit that a structure or a file occupies.
    #[error("{bitmap} marks {owner} free (bit {bit})")]
    MarkedFree {
        bitmap: String,
        owner: String,
        bit: u64,
    },
    /// A check failed inside a structure: `context` names the structure and its place.
    #[error("{context}: {source}")]
    Context {
        context: String,
        #[source]
        source: Box<MapCheck>,
    },
    /// The volume could not be read; `context` says what and where.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: Box<Error>,
    },
    /// A field disagrees with the filesystem's geometry or with another structure; the text
    /// names the structure, its place and both values.
    #[error("{0}")]
    Inconsistent(String),
}

/// `MapCheck::Inconsistent(format!(...))` in short.
macro_rules! bad {
    ($($arg:tt)*) => {
        $crate::fs::MapCheck::Inconsistent(format!($($arg)*))
    };
}
pub(crate) use bad;

/// The result of a check.
pub type Checked<T> = std::result::Result<T, MapCheck>;

/// An error that a check can wrap with what it was doing.
pub trait Cause {
    fn within(self, context: String) -> MapCheck;
}

impl Cause for MapCheck {
    fn within(self, context: String) -> MapCheck {
        MapCheck::Context {
            context,
            source: Box::new(self),
        }
    }
}

impl Cause for Error {
    fn within(self, context: String) -> MapCheck {
        MapCheck::Io {
            context,
            source: Box::new(self),
        }
    }
}

/// `e`, with what the check was doing when it failed (`"AG 3 AGF"`, `"MFT record 37"`).
pub fn within(e: impl Cause, context: impl Into<String>) -> MapCheck {
    e.within(context.into())
}

#[cfg(test)]
impl MapCheck {
    /// Whether the text contains `s` (tests check messages this way).
    pub fn contains(&self, s: &str) -> bool {
        self.to_string().contains(s)
    }
}
