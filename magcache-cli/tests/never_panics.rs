//! Property test: whatever the run file and the input shapes, the runner returns (Ok or a clear error)
//! and never panics: also with empty tensors, huge sizes (refused by the size guard, whose limit
//! `MAGCACHE_MEMORY_LIMIT` fixes here) and non-finite or huge values.

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/reference")
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("3".to_string()),
        Just("0.5".to_string()),
        Just("1e9".to_string()),
        Just("nan".to_string()),
        Just("\"x\"".to_string()),
        Just("[]".to_string()),
        Just("[1.0, 0.0]".to_string()),
        Just("[1.0, 0.99, 0.98]".to_string()),
        Just("true".to_string()),
        Just("[0, 1, 2]".to_string()),
        Just("100000000000".to_string()),
        Just("1000000000000".to_string()),
        Just("1e38".to_string()),
        Just("1e-300".to_string()),
        Just("[1, 4, 1, 100000, 100000]".to_string()),
        Just("[1, 4, 100000000, 100000000, 100000000]".to_string()),
    ]
}

/// The memory the size guard compares with in these tests (the tiny runs need a few MB).
const LIMIT: &str = "2G";

fn set_limit() {
    // Every test sets the same value, so concurrent tests agree.
    std::env::set_var("MAGCACHE_MEMORY_LIMIT", LIMIT);
}

fn key() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("model.family"),
        Just("model.preset"),
        Just("model.seed"),
        Just("inputs.latent_shape"),
        Just("inputs.text_len"),
        Just("inputs.classes"),
        Just("sampling.steps"),
        Just("sampling.shift"),
        Just("sampling.guidance_scale"),
        Just("sampling.boundary_ratio"),
        Just("cache.threshold"),
        Just("cache.max_skip_steps"),
        Just("cache.retention_ratio"),
        Just("cache.mag_ratios"),
        Just("cache.coefficients"),
        Just("cache.bogus"),
        Just("model.overrides.ffn_dim"),
        Just("model.overrides.num_layers"),
        Just("model.overrides.num_attention_heads"),
    ]
}

fn strategy_name() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("none"),
        Just("magcache"),
        Just("fbcache"),
        Just("teacache"),
        Just("warp")
    ]
}

fn family() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("wan2.1"), Just("wan2.2"), Just("flux"), Just("sd")]
}

/// A small run over a shrunk preset, with some keys replaced by random values.
fn run_file(fam: &str, strat: &str, edits: &[(&str, String)]) -> String {
    let preset = match fam {
        "flux" => "flux-dev",
        "wan2.2" => "wan2.2-ti2v-5b",
        _ => "wan2.1-t2v-1.3b",
    };
    let mut tables: Vec<(String, Vec<(String, String)>)> = vec![
        (
            "model".into(),
            vec![
                ("family".into(), format!("\"{fam}\"")),
                ("preset".into(), format!("\"{preset}\"")),
            ],
        ),
        (
            "model.overrides".into(),
            if fam == "flux" {
                vec![
                    ("num_layers".into(), "1".into()),
                    ("num_single_layers".into(), "1".into()),
                    ("num_attention_heads".into(), "2".into()),
                    ("attention_head_dim".into(), "16".into()),
                    ("axes_dims_rope".into(), "[4, 6, 6]".into()),
                    ("joint_attention_dim".into(), "8".into()),
                    ("pooled_projection_dim".into(), "8".into()),
                    ("in_channels".into(), "8".into()),
                ]
            } else {
                vec![
                    ("num_layers".into(), "1".into()),
                    ("num_attention_heads".into(), "2".into()),
                    ("attention_head_dim".into(), "16".into()),
                    ("ffn_dim".into(), "16".into()),
                    ("text_dim".into(), "8".into()),
                    ("freq_dim".into(), "16".into()),
                    ("in_channels".into(), "4".into()),
                    ("out_channels".into(), "4".into()),
                ]
            },
        ),
        (
            "inputs".into(),
            vec![
                (
                    "latent_shape".into(),
                    if fam == "flux" {
                        "[1, 2, 4, 4]".into()
                    } else {
                        "[1, 4, 1, 4, 4]".into()
                    },
                ),
                ("text_len".into(), "3".into()),
            ],
        ),
        ("sampling".into(), vec![("steps".into(), "3".into())]),
        (
            "cache".into(),
            vec![
                ("strategy".into(), format!("\"{strat}\"")),
                ("mag_ratios".into(), "[1.0, 0.95]".into()),
                ("coefficients".into(), "[1.0, 0.0]".into()),
            ],
        ),
    ];
    if strat != "magcache" {
        tables[4].1.retain(|(k, _)| k != "mag_ratios");
    }
    if strat != "teacache" {
        tables[4].1.retain(|(k, _)| k != "coefficients");
    }
    for (k, v) in edits {
        let (t, name) = k.rsplit_once('.').unwrap();
        let table = tables.iter_mut().find(|(n, _)| n == t).unwrap();
        table.1.retain(|(n, _)| n != name);
        table.1.push((name.to_string(), v.clone()));
    }
    let mut s = String::new();
    for (t, kv) in tables {
        s.push_str(&format!("[{t}]\n"));
        for (k, v) in kv {
            s.push_str(&format!("{k} = {v}\n"));
        }
    }
    s
}

