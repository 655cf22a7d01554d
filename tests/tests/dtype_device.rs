//! `[model] dtype` and `device`: bf16 weights run the reference loops within bf16 tolerance, and a
//! device this build or machine lacks is one line naming `model.device`.

use magcache_tests::{fixture, load, load_json, loop_toml, max_abs_diff, run_toml, weights_of};

/// The reference run `name` of the Wan2.1 loop fixture with `[model]` lines added.
fn wan21_run(name: &str, model_extra: &str) -> (candle_core::Tensor, magcache_cli::Report, f32) {
    let rel = "reference/wan21_tiny_loop";
    let meta = load_json(&format!("{rel}.json"));
    let tensors = load(&format!("{rel}.safetensors"));
    let run = &meta["runs"][name];
    let cache = magcache_tests::cache_table_for(name, &run["config"]);
    let inputs = fixture(&format!("{rel}.safetensors")).display().to_string();
    let text = loop_toml(
        "wan2.1",
        &weights_of("reference/wan21_tiny"),
        &inputs,
        &meta,
        cache.as_deref(),
    )
    .replacen("[model]\n", &format!("[model]\n{model_extra}"), 1);
    let dir = tempfile::tempdir().unwrap();
    let (fin, rep) = run_toml(dir.path(), &text);
    let d = max_abs_diff(&fin, &tensors[&format!("{name}.final")]);
    (fin, rep, d)
}

/// Each call's decision in a run's report (computed or reused; `None` where none was made).
fn decisions(r: &magcache_cli::Report) -> Vec<Option<bool>> {
    r.calls.iter().map(|c| c.computed).collect()
}

#[test]
fn bf16_weights_follow_the_f32_reference() {
    // Explicit f32 on cpu is today's path: identical to the reference within 1e-3.
    let (_, _, d32) = wan21_run("dense", "dtype = \"f32\"\ndevice = \"cpu\"\n");
    assert!(d32 < 1e-3, "{d32}");
    // bf16 linear weights and products (norms, softmax, modulation in f32): bf16 has 8 bits of
    // mantissa, so the final latents stay within a few 1e-2 of the f32 reference, and finite.
    let (fin, _, d) = wan21_run("dense", "dtype = \"bf16\"\n");
    assert!(fin
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|x| x.is_finite()));
    assert!(
        d > 0.0 && d < 5e-2,
        "bf16 final differs from the f32 reference by {d}"
    );
    // A cached run in bf16 keeps MagCache's decisions (they come from the curve, not the data).
    let (_, rep32, _) = wan21_run("magcache_a", "");
    let (_, rep16, _) = wan21_run("magcache_a", "dtype = \"bf16\"\n");
    assert_eq!(decisions(&rep32), decisions(&rep16));
}

/// f16 linear weights: on the layers' f32 kernel (Intel's AVX-512) they stay f16, widened a block
/// at a time; elsewhere each is widened for its product. Either way the products sum in f32, so the
/// final stays within f16's rounding of the f32 reference (11 bits: tighter than bf16's), and
/// MagCache decides as in f32.
#[test]
fn f16_weights_follow_the_f32_reference() {
    if magcache_layers::nn::f32_gemm::available() {
        eprintln!("note: f16 weights on the layers' f32 kernel (kept f16)");
    } else {
        eprintln!("note: f16 weights widened for each product (the f32 kernel is off here)");
    }
    let (fin, _, d) = wan21_run("dense", "dtype = \"f16\"\n");
    let v = fin.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
    eprintln!("f16 final from the f32 reference: {d}");
    assert!(
        d > 0.0 && d < F16_FINAL_ABS,
        "f16 final differs from the f32 reference by {d}"
    );
    let (_, rep32, _) = wan21_run("magcache_a", "");
    let (_, rep16, _) = wan21_run("magcache_a", "dtype = \"f16\"\n");
    assert_eq!(decisions(&rep32), decisions(&rep16));
}

/// The f16 run's final latents within this of the f32 reference's (measured 1.0e-3 on the kernel and
/// widened alike; bf16's 1.4e-2).
const F16_FINAL_ABS: f32 = 5e-3;

