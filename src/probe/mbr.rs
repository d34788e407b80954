//! The MBR ("DOS") partition table and its chain of extended boot records.
//!
//! Layout (all little-endian), in the first 512 bytes of sector 0 whatever the sector size:
//!
//! | offset | size | field                                               |
//! |--------|------|-----------------------------------------------------|
//! | 0      | 440  | boot code                                           |
//! | 440    | 4    | disk signature (`label-id` of `sfdisk`)             |
//! | 444    | 2    | zero (or 0x5A5A: copy protected)                    |
//! | 446    | 4×16 | partition entries                                   |
//! | 510    | 2    | boot signature 0x55 0xAA                            |
//!
//! An entry: boot indicator (0x00 or 0x80), CHS of the first sector (3 bytes), type byte, CHS of
//! the last sector (3 bytes), first sector (LBA, u32), number of sectors (u32). An entry with
//! zero sectors is unused.
//!
//! An extended partition (type 0x05, 0x0F or 0x85) holds a linked list of extended boot
//! records (EBRs), the first one in its first sector. Each EBR has the MBR layout; its first
//! used entry describes one logical partition with a start *relative to that EBR*, its
//! second entry (an extended type) links to the next EBR with a start *relative to the start
//! of the extended partition*. Logical partitions are numbered from 5 in chain order.
//!
//! Everything read from disk is checked: the chain is walked with loop detection and a hard
//! cap of [`MAX_EBRS`] records, and each EBR must lie inside the extended partition.

use crate::bytes::le_u32 as u32_le;
use crate::volume::Volume;
use std::collections::HashSet;

/// Bytes of the MBR structure (the start of sector 0).
pub const MBR_LEN: usize = 512;
/// Bytes of boot code before the disk signature.
pub const BOOT_CODE_LEN: usize = 440;
pub const DISK_SIGNATURE_OFFSET: usize = 440;
pub const TABLE_OFFSET: usize = 446;
pub const ENTRY_LEN: usize = 16;
pub const BOOT_SIGNATURE_OFFSET: usize = 510;
pub const BOOT_SIGNATURE: [u8; 2] = [0x55, 0xAA];
/// Type byte of a GPT protective (or hybrid) MBR entry.
pub const TYPE_GPT_PROTECTIVE: u8 = 0xEE;
/// The extended type `sfdisk` writes in EBR link entries.
pub const TYPE_EXTENDED: u8 = 0x05;
/// Hard cap on the EBRs followed in one chain (the Linux kernel and libfdisk stop far below
/// what a 32-bit chain could encode; 256 logical partitions is beyond any real disk).
pub const MAX_EBRS: usize = 256;
/// Boot indicator of an active ("bootable") partition.
pub const BOOT_ACTIVE: u8 = 0x80;

/// Whether `t` is an extended-partition type (DOS 0x05, Windows LBA 0x0F, Linux 0x85).
pub fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0F | 0x85)
}

/// One 16-byte partition entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    pub boot: u8,
    pub chs_first: [u8; 3],
    pub kind: u8,
    pub chs_last: [u8; 3],
    /// First sector (absolute in the MBR; relative in an EBR).
    pub start: u32,
    pub sectors: u32,
}

impl Entry {
    /// Decodes 16 bytes.
    pub fn parse(b: &[u8]) -> Entry {
        Entry {
            boot: b[0],
            chs_first: [b[1], b[2], b[3]],
            kind: b[4],
            chs_last: [b[5], b[6], b[7]],
            start: u32_le(b, 8),
            sectors: u32_le(b, 12),
        }
    }

    /// Encodes into 16 bytes.
    pub fn encode(&self, out: &mut [u8]) {
        out[0] = self.boot;
        out[1..4].copy_from_slice(&self.chs_first);
        out[4] = self.kind;
        out[5..8].copy_from_slice(&self.chs_last);
        out[8..12].copy_from_slice(&self.start.to_le_bytes());
        out[12..16].copy_from_slice(&self.sectors.to_le_bytes());
    }

    pub fn is_used(&self) -> bool {
        self.sectors != 0
    }

    /// An entry for `sectors` sectors at `start` (as stored) whose absolute first sector is
    /// `abs_start`, with CHS values computed for the usual 255-head, 63-sector geometry.
    pub fn new(kind: u8, boot: bool, start: u32, sectors: u32, abs_start: u64) -> Entry {
        let last = abs_start + u64::from(sectors.max(1)) - 1;
        Entry {
            boot: if boot { BOOT_ACTIVE } else { 0 },
            chs_first: chs(abs_start),
            kind,
            chs_last: chs(last),
            start,
            sectors,
        }
    }
}