fn run(text: &str) {
    set_limit();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("run.toml");
    std::fs::write(&p, text).unwrap();
    if let Ok(mut prepared) = magcache_cli::prepare(&p) {
        let _ = magcache_cli::generate(&mut prepared, magcache_cli::Verbosity::Quiet);
    }
    let _ = magcache_cli::plan(&p);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_run_files_never_panic(fam in family(), strat in strategy_name(), edits in prop::collection::vec((key(), value()), 0..4)) {
        magcache_models::link();
        let edits: Vec<(&str, String)> = edits.into_iter().collect();
        run(&run_file(fam, strat, &edits));
    }

    #[test]
    fn random_input_shapes_never_panic(
        lat in prop::collection::vec(0usize..6, 0..7),
        txt in prop::collection::vec(0usize..30, 0..5),
        drop_uncond in any::<bool>(),
        fill in prop_oneof![Just(0f32), Just(1e30f32), Just(-3e38f32), Just(f32::NAN), Just(f32::INFINITY)],
    ) {
        magcache_models::link();
        let dir = tempfile::tempdir().unwrap();
        let mut m: HashMap<String, Tensor> = HashMap::new();
        let full = |shape: &[usize]| (Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap() * fill as f64).unwrap();
        m.insert("latents_init".into(), full(lat.as_slice()));
        m.insert("cond".into(), full(txt.as_slice()));
        if !drop_uncond {
            m.insert("uncond".into(), full(txt.as_slice()));
        }
        let inp = dir.path().join("in.safetensors");
        candle_core::safetensors::save(&m, &inp).unwrap();
        let text = format!(
            "[model]\nfamily = \"wan2.1\"\nweights = \"{}\"\n[inputs]\nfile = \"{}\"\n[sampling]\nsteps = 2\n[cache]\nstrategy = \"fbcache\"\n",
            fixtures().join("wan21_tiny").display(),
            inp.display()
        );
        run(&text);
    }
}

#[test]
fn the_unedited_base_runs_succeed() {
    magcache_models::link();
    set_limit();
    for fam in ["wan2.1", "wan2.2", "flux"] {
        for strat in ["none", "magcache", "fbcache", "teacache"] {
            let text = run_file(fam, strat, &[]);
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("run.toml");
            std::fs::write(&p, &text).unwrap();
            let mut prepared =
                magcache_cli::prepare(&p).unwrap_or_else(|e| panic!("{fam} {strat}: {e}\n{text}"));
            let (_, rep) =
                magcache_cli::generate(&mut prepared, magcache_cli::Verbosity::Quiet).unwrap();
            assert!(rep.total_calls >= 3, "{fam} {strat}");
        }
    }
}
