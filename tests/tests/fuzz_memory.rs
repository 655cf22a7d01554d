//! The fuzz pass of issue 42, with the guard: the readers of pictures, GGUF headers, safetensors
//! headers and LoRA files, given arbitrary or mutated bytes (real files with header fields flipped,
//! cut or extended), never allocate past what a run may use. `MAGCACHE_MEMORY_LIMIT` is 64 MB here; every case's heap peak,
//! counted by this binary's allocator, stays under it (with the input file itself and 8 MB for the
//! decoders' own tables), whatever size a header claims.
//!
//! One test in this binary: the counter is process-wide, and the environment is set before any
//! other thread could read it.

use magcache_tests::{fixture, heap_peak_of, CountingAlloc};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

#[global_allocator]
static A: CountingAlloc = CountingAlloc;

const LIMIT: usize = 64 << 20;

/// `base` with up to 8 header bytes overwritten (in the first `head` bytes, so that sizes and
/// counts change), then cut, then extended.
fn mutated(base: Vec<u8>, head: usize) -> impl Strategy<Value = Vec<u8>> {
    let n = base.len().max(1);
    (
        prop::collection::vec((0..head.min(n), any::<u8>()), 0..8),
        prop::option::of(0..n + 1),
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(move |(flips, cut, tail)| {
            let mut b = base.clone();
            for (i, v) in flips {
                if i < b.len() {
                    b[i] = v;
                }
            }
            if let Some(c) = cut {
                b.truncate(c);
            }
            b.extend(tail);
            b
        })
}

/// CRC-32 (PNG's chunk checksum).
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A PNG chunk: length, type and data, checksum.
fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut body = kind.to_vec();
    body.extend(data);
    let mut c = (data.len() as u32).to_be_bytes().to_vec();
    c.extend(&body);
    c.extend(crc32(&body).to_be_bytes());
    c
}

/// A well-formed PNG whose header claims `w x h` pixels of 8-bit RGBA over an image stream of a
/// few bytes (`rest` appended to an empty zlib stream): a decoder sizes its buffer from the header
/// and only then finds the data short.
fn png_claiming(w: u32, h: u32, rest: &[u8]) -> Vec<u8> {
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 6, 0, 0, 0]);
    let mut idat = vec![0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01];
    idat.extend(rest);
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    b.extend(chunk(b"IHDR", &ihdr));
    b.extend(chunk(b"IDAT", &idat));
    b.extend(chunk(b"IEND", &[]));
    b
}

/// Runs `read` on a file of `bytes` named `name`; the heap peak above the input must stay under
/// the limit.
fn within_guard(
    name: &str,
    bytes: &[u8],
    read: impl FnOnce(&std::path::Path),
) -> Result<(), TestCaseError> {
    let d = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let p = d.path().join(name);
    std::fs::write(&p, bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (peak, ()) = heap_peak_of(|| read(&p));
    let bound = LIMIT + 2 * bytes.len() + (8 << 20);
    prop_assert!(
        peak <= bound,
        "{name}: {peak} B allocated, the guard allows {bound} B"
    );
    Ok(())
}

#[test]
fn readers_never_allocate_past_the_guard() {
    // SAFETY of the environment: this is the binary's only test, and nothing else runs yet.
    std::env::set_var("MAGCACHE_MEMORY_LIMIT", "64M");
    // A runner counts its cases over every `run`: a new one for each reader.
    let runner = || {
        TestRunner::new(Config {
            cases: 300,
            failure_persistence: None,
            rng_seed: RngSeed::Fixed(11),
            ..Config::default()
        })
    };
    let pictures = [
        ("picture/source.png", "p.png"),
        ("picture/exif6.jpg", "p.jpg"),
    ];
    for (fixture_name, name) in pictures {
        let base = std::fs::read(fixture(fixture_name)).unwrap();
        runner()
            .run(&mutated(base, 256), |b| {
                within_guard(name, &b, |p| {
                    let _ = magcache_layers::picture::load_rgb8(p, "run.toml", "inputs.image");
                })
            })
            .unwrap();
    }
    // Headers that claim up to 40000 x 40000 pixels over a few bytes of data.
    let claims = (
        1u32..40_000,
        1u32..40_000,
        prop::collection::vec(any::<u8>(), 0..64),
    );
    runner()
        .run(&claims, |(w, h, rest)| {
            within_guard("big.png", &png_claiming(w, h, &rest), |p| {
                let _ = magcache_layers::picture::load_rgb8(p, "run.toml", "inputs.image");
            })
        })
        .unwrap();
    // LoRA files (safetensors headers and adapter metadata) with their header mutated.
    let base = std::fs::read(fixture("lora/wan21_diffusers.safetensors")).unwrap();
    runner()
        .run(&mutated(base, 1024), |b| {
            within_guard("a.safetensors", &b, |p| {
                let _ = magcache_layers::lora::Adapter::read(p);
                let _ = magcache_layers::weights::WeightStore::load_checkpoint(p);
            })
        })
        .unwrap();
    // Safetensors headers claiming any length over arbitrary bytes.
    let claims = (any::<u64>(), prop::collection::vec(any::<u8>(), 0..256));
    runner()
        .run(&claims, |(len, body)| {
            let mut b = len.to_le_bytes().to_vec();
            b.extend(body);
            within_guard("m.safetensors", &b, |p| {
                let _ = magcache_layers::weights::WeightStore::load_checkpoint(p);
            })
        })
        .unwrap();
    let base = std::fs::read(fixture("gguf/wan21_tiny-Q4_0.gguf")).unwrap();
    runner()
        .run(&mutated(base, 2048), |b| {
            within_guard("m.gguf", &b, |p| {
                let mut f = std::fs::File::open(p).unwrap();
                let _ = magcache_layers::weights::gguf::read_header(&mut f, "m.gguf");
            })
        })
        .unwrap();
}
