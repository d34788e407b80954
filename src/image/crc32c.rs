//! CRC-32C (Castagnoli) as VHDX uses it for its headers, region tables and log entries
//! (MS-VHDX 2.2: "CRC-32C ... using the Castagnoli polynomial 0x1EDC6F41"): reflected
//! polynomial 0x82F63B78, initial value 0xFFFFFFFF, final XOR 0xFFFFFFFF. Check value: the CRC
//! of "123456789" is 0xE3069283.

const POLY: u32 = 0x82F6_3B78;

const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { POLY ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    !update(!0, data)
}

/// CRC-32C of `data` computed as if the four bytes at `field` (a checksum field inside
/// `data`) were zero, as VHDX structures are checksummed.
pub fn crc32c_without_field(data: &[u8], field: usize) -> u32 {
    let (before, rest) = data.split_at(field.min(data.len()));
    let skip = rest.len().min(4);
    let mut c = update(!0, before);
    c = update(c, &[0u8; 4][..skip]);
    c = update(c, &rest[skip..]);
    !c
}

fn update(mut c: u32, data: &[u8]) -> u32 {
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn field_is_treated_as_zero() {
        let mut v = b"abcdefghijkl".to_vec();
        let plain = {
            let mut z = v.clone();
            z[4..8].fill(0);
            crc32c(&z)
        };
        v[4..8].copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(crc32c_without_field(&v, 4), plain);
    }
}
