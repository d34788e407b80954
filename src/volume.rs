//! One random-access read interface over every kind of volume.
//!
//! A source device or image file, a snapshot in a repository, and (later) copies and
//! exported images all implement [`Volume`]. Backup, restore, verify, export, FUSE and NBD
//! are written against this trait only.

use crate::error::Result;
use std::ops::Range;

/// A read-only, random-access volume of fixed size.
pub trait Volume: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the bytes at `offset`. Reading past [`Volume::size`] is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// The next range at or after `offset` (and before `end`) that may hold non-zero data.
    /// Everything between `offset` and the returned start reads as zeros. `None`: only zeros
    /// remain. The default treats the whole volume as data.
    fn next_data(&self, offset: u64, end: u64) -> Result<Option<Range<u64>>> {
        let end = end.min(self.size());
        Ok((offset < end).then_some(offset..end))
    }

    /// A short human description ("/dev/loop3", "snapshot 3fa2…").
    fn describe(&self) -> String;

    /// The hash of the stored block that holds byte `offset`, when the volume knows it
    /// without reading the block (a snapshot's records): lets `restore --only-changed` compare
    /// a target with the volume by hashing the target alone. `None` by default.
    fn known_hash(&self, _offset: u64) -> Result<Option<KnownHash>> {
        Ok(None)
    }

    /// How many threads reading at once keep this volume busy (0: one per core, the default).
    /// A snapshot in a repository on object storage asks for more: its readers mostly wait
    /// on the network.
    fn readers(&self) -> usize {
        0
    }
}

/// A block's hash as a volume records it: bytes `[start, start + len)` hash to `hash` with
/// `algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownHash {
    pub start: u64,
    pub len: u64,
    pub algorithm: crate::hash::HashAlgorithm,
    pub hash: crate::hash::ChunkId,
}

/// Checks that a read of `len` bytes at `offset` lies inside a volume of `size` bytes;
/// `name` describes the volume for the error ("snapshot 3fa2…").
pub fn check_read(size: u64, offset: u64, len: usize, name: impl FnOnce() -> String) -> Result<()> {
    if offset.checked_add(len as u64).is_none_or(|e| e > size) {
        return Err(crate::error::Error::read_out_of_range(
            name(),
            offset,
            len as u64,
            size,
        ));
    }
    Ok(())
}

/// Returns true when every byte of `buf` is zero. Word-at-a-time; the compiler vectorises it.
pub fn is_zero(buf: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned
        // middle part of the byte slice.
        unsafe { buf.align_to::<u64>() }
    };
    prefix.iter().all(|&b| b == 0)
        && suffix.iter().all(|&b| b == 0)
        && words
            .chunks(16)
            .all(|c| c.iter().fold(0u64, |acc, &w| acc | w) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_detects_any_nonzero_byte() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        for i in [0, 1, 7, 8, 100, 4095, 4098] {
            v[i] = 1;
            assert!(!is_zero(&v[..]), "byte {i}");
            assert!(!is_zero(&v[1..]) || i == 0, "offset slice, byte {i}");
            v[i] = 0;
        }
        assert!(is_zero(&[]));
    }
}
