//! `magcache export` writes a preset's weights as a sharded diffusers folder that loads (held or
//! streamed) to the preset run's exact bits; it never replaces a folder and leaves nothing behind
//! when it fails.

use magcache_tests::{max_abs_diff, run_toml};
use std::path::Path;

/// A Wan2.1 or Wan2.2 (two experts) preset shrunk to a test size.
fn preset_toml(family: &str, preset: &str, dtype: &str) -> String {
    format!(
        "[model]\nfamily = \"{family}\"\npreset = \"{preset}\"\nseed = 7\ndtype = \"{dtype}\"\n\
         [model.overrides]\nnum_layers = 3\nnum_attention_heads = 2\nattention_head_dim = 12\nffn_dim = 40\ntext_dim = 16\nfreq_dim = 8\n\
         [inputs]\nlatent_shape = [1, 16, 2, 4, 4]\ntext_len = 5\n[sampling]\nsteps = 4\n"
    )
}

/// The same run loading `weights` instead of generating the preset.
fn weights_toml(preset_text: &str, preset: &str, weights: &str, extra: &str) -> String {
    let without_overrides: String = preset_text
        .split("[inputs]")
        .nth(1)
        .map(|rest| format!("[inputs]{rest}"))
        .unwrap_or_default();
    let model = preset_text
        .split("[model.overrides]")
        .next()
        .unwrap_or_default()
        .replace(
            &format!("preset = \"{preset}\"\n"),
            &format!("weights = {weights}\n{extra}"),
        );
    format!("{model}{without_overrides}")
}

fn export(dir: &Path, text: &str, out: &Path, shard_bytes: u64) -> magcache_core::Result<()> {
    let cfg = dir.join("export.toml");
    std::fs::write(&cfg, text).unwrap();
    magcache_cli::export(&cfg, out, shard_bytes, &mut |_| {}).map(|_| ())
}

#[test]
fn an_exported_preset_loads_held_and_streamed_to_the_preset_bits() {
    magcache_tests::link_all();
    for dtype in ["f32", "bf16"] {
        let dir = tempfile::tempdir().unwrap();
        let text = preset_toml("wan2.1", "wan2.1-t2v-1.3b", dtype);
        let out = dir.path().join("ckpt");
        // Small shards: the folder is sharded with an index, as released checkpoints are.
        export(dir.path(), &text, &out, 4096).unwrap();
        assert!(out.join("config.json").is_file());
        assert!(out
            .join("diffusion_pytorch_model.safetensors.index.json")
            .is_file());
        let shards = std::fs::read_dir(&out)
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                let n = n.to_string_lossy();
                n.starts_with("diffusion_pytorch_model-") && n.ends_with(".safetensors")
            })
            .count();
        assert!(shards > 3, "{shards} shards");
        // Shards get the umask's permissions, like config.json (not a temp file's 0600).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            let first = out.join(format!(
                "diffusion_pytorch_model-00001-of-{shards:05}.safetensors"
            ));
            assert_eq!(mode(&first), mode(&out.join("config.json")));
        }
        // No temporary is left beside it.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert!(names.iter().all(|n| !n.contains("partial")), "{names:?}");

        let (preset_final, _) = run_toml(dir.path(), &text);
        let held = weights_toml(&text, "wan2.1-t2v-1.3b", "\"ckpt\"", "");
        let (held_final, rep) = run_toml(dir.path(), &held);
        assert_eq!(max_abs_diff(&preset_final, &held_final), 0.0, "{dtype}");
        assert!(
            rep.warnings.iter().all(|w| !w.contains("not used")),
            "{:?}",
            rep.warnings
        );
        let streamed = weights_toml(
            &text,
            "wan2.1-t2v-1.3b",
            "\"ckpt\"",
            "offload = \"stream\"\n",
        );
        let (streamed_final, _) = run_toml(dir.path(), &streamed);
        assert_eq!(max_abs_diff(&preset_final, &streamed_final), 0.0, "{dtype}");
    }
}

