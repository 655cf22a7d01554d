//! LoRA adapters as people download them, merged into a model's weights (`[[model.lora]]`, see the
//! contract's "LoRA" section). A file's layout is detected from its keys:
//!
//! - diffusers / PEFT: `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight` (and
//!   `.lora_B.bias`), alpha from the header's `lora_adapter_metadata` (`lora_alpha`, per-module
//!   `alpha_pattern`, `use_rslora`), else the rank;
//! - original names (`diffusion_model.<module>`: original Wan, ComfyUI, ai-toolkit, lightx2v's
//!   distillation files with their `.diff` / `.diff_b` full deltas, FLUX's BFL names):
//!   `.lora_down.weight` / `.lora_up.weight` (or `.lora_A` / `.lora_B`), `.alpha`;
//! - `lora_unet_<module with "_" for ".">` (musubi-tuner for Wan, kohya sd-scripts for FLUX).
//!
//! Each module adds `scale * alpha / r * up @ down` to its weight, `scale * diff_b` to its bias and
//! `scale * diff` to its weight, through [`WeightStore::add_delta`]: the store adds them when a
//! tensor is handed out (at load for a held model, as each block is read for a streamed one). The
//! family maps original names to its diffusers modules ([`LoraNames`]), fused modules split by rows.
//! A key that matches no weight, an unknown suffix, a half pair or a file mixing layouts is an error
//! naming the file and the key: diffusers only warns about unmatched keys and drops some without a
//! word, and a half-applied adapter is worse than a refusal.

use crate::weights::{Delta, WeightStore};
use candle_core::{DType, Device, Tensor};
use magcache_core::runtime::config::LoraTable;
use magcache_core::{Error, Result};
use meta::{peft_meta, PeftMeta};
use std::collections::BTreeMap;
use std::path::Path;

mod meta;

/// How a family's original checkpoints name its modules, for adapters in those names.
pub trait LoraNames {
    /// The family, for messages.
    fn family(&self) -> &str;
    /// The words of original module names that hold a `_` (`self_attn`), to restore the dots of
    /// `lora_unet_` names.
    fn compounds(&self) -> &[&'static str];
    /// The diffusers modules an original module (dotted, without a prefix) maps to, each with the
    /// rows of the original module's output it takes, in order (empty: all of them). `None`: the
    /// family has no such module.
    fn original(&self, module: &str) -> Option<Vec<Target>>;
}

/// A diffusers module a LoRA module changes, and the `(start, len)` row ranges of the original
/// module's output it takes, in order (empty: all rows).
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub module: String,
    pub rows: Vec<(usize, usize)>,
}

impl Target {
    pub fn whole(module: impl Into<String>) -> Self {
        Target {
            module: module.into(),
            rows: Vec::new(),
        }
    }
}

/// Key layouts of adapter files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `transformer.<diffusers module>.lora_A.weight` (diffusers / PEFT).
    Diffusers,
    /// `diffusion_model.<original module>.lora_down.weight` (original Wan, ComfyUI, lightx2v, BFL).
    Original,
    /// `lora_unet_<original module, "_" for ".">.lora_down.weight` (musubi-tuner, kohya).
    Underscored,
}

/// The tensors of one module of an adapter, with the keys they came from.
#[derive(Default)]
struct Parts {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    up_bias: Option<(String, Tensor)>,
    alpha: Option<(String, f64)>,
    diff: Option<(String, Tensor)>,
    diff_b: Option<(String, Tensor)>,
}

/// An adapter file, read and grouped by module.
pub struct Adapter {
    /// The file as messages name it.
    pub file: String,
    pub layout: Layout,
    modules: BTreeMap<String, Parts>,
    meta: PeftMeta,
    /// Text-encoder keys skipped (a run applies adapters to its transformer only).
    pub skipped_text: usize,
}

const TEXT_PREFIXES: &[&str] = &[
    "lora_te_",
    "lora_te1_",
    "lora_te2_",
    "text_encoder.",
    "text_encoders.",
];

const SUFFIXES: &[&str] = &[
    ".lora_down.weight",
    ".lora_A.weight",
    ".lora_up.weight",
    ".lora_B.weight",
    ".lora_B.bias",
    ".lora_up.bias",
    ".alpha",
    ".diff_b",
    ".diff",
];

