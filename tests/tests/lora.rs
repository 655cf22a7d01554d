//! LoRA adapters (`[[model.lora]]`) against diffusers: every layout's merged weights, and every
//! run of `fixtures/lora/lora_loop` (dense per layout, scaled, stacked, one expert only, MagCache,
//! FBCache) through the runner with identical decisions and final latents within 1e-3.

use candle_core::{Device, Tensor};
use magcache_layers::lora::{Adapter, LoraNames};
use magcache_tests::{
    assert_calls_match, cache_table_for, family_inputs_file, family_name, fixture, load, load_json,
    loop_toml, max_abs_diff, run_toml,
};
use std::collections::HashMap;

const LOOP: &str = "lora/lora_loop";

/// The base model(s) of a fixture family as a TOML `weights` value.
fn weights(fam: &serde_json::Value) -> String {
    let path = |rel: &serde_json::Value| {
        let rel = rel.as_str().unwrap().trim_start_matches("../");
        format!("\"{}\"", fixture(rel).display())
    };
    match fam.get("models") {
        Some(list) => format!(
            "[{}]",
            list.as_array()
                .unwrap()
                .iter()
                .map(path)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => path(&fam["model"]),
    }
}

fn inputs_file(dir: &std::path::Path, fam: &serde_json::Value) -> String {
    family_inputs_file(dir, LOOP, fam)
}

fn lora_tables(loras: &serde_json::Value) -> String {
    let mut s = String::new();
    for l in loras.as_array().unwrap() {
        s.push_str(&format!(
            "\n[[model.lora]]\npath = \"{}\"\nscale = {}\n",
            fixture(&format!("lora/{}", l["path"].as_str().unwrap())).display(),
            l["scale"]
        ));
        if let Some(e) = l.get("expert").and_then(|e| e.as_str()) {
            s.push_str(&format!("expert = \"{e}\"\n"));
        }
    }
    s
}

fn check_run(name: &str) {
    check_run_with(name, "");
}

/// Runs `name` with `model_extra` added to its `[model]` table (e.g. `offload = "stream"`).
fn check_run_with(name: &str, model_extra: &str) {
    let meta = load_json(&format!("{LOOP}.json"));
    let tensors = load(&format!("{LOOP}.safetensors"));
    let run = &meta["runs"][name];
    let fam_key = run["family"].as_str().unwrap();
    let fam = &meta["families"][fam_key];
    let cache = match run["cache"].get("strategy").and_then(|s| s.as_str()) {
        None => None,
        Some(strategy) => cache_table_for(strategy, &run["cache"]),
    };
    let dir = tempfile::tempdir().unwrap();
    let inputs = inputs_file(dir.path(), fam);
    let mut text = loop_toml(
        family_name(fam_key),
        &weights(fam),
        &inputs,
        fam,
        cache.as_deref(),
    );
    text.push_str(&lora_tables(&run["loras"]));
    if !model_extra.is_empty() {
        text = text.replacen("[model]\n", &format!("[model]\n{model_extra}\n"), 1);
    }
    let (fin, report) = run_toml(dir.path(), &text);
    assert_calls_match(name, &report, &run["calls"], 1e-3);
    assert_eq!(
        report.computed_calls as u64,
        run["computed_calls"].as_u64().unwrap(),
        "{name}: computed calls"
    );
    let d = max_abs_diff(&fin, &tensors[&format!("{name}.final")]);
    assert!(d < 1e-3, "{name}: final differs by {d}");
}

fn runs_of(family: &str) -> Vec<String> {
    let meta = load_json(&format!("{LOOP}.json"));
    let runs: Vec<String> = meta["runs"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, r)| r["family"] == family)
        .map(|(k, _)| k.clone())
        .collect();
    assert!(!runs.is_empty(), "no {family} runs");
    runs
}

#[test]
fn wan21_runs_reproduce() {
    for name in runs_of("wan21") {
        check_run(&name);
    }
}

#[test]
fn wan22_runs_reproduce() {
    for name in runs_of("wan22") {
        check_run(&name);
    }
}

#[test]
fn flux_runs_reproduce() {
    for name in runs_of("flux") {
        check_run(&name);
    }
}

/// Streamed blocks get the adapters as each block is read: the same runs.
#[test]
fn streamed_blocks_get_the_adapters_too() {
    for name in ["wan21_stack", "wan22_lightx2v_magcache", "flux_kohya"] {
        check_run_with(name, "offload = \"stream\"");
    }
}

