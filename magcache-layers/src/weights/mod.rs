//! Reading checkpoints: single files, sharded `*.safetensors.index.json`, diffusers folders. Every
//! failure names the file and the tensor.
//!
//! Not candle-nn's `VarBuilder`: its errors name neither the file nor the folder a tensor was looked
//! for in, it converts every tensor to one dtype as it is fetched (we keep norms and biases in f32
//! and only linear weights in the run's dtype), and it cannot report which checkpoint tensors a model
//! never asked for.
//!
//! [`files`] finds a checkpoint's files (single file, sharded index, folder); blocks read from the
//! checkpoint as they run (`offload = "stream"`) are run by `magcache_core::blocks`.

use candle_core::{DType, Device, Tensor};
use magcache_core::{Error, Result};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

mod delta;
pub mod files;
pub mod gguf;
mod open;
mod read;
mod st_errors;
mod unused;
pub mod warm;

pub use delta::Delta;
pub use files::weight_files;
use read::{read_f32, read_range};
pub use st_errors::safetensors_error;

/// A tensor of the store: in memory, or where it lies in a memory-mapped checkpoint file (read when
/// it is handed out, so a model can fetch a block's weights when the block runs).
enum Entry {
    Mem(Tensor),
    /// A GGUF tensor, read (quantized) from its file and dequantized when handed out.
    Gguf(gguf::GgufEntry),
    Mapped {
        /// Index into [`WeightStore::handles`].
        map: usize,
        dtype: DType,
        shape: Vec<usize>,
        /// Byte range in the file.
        start: usize,
        end: usize,
    },
}

impl Entry {
    fn shape(&self) -> &[usize] {
        match self {
            Entry::Mem(t) => t.dims(),
            Entry::Mapped { shape, .. } => shape,
            Entry::Gguf(g) => &g.shape,
        }
    }
}

/// A tensor's name and shape.
pub type TensorShape = (String, Vec<usize>);

/// A linear layer's weight as the store hands it out ([`WeightStore::get_linear`]).
pub enum LinearWeight {
    /// `[out, in]` in the placement's dtype.
    Dense(Tensor),
    /// A GGUF tensor kept quantized, `[out, in]`.
    Quantized(Arc<candle_core::quantized::QTensor>),
}

/// Tensors by name, each remembering the file it came from, and which names the model fetched.
///
/// Only a checkpoint file's header is read when it is opened (through a memory map, dropped right
/// after); a tensor's bytes are read from the open file when it is handed out (`pread` on Unix, not
/// through a mapping: a file truncated while the run reads it is an error naming the file, never a
/// SIGBUS), so the resident memory is the tensors the model holds, never the checkpoint.
#[derive(Default)]
pub struct WeightStore {
    tensors: HashMap<String, (Entry, usize)>,
    files: Vec<String>,
    /// The open checkpoint files tensors are read from, with their length when opened.
    handles: Vec<Arc<(std::fs::File, u64)>>,
    /// Names handed out by `get*` or declared by [`WeightStore::expect`] (after renames): what the
    /// model uses.
    used: Mutex<HashSet<String>>,
    /// Names already checked finite in the run's dtype (a streamed block is fetched once per call:
    /// the check runs once).
    finite: Mutex<HashSet<String>>,
    /// What to call the store in messages (the folder or file the user gave).
    pub origin: String,
    /// The device and linear-weight dtype tensors are handed out in.
    placement: magcache_core::Placement,
    /// A recording store ([`WeightStore::recording`]): the names and shapes asked for, in order.
    record: Option<Mutex<Vec<TensorShape>>>,
    /// Changes added to tensors when they are handed out (LoRA adapters), by name.
    /// Each tensor's deltas with their origins (`file: key`, for messages).
    deltas: HashMap<String, Vec<(Delta, String)>>,
    /// Streamed from (`offload = "stream"`): never kept warm ([`warm`]), its bound holds.
    pub streamed: std::sync::atomic::AtomicBool,
    /// The file's own name of each tensor a layout conversion renamed ([`WeightStore::rename`]),
    /// by its new name: messages about the tensor give both.
    renamed: HashMap<String, String>,
}

