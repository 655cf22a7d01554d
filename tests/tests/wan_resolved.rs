//! A Wan run file is resolved once (`magcache_models::wan::WanRun`): `plan` refuses what the build
//! refuses, and neither `plan` nor the estimates open the device.

use std::path::{Path, PathBuf};

/// `examples/NAME` copied into a temporary folder, its relative paths made absolute and `edit`
/// applied.
fn example(name: &str, edit: impl Fn(String) -> String) -> (tempfile::TempDir, PathBuf) {
    magcache_tests::link_all();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let text = std::fs::read_to_string(examples.join(name)).unwrap();
    let text = text.replace(
        "\"../tests/",
        &format!("\"{}/../tests/", examples.display()),
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join(name);
    std::fs::write(&cfg, edit(text)).unwrap();
    (dir, cfg)
}

#[test]
fn a_gpu_run_file_plans_without_the_gpu() {
    for name in [
        "wan21_tiny_prompted.toml",
        "wan22_i2v_tiny_prompted.toml",
        "wan22_ti2v_tiny_prompted.toml",
        "wan22_tiny_magcache.toml",
    ] {
        let (_dir, cfg) = example(name, |t| {
            t.replace("[model]\n", "[model]\ndevice = \"cuda\"\n")
        });
        let plan = magcache_cli::plan(&cfg);
        assert!(plan.is_ok(), "{name}: {:?}", plan.err());
        if candle_core::utils::cuda_is_available() {
            continue;
        }
        match magcache_cli::prepare(&cfg) {
            Ok(_) => panic!("{name}: built on a device this machine lacks"),
            Err(e) => assert!(e.to_string().contains("model.device"), "{name}: {e}"),
        }
    }
}

#[test]
fn plan_refuses_what_the_build_refuses() {
    magcache_tests::link_all();
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipelines");
    let refused = |name: &str, text: String, key: &str| {
        let cfg = dir.path().join(name);
        std::fs::write(&cfg, text).unwrap();
        for (what, e) in [
            ("plan", magcache_cli::plan(&cfg).err()),
            ("build", magcache_cli::prepare(&cfg).err()),
        ] {
            let e = e.unwrap_or_else(|| panic!("{name}: {what} accepted it"));
            assert!(e.to_string().contains(key), "{name}: {what}: {e}");
        }
    };
    // Two experts with no boundary between them (no pipeline index, no preset matched).
    let root = fixtures.join("wan22_i2v_folder").display().to_string();
    refused(
        "no_boundary.toml",
        format!(
            "[model]\nfamily = \"wan2.2\"\nweights = [\"{root}/transformer\", \"{root}/transformer_2\"]\n[inputs]\nlatent_shape = [1, 16, 1, 4, 4]\ntext_len = 3\n[sampling]\nsteps = 4\n"
        ),
        "sampling.boundary_ratio",
    );
    // wan2.1 takes one weights path.
    let one = fixtures.join("wan_transformer").display().to_string();
    refused(
        "two_paths.toml",
        format!(
            "[model]\nfamily = \"wan2.1\"\nweights = [\"{one}\", \"{one}\"]\n[inputs]\nlatent_shape = [1, 16, 1, 4, 4]\ntext_len = 3\n[sampling]\nsteps = 4\n"
        ),
        "model.weights",
    );
}

#[test]
fn a_wan22_folder_missing_the_expert_its_index_names_is_refused() {
    // A partial download or copy of an A14B folder: `model_index.json` names `transformer_2`, the
    // folder lacks it. Running the first expert alone would be another model, silently.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pipelines");
    let (dir, cfg) = example("wan22_i2v_tiny_prompted.toml", |t| t);
    let folder = dir.path().join("partial");
    std::fs::create_dir(&folder).unwrap();
    let whole = fixtures.join("wan22_i2v_folder");
    for e in std::fs::read_dir(&whole).unwrap() {
        let name = e.unwrap().file_name();
        if name != "transformer_2" {
            std::os::unix::fs::symlink(
                whole.join(&name).canonicalize().unwrap(),
                folder.join(&name),
            )
            .unwrap();
        }
    }
    let text = std::fs::read_to_string(&cfg).unwrap();
    let weights = text
        .lines()
        .find(|l| l.starts_with("weights"))
        .expect("the example names its folder");
    std::fs::write(
        &cfg,
        text.replace(weights, &format!("weights = \"{}\"", folder.display())),
    )
    .unwrap();
    for (what, e) in [
        ("plan", magcache_cli::plan(&cfg).err()),
        ("build", magcache_cli::prepare(&cfg).err()),
    ] {
        let e = e
            .unwrap_or_else(|| panic!("{what}: ran on one expert"))
            .to_string();
        assert!(
            e.contains("model_index.json") && e.contains("transformer_2"),
            "{what}: {e}"
        );
    }
    // With its second expert the same folder plans.
    std::os::unix::fs::symlink(
        whole.join("transformer_2").canonicalize().unwrap(),
        folder.join("transformer_2"),
    )
    .unwrap();
    assert!(
        magcache_cli::plan(&cfg).is_ok(),
        "{:?}",
        magcache_cli::plan(&cfg).err()
    );
}
