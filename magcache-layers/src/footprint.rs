//! Memory estimates of the models here, for core's size guard ([`magcache_core::runtime::guard`]): weights
//! (parameters x bytes of the run's dtype; streamed: the embeddings, head and two blocks),
//! activations of one transformer call (tokens x dims x a factor, attention scores capped by
//! [`crate::nn::ATTENTION_SCORE_BUDGET`]), the text embeddings, the cache (a few hidden-state-sized
//! tensors per scope) and the plan (per call). All arithmetic is checked: an overflow is "more than
//! any memory", never a panic.

use magcache_core::runtime::guard::{Footprint, BYTES_PER_CALL};
use std::collections::HashMap;
use std::ops::{Add, Mul};
use std::path::Path;

/// A size in bytes or elements; `None` once an operation overflowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sz(pub Option<u64>);

impl From<usize> for Sz {
    fn from(x: usize) -> Self {
        Sz(u64::try_from(x).ok())
    }
}

impl Add for Sz {
    type Output = Sz;
    fn add(self, o: Sz) -> Sz {
        Sz(self.0.zip(o.0).and_then(|(a, b)| a.checked_add(b)))
    }
}

impl Mul for Sz {
    type Output = Sz;
    fn mul(self, o: Sz) -> Sz {
        Sz(self.0.zip(o.0).and_then(|(a, b)| a.checked_mul(b)))
    }
}

impl Sz {
    pub fn min(self, cap: u64) -> Sz {
        Sz(self.0.map(|x| x.min(cap)))
    }
    /// The larger of two sizes; `None` (overflowed) if either is.
    pub fn max(self, o: Sz) -> Sz {
        Sz(self.0.zip(o.0).map(|(a, b)| a.max(b)))
    }
}

/// Shorthand: a size from a `usize`.
pub fn sz(x: usize) -> Sz {
    Sz::from(x)
}

/// Live hidden-state copies of one transformer call, in units of `tokens x inner_dim` (q, k, v,
/// attention output, residuals, norms, modulated inputs, rotated q and k).
pub const HIDDEN_FACTOR: usize = 12;
/// Live copies of the feed-forward hidden layer (`tokens x ffn_dim`: the projection and its GELU).
pub const FFN_FACTOR: usize = 2;
/// Hidden-state-sized tensors a cache keeps per scope (residuals, first-block outputs).
pub const CACHE_FACTOR: usize = 3;
/// Latent-sized tensors a loop holds (latents, model input, each branch's output, guided
/// prediction, update, result).
pub const LATENT_FACTOR: usize = 8;

/// Score matrices of one attention over `s` queries and `l` keys as the run's `device` computes it
/// ([`crate::nn::attention`]). On the CPU (activations are f32 there) the fused attention holds one
/// block of 128 queries' scores per thread (where its bf16 products run on oneDNN, its block of
/// queries by its block of keys: within 2 MB, or `MAGCACHE_ONEDNN_QUERY_ROWS` by
/// `MAGCACHE_ONEDNN_KEY_ROWS`; measured: counting the chunked budget instead put a 480x832 Wan
/// denoise 21-28% over its peak); elsewhere queries are chunked so that one score matrix (and its
/// softmax) stays within the budget.
pub fn attention_bytes(device: &str, b: usize, heads: usize, s: usize, l: usize) -> Sz {
    let cap = crate::nn::ATTENTION_SCORE_BUDGET as u64;
    let one = (sz(b) * sz(heads) * sz(s) * sz(l) * sz(4))
        .0
        .map_or(cap, |x| x.min(cap));
    let chunked = Sz(Some(one)) * sz(2);
    if device.starts_with("cuda") || device.starts_with("metal") {
        return chunked;
    }
    let (qb, kb) = crate::nn::cpu_task_scores(l);
    let qb = qb.min(s);
    let tasks = (sz(b) * sz(heads) * sz(s.div_ceil(qb.max(1))))
        .0
        .unwrap_or(u64::MAX);
    let threads = (candle_core::utils::get_num_threads() as u64).clamp(1, tasks.max(1));
    let fused = Sz(Some(threads)) * sz(qb) * sz(kb.min(l)) * sz(4);
    match (fused.0, chunked.0) {
        (Some(f), Some(c)) => Sz(Some(f.min(c))),
        _ => chunked,
    }
}

/// Bytes of a dtype name (`f32`, `bf16`, `f16`); 4 for anything else.
pub fn dtype_bytes(dtype: &str) -> usize {
    match dtype {
        "bf16" | "f16" => 2,
        _ => 4,
    }
}