/// Each layout's merged example: the effective weight and bias of one Linear after the adapter,
/// as diffusers' PEFT layer computes it, read back from the store.
#[test]
fn merged_weights_match_diffusers() {
    let meta = load_json(&format!("{LOOP}.json"));
    let tensors = load(&format!("{LOOP}.safetensors"));
    for (run, ex) in meta["merged_examples"].as_object().unwrap() {
        let r = &meta["runs"][run];
        let fam_key = r["family"].as_str().unwrap();
        let fam = &meta["families"][fam_key];
        let l = &r["loras"][0];
        let base = match fam.get("models") {
            Some(list) => list[0].as_str().unwrap().to_string(),
            None => fam["model"].as_str().unwrap().to_string(),
        };
        let base = fixture(base.trim_start_matches("../"));
        let adapter =
            Adapter::read(&fixture(&format!("lora/{}", l["path"].as_str().unwrap()))).unwrap();
        let scale = l["scale"].as_f64().unwrap();
        let empty = serde_json::Map::new();
        let (mut store, names): (_, Box<dyn LoraNames>) = if fam_key == "flux" {
            let f = magcache_models::flux::load::load_flux(&base, None, &empty, "t").unwrap();
            let d = f.config.inner_dim();
            (
                f.store,
                Box::new(magcache_models::flux::load::FluxLoraNames { d, mlp: 4 * d }),
            )
        } else {
            let w = magcache_models::wan::load::load_wan(&base, None, &empty, "t").unwrap();
            (w.store, Box::new(magcache_models::wan::load::WanLoraNames))
        };
        adapter.apply(&mut store, scale, names.as_ref()).unwrap();
        for part in ["weight", "bias"] {
            let module = ex["module"].as_str().unwrap();
            let want = &tensors[ex[part].as_str().unwrap()];
            let got = store
                .get_shape(&format!("{module}.{part}"), want.dims())
                .unwrap();
            let d = max_abs_diff(&got, want);
            assert!(d < 1e-5, "{run}: merged {module}.{part} differs by {d}");
        }
    }
}

