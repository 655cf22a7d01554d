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
    if let Some(why) = bad_revision(rev) {
        return Err(Error::config(
            file,
            "model.revision",
            format!("`{rev}` is not a branch, tag or commit name: {why}"),
        ));
    }
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
    // A ref file holds a commit hash: read through the one regular-file check (a FIFO or a device
    // there is refused at once), and a few bytes at most.
    let ref_file = repo.join("refs").join(rev);
    let ref_key = if revision.is_some() {
        "model.revision"
    } else {
        key
    };
    let commit = match ref_file.symlink_metadata() {
        Err(_) => Err(format!(
            "`{id}` has no revision `{rev}` in the Hugging Face cache {} ({})",
            root.display(),
            fetch(rev)
        )),
        Ok(_) => crate::error::read_regular(&ref_file, 1024)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                String::from_utf8(b).map_err(|_| format!("{}: is not text", ref_file.display()))
            })
            .map(|s| s.trim().to_string()),
    }
    .map_err(|why| Error::config(file, ref_key, why))?;
    if !is_commit_hash(&commit) {
        return Err(Error::config(
            file,
            key,
            format!(
                "`{id}`: {} does not hold a commit hash: a damaged cache ({})",
                repo.join("refs").join(rev).display(),
                fetch(rev)
            ),
        ));
    }
    let snap = repo.join("snapshots").join(&commit);
    if snap.is_dir() {
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

/// Why `rev` cannot be a revision (a git branch, tag or commit name, `refs/pr/N` included): `None`
/// when it can. It names a folder inside the repo's cache entry, so it may not leave it: no empty,
/// `.`-led or `..` component, no absolute path, only ASCII letters, digits, `.`, `_`, `-` and `/`.
pub fn bad_revision(rev: &str) -> Option<&'static str> {
    if rev.is_empty() {
        return Some("it is empty");
    }
    if rev.starts_with('/') || rev.contains('\\') {
        return Some("it is a path");
    }
    if rev.split('/').any(|c| c.is_empty() || c.starts_with('.')) {
        return Some("a part of it is empty or starts with `.` (`..` would leave the cache)");
    }
    if !rev
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
    {
        return Some("only letters, digits, `.`, `_`, `-` and `/` are allowed");
    }
    None
}

/// A git commit hash as a ref file holds it: hexadecimal digits (40 for SHA-1, 64 for SHA-256; an
/// abbreviated one is accepted).
fn is_commit_hash(s: &str) -> bool {
    (4..=64).contains(&s.len()) && s.chars().all(|c| c.is_ascii_hexdigit())
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
        let abc = "abc0".repeat(10);
        std::fs::create_dir_all(repo.join("snapshots").join(&abc)).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{abc}\n")).unwrap();
        assert_eq!(
            snapshot(&d, "org/m", None, "f", "model.weights").unwrap(),
            repo.join("snapshots").join(&abc)
        );
        assert_eq!(
            snapshot(&d, "org/m", Some(&abc), "f", "model.weights").unwrap(),
            repo.join("snapshots").join(&abc)
        );
        // A revision that would leave the repo's cache entry, or a ref file that holds no commit
        // hash (its contents are never printed).
        std::fs::write(d.join("secret"), "top secret line\n").unwrap();
        for rev in ["../../secret", "/etc/passwd", "a//b", ".hidden", "v1 2"] {
            let e = snapshot(&d, "org/m", Some(rev), "f", "model.weights")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("model.revision") && !e.contains("top secret"),
                "{rev}: {e}"
            );
        }
        std::fs::write(repo.join("refs/v9"), "top secret line\n").unwrap();
        let e = snapshot(&d, "org/m", Some("v9"), "f", "model.weights")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("commit hash") && !e.contains("top secret"),
            "{e}"
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
