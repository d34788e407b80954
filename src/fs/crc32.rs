//! The two CRC-32 variants on-disk formats use, both reflected, initial value 0xFFFFFFFF and
//! final XOR 0xFFFFFFFF:
//!
//! - [`crc32`]: the IEEE 802.3 polynomial (0xEDB88320 reflected), as GPT uses it (UEFI
//!   specification, "GPT Header" and "GPT Partition Entry Array") — the same CRC as zlib's
//!   `crc32()`. Check value: CRC of "123456789" is 0xCBF43926.
//! - [`crc32c`]: the Castagnoli polynomial (0x82F63B78 reflected), as XFS (v5 metadata) and
//!   btrfs (`csum_type` 0) use it, stored little-endian. Check value 0xE3069283.

const POLY_IEEE: u32 = 0xEDB8_8320;
const POLY_CASTAGNOLI: u32 = 0x82F6_3B78;

const fn table(poly: u32) -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { poly ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

const TABLE_IEEE: [u32; 256] = table(POLY_IEEE);
const TABLE_CASTAGNOLI: [u32; 256] = table(POLY_CASTAGNOLI);

fn update(table: &[u32; 256], mut c: u32, data: &[u8]) -> u32 {
    for &b in data {
        c = table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    c
}

/// CRC-32 (IEEE) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    !update(&TABLE_IEEE, !0, data)
}

/// CRC-32C (Castagnoli) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    !update(&TABLE_CASTAGNOLI, !0, data)
}

/// The CRC-32C register after `data`, starting from `crc`, without the initial and final
/// inversions: `!crc32c_update(!0, d) == crc32c(d)`. ext4 chains its checksums this way
/// (the kernel's `ext4_chksum`).
pub fn crc32c_update(crc: u32, data: &[u8]) -> u32 {
    update(&TABLE_CASTAGNOLI, crc, data)
}

/// CRC-32C of `data` with the four bytes at `field` taken as zero: how XFS checksums a block
/// that holds its own checksum. `field + 4` must not exceed `data.len()`.
pub fn crc32c_skipping(data: &[u8], field: usize) -> u32 {
    let c = update(&TABLE_CASTAGNOLI, !0, &data[..field]);
    let c = update(&TABLE_CASTAGNOLI, c, &[0; 4]);
    !update(&TABLE_CASTAGNOLI, c, &data[field + 4..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_values() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn skipping_a_field_equals_zeroing_it() {
        let mut d: Vec<u8> = (0..100u8).collect();
        let skipped = crc32c_skipping(&d, 40);
        d[40..44].fill(0);
        assert_eq!(skipped, crc32c(&d));
    }
}