/// A file in `dir` holding `tensors` (f32, shapes as given).
fn adapter_file(dir: &std::path::Path, name: &str, tensors: &[(&str, &[usize])]) -> String {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, s)| {
            (
                k.to_string(),
                Tensor::ones(*s, candle_core::DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let p = dir.join(name);
    candle_core::safetensors::save(&map, &p).unwrap();
    p.display().to_string()
}

/// What no adapter may do silently: keys matching nothing, half pairs, mixed layouts, unknown
/// suffixes, a missing or misplaced `expert`. Each is one line naming the file and the key.
#[test]
fn bad_adapters_are_refused_naming_file_and_key() {
    let meta = load_json(&format!("{LOOP}.json"));
    let fam = &meta["families"]["wan21"];
    let dir = tempfile::tempdir().unwrap();
    let inputs = inputs_file(dir.path(), fam);
    let base = loop_toml("wan2.1", &weights(fam), &inputs, fam, None);
    let bad = |tensors: &[(&str, &[usize])], must: &[&str]| {
        let path = adapter_file(dir.path(), "bad.safetensors", tensors);
        let text = format!("{base}\n[[model.lora]]\npath = \"{path}\"\n");
        magcache_tests::link_all();
        let run = dir.path().join("run.toml");
        std::fs::write(&run, &text).unwrap();
        let err = match magcache_cli::prepare(&run) {
            Ok(_) => panic!("accepted: {tensors:?}"),
            Err(e) => e.to_string(),
        };
        for m in must {
            assert!(err.contains(m), "should name `{m}`: {err}");
        }
        assert!(!err.contains('\n'), "{err}");
    };
    // A block the model does not have.
    bad(
        &[
            (
                "diffusion_model.blocks.7.self_attn.q.lora_down.weight",
                &[4, 32],
            ),
            (
                "diffusion_model.blocks.7.self_attn.q.lora_up.weight",
                &[32, 4],
            ),
        ],
        &[
            "bad.safetensors",
            "blocks.7.self_attn.q.lora_up.weight",
            "matches no weight",
        ],
    );
    // An unknown module.
    bad(
        &[
            ("transformer.blocks.0.attn1.to_z.lora_A.weight", &[4, 32]),
            ("transformer.blocks.0.attn1.to_z.lora_B.weight", &[32, 4]),
        ],
        &["bad.safetensors", "to_z"],
    );
    // A delta whose shape does not fit.
    bad(
        &[
            ("transformer.blocks.0.attn1.to_q.lora_A.weight", &[4, 33]),
            ("transformer.blocks.0.attn1.to_q.lora_B.weight", &[32, 4]),
        ],
        &["bad.safetensors", "to_q", "shape"],
    );
    // A down matrix without its up matrix.
    bad(
        &[("transformer.blocks.0.attn1.to_q.lora_A.weight", &[4, 32])],
        &["bad.safetensors", "to_q.lora_A.weight", "up"],
    );
    // Two layouts in one file.
    bad(
        &[
            ("transformer.blocks.0.attn1.to_q.lora_A.weight", &[4, 32]),
            ("transformer.blocks.0.attn1.to_q.lora_B.weight", &[32, 4]),
            (
                "diffusion_model.blocks.0.self_attn.k.lora_down.weight",
                &[4, 32],
            ),
            (
                "diffusion_model.blocks.0.self_attn.k.lora_up.weight",
                &[32, 4],
            ),
        ],
        &["bad.safetensors", "mixes layouts"],
    );
    // An unknown suffix.
    bad(
        &[(
            "transformer.blocks.0.attn1.to_q.lora_magnitude_vector",
            &[32],
        )],
        &["bad.safetensors", "lora_magnitude_vector", "suffix"],
    );
    // `expert` on a one-model family.
    let path = fixture("lora/wan21_original.safetensors");
    let text = format!(
        "{base}\n[[model.lora]]\npath = \"{}\"\nexpert = \"high_noise\"\n",
        path.display()
    );
    let run = dir.path().join("run.toml");
    std::fs::write(&run, &text).unwrap();
    let err = magcache_cli::prepare(&run).err().unwrap().to_string();
    assert!(err.contains("model.lora[0].expert"), "{err}");
}

/// Wan2.2: a table without `expert` is refused (which expert would it change?).
#[test]
fn two_experts_need_the_expert_named() {
    let meta = load_json(&format!("{LOOP}.json"));
    let fam = &meta["families"]["wan22"];
    let dir = tempfile::tempdir().unwrap();
    let inputs = inputs_file(dir.path(), fam);
    let text = format!(
        "{}\n[[model.lora]]\npath = \"{}\"\n",
        loop_toml("wan2.2", &weights(fam), &inputs, fam, None),
        fixture("lora/wan22_lightx2v_high_noise.safetensors").display()
    );
    magcache_tests::link_all();
    let run = dir.path().join("run.toml");
    std::fs::write(&run, &text).unwrap();
    let err = magcache_cli::prepare(&run).err().unwrap().to_string();
    assert!(
        err.contains("model.lora[0].expert") && err.contains("high_noise"),
        "{err}"
    );
}

/// The real 4-step distillation LoRA of the digits model (lightx2v/ComfyUI layout, and the same
/// adapter in diffusers names): dense, MagCache calibrated on the distilled model and FBCache
/// reproduce `trained/digits_4step_loop`, and the run says what caching can gain at 4 steps.
#[test]
fn distilled_digits_four_steps() {
    let meta = load_json("trained/digits_4step_loop.json");
    let tensors = load("trained/digits_4step_loop.safetensors");
    let inputs = fixture("trained/digits_4step_loop.safetensors")
        .display()
        .to_string();
    for file in [
        "digits_4step_lora_rank16_comfy.safetensors",
        "pytorch_lora_weights.safetensors",
    ] {
        for (name, run) in meta["runs"].as_object().unwrap() {
            let cache = if run["config"].is_null() {
                None
            } else {
                cache_table_for(name, &run["config"])
            };
            let dir = tempfile::tempdir().unwrap();
            let mut text = loop_toml(
                "wan2.1",
                &format!("\"{}\"", fixture("trained/digits_wan").display()),
                &inputs,
                &meta,
                cache.as_deref(),
            );
            text.push_str(&format!(
                "\n[[model.lora]]\npath = \"{}\"\n",
                fixture(&format!("trained/digits_4step_lora/{file}")).display()
            ));
            let (fin, report) = run_toml(dir.path(), &text);
            assert_calls_match(name, &report, &run["calls"], 1e-3);
            let d = max_abs_diff(&fin, &tensors[&format!("{name}.final")]);
            assert!(d < 1e-3, "{file} {name}: final differs by {d}");
            if cache.is_some() {
                assert!(
                    report.warnings.iter().any(|w| w.contains("only 4 steps")),
                    "{name}: the few-step warning: {:?}",
                    report.warnings
                );
            }
        }
    }
}