#[test]
fn a_two_expert_preset_exports_one_folder_per_expert() {
    magcache_tests::link_all();
    let dir = tempfile::tempdir().unwrap();
    let text = preset_toml("wan2.2", "wan2.2-t2v-a14b", "f32")
        .replace("[sampling]\n", "[sampling]\nboundary_ratio = 0.5\n");
    let out = dir.path().join("a14b");
    export(dir.path(), &text, &out, 1 << 30).unwrap();
    for e in ["transformer", "transformer_2"] {
        assert!(out.join(e).join("config.json").is_file(), "{e}");
        assert!(out
            .join(e)
            .join("diffusion_pytorch_model.safetensors")
            .is_file());
    }
    let (preset_final, _) = run_toml(dir.path(), &text);
    let loaded = weights_toml(
        &text,
        "wan2.2-t2v-a14b",
        "[\"a14b/transformer\", \"a14b/transformer_2\"]",
        "offload = \"stream\"\n",
    );
    let (loaded_final, _) = run_toml(dir.path(), &loaded);
    assert_eq!(max_abs_diff(&preset_final, &loaded_final), 0.0);
}

#[test]
fn export_never_replaces_a_folder_and_refuses_checkpoint_runs() {
    magcache_tests::link_all();
    let dir = tempfile::tempdir().unwrap();
    let text = preset_toml("wan2.1", "wan2.1-t2v-1.3b", "f32");
    let out = dir.path().join("mine");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "user data").unwrap();
    let e = export(dir.path(), &text, &out, 1 << 30)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "user data"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);

    let checkpoint_run = weights_toml(&text, "wan2.1-t2v-1.3b", "\"somewhere\"", "");
    let e = export(
        dir.path(),
        &checkpoint_run,
        &dir.path().join("new"),
        1 << 30,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("model.weights"), "{e}");
    assert!(!dir.path().join("new").exists());

    // A size past any memory is refused before anything is generated or written.
    let huge = text.replace("ffn_dim = 40", "ffn_dim = 1099511627776");
    let e = export(dir.path(), &huge, &dir.path().join("huge"), 1 << 30)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.overrides") && e.contains("largest tensor"),
        "{e}"
    );
    assert!(!dir.path().join("huge").exists());
    let dot_entries = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .count();
    assert_eq!(dot_entries, 0, "a temporary folder was left behind");
}

/// A FLUX run over the tiny reference inputs: `model` is the `[model]` body.
fn flux_toml(model: &str, cache: &str) -> String {
    let inputs = magcache_tests::fixture("reference/flux_tiny_loop.safetensors");
    format!(
        "[model]\nfamily = \"flux\"\n{model}\n[inputs]\nfile = \"{}\"\n[sampling]\nsteps = 6\nguidance_scale = 3.5\n{cache}",
        inputs.display()
    )
}

