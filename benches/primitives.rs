//! Micro-benchmark of the per-block primitives: chunk hashes (BLAKE3, SHA-256) and zstd
//! levels, on 256 KiB blocks of text-like and random data. Run: `cargo bench --bench primitives`.
//! Prints MB/s per core; docs/BENCHMARKS.md keeps the figures.

use std::time::Instant;
use volback::hash::HashAlgorithm;
use volback::repo::chunks::Encoder;

fn text_block(len: usize) -> Vec<u8> {
    let words = [
        "volume ",
        "backup ",
        "block ",
        "snapshot ",
        "chunk ",
        "restore ",
        "the ",
        "of ",
        "\n",
    ];
    let mut out = Vec::with_capacity(len);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

fn random_block(len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for b in out.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8;
    }
    out
}

fn rate(bytes: usize, f: impl Fn()) -> f64 {
    let mut reps = 1;
    loop {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        let s = t.elapsed().as_secs_f64();
        if s > 0.5 {
            return (bytes * reps) as f64 / s / 1e6;
        }
        reps *= 2;
    }
}

fn main() {
    const BS: usize = 256 * 1024;
    let text = text_block(BS);
    let random = random_block(BS);
    for algo in [HashAlgorithm::Blake3, HashAlgorithm::Sha256] {
        let r = rate(BS, || {
            std::hint::black_box(algo.hash(std::hint::black_box(&random)));
        });
        println!("hash {:<7} {:>8.0} MB/s", algo.name(), r);
    }
    for level in [1, 3] {
        for (name, data) in [("text", &text), ("random", &random)] {
            let enc = std::cell::RefCell::new(Encoder::new(level).expect("zstd level"));
            let r = rate(BS, || {
                let mut e = enc.borrow_mut();
                std::hint::black_box(e.encode(data).len());
            });
            println!("zstd -{level} {name:<6} {r:>8.0} MB/s");
        }
    }
}
