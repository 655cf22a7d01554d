//! Wan2.2 dual-expert: the runner reproduces `wan22_tiny_loop` (dense and MagCache per expert), and
//! each expert's scope counts only its own steps.

use magcache_layers::scheduler::flow_match_static;
use magcache_tests::{
    assert_calls_match, check_reference_run, fixture, load_json, loop_toml, run_toml,
};

fn weights_list() -> String {
    format!(
        "[\"{}\", \"{}\"]",
        fixture("reference/wan22_tiny/transformer").display(),
        fixture("reference/wan22_tiny/transformer_2").display()
    )
}

fn check(name: &str, weights: &str) {
    let report = check_reference_run("wan2.2", weights, "reference/wan22_tiny_loop", name);
    let n_high = load_json("reference/wan22_tiny_loop.json")["steps_high_noise"]
        .as_u64()
        .unwrap() as usize;
    assert_eq!(
        report.calls.iter().filter(|c| c.expert == 0).count(),
        2 * n_high,
        "each expert runs its own steps"
    );
}

#[test]
fn dense() {
    check("dense", &weights_list());
}

#[test]
fn magcache_per_expert() {
    check("magcache_per_expert", &weights_list());
}

#[test]
fn pipeline_folder_with_transformer_and_transformer_2() {
    check(
        "magcache_per_expert",
        &format!("\"{}\"", fixture("reference/wan22_tiny").display()),
    );
}

#[test]
fn one_curve_over_all_steps_is_split_at_the_boundary() {
    // The high curve followed by the low curve, given as one 12-step curve, gives the same run.
    let meta = load_json("reference/wan22_tiny_loop.json");
    let c = &meta["runs"]["magcache_per_expert"]["config"];
    let mut all: Vec<f64> = serde_json::from_value(c["high"]["mag_ratios"].clone()).unwrap();
    all.extend(serde_json::from_value::<Vec<f64>>(c["low"]["mag_ratios"].clone()).unwrap());
    let table = format!(
        "strategy = \"magcache\"\nthreshold = 0.3\nmax_skip_steps = 2\nretention_ratio = 0.2\nmag_ratios = {:?}\n",
        all
    );
    let dir = tempfile::tempdir().unwrap();
    let text = loop_toml(
        "wan2.2",
        &weights_list(),
        &fixture("reference/wan22_tiny_loop.safetensors")
            .display()
            .to_string(),
        &meta,
        Some(&table),
    );
    let (_, report) = run_toml(dir.path(), &text);
    assert_calls_match(
        "split curve",
        &report,
        &meta["runs"]["magcache_per_expert"]["calls"],
        1e-3,
    );
}

#[test]
fn few_steps_two_plus_two_each_expert_its_own_retention_and_k() {
    // 4 steps at shift 12; the boundary between the second and the third timestep splits them 2 + 2.
    let s = flow_match_static(4, 12.0);
    let boundary = (s.timesteps[1] + s.timesteps[2]) as f64 / 2000.0;
    let mut meta = load_json("reference/wan22_tiny_loop.json");
    meta["steps"] = 4.into();
    meta["boundary_ratio"] = boundary.into();
    // retention 0.5: floor(0.5 * 2 + 0.5) = 1 step per expert (counting all 4 steps would give 2);
    // K = 1 and flat ratios: each expert computes its first step and reuses its second.
    let table = "strategy = \"magcache\"\nthreshold = 10.0\nmax_skip_steps = 1\nretention_ratio = 0.5\nmag_ratios = [1.0]\n";
    let dir = tempfile::tempdir().unwrap();
    let text = loop_toml(
        "wan2.2",
        &weights_list(),
        &fixture("reference/wan22_tiny_loop.safetensors")
            .display()
            .to_string(),
        &meta,
        Some(table),
    );
    let (_, report) = run_toml(dir.path(), &text);
    let got: Vec<(usize, usize, &str, Option<bool>)> = report
        .calls
        .iter()
        .map(|c| (c.step, c.expert, c.branch.as_str(), c.computed))
        .collect();
    let want = vec![
        (0, 0, "cond", Some(true)),
        (0, 0, "uncond", Some(true)),
        (1, 0, "cond", Some(false)),
        (1, 0, "uncond", Some(false)),
        // The low-noise expert starts clean: no residual crosses experts, so its first step computes.
        (2, 1, "cond", Some(true)),
        (2, 1, "uncond", Some(true)),
        (3, 1, "cond", Some(false)),
        (3, 1, "uncond", Some(false)),
    ];
    assert_eq!(got, want);
    for s in &report.scopes {
        assert_eq!(s.calls, 2, "scope {} {}", s.expert, s.branch);
    }
}

#[test]
fn preset_uses_its_published_split_curve_and_warns_on_another_boundary() {
    magcache_tests::link_all();
    let dir = tempfile::tempdir().unwrap();
    let text = |boundary: f64| {
        format!(
            "[model]\nfamily = \"wan2.2\"\npreset = \"wan2.2-t2v-a14b\"\n[model.overrides]\nnum_layers = 1\nnum_attention_heads = 2\nattention_head_dim = 16\nffn_dim = 32\ntext_dim = 16\nfreq_dim = 32\n[inputs]\nlatent_shape = [1, 16, 1, 4, 4]\ntext_len = 3\n[sampling]\nsteps = 10\nshift = 12.0\nguidance_scale = 4.0\nboundary_ratio = {boundary}\n[cache]\nstrategy = \"magcache\"\nthreshold = 0.06\nmax_skip_steps = 2\nretention_ratio = 0.4\n"
        )
    };
    let path = dir.path().join("run.toml");
    std::fs::write(&path, text(0.875)).unwrap();
    let p = magcache_cli::prepare(&path).unwrap();
    let info = p.pipeline.model_info();
    let rc = magcache_strategies::ratios::published_curves(&info)
        .unwrap()
        .expect("published curve registered with the preset");
    assert_eq!(rc.experts.len(), 2);
    assert_eq!(rc.experts[0][&magcache_core::Branch::Cond].len(), 26);
    assert_eq!(rc.experts[1][&magcache_core::Branch::Cond].len(), 14);
    let (_, rep) = run_toml(dir.path(), &text(0.875));
    // Same boundary and shift as the published curve: only the sampler differs (UniPC there).
    assert!(
        !rep.warnings
            .iter()
            .any(|w| w.contains("boundary_ratio") || w.contains("shift")),
        "{:?}",
        rep.warnings
    );
    assert!(
        rep.warnings.iter().any(|w| w.contains("`unipc` sampler")),
        "{:?}",
        rep.warnings
    );
    let (_, rep) = run_toml(dir.path(), &text(0.9));
    assert!(
        rep.warnings.iter().any(|w| w.contains("boundary_ratio")),
        "{:?}",
        rep.warnings
    );
}