/// CHS address of `lba` for 255 heads and 63 sectors per track, as `fdisk` writes it;
/// addresses past cylinder 1023 are written as the maximum (1023, 254, 63).
pub fn chs(lba: u64) -> [u8; 3] {
    const HEADS: u64 = 255;
    const SECTORS: u64 = 63;
    let cyl = lba / (HEADS * SECTORS);
    if cyl > 1023 {
        return [0xFE, 0xFF, 0xFF];
    }
    let head = (lba / SECTORS) % HEADS;
    let sector = lba % SECTORS + 1;
    [
        head as u8,
        (sector as u8) | (((cyl >> 8) as u8 & 0x3) << 6),
        cyl as u8,
    ]
}

/// A decoded MBR (or EBR) sector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mbr {
    pub disk_signature: u32,
    pub entries: [Entry; 4],
}

impl Mbr {
    /// Decodes the first 512 bytes of `sector`; `None` without the 0x55AA boot signature.
    pub fn parse(sector: &[u8]) -> Option<Mbr> {
        if sector.len() < MBR_LEN
            || sector[BOOT_SIGNATURE_OFFSET..BOOT_SIGNATURE_OFFSET + 2] != BOOT_SIGNATURE
        {
            return None;
        }
        let e = |i: usize| Entry::parse(&sector[TABLE_OFFSET + i * ENTRY_LEN..]);
        Some(Mbr {
            disk_signature: u32_le(sector, DISK_SIGNATURE_OFFSET),
            entries: [e(0), e(1), e(2), e(3)],
        })
    }

    /// Whether the entries look like a partition table: boot indicators are 0x00 or 0x80 and
    /// at least one entry is used. (A filesystem boot sector also ends in 0x55AA; its bytes
    /// where the table would be rarely pass this test, and callers check for one first.)
    pub fn looks_like_table(&self) -> bool {
        self.entries
            .iter()
            .all(|e| e.boot == 0 || e.boot == BOOT_ACTIVE)
            && self.entries.iter().any(Entry::is_used)
    }

    /// Whether an entry is a GPT protective entry (type 0xEE).
    pub fn has_protective_entry(&self) -> bool {
        self.entries
            .iter()
            .any(|e| e.is_used() && e.kind == TYPE_GPT_PROTECTIVE)
    }

    /// Writes the disk signature, the four entries and the boot signature into `sector`,
    /// keeping its boot code.
    pub fn encode_into(&self, sector: &mut [u8]) {
        sector[DISK_SIGNATURE_OFFSET..DISK_SIGNATURE_OFFSET + 4]
            .copy_from_slice(&self.disk_signature.to_le_bytes());
        sector[444] = 0;
        sector[445] = 0;
        for (i, e) in self.entries.iter().enumerate() {
            e.encode(&mut sector[TABLE_OFFSET + i * ENTRY_LEN..TABLE_OFFSET + (i + 1) * ENTRY_LEN]);
        }
        sector[BOOT_SIGNATURE_OFFSET..BOOT_SIGNATURE_OFFSET + 2].copy_from_slice(&BOOT_SIGNATURE);
    }
}

/// A logical partition found in an EBR chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logical {
    /// Sector of the EBR that describes it.
    pub ebr: u64,
    /// Absolute first sector.
    pub start: u64,
    pub sectors: u64,
    pub kind: u8,
    pub boot: u8,
}

