//! Page-aligned I/O buffers, as `O_DIRECT` reads require.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every buffer: the largest logical sector size in use (4 KiB).
pub const ALIGN: usize = 4096;

/// A zero-initialised byte buffer whose start is aligned to [`ALIGN`] and whose capacity is a
/// multiple of it.
pub struct AlignedBuf {
    /// Start of the allocation.
    base: NonNull<u8>,
    /// First aligned byte in it: the buffer.
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); moving it to another
// thread moves that ownership, and shared references only allow reads.
unsafe impl Send for AlignedBuf {}
// SAFETY: &AlignedBuf only gives out &[u8]; mutation needs &mut.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` bytes rounded up to a multiple of [`ALIGN`] (at least one page).
    ///
    /// The allocation asks for zeroed memory with the allocator's own alignment and one page
    /// more, then aligns the start inside it: for large buffers the system then maps zero
    /// pages lazily (calloc), where an aligned zeroed allocation would write every page up
    /// front. A backup keeps several 16 MiB staging buffers of which an incremental touches
    /// little; writing them all cost more system time than its reads.
    pub fn new(len: usize) -> AlignedBuf {
        let len = len.max(1).div_ceil(ALIGN) * ALIGN;
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(base) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout);
        };
        let skip = base.as_ptr().align_offset(ALIGN);
        // SAFETY: the allocation has `len + ALIGN` bytes and `skip < ALIGN`, so the aligned
        // start and the `len` bytes after it lie inside it.
        let ptr = unsafe { base.add(skip) };
        AlignedBuf { base, ptr, len }
    }

    /// The layout of the allocation behind a buffer of `len` bytes.
    fn layout(len: usize) -> Layout {
        match len
            .checked_add(ALIGN)
            .and_then(|n| Layout::from_size_align(n, 16).ok())
        {
            Some(l) => l,
            None => panic!("buffer of {len} bytes is too large"),
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to `len` initialised (zeroed at allocation) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: base was allocated in `new` with exactly this layout and not freed since.
        unsafe { dealloc(self.base.as_ptr(), Self::layout(self.len)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_rounded() {
        let mut b = AlignedBuf::new(5000);
        assert_eq!(b.len(), 8192);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[8191] = 7;
        assert_eq!(b[8191], 7);
    }
}
