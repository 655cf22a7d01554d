//! Issue 12, class 7 through the binary: misleading messages, and keys that cannot apply to a run
//! fail before anything loads, naming the key.

mod common;

use common::{check_err, fixtures, magcache, s};

// ---- class 7: misleading messages and keys that cannot apply ----

fn wan_preset(inputs: &str, sampling: &str, cache: &str) -> String {
    format!(
        "[model]\nfamily = \"wan2.1\"\npreset = \"wan2.1-t2v-1.3b\"\n[model.overrides]\nnum_layers = 1\n[inputs]\n{inputs}\n[sampling]\nsteps = 3\n{sampling}\n{cache}"
    )
}

/// `run` and `plan` of `text` both fail, naming each of `must_name` (and not `must_not`).
fn both_refuse(text: &str, must_name: &[&str], must_not: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, text).unwrap();
    for cmd in ["run", "plan"] {
        let mut args = vec![cmd, "--config", s(&cfg)];
        if cmd == "run" {
            args.push("--quiet");
        }
        let o = magcache(&args);
        let e = check_err(&o, must_name);
        for n in must_not {
            assert!(!e.contains(n), "{cmd}: should not name `{n}`: {e}");
        }
    }
}

#[test]
fn class7_two_expert_keys_on_one_model_name_the_key() {
    both_refuse(
        &wan_preset("", "guidance_scale_2 = 3.0", ""),
        &["run.toml", "sampling.guidance_scale_2"],
        &["boundary_ratio"],
    );
    both_refuse(
        &wan_preset("", "boundary_ratio = 0.9", ""),
        &["run.toml", "sampling.boundary_ratio"],
        &[],
    );
    // A single-expert wan2.2 (TI2V-5B).
    let ti2v = |sampling: &str, cache: &str| {
        format!("[model]\nfamily = \"wan2.2\"\npreset = \"wan2.2-ti2v-5b\"\n[model.overrides]\nnum_layers = 1\n[sampling]\nsteps = 3\n{sampling}\n{cache}")
    };
    both_refuse(
        &ti2v("boundary_ratio = 0.9", ""),
        &["sampling.boundary_ratio"],
        &[],
    );
    both_refuse(
        &ti2v("guidance_scale_2 = 3.0", ""),
        &["sampling.guidance_scale_2"],
        &[],
    );
    // Per-expert MagCache curves on one-model families.
    let per_expert = "[cache]\nstrategy = \"magcache\"\n[cache.mag_ratios]\nhigh_noise = [1.0, 0.9]\nlow_noise = [1.0, 0.9]\n";
    both_refuse(
        &wan_preset("", "", per_expert),
        &["cache.mag_ratios.high_noise", "wan2.1"],
        &[],
    );
    both_refuse(&ti2v("", per_expert), &["cache.mag_ratios"], &[]);
    let flux = |inputs: &str, sampling: &str, cache: &str| {
        format!("[model]\nfamily = \"flux\"\npreset = \"flux-dev\"\n[model.overrides]\nnum_layers = 1\nnum_single_layers = 1\n[inputs]\n{inputs}\n[sampling]\nsteps = 3\n{sampling}\n{cache}")
    };
    both_refuse(&flux("", "", per_expert), &["cache.mag_ratios"], &[]);
    both_refuse(
        &flux("", "guidance_scale_2 = 2.0", ""),
        &["sampling.guidance_scale_2"],
        &["boundary_ratio"],
    );
    // Classes on FLUX.
    both_refuse(
        &flux("classes = [1]", "", ""),
        &["inputs.classes", "flux"],
        &[],
    );
}

