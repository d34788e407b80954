//! Micro-benchmark of the AEAD choices for encrypted repositories (docs/SECURITY.md keeps the
//! figures). Run: `cargo bench --bench aead`. One thread; prints MB/s per core.
//!
//! - `aes-256-gcm per-record key`: what volback does ([`volback::crypto::Keys::seal_into`] and
//!   [`volback::crypto::Keys::open`]): a random 24-byte salt per record, the record's key is
//!   BLAKE3-keyed(data key, salt), then AES-256-GCM with a zero nonce, as implemented by
//!   `ring` (assembly: AES-NI or VAES, carry-less multiplication).
//! - `aes-256-gcm one key (RustCrypto)`: the portable `aes-gcm` crate under one fixed key and
//!   a random 96-bit nonce: what volback used before `ring`, and what the per-record key
//!   costs.
//! - `xchacha20-poly1305`: one fixed key and a random 192-bit nonce per record (the usual way
//!   to use it), same record layout (nonce | ciphertext | tag).
//!
//! Records of 64 KiB (a small frame) and 1 MiB (a large frame). Last, the time of one
//! Argon2id derivation at `KdfParams::default()` (what every open of an encrypted repository
//! pays once), through [`volback::crypto::keyslot::KeySlot::wrap`] and `unwrap_key`.

use aes_gcm::aead::{AeadInOut, Nonce, Tag};
use aes_gcm::{Aes256Gcm, KeyInit};
use chacha20poly1305::XChaCha20Poly1305;
use std::hint::black_box;
use std::time::{Duration, Instant};
use volback::crypto::keyslot::{KdfParams, KeySlot};
use volback::crypto::{Keys, Kind, MasterKey, SEAL_OVERHEAD};

/// Incompressible, deterministic bytes (the AEADs do not care, but no page is all zeros).
fn data(len: usize) -> Vec<u8> {
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

/// MB/s of `f` over records of `bytes`, running it for at least 0.7 s (doubling the count).
fn rate(bytes: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut reps = 1;
    loop {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        let s = t.elapsed().as_secs_f64();
        if s > 0.7 {
            return (bytes * reps) as f64 / s / 1e6;
        }
        reps *= 2;
    }
}

/// A record `nonce | ciphertext | tag` under one key and a random nonce (AES-256-GCM with 96
/// bits, XChaCha20-Poly1305 with 192).
fn one_key_seal<A: AeadInOut>(cipher: &A, pt: &[u8], out: &mut Vec<u8>) {
    let mut nonce = Nonce::<A>::default();
    getrandom::fill(&mut nonce).expect("random numbers");
    out.clear();
    out.extend_from_slice(&nonce);
    out.extend_from_slice(pt);
    let tag = cipher
        .encrypt_inout_detached(&nonce, b"aad", (&mut out[nonce.len()..]).into())
        .expect("encrypt");
    out.extend_from_slice(&tag);
}

/// Opens a record of [`one_key_seal`].
fn one_key_open<A: AeadInOut>(cipher: &A, rec: &[u8], out: &mut Vec<u8>) {
    let (nonce, rest) = rec.split_at(Nonce::<A>::default().len());
    let (ct, tag) = rest.split_at(rest.len() - 16);
    let nonce = Nonce::<A>::try_from(nonce).expect("nonce length");
    let tag = Tag::<A>::try_from(tag).expect("tag length");
    out.clear();
    out.extend_from_slice(ct);
    cipher
        .decrypt_inout_detached(&nonce, b"aad", out.as_mut_slice().into(), &tag)
        .expect("authentic");
}

fn time_of(mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn main() {
    let keys = Keys::derive(&MasterKey::from_bytes([7; 32]), "0123456789abcdef");
    let aes = Aes256Gcm::new(&[9u8; 32].into());
    let xchacha = XChaCha20Poly1305::new(&[9u8; 32].into());
    println!("AEAD, one core, MB/s of plaintext (seal = encrypt, open = decrypt + check)");
    println!(
        "{:<34} {:>8} {:>10} {:>10}",
        "scheme", "record", "seal", "open"
    );
    for (label, len) in [("64 KiB", 64 * 1024), ("1 MiB", 1024 * 1024)] {
        let pt = data(len);
        let mut rec = Vec::with_capacity(len + SEAL_OVERHEAD);
        let mut back = Vec::with_capacity(len);

        let seal = rate(len, || {
            rec.clear();
            keys.seal_into(Kind::Frame, b"", black_box(&pt), &mut rec)
                .expect("random numbers");
            black_box(&rec);
        });
        let sealed = keys.seal(Kind::Frame, b"", &pt).expect("random numbers");
        let open = rate(len, || {
            let out = keys.open(Kind::Frame, b"", black_box(&sealed));
            black_box(out.expect("authentic").len());
        });
        println!(
            "{:<34} {:>8} {:>10.0} {:>10.0}",
            "aes-256-gcm per-record (ring)", label, seal, open
        );

        let seal = rate(len, || {
            one_key_seal(&aes, black_box(&pt), &mut rec);
            black_box(&rec);
        });
        one_key_seal(&aes, &pt, &mut rec);
        let sealed = rec.clone();
        let open = rate(len, || {
            one_key_open(&aes, black_box(&sealed), &mut back);
            black_box(&back);
        });
        println!(
            "{:<34} {:>8} {:>10.0} {:>10.0}",
            "aes-256-gcm one key (RustCrypto)", label, seal, open
        );

        let seal = rate(len, || {
            one_key_seal(&xchacha, black_box(&pt), &mut rec);
            black_box(&rec);
        });
        one_key_seal(&xchacha, &pt, &mut rec);
        let sealed = rec.clone();
        let open = rate(len, || {
            one_key_open(&xchacha, black_box(&sealed), &mut back);
            black_box(&back);
        });
        assert_eq!(back, pt, "xchacha20-poly1305 round trip");
        println!(
            "{:<34} {:>8} {:>10.0} {:>10.0}",
            "xchacha20-poly1305", label, seal, open
        );
    }

    let params = KdfParams::default();
    let master = MasterKey::from_bytes([5; 32]);
    let mut wraps = Vec::new();
    let mut unwraps = Vec::new();
    let mut slot = None;
    for _ in 0..5 {
        wraps.push(time_of(|| {
            slot = Some(
                KeySlot::wrap(&master, b"password", params, "repo", "slot", "t".into())
                    .expect("wrap"),
            );
        }));
        let s = slot.as_ref().expect("a slot");
        unwraps.push(time_of(|| {
            let m = s.unwrap_key(b"password", "repo", "slot").expect("unwrap");
            black_box(m.as_bytes());
        }));
    }
    wraps.sort();
    unwraps.sort();
    println!(
        "argon2id {} MiB, {} iterations, {} lanes: wrap median {:.0} ms (min {:.0}), \
         unwrap median {:.0} ms (min {:.0})",
        params.memory_kib / 1024,
        params.iterations,
        params.parallelism,
        wraps[2].as_secs_f64() * 1e3,
        wraps[0].as_secs_f64() * 1e3,
        unwraps[2].as_secs_f64() * 1e3,
        unwraps[0].as_secs_f64() * 1e3,
    );
}
