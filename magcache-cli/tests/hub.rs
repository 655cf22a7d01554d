//! Hugging Face hub ids as weights: a repo id resolves to its snapshot in the local cache (files
//! symlinked into `blobs/`, `refs/main`, `revision`), offline, and runs to the bits of the same
//! weights given as a path; a missing repo or revision is one line saying how to fetch it.

mod common;

use common::{bin, check_err, s, Case};
use std::path::Path;

/// A hub cache under `root` holding `org/wan21-tiny` at commit `c0ffee` (refs/main), its files
/// symlinks into `blobs/` as the hub client leaves them.
fn cache_with_tiny_wan(root: &Path, w: &Path) {
    let repo = root.join("models--org--wan21-tiny");
    let snap = repo.join("snapshots").join("c0ffee");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "c0ffee").unwrap();
    for (i, f) in ["config.json", "diffusion_pytorch_model.safetensors"]
        .iter()
        .enumerate()
    {
        let blob = repo.join("blobs").join(format!("blob{i}"));
        std::fs::copy(w.join(f), &blob).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(format!("../../blobs/blob{i}"), snap.join(f)).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&blob, snap.join(f)).unwrap();
    }
}

fn run_out(c: &Case, cache: &Path, out: &str) -> std::process::Output {
    bin()
        .env("HF_HUB_CACHE", cache)
        .args([
            "run",
            "--quiet",
            "--config",
            s(&c.run_file()),
            "--out",
            s(&c.p(out)),
        ])
        .output()
        .unwrap()
}

#[test]
fn a_repo_id_runs_from_the_cache_like_its_path() {
    let c = Case::new("");
    let cache = c.p("hub");
    cache_with_tiny_wan(&cache, &c.p("w"));
    let o = run_out(&c, &cache, "local.safetensors");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(c.run_file()).unwrap();
    c.write_run(&text.replace("weights = \"w\"", "weights = \"org/wan21-tiny\""));
    let o = run_out(&c, &cache, "hub.safetensors");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = std::fs::read(c.p("local.safetensors")).unwrap();
    let b = std::fs::read(c.p("hub.safetensors")).unwrap();
    assert_eq!(a, b, "the same weights, the same latents");
    // A commit given as the revision.
    c.write_run(&text.replace(
        "weights = \"w\"",
        "weights = \"org/wan21-tiny\"\nrevision = \"c0ffee\"",
    ));
    let o = run_out(&c, &cache, "rev.safetensors");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A branch the cache does not have.
    c.write_run(&text.replace(
        "weights = \"w\"",
        "weights = \"org/wan21-tiny\"\nrevision = \"v2\"",
    ));
    check_err(
        &run_out(&c, &cache, "x.safetensors"),
        &[
            "model.revision",
            "huggingface-cli download org/wan21-tiny --revision v2",
        ],
    );
    // A repo the cache does not have.
    c.write_run(&text.replace("weights = \"w\"", "weights = \"org/absent\""));
    check_err(
        &run_out(&c, &cache, "x.safetensors"),
        &["model.weights", "huggingface-cli download org/absent"],
    );
    // An output may not replace a cached blob through the snapshot's symlinks.
    c.write_run(&text.replace("weights = \"w\"", "weights = \"org/wan21-tiny\""));
    let target =
        cache.join("models--org--wan21-tiny/snapshots/c0ffee/diffusion_pytorch_model.safetensors");
    let before = std::fs::read(&target).unwrap();
    let o = bin()
        .env("HF_HUB_CACHE", &cache)
        .args([
            "run",
            "--quiet",
            "--config",
            s(&c.run_file()),
            "--out",
            s(&target),
        ])
        .output()
        .unwrap();
    check_err(&o, &["--out"]);
    assert_eq!(std::fs::read(&target).unwrap(), before);
}
