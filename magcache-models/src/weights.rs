//! Reading checkpoints: single files, sharded `*.safetensors.index.json`, diffusers folders. Every
//! failure names the file and the tensor.
//!
//! Not candle-nn's `VarBuilder`: its errors name neither the file nor the folder a tensor was looked
//! for in, it converts every tensor to one dtype as it is fetched (we keep norms and biases in f32
//! and only linear weights in the run's dtype), and it cannot report which checkpoint tensors a model
//! never asked for.

use candle_core::{DType, Device, Tensor};
use magcache_core::{Error, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Tensors by name, each remembering the file it came from, and which names the model fetched.
#[derive(Default)]
pub struct WeightStore {
    tensors: HashMap<String, (Tensor, usize)>,
    files: Vec<String>,
    /// Names handed out by `get*` (after renames): what the model used.
    used: Mutex<HashSet<String>>,
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
            used: Default::default(),
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
            if let Some(why) = magcache_core::error::not_a_file(f) {
                return Err(Error::weights(
                    &name,
                    "(file)",
                    format!("weight file {why}"),
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
                // Integer `position_ids` buffers (older transformers CLIP checkpoints store
                // `text_model.embeddings.position_ids`) are not weights: positions are 0..L.
                if k.ends_with("position_ids")
                    && matches!(t.dtype(), DType::I64 | DType::U32 | DType::U8)
                {
                    continue;
                }
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
                if let Some((_, other)) = store.tensors.get(&k) {
                    let other = store.files.get(*other).cloned().unwrap_or_default();
                    return Err(Error::weights(
                        &name,
                        &k,
                        format!("is also in {other}: two shards hold the same tensor and neither can be chosen (remove one, or give an index *.safetensors.index.json)"),
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

    /// The stored shape of a tensor, without handing it out (layout detection, config inference).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|(t, _)| t.dims().to_vec())
    }

    /// Renames every key through `f` (layout conversion).
    pub fn rename(&mut self, f: impl Fn(&str) -> String) {
        let old = std::mem::take(&mut self.tensors);
        self.tensors = old.into_iter().map(|(k, v)| (f(&k), v)).collect();
        if let Ok(mut used) = self.used.lock() {
            let old = std::mem::take(&mut *used);
            *used = old.into_iter().map(|k| f(&k)).collect();
        }
    }

    /// Removes a tensor (used by layout conversions that split fused tensors).
    pub fn take(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name).map(|(t, _)| t)
    }

    pub fn insert(&mut self, name: &str, t: Tensor) {
        self.tensors.insert(name.to_string(), (t, 0));
    }

    /// The file a tensor was read from (the store's origin when unknown).
    pub fn file_of(&self, name: &str) -> &str {
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

    /// A tensor in `dtype` on the placement's device (converted once, from the stored dtype),
    /// checked finite: a NaN or an infinity (in the file, or from a conversion that overflows the
    /// run's dtype) is an error naming the tensor and its file. Marks the name as used.
    fn get_as(&self, name: &str, dtype: DType) -> Result<Tensor> {
        let stored = self.get_stored(name)?;
        let file = self.file_of(name);
        let t = stored
            .to_device(&self.placement.device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| Error::weights(file, name, e.to_string()))?;
        let finite = |t: &Tensor| {
            magcache_core::finite::all_finite(t)
                .map_err(|e| Error::weights(file, name, e.to_string()))
        };
        if !finite(&t)? {
            let what = magcache_core::finite::describe_non_finite(&t)
                .map_err(|e| Error::weights(file, name, e.to_string()))?;
            let msg = if stored.dtype() != dtype && finite(&stored)? {
                format!(
                    "is finite as stored ({:?}) but overflows {dtype:?}, the run's dtype ({what}); use a wider `model.dtype`",
                    stored.dtype()
                )
            } else {
                format!("holds non-finite values: {what}")
            };
            return Err(Error::weights(file, name, msg));
        }
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_string());
        }
        Ok(t)
    }

    /// Checkpoint tensors the model never fetched, sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = match self.used.lock() {
            Ok(u) => u.clone(),
            Err(_) => return Vec::new(),
        };
        let mut v: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// After a model is built from this store: the warning naming checkpoint tensors it did not use
    /// (`None` when it used them all), or an error when a whole block (`blocks.N.*`,
    /// `transformer_blocks.N.*`, ...: every tensor under a numbered prefix) is left over: the model
    /// was built with fewer blocks than the checkpoint holds. `depth_key` maps a block prefix
    /// (`blocks`) to what sets that number of blocks (`model.overrides.num_layers = 2`, or
    /// `num_layers = 2 in config.json`); a key under `model.overrides.` makes the error name the
    /// run file and that key, any other the checkpoint file and the block.
    pub fn check_unused(
        &self,
        cfg_file: &str,
        depth_key: impl Fn(&str) -> String,
    ) -> Result<Option<String>> {
        let unused = self.unused();
        if unused.is_empty() {
            return Ok(None);
        }
        let used = match self.used.lock() {
            Ok(u) => u.clone(),
            Err(_) => HashSet::new(),
        };
        // Numbered prefixes (`blocks.2`) none of whose tensors was used.
        let mut left_blocks: BTreeSet<(String, usize)> = BTreeSet::new();
        for k in &unused {
            if let Some((prefix, n)) = block_of(k) {
                let p = format!("{prefix}.{n}.");
                if !used.iter().any(|u| u.starts_with(&p)) {
                    left_blocks.insert((prefix.to_string(), n));
                }
            }
        }
        if let Some((prefix, first)) = left_blocks.iter().next() {
            let names: Vec<String> = left_blocks
                .iter()
                .map(|(p, n)| format!("{p}.{n}.*"))
                .collect();
            let depth_key = depth_key(prefix);
            let msg = format!(
                "{} holds block(s) {} that the model does not build (its depth comes from {depth_key}): a model shallower than its checkpoint would run silently wrong; set the number of blocks to match the checkpoint",
                self.origin,
                names.join(", ")
            );
            return Err(if depth_key.starts_with("model.overrides.") {
                let key = depth_key.split(' ').next().unwrap_or_default().to_string();
                Error::config(cfg_file, key, msg)
            } else {
                let p = format!("{prefix}.{first}.");
                let file = unused
                    .iter()
                    .find(|k| k.starts_with(&p))
                    .map(|k| self.file_of(k))
                    .unwrap_or(&self.origin);
                Error::weights(file, format!("{prefix}.{first}.*"), msg)
            });
        }
        const SHOWN: usize = 8;
        let mut list: Vec<&str> = unused.iter().take(SHOWN).map(|s| s.as_str()).collect();
        let more = unused.len().saturating_sub(SHOWN);
        let extra = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        list.sort();
        Ok(Some(format!(
            "{}: {} checkpoint tensor(s) not used by the model: {}{extra}",
            self.origin,
            unused.len(),
            list.join(", ")
        )))
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

/// `blocks.12.attn1.to_q.weight` -> `("blocks", 12)`: the prefix up to the first numbered component.
fn block_of(name: &str) -> Option<(&str, usize)> {
    let mut start: usize = 0;
    for part in name.split('.') {
        if let Ok(n) = part.parse::<usize>() {
            let prefix = name.get(..start.checked_sub(1)?)?;
            return Some((prefix, n));
        }
        start += part.len() + 1;
    }
    None
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
