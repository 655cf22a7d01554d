//! The files of a checkpoint: a file, a sharded `*.safetensors.index.json`, a diffusers folder, or a
//! folder of `*.safetensors`.

use magcache_core::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The weight files of a model path: a file, a folder with a `*.safetensors.index.json`, a folder with
/// `diffusion_pytorch_model.safetensors`, or a folder of `*.safetensors`.
pub fn weight_files(path: &Path) -> Result<Vec<PathBuf>> {
    let shown = path.display().to_string();
    if path.is_file() {
        if path.extension().and_then(|e| e.to_str()) == Some("json") {
            return index_files(path);
        }
        return Ok(vec![path.to_path_buf()]);
    }
    if let Some(why) = magcache_core::error::not_found(path) {
        let why = if why == "does not exist" {
            "no such file or folder".to_string()
        } else {
            why
        };
        return Err(Error::weights(&shown, "(file)", why));
    }
    if !path.is_dir() {
        return Err(Error::weights(
            &shown,
            "(file)",
            "is neither a file nor a folder",
        ));
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(&shown, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    if let Some(idx) = entries
        .iter()
        .find(|p| p.to_string_lossy().ends_with(".safetensors.index.json"))
    {
        return index_files(idx);
    }
    let single = path.join("diffusion_pytorch_model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let st: Vec<PathBuf> = entries
        .into_iter()
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
        .collect();
    if st.is_empty() {
        return Err(Error::weights(
            &shown,
            "(file)",
            "folder holds no *.safetensors weights",
        ));
    }
    Ok(st)
}

fn index_files(idx: &Path) -> Result<Vec<PathBuf>> {
    let shown = idx.display().to_string();
    let text = magcache_core::error::read_text(std::path::Path::new(idx))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::weights(&shown, "(index)", format!("invalid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            Error::weights(&shown, "weight_map", "the index has no `weight_map` object")
        })?;
    let dir = idx.parent().unwrap_or(Path::new("."));
    // Each shard's tensors, as the index says.
    let mut shards: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (k, f) in map {
        let f = f
            .as_str()
            .ok_or_else(|| Error::weights(&shown, k, "weight_map entry is not a file name"))?;
        // A shard is a file beside the index: never a path that leaves its folder.
        let plain = Path::new(f).file_name().is_some_and(|n| n == f) && f != "..";
        if !plain {
            return Err(Error::weights(
                &shown,
                k,
                format!("weight_map names `{f}`, not a file name beside the index"),
            ));
        }
        shards.entry(f.to_string()).or_default().push(k);
    }
    if shards.is_empty() {
        return Err(Error::weights(
            &shown,
            "weight_map",
            "the index names no tensors",
        ));
    }
    for (f, listed) in &shards {
        let path = dir.join(f);
        let held = header_names(&path)?;
        if let Some(k) = listed.iter().find(|k| !held.contains(**k)) {
            return Err(Error::weights(
                &shown,
                *k,
                format!("weight_map places it in {f}, which does not hold it"),
            ));
        }
        if let Some(k) = held.iter().find(|k| !listed.contains(&k.as_str())) {
            return Err(Error::weights(
                path.display().to_string(),
                k,
                format!("is in this shard but not in {shown}'s weight_map (an index from another checkpoint?)"),
            ));
        }
    }
    Ok(shards.into_keys().map(|f| dir.join(f)).collect())
}

/// The tensor names of a safetensors file, from its header only (a shard may be tens of GB).
fn header_names(path: &Path) -> Result<std::collections::BTreeSet<String>> {
    use std::io::Read;
    let shown = path.display().to_string();
    if let Some(why) = magcache_core::error::not_a_file(path) {
        return Err(Error::weights(
            &shown,
            "(file)",
            format!("a shard the index names {why}"),
        ));
    }
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(&shown, e))?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|e| Error::weights(&shown, "(header)", format!("cannot read: {e}")))?;
    let n = u64::from_le_bytes(n);
    // safetensors' own bound on a header.
    if n > 100_000_000 {
        return Err(Error::weights(
            &shown,
            "(header)",
            format!("claims a {n}-byte header"),
        ));
    }
    let mut text = Vec::new();
    f.take(n)
        .read_to_end(&mut text)
        .map_err(|e| Error::weights(&shown, "(header)", format!("cannot read: {e}")))?;
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)
        .map_err(|e| Error::weights(&shown, "(header)", format!("invalid JSON: {e}")))?;
    Ok(v.into_iter()
        .map(|(k, _)| k)
        .filter(|k| k != "__metadata__")
        .collect())
}
