//! Hugging Face hub ids as weights: `weights = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"` (an `owner/name`
//! that is not a local path) names the snapshot that `huggingface-cli download` (or any hub client)
//! left in the local cache, offline. The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`; a repo is `models--OWNER--NAME/`, its revisions
//! `snapshots/<commit>/` (files there are symlinks into `blobs/`), a branch or tag `refs/<name>`
//! holding the commit. `[model] revision` picks a branch, tag or commit (default `main`).
//!
//! Written here rather than with the `hf-hub` crate: its cache API looks up single files through
//! `refs/<branch>` only (no commit revisions, no snapshot folder) and its default features pull an
//! HTTP client this offline lookup never uses.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The local hub cache folder.
pub fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// Whether `s` has the shape of a hub id (`owner/name`: two parts of letters, digits, `-`, `_`, `.`,
/// neither starting with a dot).
pub fn looks_like_repo_id(s: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(s.split('/').collect::<Vec<_>>().as_slice(), [o, n] if part(o) && part(n))
}

/// The snapshot folder of repo `id` at `revision` (branch, tag or commit; `main` by default) in
/// the cache `root`. Errors name `key` in `file` and say how to fetch what is missing.
pub fn snapshot(
    root: &Path,
    id: &str,
    revision: Option<&str>,
    file: &str,
    key: &str,
) -> Result<PathBuf> {
    let repo = root.join(format!("models--{}", id.replace('/', "--")));
    let fetch = |rev: &str| {
        let r = if rev == "main" {
            String::new()
        } else {
            format!(" --revision {rev}")
        };
        format!("`huggingface-cli download {id}{r}` fetches it")
    };
    let rev = revision.unwrap_or("main");
    if !repo.is_dir() {
        return Err(Error::config(
            file,
            key,
            format!(
                "`{id}` is neither a local path nor a repo in the Hugging Face cache {} ({})",
                root.display(),
                fetch(rev)
            ),
        ));
    }
    let direct = repo.join("snapshots").join(rev);
    if direct.is_dir() {
        return Ok(direct);
    }
    let commit = std::fs::read_to_string(repo.join("refs").join(rev))
        .map(|s| s.trim().to_string())
        .map_err(|_| {
            Error::config(
                file,
                if revision.is_some() {
                    "model.revision"
                } else {
                    key
                },
                format!(
                    "`{id}` has no revision `{rev}` in the Hugging Face cache {} ({})",
                    root.display(),
                    fetch(rev)
                ),
            )
        })?;
    let snap = repo.join("snapshots").join(&commit);
    if snap.is_dir() && !commit.is_empty() && !commit.contains(['/', '\\']) {
        Ok(snap)
    } else {
        Err(Error::config(
            file,
            key,
            format!(
                "`{id}`: refs/{rev} names commit `{commit}`, whose snapshot is not in the cache {} ({})",
                root.display(),
                fetch(rev)
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths() {
        assert!(looks_like_repo_id("Wan-AI/Wan2.1-T2V-1.3B-Diffusers"));
        assert!(!looks_like_repo_id("./w"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("../x"));
        assert!(!looks_like_repo_id("weights.safetensors"));
    }

    #[test]
    fn snapshots_by_branch_commit_and_missing() {
        let d = std::env::temp_dir().join(format!("hub-test-{}", std::process::id()));
        let repo = d.join("models--org--m");
        std::fs::create_dir_all(repo.join("snapshots/abc")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc\n").unwrap();
        assert_eq!(
            snapshot(&d, "org/m", None, "f", "model.weights").unwrap(),
            repo.join("snapshots/abc")
        );
        assert_eq!(
            snapshot(&d, "org/m", Some("abc"), "f", "model.weights").unwrap(),
            repo.join("snapshots/abc")
        );
        let e = snapshot(&d, "org/m", Some("v2"), "f", "model.weights")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.revision") && e.contains("--revision v2"),
            "{e}"
        );
        let e = snapshot(&d, "org/other", None, "f", "model.weights")
            .unwrap_err()
            .to_string();
        assert!(e.contains("huggingface-cli download org/other"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