impl WeightStore {
    /// A store of in-memory tensors (presets, tests).
    pub fn from_map(origin: &str, map: HashMap<String, Tensor>) -> Self {
        WeightStore {
            tensors: map
                .into_iter()
                .map(|(k, v)| (k, (Entry::Mem(v), 0)))
                .collect(),
            files: vec![origin.to_string()],
            origin: origin.to_string(),
            ..Default::default()
        }
    }

    /// A store that holds nothing and records what a loader asks it for: each `get_weight` /
    /// `get_shape` records the name and shape and hands out a zero-stride zero tensor of that
    /// shape (no memory). Running a model's block loader on it lists the block's tensors, so that
    /// names and shapes are written once, in the loader ([`WeightStore::recorded`]).
    pub fn recording() -> Self {
        WeightStore {
            origin: "(recording)".into(),
            record: Some(Mutex::new(Vec::new())),
            ..Default::default()
        }
    }

    /// Whether this is a recording store (its tensors are zero-stride zeros, never multiplied).
    pub fn is_recording(&self) -> bool {
        self.record.is_some()
    }

    /// What a recording store was asked for, in order.
    pub fn recorded(&self) -> Result<Vec<TensorShape>> {
        let r = self
            .record
            .as_ref()
            .ok_or_else(|| Error::msg(format!("{}: not a recording store", self.origin)))?;
        Ok(r.lock()
            .map_err(|_| Error::msg("recording store poisoned"))?
            .clone())
    }