#[test]
fn flux_streams_to_the_held_bits_and_exports_its_preset() {
    magcache_tests::link_all();
    let dir = tempfile::tempdir().unwrap();
    let weights = magcache_tests::fixture("reference/flux_tiny");
    let decisions =
        |r: &magcache_cli::Report| r.calls.iter().map(|c| c.computed).collect::<Vec<_>>();
    // TeaCache reads the first double block's modulated input (streamed: from a held copy of that
    // block's norm1); FBCache runs the first block alone.
    for cache in [
        "",
        "[cache]\nstrategy = \"teacache\"\nthreshold = 0.45\n",
        "[cache]\nstrategy = \"fbcache\"\nthreshold = 0.4\n",
    ] {
        let held = flux_toml(&format!("weights = \"{}\"", weights.display()), cache);
        let streamed = flux_toml(
            &format!("weights = \"{}\"\noffload = \"stream\"", weights.display()),
            cache,
        );
        let (a, ra) = run_toml(dir.path(), &held);
        let (b, rb) = run_toml(dir.path(), &streamed);
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{cache}");
        assert_eq!(decisions(&ra), decisions(&rb), "{cache}");
        if !cache.is_empty() {
            assert!(
                decisions(&rb).contains(&Some(false)),
                "{cache}: no call reused, the streamed reuse path is untested"
            );
        }
    }
    // The flux-dev preset at the tiny reference's size, exported and loaded streamed.
    let preset = flux_toml(
        "preset = \"flux-dev\"\nseed = 3\n[model.overrides]\nattention_head_dim = 16\naxes_dims_rope = [4, 6, 6]\nin_channels = 16\njoint_attention_dim = 24\nnum_attention_heads = 2\nnum_layers = 2\nnum_single_layers = 3\npooled_projection_dim = 20",
        "",
    );
    let out = dir.path().join("flux");
    export(dir.path(), &preset, &out, 1 << 30).unwrap();
    let (p, _) = run_toml(dir.path(), &preset);
    let loaded = flux_toml("weights = \"flux\"\noffload = \"stream\"", "");
    let (l, rep) = run_toml(dir.path(), &loaded);
    assert_eq!(max_abs_diff(&p, &l), 0.0);
    assert!(rep.model.contains("streamed"), "{}", rep.model);
}