/// `matmul_precision = "bf16"` with f32 weights: on a CPU with AVX512-BF16 the products run on the
/// bf16 kernel (the final within bf16's tolerance of f32's, not equal to it, the same decisions); on
/// another CPU the key is refused, naming it. A value that is no precision is refused everywhere.
#[test]
fn f32_weights_with_bf16_products() {
    let has = magcache_layers::nn::bf16_gemm::cpu_has_bf16()
        && magcache_layers::nn::bf16_gemm::available();
    if has {
        let (f32_final, rep32, _) = wan21_run("magcache_a", "");
        let (fin, rep16, _) = wan21_run("magcache_a", "matmul_precision = \"bf16\"\n");
        let d = max_abs_diff(&fin, &f32_final);
        let scale = max_abs_diff(&f32_final, &f32_final.zeros_like().unwrap());
        assert!(
            d > 0.0 && d < magcache_tests::BF16_FINAL_REL * scale,
            "bf16 products moved the final by {d} (f32 final max |x| {scale})"
        );
        assert_eq!(decisions(&rep32), decisions(&rep16));
    } else {
        eprintln!("note: the bf16 kernel is off here (no AVX512-BF16, MAGCACHE_CPU_BF16=off, or a CPU with AMX): only the refusal is tested");
    }
    magcache_tests::link_all();
    let dir = tempfile::tempdir().unwrap();
    let values: &[&str] = if has {
        &["\"f64\""]
    } else {
        &["\"f64\"", "\"bf16\""]
    };
    for value in values {
        let text = format!(
            "[model]\nfamily = \"wan2.1\"\npreset = \"wan2.1-t2v-1.3b\"\nmatmul_precision = {value}\n[model.overrides]\nnum_layers = 1\n[inputs]\nlatent_shape = [1, 16, 1, 4, 4]\ntext_len = 3\n[sampling]\nsteps = 2\n"
        );
        let path = dir.path().join("run.toml");
        std::fs::write(&path, text).unwrap();
        let e = magcache_cli::prepare(&path).err().unwrap().to_string();
        assert!(e.contains("model.matmul_precision"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
}

#[test]
fn a_missing_device_is_one_line_naming_the_key() {
    magcache_tests::link_all();
    let dir = tempfile::tempdir().unwrap();
    for dev in ["cuda", "cuda:3", "metal"] {
        let text = format!(
            "[model]\nfamily = \"wan2.1\"\npreset = \"wan2.1-t2v-1.3b\"\ndevice = \"{dev}\"\n[model.overrides]\nnum_layers = 1\n[inputs]\nlatent_shape = [1, 16, 1, 4, 4]\ntext_len = 3\n[sampling]\nsteps = 2\n"
        );
        let path = dir.path().join("run.toml");
        std::fs::write(&path, text).unwrap();
        match magcache_cli::prepare(&path) {
            // A machine with that device and a build with its feature runs it.
            Ok(_) => {}
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("model.device"), "{e}");
                assert!(e.contains(&format!("`{dev}` is not available")), "{e}");
                assert!(!e.contains('\n'), "{e}");
            }
        }
    }
    std::fs::write(
        dir.path().join("bad.toml"),
        "[model]\nfamily = \"wan2.1\"\npreset = \"wan2.1-t2v-1.3b\"\ndevice = \"gpu\"\n[sampling]\nsteps = 2\n",
    )
    .unwrap();
    let e = magcache_cli::prepare(&dir.path().join("bad.toml"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.device: `gpu` is not a device"), "{e}");
}

#[test]
fn streamed_blocks_match_held_ones_exactly() {
    // `offload = "stream"` reads each block from the checkpoint as it runs (the next one on a second
    // thread): the same tensors, the same maths, so the same bits, whichever blocks a cache skips
    // (FBCache runs the first block alone, then the rest or nothing).
    for name in ["dense", "magcache_a", "fbcache_a"] {
        let (held, rep_h, d) = wan21_run(name, "");
        let (streamed, rep_s, _) = wan21_run(name, "offload = \"stream\"\n");
        assert!(d < 1e-3, "{name}: {d}");
        assert_eq!(max_abs_diff(&held, &streamed), 0.0, "{name}");
        assert_eq!(decisions(&rep_h), decisions(&rep_s), "{name}");
    }
    let (a, _, _) = wan21_run("dense", "dtype = \"bf16\"\n");
    let (b, _, _) = wan21_run("dense", "dtype = \"bf16\"\noffload = \"stream\"\n");
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn streaming_a_preset_or_an_unknown_offload_is_one_line_naming_the_key() {
    magcache_tests::link_all();
    let dir = tempfile::tempdir().unwrap();
    for (offload, want) in [
        (
            "stream",
            "model.offload: \"stream\" reads blocks from a checkpoint",
        ),
        ("disk", "model.offload: `disk` is not supported"),
    ] {
        let text = format!(
            "[model]\nfamily = \"wan2.1\"\npreset = \"wan2.1-t2v-1.3b\"\noffload = \"{offload}\"\n[sampling]\nsteps = 2\n"
        );
        let path = dir.path().join("run.toml");
        std::fs::write(&path, text).unwrap();
        let e = magcache_cli::prepare(&path).err().unwrap().to_string();
        assert!(e.contains(want), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
}

/// Run `name` of the loop fixture `rel` (family `family`, checkpoint `weights`) with `[model]` lines
/// added: its final latents and report.
#[test]
fn bf16_runs_every_reference_loop_with_f32_decisions_where_margins_allow() {
    magcache_tests::check_bf16_loops("dtype = \"bf16\"\n");
}

/// A family that does not stream (as a new model crate starts out): `offload = "stream"` must be
/// refused, not ignored.
fn no_build(
    _: &magcache_core::RunConfig,
    file: &str,
    _: &std::path::Path,
) -> magcache_core::Result<Box<dyn magcache_core::Pipeline>> {
    Err(magcache_core::Error::msg(format!("{file}: built")))
}

fn no_plan(
    _: &magcache_core::RunConfig,
    file: &str,
    _: &std::path::Path,
) -> magcache_core::Result<magcache_core::RunPlan> {
    Err(magcache_core::Error::msg(format!("{file}: planned")))
}

magcache_core::inventory::submit! {
    magcache_core::ModelFamily {
        name: "held-only-test",
        description: "test family without streaming",
        blocks: &[],
        presets: &[],
        published: &[],
        keys: &[],
        streams: false,
        build: no_build,
        plan: no_plan,
        estimate: None,
    }
}

#[test]
fn a_family_that_does_not_stream_refuses_offload_stream_naming_the_key() {
    magcache_tests::link_all();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.safetensors"), b"").unwrap();
    let path = dir.path().join("run.toml");
    let run = |offload: &str| {
        std::fs::write(
            &path,
            format!("[model]\nfamily = \"held-only-test\"\nweights = \"w.safetensors\"\noffload = \"{offload}\"\n[sampling]\nsteps = 2\n"),
        )
        .unwrap();
        magcache_cli::prepare(&path).err().unwrap().to_string()
    };
    let e = run("stream");
    assert!(
        e.contains("model.offload: family `held-only-test` does not stream its blocks"),
        "{e}"
    );
    assert!(e.contains("wan2.1") && e.contains("flux"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    // Held, the family's own build runs.
    assert!(run("none").contains("built"), "{}", run("none"));
}