/// The weights part of a footprint: `params` in `dtype`. Checkpoint files are memory-mapped and read
/// tensor by tensor ([`crate::weights::WeightStore`]), so their bytes are never held beside the
/// converted weights (one tensor's stored copy is transient, within the activation margins).
pub fn weights_bytes(params: Sz, dtype: &str) -> Sz {
    params * sz(dtype_bytes(dtype))
}

/// Adds the plan part: `steps` sampler steps of `calls_per_step` calls each.
pub fn add_plan(fp: &mut Footprint, steps: usize, calls_per_step: usize) {
    let per_step = sz(64) + sz(calls_per_step) * Sz(Some(BYTES_PER_CALL));
    fp.add(
        "plan and report",
        "sampling.steps",
        (sz(steps) * per_step).0,
    );
}

/// The shapes of the tensors of a safetensors file, read from its header only (no tensor data).
/// `None` when the file is missing or its header unreadable (the loader reports that later).
pub fn safetensors_shapes(path: &Path) -> Option<HashMap<String, Vec<usize>>> {
    use std::io::Read;
    // A FIFO or a device would block or never end: only regular files are read.
    if !path.is_file() {
        return None;
    }
    let mut f = std::fs::File::open(path).ok()?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).ok()?;
    let len = u64::from_le_bytes(n);
    if len > 100 << 20 {
        return None;
    }
    let mut buf = vec![0u8; usize::try_from(len).ok()?];
    f.read_exact(&mut buf).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&buf).ok()?;
    let obj = v.as_object()?;
    let mut out = HashMap::new();
    for (k, t) in obj {
        if k == "__metadata__" {
            continue;
        }
        let shape = t
            .get("shape")?
            .as_array()?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()?;
        out.insert(k.clone(), shape);
    }
    Some(out)
}

/// The `[model.overrides]` key that grows a preset the most (the largest ratio of an overridden
/// number to the preset's), or `model.preset` when no override grows it. Names the knob of a preset's
/// weights in refusals.
pub fn weights_knob(
    base: &serde_json::Map<String, serde_json::Value>,
    overrides: &serde_json::Map<String, serde_json::Value>,
) -> String {
    let num = |v: &serde_json::Value| -> Option<f64> {
        match v {
            serde_json::Value::Array(a) => a
                .iter()
                .map(|x| x.as_f64())
                .try_fold(1.0, |acc, x| x.map(|x| acc * x)),
            v => v.as_f64(),
        }
    };
    overrides
        .iter()
        .filter_map(|(k, v)| {
            let new = num(v)?;
            let old = base.get(k).and_then(num).unwrap_or(1.0).max(1.0);
            let r = new / old;
            (r > 1.0).then(|| (k.clone(), r))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(k, _)| format!("model.overrides.{k}"))
        .unwrap_or_else(|| "model.preset".to_string())
}

/// The `[[model.lora]]` adapters' share of a run: their tensors held in f32 (at most twice a file
/// stored in 16 bits) and, while a weight is merged, an f32 copy of the largest weight and of its
/// delta (`largest` elements). Files that cannot be read count nothing here: loading them names
/// the error.
pub fn add_lora(fp: &mut Footprint, cfg: &magcache_core::RunConfig, base: &Path, largest: Sz) {
    let tables: Vec<_> = cfg.model.lora.iter().collect();
    add_lora_tables(fp, &tables, base, largest)
}

/// [`add_lora`] for the adapter tables themselves (paths relative to `base`).
pub fn add_lora_tables(
    fp: &mut Footprint,
    tables: &[&magcache_core::runtime::config::LoraTable],
    base: &Path,
    largest: Sz,
) {
    if tables.is_empty() {
        return;
    }
    let held = tables
        .iter()
        .filter_map(|l| {
            std::fs::metadata(crate::config_util::resolve(base, &l.path))
                .ok()
                .map(|m| m.len())
        })
        .fold(Sz(Some(0)), |a, b| a + Sz(Some(b)) * Sz(Some(2)));
    let merging = largest * Sz(Some(4 * 3));
    fp.add(
        "LoRA adapters (f32) and merging",
        "model.lora",
        (held + merging).0,
    );
}

/// A held GGUF checkpoint's resident bytes: the file (its quantized linear weights stay quantized,
/// the other tensors are small) and, with `repack` (`model.gguf_repack`), the copies candle's
/// quantized matmul repacks into SIMD tiles on their first product and keeps beside them on this
/// CPU ([`crate::weights::gguf::gguf_repacked_bytes`]: about the file again for Q8_0 on an AVX-512
/// VNNI CPU, nothing on an AVX2 one). `None` for other files, and for streamed runs (which hold
/// two blocks, counted from the config as for any checkpoint).
pub fn gguf_held_bytes(path: &Path, streamed: bool, repack: bool) -> Option<GgufHeld> {
    if streamed || !crate::weights::gguf::is_gguf(path) {
        return None;
    }
    let file = std::fs::metadata(path).ok()?.len();
    // An unreadable header: the loader reports it; count the worst case meanwhile.
    let repacked = if repack {
        crate::weights::gguf::gguf_repacked_bytes(path).unwrap_or(file)
    } else {
        0
    };
    Some(GgufHeld { file, repacked })
}

/// What a held GGUF checkpoint keeps resident ([`gguf_held_bytes`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GgufHeld {
    pub file: u64,
    pub repacked: u64,
}