/// `export` of a preset run with `[[model.lora]]` writes the merged model: loading the export runs
/// to the bits of the preset run with the adapter.
#[test]
fn export_writes_the_lora_merged_model() {
    use candle_core::{Device, Tensor};
    magcache_tests::link_all();
    let dir = tempfile::tempdir().unwrap();
    // A diffusers-layout adapter on two modules of the shrunk preset (dim 24, ffn 40).
    let t = |shape: &[usize], seed: f64| {
        (Tensor::arange(0f32, shape.iter().product::<usize>() as f32, &Device::Cpu)
            .unwrap()
            .reshape(shape)
            .unwrap()
            .sin()
            .unwrap()
            * (0.05 * seed))
            .unwrap()
    };
    let adapter: std::collections::HashMap<String, Tensor> = [
        (
            "transformer.blocks.0.attn1.to_q.lora_A.weight",
            t(&[2, 24], 1.0),
        ),
        (
            "transformer.blocks.0.attn1.to_q.lora_B.weight",
            t(&[24, 2], 2.0),
        ),
        (
            "transformer.blocks.1.ffn.net.0.proj.lora_A.weight",
            t(&[2, 24], 3.0),
        ),
        (
            "transformer.blocks.1.ffn.net.0.proj.lora_B.weight",
            t(&[40, 2], 4.0),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    candle_core::safetensors::save(&adapter, dir.path().join("a.safetensors")).unwrap();
    let plain = preset_toml("wan2.1", "wan2.1-t2v-1.3b", "f32");
    let lora = "\n[[model.lora]]\npath = \"a.safetensors\"\nscale = 0.8\n";
    let text = format!("{plain}{lora}");
    let out = dir.path().join("merged");
    export(dir.path(), &text, &out, 1 << 30).unwrap();
    let (with_lora, _) = run_toml(dir.path(), &text);
    let (without, _) = run_toml(dir.path(), &plain);
    assert!(
        max_abs_diff(&with_lora, &without) > 1e-4,
        "the adapter changes the run"
    );
    let held = weights_toml(&plain, "wan2.1-t2v-1.3b", "\"merged\"", "");
    let (exported, _) = run_toml(dir.path(), &held);
    assert_eq!(max_abs_diff(&with_lora, &exported), 0.0);
}

/// `export --gguf q8_0` writes a GGUF file per transformer that loads (its config embedded, so the
/// heads need no overrides; overrides giving the same ones change nothing) and runs close to the
/// preset it was written from, in a quarter of the f32 bytes.
#[test]
fn a_preset_exports_as_gguf_and_runs_close_to_it() {
    magcache_tests::link_all();
    let dir = tempfile::tempdir().unwrap();
    let text = preset_toml("wan2.1", "wan2.1-t2v-1.3b", "f32")
        .replace("attention_head_dim = 12", "attention_head_dim = 32")
        .replace("ffn_dim = 40", "ffn_dim = 64");
    let cfg = dir.path().join("export.toml");
    std::fs::write(&cfg, &text).unwrap();
    let out = dir.path().join("q8");
    let r = magcache_cli::export_as(
        &cfg,
        &out,
        &magcache_cli::ExportFormat::Gguf {
            quant: "q8_0".into(),
        },
        &mut |_| {},
    )
    .unwrap();
    let file = out.join("diffusion_pytorch_model-Q8_0.gguf");
    assert!(file.is_file());
    // k-quants are named as ggml spells them (`Q4_K`, as released files are), not `Q4K`.
    let k = dir.path().join("q4k");
    magcache_cli::export_as(
        &cfg,
        &k,
        &magcache_cli::ExportFormat::Gguf {
            quant: "q4_k".into(),
        },
        &mut |_| {},
    )
    .unwrap();
    assert!(k.join("diffusion_pytorch_model-Q4_K.gguf").is_file());
    let (preset_final, _) = run_toml(dir.path(), &text);
    let run = weights_toml(
        &text,
        "wan2.1-t2v-1.3b",
        "\"q8/diffusion_pytorch_model-Q8_0.gguf\"",
        "",
    ) + "[model.overrides]\nnum_attention_heads = 2\nattention_head_dim = 32\n";
    let (gguf_final, _) = run_toml(dir.path(), &run);
    // The file carries its config (`magcache.config`): no overrides needed for its heads.
    let bare = weights_toml(
        &text,
        "wan2.1-t2v-1.3b",
        "\"q8/diffusion_pytorch_model-Q8_0.gguf\"",
        "",
    );
    let (bare_final, _) = run_toml(dir.path(), &bare);
    assert_eq!(max_abs_diff(&bare_final, &gguf_final), 0.0);
    // An embedded config that disagrees with the file's blocks is named as the metadata's.
    let mut bytes = std::fs::read(&file).unwrap();
    let key = b"\"num_layers\":";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    bytes[at] = if bytes[at] == b'9' {
        b'8'
    } else {
        bytes[at] + 1
    };
    let tampered = dir.path().join("tampered.gguf");
    std::fs::write(&tampered, bytes).unwrap();
    let e = magcache_models::wan::load::load_wan(&tampered, None, &Default::default(), "run.toml")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("magcache.config") && e.contains("num_layers") && e.contains("blocks"),
        "{e}"
    );
    let d = max_abs_diff(&preset_final, &gguf_final);
    let scale = magcache_tests::max_abs(&preset_final);
    // Q8_0 weights and QMatMul's 8-bit activations on a random-weight model: 2.7 % of the largest
    // value measured (1.9 % with the weights dequantized), a wrong tensor moves it by far more.
    assert!(
        d > 0.0 && d < 0.05 * scale,
        "Q8_0 moves the result by {d} (values up to {scale})"
    );
    // About a quarter of the f32 bytes (8.5 bits per matrix weight; norms and biases stay f32).
    let f32_out = dir.path().join("f32");
    let f = magcache_cli::export(&cfg, &f32_out, 1 << 30, &mut |_| {}).unwrap();
    assert!(
        (r.bytes as f64) < 0.35 * f.bytes as f64,
        "{} vs {} bytes",
        r.bytes,
        f.bytes
    );
    let unknown = magcache_cli::export_as(
        &cfg,
        &dir.path().join("x"),
        &magcache_cli::ExportFormat::Gguf {
            quant: "q9_9".into(),
        },
        &mut |_| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        unknown.contains("q9_9") && unknown.contains("q8_0"),
        "{unknown}"
    );
}
