//! qcow2 L1, L2 and refcount table entries, and refcount blocks (pure, no I/O).

/// Offset bits of L1 and L2 entries (9-55).
pub(super) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "Copied": the cluster's refcount is exactly 1.
pub(super) const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
pub(super) const ZERO_FLAG: u64 = 1;
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
const RT_RESERVED: u64 = 0x1ff;
/// qemu's limits: 32 MiB of L1 table, 8 MiB of refcount table.
pub(super) const MAX_L1_BYTES: u64 = 32 << 20;
pub(super) const MAX_RT_BYTES: u64 = 8 << 20;
/// Bytes per table entry (L1, L2, refcount table).
pub(super) const ENTRY_SIZE: u64 = 8;

/// The L2 table offset of an L1 entry (0: none); `None` when reserved bits are set.
pub(super) fn l1_entry(e: u64) -> Option<u64> {
    (e & L1_RESERVED == 0).then_some(e & OFFSET_MASK)
}

/// What an L2 entry says about its virtual cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum L2 {
    Zero,
    /// Reads as zeros but keeps a cluster allocated.
    ZeroAllocated(u64),
    Data(u64),
    Compressed,
}

/// Decodes an L2 entry of an image of `version`; `None` when reserved bits are set. The
/// offsets are not checked against the file yet.
pub(super) fn l2_entry(e: u64, version: u32) -> Option<L2> {
    if e & COMPRESSED != 0 {
        return Some(L2::Compressed);
    }
    if e & L2_RESERVED != 0 || (version == 2 && e & ZERO_FLAG != 0) {
        return None;
    }
    let off = e & OFFSET_MASK;
    Some(if off == 0 {
        L2::Zero
    } else if e & ZERO_FLAG != 0 {
        L2::ZeroAllocated(off)
    } else {
        L2::Data(off)
    })
}

/// The refcount block offset of a refcount table entry, when it is plausible (no reserved
/// bits, cluster-aligned, not 0) for clusters of `cs` bytes.
pub(super) fn refcount_block(e: u64, cs: u64) -> Option<u64> {
    let off = e & !RT_RESERVED;
    (e & RT_RESERVED == 0 && off.is_multiple_of(cs) && off != 0).then_some(off)
}

/// Stores refcount `value` for entry `index` of a refcount block of `bits`-bit entries
/// (big-endian when a byte or wider; packed from the least significant bit otherwise).
pub(super) fn set_refcount(block: &mut [u8], bits: u64, index: u64, value: u64) {
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let at = index as usize * bytes;
        let v = value.to_be_bytes();
        block[at..at + bytes].copy_from_slice(&v[8 - bytes..]);
    } else {
        let per_byte = 8 / bits;
        let byte = (index / per_byte) as usize;
        let shift = (index % per_byte) * bits;
        let mask = ((1u64 << bits) - 1) as u8;
        block[byte] = (block[byte] & !(mask << shift)) | (((value as u8) & mask) << shift);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refcount_packing() {
        let mut b = vec![0u8; 8];
        set_refcount(&mut b, 16, 1, 1);
        assert_eq!(b[..4], [0, 0, 0, 1]);
        let mut b = vec![0u8; 8];
        set_refcount(&mut b, 1, 9, 1);
        assert_eq!(b[1], 0b10);
        let mut b = vec![0u8; 8];
        set_refcount(&mut b, 4, 1, 1);
        assert_eq!(b[0], 0x10);
        let mut b = vec![0u8; 16];
        set_refcount(&mut b, 64, 1, 1);
        assert_eq!(b[15], 1);
    }

    #[test]
    fn entries() {
        assert_eq!(l1_entry(COPIED | 0x30000), Some(0x30000));
        assert_eq!(l1_entry(1), None);
        assert_eq!(l2_entry(0, 3), Some(L2::Zero));
        assert_eq!(l2_entry(ZERO_FLAG, 3), Some(L2::Zero));
        assert_eq!(l2_entry(ZERO_FLAG, 2), None);
        assert_eq!(l2_entry(COPIED | 0x20000, 3), Some(L2::Data(0x20000)));
        assert_eq!(
            l2_entry(0x20000 | ZERO_FLAG, 3),
            Some(L2::ZeroAllocated(0x20000))
        );
        assert_eq!(l2_entry(COMPRESSED | 2, 3), Some(L2::Compressed));
        assert_eq!(l2_entry(2, 3), None);
        assert_eq!(refcount_block(0x30000, 0x10000), Some(0x30000));
        assert_eq!(refcount_block(0x30001, 0x10000), None);
        assert_eq!(refcount_block(0x38000, 0x10000), None);
        assert_eq!(refcount_block(0, 0x10000), None);
    }

    proptest! {
        #[test]
        fn any_entry_decodes_without_panic(e in any::<u64>(), v in 2u32..4) {
            if let Some(L2::Data(o) | L2::ZeroAllocated(o)) = l2_entry(e, v) {
                prop_assert_eq!(o % 512, 0);
            }
            if let Some(o) = l1_entry(e) {
                prop_assert_eq!(o % 512, 0);
            }
        }
    }
}
