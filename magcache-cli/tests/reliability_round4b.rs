//! Reliability round 4, second pass (issue 42), through the binary: a GGUF shape whose product
//! overflows, a hub ref that is a FIFO, integer tensors where floats are read, adapters whose merge
//! overflows named (not the checkpoint), and no backtrace inside an error line.

mod common;

use common::{check_err, magcache, s, Case};
use std::path::Path;

/// The Wan LoRA fixture's tensors and the first key containing one of `parts`.
fn lora_fixture(
    parts: &[&str],
) -> (
    std::collections::HashMap<String, candle_core::Tensor>,
    String,
) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/lora/wan21_diffusers.safetensors");
    let tensors = candle_core::safetensors::load(&fixture, &candle_core::Device::Cpu).unwrap();
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    let key = keys
        .into_iter()
        .find(|k| parts.iter().any(|p| k.contains(p)))
        .unwrap()
        .clone();
    (tensors, key)
}

#[test]
fn a_gguf_shape_that_overflows_is_refused() {
    let d = tempfile::tempdir().unwrap();
    // One f32 tensor of 64 values, its original shape claimed as [2^63 + 1, 64] (a product that
    // overflows, or wraps to 64 in a release build).
    let name = "blocks.0.ffn.0.weight";
    let key = format!("comfy.gguf.orig_shape.{name}");
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key.as_bytes());
    b.extend(9u32.to_le_bytes()); // array
    b.extend(10u32.to_le_bytes()); // of u64
    b.extend(2u64.to_le_bytes());
    b.extend(((1u64 << 63) + 1).to_le_bytes());
    b.extend(64u64.to_le_bytes());
    b.extend((name.len() as u64).to_le_bytes());
    b.extend(name.as_bytes());
    b.extend(1u32.to_le_bytes());
    b.extend(64u64.to_le_bytes());
    b.extend(0u32.to_le_bytes()); // f32
    b.extend(0u64.to_le_bytes());
    let pad = b.len().div_ceil(32) * 32 - b.len();
    b.extend(vec![0u8; pad + 256]);
    let f = d.path().join("wrap.gguf");
    std::fs::write(&f, b).unwrap();
    let run = d.path().join("run.toml");
    std::fs::write(
        &run,
        format!(
            "[model]\nfamily = \"wan2.1\"\nweights = {:?}\n\n[inputs]\nlatent_shape = [1, 4, 1, 4, 4]\n\n[sampling]\nsteps = 2\n",
            s(&f)
        ),
    )
    .unwrap();
    for args in [vec!["plan"], vec!["run", "--quiet"]] {
        let mut args = args;
        args.extend(["--config", s(&run)]);
        let o = magcache(&args);
        check_err(&o, &["wrap.gguf", "orig_shape"]);
    }
}