    /// Records `name` and `shape` and hands out a zero-stride tensor, in a recording store.
    fn record(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Option<Tensor>> {
        let Some(r) = &self.record else {
            return Ok(None);
        };
        r.lock()
            .map_err(|_| Error::msg("recording store poisoned"))?
            .push((name.to_string(), shape.to_vec()));
        let zero = Tensor::zeros((), dtype, &Device::Cpu)?;
        Ok(Some(zero.broadcast_as(shape)?))
    }

    /// Hands tensors out on `p.device`; linear weights ([`WeightStore::get_weight`]) in `p.dtype`.
    pub fn set_placement(&mut self, p: magcache_core::Placement) {
        self.placement = p;
    }

    pub fn placement(&self) -> &magcache_core::Placement {
        &self.placement
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
        self.tensors.get(name).map(|(t, _)| t.shape().to_vec())
    }

    /// Renames every key through `f` (layout conversion). Two tensors that get the same name (a
    /// checkpoint holding `X` and `model.diffusion_model.X`, or a layout's two spellings of one
    /// tensor) are an error naming both: which one the model would get is arbitrary.
    pub fn rename(&mut self, f: impl Fn(&str) -> String) -> Result<()> {
        let mut seen: HashMap<String, String> = HashMap::new();
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        for k in names {
            if let Some(other) = seen.insert(f(k), k.clone()) {
                let (a, b) = (self.file_of(&other), self.file_of(k));
                let place = if a == b {
                    format!("both in {a}")
                } else {
                    format!("in {a} and {b}")
                };
                return Err(Error::weights(
                    b,
                    k,
                    format!(
                        "and `{other}` ({place}) are the same tensor `{}` under two names: which one the model would use is arbitrary; remove one of them",
                        f(k)
                    ),
                ));
            }
        }
        // `seen` maps each new name to its old one: the file's own name goes with the new one.
        self.renamed = seen
            .into_iter()
            .filter_map(|(new, old)| {
                let own = self.renamed.get(&old).cloned().unwrap_or(old);
                (new != own).then_some((new, own))
            })
            .collect();
        let old = std::mem::take(&mut self.tensors);
        self.tensors = old.into_iter().map(|(k, v)| (f(&k), v)).collect();
        if let Ok(mut used) = self.used.lock() {
            let old = std::mem::take(&mut *used);
            *used = old.into_iter().map(|k| f(&k)).collect();
        }
        Ok(())
    }

    /// Removes a tensor (used by layout conversions that split fused tensors).
    pub fn take(&mut self, name: &str) -> Result<Option<Tensor>> {
        if !self.tensors.contains_key(name) {
            return Ok(None);
        }
        let t = self.get_stored(name)?;
        self.tensors.remove(name);
        Ok(Some(t))
    }

    /// Renames one tensor without reading it; `false` when `from` is not there.
    pub fn move_key(&mut self, from: &str, to: &str) -> bool {
        match self.tensors.remove(from) {
            Some(e) => {
                self.tensors.insert(to.to_string(), e);
                true
            }
            None => false,
        }
    }

    /// Splits the fused tensor `name` along its first dimension into `parts` (new name, rows), in
    /// order, without reading a mapped tensor (each part is the matching byte range of the file).
    /// Rows left over after the parts are an error, as are too few.
    pub fn split_rows(&mut self, name: &str, parts: &[(String, usize)]) -> Result<()> {
        let shape = self.entry(name)?.shape().to_vec();
        let file = self.file_of(name).to_string();
        let rows = shape.first().copied().unwrap_or(0);
        let need: usize = parts.iter().map(|(_, r)| r).sum();
        if rows != need {
            let sizes: Vec<usize> = parts.iter().map(|(_, r)| *r).collect();
            return Err(Error::weights(
                &file,
                name,
                format!("has {rows} rows; the fused parts {sizes:?} need {need}"),
            ));
        }
        let Some((entry, fi)) = self.tensors.remove(name) else {
            return Ok(());
        };
        let row_elems: usize = shape[1..].iter().product();
        let mut off = 0;
        for (part, r) in parts {
            let e = match &entry {
                Entry::Mem(t) => Entry::Mem(t.narrow(0, off, *r)?.contiguous()?),
                Entry::Gguf(g) => {
                    Entry::Mem(g.read(&file, name)?.narrow(0, off, *r)?.contiguous()?)
                }
                Entry::Mapped {
                    map, dtype, start, ..
                } => {
                    let row_bytes = row_elems * dtype.size_in_bytes();
                    let mut sh = shape.clone();
                    sh[0] = *r;
                    Entry::Mapped {
                        map: *map,
                        dtype: *dtype,
                        shape: sh,
                        start: start + off * row_bytes,
                        end: start + (off + r) * row_bytes,
                    }
                }
            };
            self.tensors.insert(part.clone(), (e, fi));
            off += r;
        }
        Ok(())
    }

    /// Adds `delta` to tensor `name` whenever it is handed out. `what` names the delta's origin for
    /// messages (`file: key`): a tensor the store does not hold, or a delta of another shape, is an
    /// error naming it.
    pub fn add_delta(&mut self, name: &str, delta: Delta, what: (&str, &str)) -> Result<()> {
        let (file, key) = what;
        let shape = self
            .tensors
            .get(name)
            .map(|(e, _)| e.shape().to_vec())
            .ok_or_else(|| {
                Error::weights(
                    file,
                    key,
                    format!(
                        "matches no weight of the model (`{name}` is not in {})",
                        self.origin
                    ),
                )
            })?;
        let ds = delta.shape()?;
        if ds != shape {
            return Err(Error::weights(
                file,
                key,
                format!("gives a delta of shape {ds:?} for `{name}`, whose shape is {shape:?}"),
            ));
        }
        let origin = format!("{file}: {key}");
        self.deltas
            .entry(name.to_string())
            .or_default()
            .push((delta, origin));
        Ok(())
    }

    /// The sum of the deltas added to `name` (f32, CPU), if any.
    pub fn delta(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(ds) = self.deltas.get(name) else {
            return Ok(None);
        };
        let mut sum: Option<Tensor> = None;
        for (d, _) in ds {
            let v = d.value()?;
            sum = Some(match sum {
                None => v,
                Some(s) => (s + v)?,
            });
        }
        Ok(sum)
    }

    pub fn insert(&mut self, name: &str, t: Tensor) {
        self.tensors.insert(name.to_string(), (Entry::Mem(t), 0));
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
        let checked = self
            .finite
            .lock()
            .map(|c| c.contains(name))
            .unwrap_or(false);
        let stored = match self.deltas.get(name) {
            None => stored,
            Some(ds) => delta::merged(&stored, ds, !checked, (file, name))?,
        };
        let t = stored
            .to_device(&self.placement.device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| Error::weights(file, name, magcache_core::error::candle_text(e)))?;
        let finite = |t: &Tensor| {
            magcache_core::finite::all_finite(t)
                .map_err(|e| Error::weights(file, name, e.to_string()))
        };
        if !checked && !finite(&t)? {
            let what = magcache_core::finite::describe_non_finite(&t)
                .map_err(|e| Error::weights(file, name, e.to_string()))?;
            let own = self.stored_as(name);
            let msg = if stored.dtype() != dtype && finite(&stored)? {
                format!(
                    "is finite as stored ({:?}){own} but overflows {dtype:?}, the run's dtype ({what}); use a wider `model.dtype`",
                    stored.dtype()
                )
            } else {
                format!("holds non-finite values{own}: {what}")
            };
            return Err(Error::weights(file, name, msg));
        }
        if let Ok(mut c) = self.finite.lock() {
            c.insert(name.to_string());
        }
        self.mark_used(name);
        Ok(t)
    }

    fn mark_used(&self, name: &str) {
        if let Ok(mut used) = self.used.lock() {
            used.insert(name.to_string());
        }
    }

    /// Checks that a tensor exists with this shape and counts it as used, without reading it: a
    /// model that fetches a block's weights only when the block runs (`offload = "stream"`)
    /// declares them at build time, so a missing or misshapen tensor fails before the first call.
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<()> {
        self.check_shape(name, shape)?;
        self.mark_used(name);
        Ok(())
    }

    /// A linear layer's weight: a quantized GGUF tensor without LoRA deltas stays quantized (on the
    /// placement's device, checked finite once); anything else as [`WeightStore::get_weight`].
    pub fn get_linear(&self, name: &str, shape: &[usize]) -> Result<LinearWeight> {
        if self.record.is_none() && !self.deltas.contains_key(name) {
            if let Some((Entry::Gguf(g), _)) = self.tensors.get(name) {
                if g.is_quantized() && g.stored == shape {
                    let file = self.file_of(name);
                    let checked = self
                        .finite
                        .lock()
                        .map(|c| c.contains(name))
                        .unwrap_or(false);
                    let q = g.read_quantized(file, name, &self.placement.device, !checked)?;
                    if !checked {
                        if let Ok(mut c) = self.finite.lock() {
                            c.insert(name.to_string());
                        }
                    }
                    self.mark_used(name);
                    return Ok(LinearWeight::Quantized(Arc::new(q)));
                }
            }
        }
        Ok(LinearWeight::Dense(self.get_weight(name, shape)?))
    }

    /// A linear layer's weight with this shape, in the placement's dtype.
    pub fn get_weight(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Some(t) = self.record(name, shape, self.placement.dtype)? {
            return Ok(t);
        }
        self.check_shape(name, shape)?;
        self.get_as(name, self.placement.dtype)
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).map(|(e, _)| e).ok_or_else(|| {
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

    /// The tensor in its stored dtype, on the CPU: a clone of an in-memory one, or its bytes read
    /// from its checkpoint file.
    fn get_stored(&self, name: &str) -> Result<Tensor> {
        match self.entry(name)? {
            Entry::Mem(t) => Ok(t.clone()),
            Entry::Gguf(g) => {
                let file = self.file_of(name);
                let keep = !self.streamed.load(std::sync::atomic::Ordering::Relaxed);
                warm::tensor(file, format!("gguf {name}"), keep, || g.read(file, name))
            }
            Entry::Mapped {
                map,
                dtype,
                shape,
                start,
                end,
            } => {
                let file = self.file_of(name);
                let h = self
                    .handles
                    .get(*map)
                    .ok_or_else(|| Error::weights(file, name, "checkpoint file handle lost"))?;
                // Read straight into the tensor's own vector: one allocation of the tensor's size
                // (reading bytes and then building the tensor from them held it twice: 8.4 GB for
                // UMT5-XXL's 4.2 GB f32 embedding). f32 only, the released folders' dtype: 2-byte
                // tensors take the byte path (their vector type needs the `half` crate).
                let read = || match dtype {
                    DType::F32
                        if cfg!(target_endian = "little")
                            && (end.saturating_sub(*start)).is_multiple_of(4) =>
                    {
                        read_f32(&h.0, h.1, *start, *end, shape)
                    }
                    _ => read_range(&h.0, h.1, *start, *end).and_then(|bytes| {
                        Tensor::from_raw_buffer(&bytes, *dtype, shape, &Device::Cpu)
                            .map_err(magcache_core::error::candle_text)
                    }),
                };
                let keep = !self.streamed.load(std::sync::atomic::Ordering::Relaxed);
                warm::tensor(file, format!("{start}..{end}"), keep, || {
                    read().map_err(|why| Error::weights(file, name, why))
                })
            }
        }
    }

    /// A tensor that must exist with this shape, in f32 on the placement's device.
    pub fn get_shape(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Some(t) = self.record(name, shape, DType::F32)? {
            return Ok(t);
        }
        self.check_shape(name, shape)?;
        self.get(name)
    }

    fn check_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        let stored = self.entry(name)?.shape();
        if stored != shape {
            return Err(Error::weights(
                self.file_of(name),
                name,
                format!(
                    "has shape {stored:?}, the model config expects {shape:?}{}",
                    self.stored_as(name)
                ),
            ));
        }
        Ok(())
    }

    /// ` (stored as `X`)` where a layout conversion renamed the tensor from the file's `X`, for
    /// messages about it; empty where it keeps the file's name.
    fn stored_as(&self, name: &str) -> String {
        self.renamed
            .get(name)
            .map(|own| format!(" (stored as `{own}`)"))
            .unwrap_or_default()
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

/// How many numbered blocks `{prefix}{i}.` the store holds (one more than the largest `i`; 0 for none).
pub fn count_blocks(store: &WeightStore, prefix: &str) -> usize {
    store
        .keys()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map(|m| m.saturating_add(1))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor a layout conversion renamed is named in messages by the model's name and the
    /// file's own (kept through a second rename); one it did not rename by its name alone.
    #[test]
    fn a_renamed_tensor_s_shape_error_gives_the_file_s_own_name() {
        let t = |n: usize| Tensor::zeros((n, 2), DType::F32, &Device::Cpu).unwrap();
        let map = HashMap::from([
            ("blocks.0.self_attn.q.weight".to_string(), t(3)),
            ("head.head.weight".to_string(), t(3)),
        ]);
        let mut store = WeightStore::from_map("ckpt.safetensors", map);
        store
            .rename(|k| k.replace("self_attn.q", "attn1.to_q"))
            .unwrap();
        store.rename(|k| format!("x.{k}")).unwrap();
        let e = store
            .get_shape("x.blocks.0.attn1.to_q.weight", &[4, 2])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`x.blocks.0.attn1.to_q.weight`")
                && e.contains("(stored as `blocks.0.self_attn.q.weight`)"),
            "{e}"
        );
        let e = store
            .get_shape("x.head.head.weight", &[4, 2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("(stored as `head.head.weight`)"), "{e}");
        let mut plain = WeightStore::from_map("c", HashMap::from([("w".to_string(), t(3))]));
        plain.rename(|k| k.to_string()).unwrap();
        let e = plain.get_shape("w", &[4, 2]).unwrap_err().to_string();
        assert!(!e.contains("stored as"), "{e}");
    }
}