/// The largest adapter file read (64 GB): a bound on what a lying or endless file can make a run
/// read, far above any published adapter.
const MAX_ADAPTER_BYTES: u64 = 64 << 30;

impl Adapter {
    /// Reads an adapter file (safetensors, any float dtype; kept in f32 on the CPU).
    pub fn read(path: &Path) -> Result<Adapter> {
        let file = path.display().to_string();
        if let Some(why) = magcache_core::error::not_a_file(path) {
            return Err(Error::weights(&file, "(file)", why));
        }
        // An adapter is read whole (the largest published ones are a few GB).
        let bytes = magcache_core::error::read_regular(path, MAX_ADAPTER_BYTES)?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| crate::weights::safetensors_error(&file, &bytes, &e))?;
        let meta = peft_meta(&file, header.metadata().as_ref())?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
            Error::weights(&file, "(tensors)", magcache_core::error::candle_text(e))
        })?;
        let mut keys: Vec<(String, Tensor)> = tensors.into_iter().collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        let mut layout: Option<(Layout, String)> = None;
        let mut modules: BTreeMap<String, Parts> = BTreeMap::new();
        let mut skipped_text = 0;
        for (key, t) in keys {
            if TEXT_PREFIXES.iter().any(|p| key.starts_with(p)) {
                skipped_text += 1;
                continue;
            }
            let Some((this, rest)) = layout_of(&key) else {
                return Err(Error::weights(
                    &file,
                    &key,
                    "is not a LoRA key of a known layout (`transformer.` diffusers/PEFT, `diffusion_model.` original/ComfyUI/lightx2v/BFL, `lora_unet_` musubi/kohya)",
                ));
            };
            match &layout {
                None => layout = Some((this, key.clone())),
                Some((l, first)) if *l != this => {
                    return Err(Error::weights(
                        &file,
                        &key,
                        format!("mixes layouts: {this:?} here, {l:?} at `{first}`"),
                    ));
                }
                _ => {}
            }
            let Some(suffix) = SUFFIXES.iter().find(|s| rest.ends_with(*s)) else {
                return Err(Error::weights(
                    &file,
                    &key,
                    "has an unknown suffix (expected lora_down/lora_up/lora_A/lora_B .weight, .lora_B.bias, .alpha, .diff or .diff_b)",
                ));
            };
            let module = rest[..rest.len() - suffix.len()].to_string();
            let t = as_f32(t, &file, &key)?;
            check_tensor(&file, &key, suffix, &t)?;
            let parts = modules.entry(module).or_default();
            let slot = match *suffix {
                ".lora_down.weight" | ".lora_A.weight" => &mut parts.down,
                ".lora_up.weight" | ".lora_B.weight" => &mut parts.up,
                ".lora_B.bias" | ".lora_up.bias" => &mut parts.up_bias,
                ".diff" => &mut parts.diff,
                ".diff_b" => &mut parts.diff_b,
                _ => {
                    let a = t
                        .flatten_all()
                        .and_then(|a| a.to_vec1::<f32>())
                        .map_err(|e| {
                            Error::weights(&file, &key, magcache_core::error::candle_text(e))
                        })?;
                    let [a] = a.as_slice() else {
                        return Err(Error::weights(&file, &key, "an alpha must be one number"));
                    };
                    parts.alpha = Some((key.clone(), *a as f64));
                    continue;
                }
            };
            if slot.is_some() {
                return Err(Error::weights(
                    &file,
                    &key,
                    "the module has this tensor twice (two spellings of one key)",
                ));
            }
            *slot = Some((key.clone(), t));
        }
        let layout = match layout {
            Some((l, _)) => l,
            None if skipped_text > 0 => Layout::Diffusers,
            None => return Err(Error::weights(&file, "(file)", "holds no LoRA tensors")),
        };
        meta.check_modules(&file, &modules)?;
        Ok(Adapter {
            file,
            layout,
            modules,
            meta,
            skipped_text,
        })
    }

    /// Adds this adapter's deltas, times `scale`, to `store` (a transformer's diffusers-named
    /// weights); `names` maps original module names.
    pub fn apply(&self, store: &mut WeightStore, scale: f64, names: &dyn LoraNames) -> Result<()> {
        let file = self.file.as_str();
        for (module, parts) in &self.modules {
            let targets = self.targets(module, parts, names)?;
            match (&parts.down, &parts.up) {
                (Some((dk, down)), Some((uk, up))) => {
                    let r = down.dim(0)?;
                    if up.rank() != 2 || down.rank() != 2 || up.dim(1)? != r {
                        return Err(Error::weights(
                            file,
                            uk,
                            format!(
                                "has shape {:?}; its down matrix `{dk}` has shape {:?} (up [out, r] @ down [r, in])",
                                up.dims(),
                                down.dims()
                            ),
                        ));
                    }
                    let factor = self.factor(module, parts, scale, (dk, uk))?;
                    for t in &targets {
                        let up = rows_of(up, &t.rows, file, uk)?;
                        store.add_delta(
                            &format!("{}.weight", t.module),
                            Delta::LowRank {
                                up,
                                down: down.clone(),
                                factor,
                            },
                            (file, uk),
                        )?;
                    }
                    if let Some((bk, b)) = &parts.up_bias {
                        for t in &targets {
                            let b = rows_of(b, &t.rows, file, bk)?;
                            store.add_delta(
                                &format!("{}.bias", t.module),
                                Delta::Full { t: b, factor },
                                (file, bk),
                            )?;
                        }
                    }
                }
                (Some((k, _)), None) => {
                    return Err(Error::weights(
                        file,
                        k,
                        "a down (A) matrix without its up (B) matrix",
                    ))
                }
                (None, Some((k, _))) => {
                    return Err(Error::weights(
                        file,
                        k,
                        "an up (B) matrix without its down (A) matrix",
                    ))
                }
                (None, None) => {
                    if let Some((k, _)) = parts.alpha.as_ref().or(None) {
                        if parts.diff.is_none() && parts.diff_b.is_none() {
                            return Err(Error::weights(
                                file,
                                k,
                                "an alpha without its lora_down/lora_up pair",
                            ));
                        }
                    }
                    if let Some((k, _)) = &parts.up_bias {
                        return Err(Error::weights(
                            file,
                            k,
                            "a lora_B bias without its lora_A/lora_B pair",
                        ));
                    }
                }
            }
            for (slot, suffix) in [(&parts.diff, "weight"), (&parts.diff_b, "bias")] {
                if let Some((k, d)) = slot {
                    for t in &targets {
                        let d = rows_of(d, &t.rows, file, k)?;
                        store.add_delta(
                            &format!("{}.{suffix}", t.module),
                            Delta::Full {
                                t: d,
                                factor: scale,
                            },
                            (file, k),
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The store modules (and row ranges) an adapter module merges into, by its layout; one that
    /// matches nothing is an error naming its first key.
    fn targets(&self, module: &str, parts: &Parts, names: &dyn LoraNames) -> Result<Vec<Target>> {
        let file = self.file.as_str();
        let first_key = [
            &parts.down,
            &parts.up,
            &parts.diff,
            &parts.diff_b,
            &parts.up_bias,
        ]
        .into_iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .next()
        .or_else(|| parts.alpha.as_ref().map(|(k, _)| k.clone()))
        .unwrap_or_else(|| module.to_string());
        Ok(match self.layout {
            Layout::Diffusers => vec![Target::whole(module)],
            Layout::Original => names.original(module).ok_or_else(|| {
                Error::weights(
                    file,
                    &first_key,
                    format!("matches no module of {}", names.family()),
                )
            })?,
            Layout::Underscored => {
                let dotted = restore_dots(module, names.compounds());
                names.original(&dotted).ok_or_else(|| {
                    Error::weights(
                        file,
                        &first_key,
                        format!(
                            "matches no module of {} (read as `{dotted}`)",
                            names.family()
                        ),
                    )
                })?
            }
        })
    }

    /// `alpha / r` of a module (`alpha / sqrt(r)` under rsLoRA): its `.alpha`, else the metadata's
    /// per-module or global `lora_alpha`, else `r` (a factor of 1).
    /// The merge factor of a low-rank pair (keys `dk` and `uk`): `scale` x alpha / rank; a rank of
    /// 0 or a factor beyond f32 is an error naming the key.
    fn factor(&self, module: &str, parts: &Parts, scale: f64, keys: (&str, &str)) -> Result<f64> {
        let (file, (dk, uk)) = (self.file.as_str(), keys);
        let r = parts.down.as_ref().map_or(Ok(0), |(_, d)| d.dim(0))?;
        if r == 0 {
            let why = "has rank 0 (no rows): an empty adapter factor";
            return Err(Error::weights(file, dk, why));
        }
        let factor = scale * self.alpha_over_rank(module, parts, r);
        if !factor.is_finite() || factor.abs() > f32::MAX as f64 {
            return Err(Error::weights(
                file,
                uk,
                format!("its merge factor (scale {scale} x alpha / rank) is {factor}, beyond f32: check `scale` in [[model.lora]] and the file's alpha"),
            ));
        }
        Ok(factor)
    }

    fn alpha_over_rank(&self, module: &str, parts: &Parts, r: usize) -> f64 {
        let alpha = parts
            .alpha
            .as_ref()
            .map(|(_, a)| *a)
            .or_else(|| {
                self.meta
                    .alpha_pattern
                    .iter()
                    .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
                    .map(|(_, a)| *a)
            })
            .or(self.meta.alpha);
        match alpha {
            None => 1.0,
            Some(a) if self.meta.rslora => a / (r as f64).sqrt(),
            Some(a) => a / r as f64,
        }
    }
}

/// A key's layout, told by its prefix, and the rest of the key.
fn layout_of(key: &str) -> Option<(Layout, &str)> {
    [
        ("transformer.", Layout::Diffusers),
        ("diffusion_model.", Layout::Original),
        ("lora_unet_", Layout::Underscored),
    ]
    .into_iter()
    .find_map(|(p, l)| key.strip_prefix(p).map(|r| (l, r)))
}

/// An adapter tensor in f32: floating-point values only (an integer tensor is an error naming the
/// key, not a silent cast).
fn as_f32(t: Tensor, file: &str, key: &str) -> Result<Tensor> {
    if !matches!(
        t.dtype(),
        DType::F32 | DType::F16 | DType::BF16 | DType::F64
    ) {
        let why = format!(
            "has dtype {:?}; adapter tensors are f32, f16 or bf16",
            t.dtype()
        );
        return Err(Error::weights(file, key, why));
    }
    t.to_dtype(DType::F32)
        .map_err(|e| Error::weights(file, key, magcache_core::error::candle_text(e)))
}

/// The rows `ranges` of `t` (all of it for none), concatenated.
fn rows_of(t: &Tensor, ranges: &[(usize, usize)], file: &str, key: &str) -> Result<Tensor> {
    if ranges.is_empty() {
        return Ok(t.clone());
    }
    let rows = t.dim(0)?;
    let need: usize = ranges.iter().map(|(s, l)| s + l).max().unwrap_or(0);
    if need > rows {
        return Err(Error::weights(
            file,
            key,
            format!("has {rows} rows; the fused module it splits into needs {need}"),
        ));
    }
    let parts: Vec<Tensor> = ranges
        .iter()
        .map(|(s, l)| t.narrow(0, *s, *l))
        .collect::<candle_core::Result<_>>()?;
    Ok(Tensor::cat(&parts, 0)?.contiguous()?)
}

/// `blocks_0_cross_attn_k` -> `blocks.0.cross_attn.k`: every `_` a dot, then the family's compound
/// words (longest first) joined again.
pub fn restore_dots(name: &str, compounds: &[&str]) -> String {
    let mut s = name.replace('_', ".");
    let mut cs: Vec<&str> = compounds.to_vec();
    cs.sort_by_key(|c| std::cmp::Reverse(c.len()));
    for c in cs {
        let dotted = c.replace('_', ".");
        s = s.replace(&dotted, c);
    }
    s
}

/// A tensor of an adapter file: finite (a non-finite value would surface as a NaN blamed on the
/// base checkpoint) and of a rank its role allows (a 0-d `lora_A` failed later with no file named).
fn check_tensor(file: &str, key: &str, suffix: &str, t: &Tensor) -> Result<()> {
    if !magcache_core::finite::all_finite(t)? {
        return Err(Error::weights(
            file,
            key,
            format!(
                "holds non-finite values ({})",
                magcache_core::finite::describe_non_finite(t)?
            ),
        ));
    }
    let min_rank = match suffix {
        ".lora_down.weight" | ".lora_A.weight" | ".lora_up.weight" | ".lora_B.weight" => 2,
        ".alpha" => 0,
        _ => 1,
    };
    if t.rank() < min_rank {
        return Err(Error::weights(
            file,
            key,
            format!(
                "has shape {:?}; a LoRA {} has at least {min_rank} dimensions",
                t.dims(),
                suffix.trim_start_matches('.')
            ),
        ));
    }
    Ok(())
}

/// The `[[model.lora]]` tables of the model `expert` of a run with `experts` transformer models
/// (`family` for messages): on two experts every table names its expert (`high_noise` is expert 0),
/// elsewhere none may. Errors name the run file and the table.
pub fn tables_for<'a>(
    tables: &'a [LoraTable],
    file: &str,
    family: &str,
    experts: usize,
    expert: usize,
) -> Result<Vec<&'a LoraTable>> {
    let mut out = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        let key = format!("model.lora[{i}].expert");
        match (&t.expert, experts) {
            (None, 2) => {
                return Err(Error::config(
                    file,
                    key,
                    format!("{family} has two experts: say which one `{}` applies to (\"high_noise\" or \"low_noise\"; the same file for both is two tables)", t.path),
                ))
            }
            (Some(e), n) if n < 2 => {
                return Err(Error::config(
                    file,
                    key,
                    format!("{family} runs one model: `expert = \"{e}\"` cannot apply"),
                ))
            }
            (Some(e), _) => {
                let idx = if e == "high_noise" { 0 } else { 1 };
                if idx == expert {
                    out.push(t);
                }
            }
            (None, _) => out.push(t),
        }
    }
    Ok(out)
}

/// Reads `tables`' files (relative paths against `base`) and adds their deltas to `store`; returns
/// the warnings (text-encoder keys skipped).
pub fn apply_tables(
    store: &mut WeightStore,
    tables: &[&LoraTable],
    base: &Path,
    names: &dyn LoraNames,
) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    for t in tables {
        let path = crate::config_util::resolve(base, &t.path);
        let a = Adapter::read(&path)?;
        if a.skipped_text > 0 {
            warnings.push(format!(
                "{}: {} text-encoder LoRA key(s) skipped (adapters apply to the transformer)",
                a.file, a.skipped_text
            ));
        }
        a.apply(store, t.scale, names)?;
    }
    Ok(warnings)
}

/// `g` with `tables`' deltas added to every tensor it generates (`magcache export` of a preset run
/// with adapters: the merged model). The adapters are checked against `g`'s names and shapes first.
pub fn merged(
    g: magcache_core::GeneratedWeights,
    tables: &[&LoraTable],
    base: &Path,
    names: &dyn LoraNames,
) -> Result<magcache_core::GeneratedWeights> {
    if tables.is_empty() {
        return Ok(g);
    }
    // A store of zero-stride tensors of `g`'s shapes: it holds nothing but checks the adapters.
    let zero = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    let mut shapes = std::collections::HashMap::new();
    for (n, s, _) in &g.tensors {
        shapes.insert(n.clone(), zero.broadcast_as(s.as_slice())?);
    }
    let mut store = WeightStore::from_map("(export)", shapes);
    apply_tables(&mut store, tables, base, names)?;
    let generate = g.generate;
    Ok(magcache_core::GeneratedWeights {
        generate: Box::new(move |name, shape| {
            let t = generate(name, shape)?;
            match store.delta(name)? {
                None => Ok(t),
                Some(d) => Ok((t.to_dtype(DType::F32)? + d)?.to_dtype(t.dtype())?),
            }
        }),
        ..g
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn underscored_names_get_their_dots_back() {
        let c = ["self_attn", "cross_attn", "norm_k", "norm_k_img", "k_img"];
        assert_eq!(
            restore_dots("blocks_12_cross_attn_k", &c),
            "blocks.12.cross_attn.k"
        );
        assert_eq!(
            restore_dots("blocks_0_self_attn_norm_k_img", &c),
            "blocks.0.self_attn.norm_k_img"
        );
        assert_eq!(restore_dots("blocks_3_ffn_0", &c), "blocks.3.ffn.0");
    }
}