/// Adds a held GGUF run's repacked copies to `fp` (nothing when there are none), and tells a
/// refusal whose largest part is the weights or these copies how to fit without them.
pub fn add_gguf_repacked(fp: &mut Footprint, repacked: u64) {
    if repacked == 0 {
        return;
    }
    let advice = "set `gguf_repack = false` in [model] (the quantized products then read the file's own blocks: one copy, slower) or use model.offload = \"stream\"";
    fp.advise(advice);
    fp.add(
        "GGUF matrices repacked into SIMD tiles by candle (kept beside the file)",
        "model.gguf_repack",
        Some(repacked),
    );
    fp.advise(advice);
}

/// The `gemm` crate's per-thread scratch: every thread that runs a product keeps a buffer the size
/// of this CPU's L2 cache as gemm reads it (1 MB on Zen 3/5, 2 MB on current Xeons) from its first
/// product on; counted for candle's threads and the calling one (the tiny decode of
/// `tests/tests/wan_vae_memory.rs` fell 1.1 MB short without it). Read from gemm itself, not
/// assumed: a fixed 2 MB over-counted on AMD, and a test bound without it failed on an Intel Xeon.
pub fn gemm_slabs() -> Sz {
    let l2 = gemm_common::cache::CACHE_INFO[1].cache_bytes;
    sz(l2) * sz(candle_core::utils::get_num_threads() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A held GGUF run refused for its repacked copies is told to turn repacking off (or stream),
    /// whether the file or the copies are the largest part; without copies nothing is added.
    #[test]
    fn repacked_gguf_copies_are_a_part_that_names_gguf_repack() {
        use magcache_core::runtime::guard::Available;
        let avail = Available {
            bytes: Some(20),
            source: "test".into(),
        };
        for (file, copies) in [(15u64, 14u64), (10, 14)] {
            let mut fp = Footprint::default();
            fp.add("weights", "model.weights", Some(file));
            add_gguf_repacked(&mut fp, copies);
            let e = fp
                .check_against("run.toml", &avail)
                .unwrap_err()
                .to_string();
            assert!(e.contains("gguf_repack = false"), "{e}");
            assert!(e.contains("GGUF matrices repacked"), "{e}");
        }
        let mut fp = Footprint::default();
        fp.add("weights", "model.weights", Some(15));
        add_gguf_repacked(&mut fp, 0);
        assert!(fp.check_against("run.toml", &avail).is_ok());
    }

    #[test]
    fn checked_sizes_saturate_to_none() {
        assert_eq!((sz(3) * sz(4) + sz(1)).0, Some(13));
        assert_eq!((sz(usize::MAX) * sz(usize::MAX)).0, None);
        assert_eq!((Sz(None) + sz(1)).0, None);
        assert_eq!(
            attention_bytes("cuda", 1, 2, 1 << 40, 1 << 40).0,
            Some(2 * crate::nn::ATTENTION_SCORE_BUDGET as u64)
        );
        // On the CPU the fused attention holds a block of 128 queries' scores per thread.
        let threads = candle_core::utils::get_num_threads() as u64;
        assert_eq!(
            attention_bytes("cpu", 1, 12, 32760, 32760).0,
            Some((threads.min(12 * 256) * 128 * 32760 * 4).min((2 * 256) << 20))
        );
        // ... and never more tasks' worth than there are (one head, 10 queries).
        assert_eq!(attention_bytes("cpu", 1, 1, 10, 64).0, Some(10 * 64 * 4));
    }

    #[test]
    fn the_growing_override_is_named() {
        let base: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"ffn_dim": 100, "num_layers": 30}"#).unwrap();
        let o = serde_json::from_str(r#"{"ffn_dim": 100000000000, "num_layers": 2}"#).unwrap();
        assert_eq!(weights_knob(&base, &o), "model.overrides.ffn_dim");
        let o = serde_json::from_str(r#"{"num_layers": 2}"#).unwrap();
        assert_eq!(weights_knob(&base, &o), "model.preset");
    }
}