#[test]
fn class7_keys_beside_an_inputs_file_are_errors() {
    let inputs = fixtures().join("wan21_tiny_loop.safetensors");
    let weights = fixtures().join("wan21_tiny");
    let with = |extra: &str| {
        format!(
            "[model]\nfamily = \"wan2.1\"\nweights = \"{}\"\n[inputs]\nfile = \"{}\"\n{extra}\n[sampling]\nsteps = 3\n",
            weights.display(),
            inputs.display()
        )
    };
    for (extra, key) in [
        ("classes = [0]", "inputs.classes"),
        ("latent_shape = [1, 4, 1, 8, 8]", "inputs.latent_shape"),
        ("text_len = 8", "inputs.text_len"),
        ("seed = 3", "inputs.seed"),
    ] {
        both_refuse(&with(extra), &[key, "inputs file"], &[]);
    }
    // Classes with a preset (no class table) and text_len with classes.
    both_refuse(
        &wan_preset("classes = [0]", "", ""),
        &["inputs.classes", "weights"],
        &[],
    );
    let w = format!(
        "[model]\nfamily = \"wan2.1\"\nweights = \"{}\"\n[inputs]\nclasses = [0]\ntext_len = 4\nlatent_shape = [1, 4, 1, 8, 8]\n[sampling]\nsteps = 3\n",
        weights.display()
    );
    both_refuse(&w, &["inputs.text_len"], &[]);
    // model.config with a preset.
    let text = wan_preset("", "", "").replace(
        "preset = \"wan2.1-t2v-1.3b\"",
        "preset = \"wan2.1-t2v-1.3b\"\nconfig = \"config.json\"",
    );
    both_refuse(&text, &["model.config"], &[]);
}

#[test]
fn class7_mag_ratios_of_a_wrong_shape_say_what_is_accepted() {
    for ratios in [
        "mag_ratios = \"fast\"",
        "mag_ratios = [1.0, \"x\"]",
        "mag_ratios = { high = [1.0] }",
        "mag_ratios = { high_noise = [1.0] }",
    ] {
        let text = wan_preset(
            "",
            "",
            &format!("[cache]\nstrategy = \"magcache\"\n{ratios}\n"),
        );
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("run.toml");
        std::fs::write(&cfg, &text).unwrap();
        let e = check_err(
            &magcache(&["plan", "--config", s(&cfg)]),
            &["run.toml", "cache.mag_ratios", "high_noise", "list"],
        );
        assert!(!e.contains("untagged") && !e.contains("RatioSpec"), "{e}");
    }
}

#[test]
fn class7_profile_missing_a_table_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let prof = dir.path().join("p.toml");
    let full = "[meta]\nfamily = \"wan2.1\"\nmodel = \"x\"\nsteps = 3\nscheduler = \"euler\"\nsigmas = [1.0, 0.5, 0.2]\n\n[ratios.main]\ncond = [1.0, 0.9, 0.8]\n\n[mag_stds.main]\ncond = [0.1, 0.1, 0.1]\n\n[cos_dists.main]\ncond = [0.1, 0.1, 0.1]\n\n[sigmas]\nmain = [1.0, 0.5, 0.2]\n";
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        wan_preset(
            "",
            "",
            "[cache]\nstrategy = \"magcache\"\nprofile = \"p.toml\"\n",
        ),
    )
    .unwrap();
    for table in ["ratios", "mag_stds", "cos_dists", "sigmas", "meta"] {
        // Drop `[table]` / `[table.main]` and its lines.
        let text: String = full
            .split("\n\n")
            .filter(|block| {
                let h = block.lines().next().unwrap_or("");
                h != format!("[{table}]") && h != format!("[{table}.main]")
            })
            .collect::<Vec<_>>()
            .join("\n\n");
        std::fs::write(&prof, &text).unwrap();
        let o = magcache(&["plan", "--config", s(&cfg)]);
        let e = check_err(&o, &["p.toml", &format!("[{table}]")]);
        assert!(!e.contains("meta.ratios"), "{e}");
    }
}