/// Walks the EBR chain of the extended partition at `ext_start` (`ext_sectors` long) on a
/// volume with `sector_size`-byte sectors. Returns the logical partitions in chain order and
/// warnings about anything odd (loops, records outside the extended partition, missing
/// signatures, the cap reached); never fails.
pub fn walk_ebr_chain(
    vol: &dyn Volume,
    sector_size: u64,
    ext_start: u64,
    ext_sectors: u64,
) -> (Vec<Logical>, Vec<String>) {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    let mut seen = HashSet::new();
    let ext_end = ext_start.saturating_add(ext_sectors);
    let mut ebr = ext_start;
    let mut buf = vec![0u8; MBR_LEN];
    loop {
        if seen.len() >= MAX_EBRS {
            warnings.push(format!(
                "the extended partition's chain has more than {MAX_EBRS} boot records; \
                 stopped there"
            ));
            break;
        }
        if !seen.insert(ebr) {
            warnings.push(format!(
                "the chain of extended boot records loops back to sector {ebr}; stopped there"
            ));
            break;
        }
        if ebr < ext_start || ebr >= ext_end {
            warnings.push(format!(
                "an extended boot record at sector {ebr} is outside the extended partition \
                 (sectors {ext_start}..{ext_end}); stopped there"
            ));
            break;
        }
        let Some(offset) = ebr.checked_mul(sector_size).filter(|o| {
            o.checked_add(MBR_LEN as u64)
                .is_some_and(|e| e <= vol.size())
        }) else {
            warnings.push(format!(
                "the extended boot record at sector {ebr} is past the end of the volume; \
                 stopped there"
            ));
            break;
        };
        if let Err(e) = vol.read_at(offset, &mut buf) {
            warnings.push(format!(
                "cannot read the extended boot record at sector {ebr}: {e}"
            ));
            break;
        }
        let Some(rec) = Mbr::parse(&buf) else {
            if seen.len() > 1 {
                warnings.push(format!(
                    "the extended boot record at sector {ebr} has no 0x55AA signature; \
                     stopped there"
                ));
            }
            // An empty extended partition (first EBR blank) is normal.
            break;
        };
        let mut link = None;
        let mut logical_seen = false;
        for e in rec.entries.iter().filter(|e| e.is_used()) {
            if is_extended(e.kind) {
                if link.is_none() {
                    link = Some(*e);
                }
            } else if !logical_seen {
                logical_seen = true;
                out.push(Logical {
                    ebr,
                    start: ebr.saturating_add(u64::from(e.start)),
                    sectors: u64::from(e.sectors),
                    kind: e.kind,
                    boot: e.boot,
                });
            } else {
                warnings.push(format!(
                    "the extended boot record at sector {ebr} describes more than one logical \
                     partition; only the first is used"
                ));
            }
        }
        match link {
            Some(l) if l.start != 0 => ebr = ext_start.saturating_add(u64::from(l.start)),
            Some(_) => {
                warnings.push(format!(
                    "the extended boot record at sector {ebr} links to the start of the \
                     extended partition (a loop); stopped there"
                ));
                break;
            }
            None => break,
        }
    }
    (out, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::tests::Mem;
    use proptest::prelude::*;

    fn put(img: &mut [u8], sector: u64, entries: &[Entry]) {
        let s = &mut img[sector as usize * 512..(sector as usize + 1) * 512];
        let mut m = Mbr {
            disk_signature: 0,
            entries: [Entry::default(); 4],
        };
        m.entries[..entries.len()].copy_from_slice(entries);
        m.encode_into(s);
    }

    /// Writes at `sector` an EBR of the extended partition at sector 10: a 4-sector Linux
    /// partition 2 sectors in, then the link to the next EBR, `next` sectors into the extended
    /// partition.
    fn put_ebr(img: &mut [u8], sector: u64, next: u32) {
        put(
            img,
            sector,
            &[
                Entry::new(0x83, false, 2, 4, sector + 2),
                Entry::new(5, false, next, 10, 10 + u64::from(next)),
            ],
        );
    }

    #[test]
    fn chs_matches_fdisk() {
        assert_eq!(chs(2048), [0x20, 0x21, 0x00]);
        assert_eq!(chs(18431), [0x25, 0x24, 0x01]);
        assert_eq!(chs(1 << 30), [0xFE, 0xFF, 0xFF]);
    }

    #[test]
    fn looping_chain_is_cut() {
        let mut img = vec![0u8; 64 * 512];
        // Extended partition at 10, 50 sectors. EBR 10 -> EBR 20 -> EBR 10 (loop).
        put_ebr(&mut img, 10, 10);
        put_ebr(&mut img, 20, 0);
        let (l, w) = walk_ebr_chain(&Mem(img.clone()), 512, 10, 50);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].start, 12);
        assert_eq!(l[1].start, 22);
        assert!(w[0].contains("loop"), "{w:?}");
        // Link back to the second EBR itself.
        put_ebr(&mut img, 20, 10);
        let (l, w) = walk_ebr_chain(&Mem(img), 512, 10, 50);
        assert_eq!(l.len(), 2);
        assert!(w[0].contains("loops back to sector 20"), "{w:?}");
    }

    #[test]
    fn chain_leaving_the_extended_partition_is_cut() {
        let mut img = vec![0u8; 64 * 512];
        put_ebr(&mut img, 10, 40);
        let (l, w) = walk_ebr_chain(&Mem(img.clone()), 512, 10, 20);
        assert_eq!(l.len(), 1);
        assert!(w[0].contains("outside the extended partition"), "{w:?}");
        // Past the end of the volume.
        put_ebr(&mut img, 10, 90);
        let (_, w) = walk_ebr_chain(&Mem(img), 512, 10, 1 << 30);
        assert!(w[0].contains("past the end"), "{w:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// Random bytes in the MBR and EBR sectors: parsing and walking never panic and stop
        /// within the cap.
        #[test]
        fn random_tables_never_panic(
            sectors in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 512), 1..8),
            ext_start in 0u64..16,
            ext_sectors in 0u64..u64::MAX,
        ) {
            let mut img = Vec::new();
            for mut s in sectors {
                s[510] = 0x55;
                s[511] = 0xAA;
                img.extend_from_slice(&s);
            }
            if let Some(m) = Mbr::parse(&img) {
                let _ = m.looks_like_table();
            }
            let (l, _) = walk_ebr_chain(&Mem(img), 512, ext_start, ext_sectors);
            prop_assert!(l.len() <= MAX_EBRS);
        }
    }
}
