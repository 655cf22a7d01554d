//! A fuzz pass over every reader of a file a user hands the runner (issue 42): GGUF headers,
//! safetensors headers, LoRA files and their metadata, PNG and JPEG pictures, and run files, on
//! arbitrary bytes and on real files with bytes flipped, cut or appended. Each returns a value or
//! an error: never a panic, never an abort (an allocation a header claims, a recursion it nests),
//! never a hang. Bounded to a few hundred cases a reader so that it runs in seconds in CI.

use magcache_layers::weights::WeightStore;
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

/// `base` mutated: `flips` bytes overwritten (positions and values from the strategy, taken modulo
/// the length), then cut to `cut` bytes when shorter, then `tail` appended.
fn mutate(base: &[u8], flips: &[(usize, u8)], cut: Option<usize>, tail: &[u8]) -> Vec<u8> {
    let mut b = base.to_vec();
    if !b.is_empty() {
        for &(i, v) in flips {
            let n = b.len();
            b[i % n] = v;
        }
    }
    if let Some(c) = cut {
        b.truncate(c % (b.len() + 1));
    }
    b.extend_from_slice(tail);
    b
}

/// Mutations concentrated on the header: positions in the first `head` bytes.
fn mutation(head: usize) -> impl Strategy<Value = (Vec<(usize, u8)>, Option<usize>, Vec<u8>)> {
    (
        prop::collection::vec((0..head, any::<u8>()), 0..8),
        prop::option::of(0usize..1 << 20),
        prop::collection::vec(any::<u8>(), 0..16),
    )
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// GGUF bytes: the magic and a version, then arbitrary bytes (counts, types, lengths).
fn gguf_like() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![2u32, 3]),
        prop::collection::vec(any::<u8>(), 0..512),
    )
        .prop_map(|(v, rest)| {
            let mut b = b"GGUF".to_vec();
            b.extend(v.to_le_bytes());
            b.extend(rest);
            b
        })
}

proptest! {
    // A fixed seed: CI runs the same cases every time (a failure is reproducible); raise `cases` to
    // search further (5000 a reader passed when this came in).
    #![proptest_config(ProptestConfig {
        cases: 1000,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(42),
        ..ProptestConfig::default()
    })]

    #[test]
    fn gguf_headers_never_panic(bytes in gguf_like()) {
        let _ = magcache_layers::weights::gguf::read_header(&mut std::io::Cursor::new(&bytes), "x.gguf");
    }

    #[test]
    fn real_gguf_files_mutated_never_panic((flips, cut, tail) in mutation(2048)) {
        let base = std::fs::read(fixture("gguf/wan21_tiny-Q4_0.gguf")).unwrap();
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "m.gguf", &mutate(&base, &flips, cut, &tail));
        if let Ok((store, _)) = WeightStore::load_gguf(&p) {
            // Every tensor the header names can be asked for: an error at worst.
            let names: Vec<String> = store.keys().map(|k| k.to_string()).collect();
            for n in names {
                let _ = store.get(&n);
            }
        }
    }

    #[test]
    fn safetensors_headers_never_panic(len in 0u64..4096, body in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut b = len.to_le_bytes().to_vec();
        b.extend(body);
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "m.safetensors", &b);
        let _ = WeightStore::load_checkpoint(&p);
        let _ = magcache_layers::lora::Adapter::read(&p);
    }

    #[test]
    fn real_lora_files_mutated_never_panic((flips, cut, tail) in mutation(1024)) {
        let base = std::fs::read(fixture("lora/wan21_diffusers.safetensors")).unwrap();
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "a.safetensors", &mutate(&base, &flips, cut, &tail));
        let _ = magcache_layers::lora::Adapter::read(&p);
    }

    #[test]
    fn lora_metadata_never_panics(meta in prop_oneof![
        Just("{\"transformer.lora_alpha\": \"8\"}".to_string()),
        Just("{\"transformer.use_rslora\": \"true\"}".to_string()),
        Just("{\"transformer.alpha_pattern\": [1, 2]}".to_string()),
        Just("{\"transformer.alpha_pattern\": {\"a\": null}}".to_string()),
        Just("{\"transformer.lora_alpha\": 1e400}".to_string()),
        Just("[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]".to_string()),
        "\\PC{0,64}",
    ]) {
        let base = std::fs::read(fixture("lora/wan21_diffusers.safetensors")).unwrap();
        let tensors = candle_core::safetensors::load_buffer(&base, &candle_core::Device::Cpu).unwrap();
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.safetensors");
        let views: Vec<(String, candle_core::Tensor)> = tensors.into_iter().collect();
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = views
            .iter()
            .map(|(k, t)| {
                let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (k.clone(), t.dims().to_vec(), v.iter().flat_map(|x| x.to_le_bytes()).collect())
            })
            .collect();
        let st: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
            .iter()
            .map(|(k, s, b)| (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap()))
            .collect();
        let mut m = std::collections::HashMap::new();
        m.insert("lora_adapter_metadata".to_string(), meta);
        safetensors::tensor::serialize_to_file(st, Some(m), &p).unwrap();
        let _ = magcache_layers::lora::Adapter::read(&p);
    }

    #[test]
    fn pictures_never_panic(
        which in prop::sample::select(vec!["picture/source.png", "picture/exif6.jpg"]),
        (flips, cut, tail) in mutation(256),
    ) {
        let base = std::fs::read(fixture(which)).unwrap();
        let d = tempfile::tempdir().unwrap();
        let name = if which.ends_with(".png") { "p.png" } else { "p.jpg" };
        let p = write(d.path(), name, &mutate(&base, &flips, cut, &tail));
        let _ = magcache_layers::picture::load_rgb8(&p, "run.toml", "inputs.image");
    }

    #[test]
    fn random_bytes_as_pictures_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let d = tempfile::tempdir().unwrap();
        for name in ["p.png", "p.jpg"] {
            let p = write(d.path(), name, &bytes);
            let _ = magcache_layers::picture::load_rgb8(&p, "run.toml", "inputs.image");
        }
    }

    #[test]
    fn run_files_never_panic(text in prop_oneof![
        "\\PC{0,200}",
        "(\\[model\\]\nfamily = \"wan2.1\"\n|\\[\\[model.lora\\]\\]\npath = 5\n|\\[cache\\]\nstrategy = \"magcache\"\n|\\[cache.mag_ratios\\]\n|x = \\[\\[\\[\\[1\\]\\]\\]\\]\n|steps = -1\n|\\[sampling\\]\n){0,8}",
    ]) {
        let _ = magcache_core::RunConfig::parse(&text, "run.toml");
    }
}