#[test]
fn class7_folder_or_symlink_loop_where_a_file_is_expected() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("folder.toml")).unwrap();
    std::fs::create_dir(d.join("folder.safetensors")).unwrap();
    std::os::unix::fs::symlink(d.join("loop_b"), d.join("loop_a")).unwrap();
    std::os::unix::fs::symlink(d.join("loop_a"), d.join("loop_b")).unwrap();
    // The run file itself.
    for (path, why) in [("folder.toml", "is a folder"), ("loop_a", "symlink loop")] {
        let o = magcache(&["plan", "--config", s(&d.join(path))]);
        let e = check_err(&o, &[path, why]);
        assert!(!e.contains("does not exist"), "{e}");
    }
    // The inputs file, the weights, a profile.
    let weights = fixtures().join("wan21_tiny");
    let cfg = d.join("run.toml");
    let cases = [
        (
            format!(
                "[model]\nfamily = \"wan2.1\"\nweights = \"{}\"\n[inputs]\nfile = \"folder.safetensors\"\n[sampling]\nsteps = 2\n",
                weights.display()
            ),
            "folder.safetensors",
            "is a folder",
        ),
        (
            format!(
                "[model]\nfamily = \"wan2.1\"\nweights = \"{}\"\n[inputs]\nfile = \"loop_a\"\n[sampling]\nsteps = 2\n",
                weights.display()
            ),
            "loop_a",
            "symlink loop",
        ),
        (
            "[model]\nfamily = \"wan2.1\"\nweights = \"loop_a\"\n[sampling]\nsteps = 2\n".into(),
            "loop_a",
            "symlink loop",
        ),
        (
            wan_preset("", "", "[cache]\nstrategy = \"magcache\"\nprofile = \"folder.toml\"\n"),
            "folder.toml",
            "is a folder",
        ),
        (
            wan_preset("", "", "[cache]\nstrategy = \"magcache\"\nprofile = \"loop_a\"\n"),
            "loop_a",
            "symlink loop",
        ),
    ];
    for (text, path, why) in cases {
        std::fs::write(&cfg, &text).unwrap();
        let o = magcache(&["run", "--quiet", "--config", s(&cfg)]);
        let e = check_err(&o, &[path, why]);
        assert!(!e.contains("does not exist"), "{e}");
    }
}

#[test]
fn class7_magcache_keys_that_cannot_apply_fail_before_loading() {
    // resample = "sigma" needs a profile; mag_ratios and profile exclude each other.
    both_refuse(
        &wan_preset(
            "",
            "",
            "[cache]\nstrategy = \"magcache\"\nmag_ratios = [1.0, 0.9]\nresample = \"sigma\"\n",
        ),
        &["cache.resample", "profile"],
        &[],
    );
    both_refuse(
        &wan_preset(
            "",
            "",
            "[cache]\nstrategy = \"magcache\"\nmag_ratios = [1.0, 0.9]\nprofile = \"p.toml\"\n",
        ),
        &["cache.profile", "mag_ratios"],
        &[],
    );
}