#[cfg(unix)]
#[test]
fn a_hub_ref_that_is_a_fifo_is_refused_at_once() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("hub").join("models--org--m");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    let fifo = repo.join("refs").join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let run = d.path().join("run.toml");
    std::fs::write(
        &run,
        "[model]\nfamily = \"wan2.1\"\nweights = \"org/m\"\nrevision = \"fifo\"\n\n[inputs]\nlatent_shape = [1, 4, 1, 4, 4]\n\n[sampling]\nsteps = 2\n",
    )
    .unwrap();
    let mut child = common::bin()
        .args(["plan", "--config", s(&run)])
        .env("HF_HUB_CACHE", d.path().join("hub"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("plan hangs on a FIFO ref");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    check_err(&o, &["model.revision", "regular file"]);
}

#[test]
fn integer_tensors_are_refused_where_floats_are_read() {
    // An adapter factor in i64.
    let (mut tensors, key) = lora_fixture(&["lora_A", "lora_down"]);
    let t = &tensors[&key];
    tensors.insert(key.clone(), t.to_dtype(candle_core::DType::I64).unwrap());
    let c = Case::new("\n[[model.lora]]\npath = \"int.safetensors\"\n");
    candle_core::safetensors::save(&tensors, c.dir.path().join("int.safetensors")).unwrap();
    let o = magcache(&["run", "--config", s(&c.run_file()), "--quiet"]);
    check_err(&o, &["int.safetensors", &key, "I64"]);
    // `latents_init` of the inputs file in u8.
    let c = Case::new("");
    let inputs = c.dir.path().join("in.safetensors");
    let mut t = candle_core::safetensors::load(&inputs, &candle_core::Device::Cpu).unwrap();
    let l = t["latents_init"].to_dtype(candle_core::DType::U8).unwrap();
    t.insert("latents_init".into(), l);
    candle_core::safetensors::save(&t, &inputs).unwrap();
    let o = magcache(&["run", "--config", s(&c.run_file()), "--quiet"]);
    check_err(&o, &["in.safetensors", "latents_init", "U8"]);
}

#[test]
fn an_adapter_whose_merge_overflows_is_named_not_the_checkpoint() {
    // A scale past f32's range.
    let c = Case::new("\n[[model.lora]]\npath = \"a.safetensors\"\nscale = 1e39\n");
    let (tensors, _) = lora_fixture(&["lora_A"]);
    candle_core::safetensors::save(&tensors, c.dir.path().join("a.safetensors")).unwrap();
    let o = magcache(&["run", "--config", s(&c.run_file()), "--quiet"]);
    let e = check_err(&o, &["a.safetensors", "beyond f32"]);
    assert!(!e.contains("diffusion_pytorch_model"), "{e}");
    // Finite factors whose product overflows f32 where the checkpoint's tensor is finite.
    let (mut tensors, key) = lora_fixture(&["lora_B", "lora_up"]);
    let big = (tensors[&key].ones_like().unwrap() * 3e38).unwrap();
    tensors.insert(key.clone(), big);
    let c = Case::new("\n[[model.lora]]\npath = \"big.safetensors\"\nscale = 10.0\n");
    candle_core::safetensors::save(&tensors, c.dir.path().join("big.safetensors")).unwrap();
    let o = magcache(&["run", "--config", s(&c.run_file()), "--quiet"]);
    check_err(&o, &["big.safetensors", "LoRA adapters merged"]);
    // Factors of rank 0.
    let (mut tensors, key) = lora_fixture(&["lora_A"]);
    let up_key = key.replace("lora_A", "lora_B");
    let (r, cols) = tensors[&key].dims2().unwrap();
    let rows = tensors[&up_key].dim(0).unwrap();
    assert!(r > 0);
    let dev = candle_core::Device::Cpu;
    let f32 = candle_core::DType::F32;
    tensors.insert(
        key.clone(),
        candle_core::Tensor::zeros((0, cols), f32, &dev).unwrap(),
    );
    tensors.insert(
        up_key,
        candle_core::Tensor::zeros((rows, 0), f32, &dev).unwrap(),
    );
    let c = Case::new("\n[[model.lora]]\npath = \"r0.safetensors\"\n");
    candle_core::safetensors::save(&tensors, c.dir.path().join("r0.safetensors")).unwrap();
    let o = magcache(&["run", "--config", s(&c.run_file()), "--quiet"]);
    let e = check_err(&o, &["r0.safetensors"]);
    assert!(e.contains("rank 0") || e.contains("empty"), "{e}");
}

#[test]
fn no_backtrace_inside_an_error_line() {
    // candle refuses to read an f8 tensor as f32: its error (with a backtrace under
    // RUST_BACKTRACE=1) is wrapped with the file and key, on one line.
    let (mut tensors, key) = lora_fixture(&["lora_A", "lora_down"]);
    let t = tensors[&key].to_dtype(candle_core::DType::F8E4M3).unwrap();
    tensors.insert(key.clone(), t);
    let c = Case::new("\n[[model.lora]]\npath = \"f8.safetensors\"\n");
    candle_core::safetensors::save(&tensors, c.dir.path().join("f8.safetensors")).unwrap();
    let o = common::bin()
        .args(["run", "--config", s(&c.run_file()), "--quiet"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let e = check_err(&o, &["f8.safetensors", &key]);
    assert!(!e.contains("stack backtrace") && !e.contains(" 0: "), "{e}");
}
