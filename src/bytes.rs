//! Fixed-width integer readers for on-disk structures, shared by every parser, and byte
//! counts for people.
//!
//! Callers check lengths first (a header is read whole, then its fields are taken); an
//! offset past the slice is a bug in the caller and panics like any slice index.

fn array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

/// `name(b, at)`: the integer at byte `at` of `b`, in the byte order its constructor reads.
macro_rules! readers {
    ($($name:ident: $t:ty = $from:ident;)*) => {$(
        pub fn $name(b: &[u8], at: usize) -> $t {
            <$t>::$from(array(b, at))
        }
    )*};
}

readers! {
    le_u16: u16 = from_le_bytes;
    le_u32: u32 = from_le_bytes;
    le_u64: u64 = from_le_bytes;
    be_u16: u16 = from_be_bytes;
    be_u32: u32 = from_be_bytes;
    be_u64: u64 = from_be_bytes;
}

/// `n` bytes with binary units: "512 B", "1.5 GiB"; a whole number of a larger unit as
/// "256 KiB" with `trim_whole`, else "256.0 KiB".
pub fn human(n: u64, trim_whole: bool) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if trim_whole && v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_orders() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(le_u16(&b, 1), 0x0302);
        assert_eq!(be_u16(&b, 1), 0x0203);
        assert_eq!(le_u32(&b, 0), 0x0403_0201);
        assert_eq!(be_u32(&b, 0), 0x0102_0304);
        assert_eq!(le_u64(&b, 1), 0x0908_0706_0504_0302);
        assert_eq!(be_u64(&b, 1), 0x0203_0405_0607_0809);
    }
}