/// Issue 23: a key belongs to core or to the run's family; another family's key, a typo and a
/// family key of the wrong type are refused before anything loads, naming the line and the key.
#[test]
fn keys_belong_to_core_or_the_family() {
    let flux = |inputs: &str, sampling: &str| {
        format!("[model]\nfamily = \"flux\"\npreset = \"flux-dev\"\n[model.overrides]\nnum_layers = 1\nnum_single_layers = 1\n[inputs]\n{inputs}\n[sampling]\nsteps = 3\n{sampling}\n")
    };
    // Wan's keys on flux: the line, the key and who owns it.
    both_refuse(
        &flux("", "boundary_ratio = 0.9"),
        &["run.toml:11", "sampling.boundary_ratio", "wan2.2", "flux"],
        &[],
    );
    both_refuse(
        &flux("num_frames = 5", ""),
        &["run.toml:8", "inputs.num_frames", "wan2.1"],
        &[],
    );
    both_refuse(
        &flux("", "scheduler_config = \"s.json\""),
        &["run.toml:11", "sampling.scheduler_config"],
        &[],
    );
    // A key nobody owns, in core's tables and as a table of its own.
    both_refuse(
        &wan_preset("", "shfit = 3.0", ""),
        &["run.toml:10", "sampling.shfit", "wan2.1"],
        &["a key of"],
    );
    both_refuse(
        &format!("{}[decoder]\ntiling = true\n", wan_preset("", "", "")),
        &["run.toml:11", "decoder", "unknown table"],
        &[],
    );
    // Wan's `[vae]` keys on flux name their owners; flux's own `[vae] tiling` needs a prompted run.
    both_refuse(
        &format!("{}[vae]\ntile_sample_stride_height = 192\n", flux("", "")),
        &["run.toml:13", "vae.tile_sample_stride_height", "wan2.1"],
        &[],
    );
    both_refuse(
        &format!("{}[vae]\ntiling = true\n", flux("", "")),
        &["run.toml", "vae.tiling", "prompted runs"],
        &[],
    );
    // Wan's own keys are typed: a wrong type names the line and key.
    both_refuse(
        &wan_preset("", "scheduler = 3", ""),
        &["run.toml:10", "sampling.scheduler"],
        &[],
    );
    // And still apply where they belong.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        wan_preset("", "scheduler = \"unipc\"\nshift = 3.0", ""),
    )
    .unwrap();
    let o = magcache(&["plan", "--config", s(&cfg)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    both_refuse(
        &wan_preset("", "scheduler = \"dpm\"", ""),
        &["sampling.scheduler", "dpm"],
        &["unknown key"],
    );
}

#[test]
fn published_data_borrowed_for_unmatched_weights_is_a_note() {
    // The tiny FLUX checkpoint matches no published variant: MagCache and TeaCache say they use
    // FLUX.1-dev's published numbers, as a note (not a warning); a preset says nothing.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (file, who) in [
        (
            "examples/flux_tiny_magcache.toml",
            "MagCache uses the published curve",
        ),
        (
            "examples/flux_tiny_teacache.toml",
            "TeaCache uses the rescale coefficients",
        ),
    ] {
        let o = common::magcache(&["plan", "--json", "--config", common::s(&root.join(file))]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let notes = j["notes"].to_string();
        assert!(
            notes.contains(who) && notes.contains("match no published variant"),
            "{file}: {notes}"
        );
        assert!(!j["warnings"].to_string().contains(who), "{file}");
    }
    let dir = tempfile::tempdir().unwrap();
    let preset = dir.path().join("preset.toml");
    std::fs::write(
        &preset,
        "[model]\nfamily = \"flux\"\npreset = \"flux-dev\"\n[inputs]\nlatent_shape = [1, 16, 16, 16]\n[sampling]\nsteps = 20\n[cache]\nstrategy = \"magcache\"\n",
    )
    .unwrap();
    let o = common::magcache(&["plan", "--json", "--config", common::s(&preset)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(j.get("notes").is_none(), "{j}");
}

/// A bad value in `[cache]` (a table read as one strategy value) is placed at its key's line, not
/// at the table's header, and said in the file's words, not serde's Rust types; a key of another
/// strategy names the strategies it belongs to.
#[test]
fn a_bad_cache_value_is_at_its_line_in_the_files_words() {
    let cases = [
        (
            "strategy = \"fbcache\"\n# a comment\nwarmup_steps = 1.5",
            "warmup_steps",
            "expected a whole number, 0 or more",
        ),
        (
            "strategy = \"magcache\"\nthreshold = \"high\"",
            "threshold",
            "expected a number",
        ),
        (
            "strategy = 3",
            "strategy",
            "expected a strategy's name in quotes",
        ),
        // Another strategy's key: its owner named.
        (
            "strategy = \"fbcache\"\nmax_skip_steps = 2",
            "max_skip_steps",
            "(a key of strategy `magcache`)",
        ),
    ];
    for (cache, key, words) in cases {
        let text = wan_preset("", "", &format!("[cache]\n{cache}\n"));
        let line = 1 + text
            .lines()
            .position(|l| l.starts_with(&format!("{key} =")))
            .unwrap();
        both_refuse(
            &text,
            &[&format!("run.toml:{line}: cache.{key}:"), words],
            &["usize", "f64", "dyn ", " in `"],
        );
    }
}

/// TeaCache's published coefficients rescale the distance of the tensor they were fit on: an
/// `indicator` naming another one, without `coefficients` of its own, is refused naming the key
/// and both tensors (with and without `ret_steps`, whose coefficients were fit on another one).
#[test]
fn teacache_indicator_other_than_the_published_coefficients_is_refused() {
    let cache = |ind: &str, ret: bool| {
        format!("[cache]\nstrategy = \"teacache\"\nindicator = \"{ind}\"\nret_steps = {ret}\n")
    };
    both_refuse(
        &wan_preset("", "", &cache("timestep_modulation", false)),
        &["cache.indicator", "\"timestep_embedding\"", "coefficients"],
        &[],
    );
    both_refuse(
        &wan_preset("", "", &cache("timestep_embedding", true)),
        &["cache.indicator", "\"timestep_modulation\"", "ret_steps"],
        &[],
    );
    // The indicator the coefficients were fit on, or coefficients of its own: accepted.
    let dir = tempfile::tempdir().unwrap();
    for cache in [
        cache("timestep_embedding", false),
        cache("timestep_modulation", true),
        format!(
            "{}coefficients = [1.0, 0.0]\n",
            cache("timestep_modulation", false)
        ),
    ] {
        let cfg = dir.path().join("ok.toml");
        std::fs::write(&cfg, wan_preset("", "", &cache)).unwrap();
        let o = magcache(&["plan", "--config", s(&cfg)]);
        assert!(
            o.status.success(),
            "{cache}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
