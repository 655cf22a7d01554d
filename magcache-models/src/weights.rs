//! Reading checkpoints: single files, sharded `*.safetensors.index.json`, diffusers folders. Every
//! failure names the file and the tensor.
//!
//! Not candle-nn's `VarBuilder`: its errors name neither the file nor the folder a tensor was looked
//! for in, it converts every tensor to one dtype as it is fetched (we keep norms and biases in f32
//! and only linear weights in the run's dtype), and it cannot report which checkpoint tensors a model
//! never asked for.

use candle_core::{DType, Device, Tensor};
use magcache_core::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Tensors by name, each remembering the file it came from.
#[derive(Default)]
pub struct WeightStore {
    tensors: HashMap<String, (Tensor, usize)>,
    files: Vec<String>,
    /// What to call the store in messages (the folder or file the user gave).
    pub origin: String,
    /// The device and linear-weight dtype tensors are handed out in.
    placement: magcache_core::Placement,
}

impl WeightStore {
    /// A store of in-memory tensors (presets, tests).
    pub fn from_map(origin: &str, map: HashMap<String, Tensor>) -> Self {
        WeightStore {
            tensors: map.into_iter().map(|(k, v)| (k, (v, 0))).collect(),
            files: vec![origin.to_string()],
            origin: origin.to_string(),
            placement: Default::default(),
        }
    }

    /// Hands tensors out on `p.device`; linear weights ([`WeightStore::get_weight`]) in `p.dtype`.
    pub fn set_placement(&mut self, p: magcache_core::Placement) {
        self.placement = p;
    }

    pub fn placement(&self) -> &magcache_core::Placement {
        &self.placement
    }

    /// Loads safetensors files (f32, f16 or bf16), each tensor kept in its stored dtype until it is
    /// handed out (converted once, then).
    pub fn load_files(origin: &str, files: &[PathBuf]) -> Result<Self> {
        let mut store = WeightStore {
            origin: origin.to_string(),
            ..Default::default()
        };
        for (fi, f) in files.iter().enumerate() {
            let name = f.display().to_string();
            if !f.is_file() {
                return Err(Error::weights(
                    &name,
                    "(file)",
                    "weight file does not exist",
                ));
            }
            let map = candle_core::safetensors::load(f, &Device::Cpu).map_err(|e| {
                Error::weights(
                    &name,
                    "(header)",
                    format!("not a readable safetensors file: {e}"),
                )
            })?;
            for (k, t) in map {
                if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
                    return Err(Error::weights(
                        &name,
                        &k,
                        format!(
                            "has dtype {:?}; weights must be f32, f16 or bf16",
                            t.dtype()
                        ),
                    ));
                }
                store.tensors.insert(k, (t, fi));
            }
            store.files.push(name);
        }
        Ok(store)
    }

    /// Loads every weight file of a model path (see [`weight_files`]) and strips the
    /// `model.diffusion_model.` prefix single-file checkpoints often carry.
    pub fn load_checkpoint(path: &Path) -> Result<Self> {
        let files = weight_files(path)?;
        let mut store = WeightStore::load_files(&path.display().to_string(), &files)?;
        const PREFIX: &str = "model.diffusion_model.";
        if store.keys().any(|k| k.starts_with(PREFIX)) {
            store.rename(|k| k.strip_prefix(PREFIX).unwrap_or(k).to_string());
        }
        Ok(store)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Renames every key through `f` (layout conversion).
    pub fn rename(&mut self, f: impl Fn(&str) -> String) {
        let old = std::mem::take(&mut self.tensors);
        self.tensors = old.into_iter().map(|(k, v)| (f(&k), v)).collect();
    }

    /// Removes a tensor (used by layout conversions that split fused tensors).
    pub fn take(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name).map(|(t, _)| t)
    }

    pub fn insert(&mut self, name: &str, t: Tensor) {
        self.tensors.insert(name.to_string(), (t, 0));
    }

    fn file_of(&self, name: &str) -> &str {
        match self.tensors.get(name) {
            Some((_, i)) => self
                .files
                .get(*i)
                .map(|s| s.as_str())
                .unwrap_or(&self.origin),
            None => &self.origin,
        }
    }

    /// A tensor that must exist, in f32 on the placement's device.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.get_as(name, DType::F32)
    }

    /// A tensor in `dtype` on the placement's device (converted once, from the stored dtype).
    fn get_as(&self, name: &str, dtype: DType) -> Result<Tensor> {
        let t = self.get_stored(name)?;
        let t = t
            .to_device(&self.placement.device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| Error::weights(self.file_of(name), name, e.to_string()))?;
        Ok(t)
    }

    /// A linear layer's weight with this shape, in the placement's dtype.
    pub fn get_weight(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.check_shape(name, shape)?;
        self.get_as(name, self.placement.dtype)
    }

    fn get_stored(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .map(|(t, _)| t.clone())
            .ok_or_else(|| {
                Error::weights(
                    &self.origin,
                    name,
                    format!(
                        "missing from the checkpoint ({} tensors present)",
                        self.tensors.len()
                    ),
                )
            })
    }

    /// A tensor that must exist with this shape, in f32 on the placement's device.
    pub fn get_shape(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.check_shape(name, shape)?;
        self.get(name)
    }

    fn check_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        let t = self.get_stored(name)?;
        if t.dims() != shape {
            return Err(Error::weights(
                self.file_of(name),
                name,
                format!(
                    "has shape {:?}, the model config expects {:?}",
                    t.dims(),
                    shape
                ),
            ));
        }
        Ok(())
    }
}

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
    if !path.is_dir() {
        return Err(Error::weights(&shown, "(file)", "no such file or folder"));
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
    let text = std::fs::read_to_string(idx).map_err(|e| Error::io(&shown, e))?;
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
