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
    let mut files: BTreeMap<String, ()> = BTreeMap::new();
    for (k, f) in map {
        let f = f
            .as_str()
            .ok_or_else(|| Error::weights(&shown, k, "weight_map entry is not a file name"))?;
        files.insert(f.to_string(), ());
    }
    Ok(files.into_keys().map(|f| dir.join(f)).collect())
}
