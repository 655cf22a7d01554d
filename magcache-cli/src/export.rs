//! `magcache export`: a preset's seeded random weights written as a checkpoint folder in the
//! diffusers layout (`config.json`, `diffusion_pytorch_model*.safetensors`, sharded with an index
//! past the shard size), for runs that load real files: `offload = "stream"` needs a checkpoint, and
//! memory and loading figures at real sizes need one that no hub has to provide.
//!
//! Tensors are generated one at a time as they are written (a 14B preset is 28 GB in bf16, more than
//! this machine's memory). The folder is written beside its target under a temporary name and
//! renamed into place when complete: it appears whole or not at all, and an existing one is never
//! touched.

use crate::prepare::link_strategies;
use candle_core::DType;
use magcache_core::runtime::guard::{self, Footprint};
use magcache_core::runtime::registry;
use magcache_core::{Error, GeneratedWeights, Result, RunConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

mod disk;
use disk::check_disk;

/// What an export wrote.
#[derive(Debug, serde::Serialize)]
pub struct ExportReport {
    pub out: PathBuf,
    /// Per transformer folder: (folder, shard files, bytes).
    pub folders: Vec<(String, usize, u64)>,
    pub tensors: usize,
    pub bytes: u64,
}

/// Writes the transformers of the preset run `config` into the new folder `out`; shards hold at
/// most `shard_bytes` of tensor data (a larger tensor gets a shard of its own). `progress` gets a
/// line per shard written.
pub fn export(
    config: &Path,
    out: &Path,
    shard_bytes: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<ExportReport> {
    export_as(config, out, &Format::Safetensors { shard_bytes }, progress)
}

/// What an export writes.
#[derive(Clone, Debug)]
pub enum Format {
    /// A diffusers folder: `config.json` and safetensors shards of at most `shard_bytes`.
    Safetensors { shard_bytes: u64 },
    /// The transformer(s) under `transformer/` and the family's other released parts beside them
    /// (Wan text-to-video: the UMT5-XXL `text_encoder/` and the `vae/`), safetensors shards of at
    /// most `shard_bytes`: a pipeline folder at the released sizes with random weights, less the
    /// tokenizer and scheduler files (`scripts/real-size-pipeline.sh` adds them).
    Pipeline { shard_bytes: u64 },
    /// One GGUF file per transformer (`diffusion_pytorch_model-Q8_0.gguf`), matrices in `quant`
    /// (`q8_0`, `q4_k`, ...) by city96's rules, diffusers tensor names, the transformer's
    /// `config.json` as metadata `magcache.config` (which the loader reads instead of inferring
    /// the config from the shapes).
    Gguf { quant: String },
}

/// [`export`] in any [`Format`].
pub fn export_as(
    config: &Path,
    out: &Path,
    format: &Format,
    progress: &mut dyn FnMut(&str),
) -> Result<ExportReport> {
    link_strategies();
    let mut cfg = RunConfig::load(config)?;
    let file = config.display().to_string();
    if let Format::Pipeline { .. } = format {
        // A `[prompt]` table is what tells an exporter to write the pipeline's other parts (a run
        // file with one needs a folder as `weights`, so the request comes as this format).
        cfg.prompt
            .get_or_insert(magcache_core::runtime::config::PromptSection {
                text: String::new(),
                negative: None,
                max_sequence_length: None,
            });
    }
    if cfg.model.weights.is_some() {
        return Err(Error::config(
            &file,
            "model.weights",
            "export writes a preset's generated weights; this run loads a checkpoint (give `preset` instead)",
        ));
    }
    let fam = crate::prepare::family_of(&cfg, &file)?;
    let exporter = registry::exporters()
        .into_iter()
        .find(|e| e.family == fam.name)
        .ok_or_else(|| {
            Error::config(
                &file,
                "model.family",
                format!("family `{}` has no preset export", fam.name),
            )
        })?;
    let shown = out.display().to_string();
    if out.exists() || out.is_symlink() {
        return Err(Error::io(
            &shown,
            "already exists; export writes a new folder and never replaces one",
        ));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::io(&shown, "its parent folder does not exist"));
    }
    if out.file_name().is_none() {
        return Err(Error::io(&shown, "names no folder"));
    }
    // Every check before the temporary folder exists: a refused export leaves nothing behind.
    let gguf = gguf_format(format, exporter, fam.name)?;
    let models = (exporter.export)(&cfg, &file, &crate::prepare::base_dir(config))?;
    check_sizes(&cfg, &file, &models)?;
    if !matches!(format, Format::Gguf { .. }) {
        check_disk(&parent, &models, &shown)?;
    }
    // Partial folders of exports that were killed (SIGKILL) go, as runs' temporaries do.
    crate::temps::clean_stale(&parent, &|_| false);
    let tmp = crate::temps::temp_name(&parent, "partial");
    std::fs::create_dir(&tmp).map_err(|e| Error::io(tmp.display().to_string(), e))?;
    crate::temps::register(&tmp);
    let written = match format {
        Format::Safetensors { shard_bytes } | Format::Pipeline { shard_bytes } => {
            write_all(&tmp, &models, *shard_bytes, progress)
        }
        Format::Gguf { .. } => match gguf {
            Some((arch, q)) => write_gguf_all(&tmp, &models, arch, q, progress),
            None => Err(Error::msg("internal: a GGUF export without its type")),
        },
    };
    let result = written.and_then(|r| put_in_place(&tmp, out).map(|()| r));
    crate::temps::unregister(&tmp);
    match result {
        Ok((folders, tensors, bytes)) => Ok(ExportReport {
            out: out.to_path_buf(),
            folders,
            tensors,
            bytes,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Renames the written folder `tmp` to `out`, which must not exist, under the cleanup lock: a
/// signal's handler either removed the temporary first (and exits holding the lock) or finds the
/// folder in place and says so.
fn put_in_place(tmp: &Path, out: &Path) -> Result<()> {
    let mut state = crate::temps::cleanup_state();
    rename_new(tmp, out).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::DirectoryNotEmpty => Error::io(
            out.display().to_string(),
            "appeared while exporting; export never replaces a folder (the export is discarded)",
        ),
        _ => Error::io(out.display().to_string(), e),
    })?;
    state.temps.retain(|t| t != tmp);
    state.committed = true;
    Ok(())
}

/// The GGUF architecture and type of a `--gguf` export (`None` for other formats), or why not.
fn gguf_format(
    format: &Format,
    exporter: &magcache_core::PresetExport,
    family: &str,
) -> Result<Option<(&'static str, candle_core::quantized::GgmlDType)>> {
    let Format::Gguf { quant } = format else {
        return Ok(None);
    };
    let arch = exporter
        .gguf
        .ok_or_else(|| Error::msg(format!("--gguf: family `{family}` has no GGUF export")))?;
    let q = magcache_layers::weights::gguf::quant_type(quant).ok_or_else(|| {
        Error::msg(format!(
            "--gguf {quant}: not a type this runner writes (q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k)"
        ))
    })?;
    Ok(Some((arch, q)))
}

type Written = (Vec<(String, usize, u64)>, usize, u64);

/// The folder a transformer goes to (`root`, or its sub-folder), created. `root` itself is never
/// created: when a signal's handler has removed it, writing stops with an error instead of
/// leaving a new partial folder.
fn model_dir(root: &Path, m: &GeneratedWeights) -> Result<PathBuf> {
    let mut dir = root.to_path_buf();
    for part in Path::new(&m.folder).components() {
        dir.push(part);
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(Error::io(dir.display().to_string(), e))
            }
            _ => {}
        }
    }
    Ok(dir)
}

/// One GGUF file per transformer folder.
fn write_gguf_all(
    root: &Path,
    models: &[GeneratedWeights],
    arch: &str,
    quant: candle_core::quantized::GgmlDType,
    progress: &mut dyn FnMut(&str),
) -> Result<Written> {
    let mut folders = Vec::new();
    let (mut tensors, mut bytes) = (0, 0u64);
    for m in models {
        let dir = model_dir(root, m)?;
        let name = magcache_layers::weights::gguf::quant_name(quant);
        let path = dir.join(format!("diffusion_pytorch_model-{name}.gguf"));
        let list: Vec<(String, Vec<usize>)> = m
            .tensors
            .iter()
            .map(|(n, s, _)| (n.clone(), s.clone()))
            .collect();
        let config = serde_json::Value::Object(m.config.clone()).to_string();
        let n = magcache_layers::weights::gguf::write_gguf(
            &path,
            arch,
            Some(&config),
            &list,
            quant,
            &|name, shape| (m.generate)(name, shape),
            progress,
        )?;
        // Said once the file is written (an export that fails says only why).
        let block = quant.block_size();
        if !m
            .tensors
            .iter()
            .any(|(_, s, _)| matches!(s.as_slice(), [_, c] if c % block == 0))
        {
            eprintln!(
                "warning: {}: no matrix of this model has rows of whole {name} blocks ({block} values): every matrix is written F16",
                path.file_name().map(|f| f.to_string_lossy()).unwrap_or_default()
            );
        }
        folders.push((m.folder.clone(), 1, n));
        tensors += list.len();
        bytes += n;
    }
    Ok((folders, tensors, bytes))
}

fn write_all(
    root: &Path,
    models: &[GeneratedWeights],
    shard_bytes: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<Written> {
    let mut folders = Vec::new();
    let (mut tensors, mut bytes) = (0, 0u64);
    for m in models {
        let dir = model_dir(root, m)?;
        let cfg_path = dir.join("config.json");
        write_json(&cfg_path, &m.config)?;
        // Shards in writing order, each at most `shard_bytes` (a larger tensor alone).
        let shards = shard_plan(m, shard_bytes);
        let count = shards.len();
        // transformers' components of a pipeline folder (text and image encoders) are named
        // `model*.safetensors`, diffusers' `diffusion_pytorch_model*.safetensors`.
        let stem = if m.folder.starts_with("text_encoder") || m.folder.starts_with("image_encoder")
        {
            "model"
        } else {
            "diffusion_pytorch_model"
        };
        let file_name = |k: usize| {
            if count == 1 {
                format!("{stem}.safetensors")
            } else {
                format!("{stem}-{:05}-of-{count:05}.safetensors", k + 1)
            }
        };
        let mut weight_map = BTreeMap::new();
        let mut folder_bytes = 0u64;
        for (k, shard) in shards.iter().enumerate() {
            let path = dir.join(file_name(k));
            let failed: Mutex<Option<Error>> = Mutex::new(None);
            let views: Vec<(String, Lazy)> = shard
                .iter()
                .map(|&i| {
                    let (n, shape, dtype) = &m.tensors[i];
                    (
                        n.clone(),
                        Lazy {
                            model: m,
                            name: n,
                            shape,
                            dtype: *dtype,
                            failed: &failed,
                        },
                    )
                })
                .collect();
            let shown = path.display().to_string();
            safetensors::tensor::serialize_to_file(views, None, &path)
                .map_err(|e| Error::io(&shown, e))?;
            // safetensors writes through a private (0600) temporary file; give the shard the
            // permissions the umask gave config.json, like every other file we write.
            let perms = std::fs::metadata(&cfg_path)
                .map_err(|e| Error::io(cfg_path.display().to_string(), e))?
                .permissions();
            std::fs::set_permissions(&path, perms).map_err(|e| Error::io(&shown, e))?;
            if let Some(e) = failed.lock().ok().and_then(|mut f| f.take()) {
                return Err(e);
            }
            let shard_bytes: u64 = shard
                .iter()
                .map(|&i| size(&m.tensors[i].1, m.tensors[i].2))
                .sum();
            folder_bytes += shard_bytes;
            for &i in shard {
                weight_map.insert(m.tensors[i].0.clone(), file_name(k));
            }
            let label = if m.folder.is_empty() {
                file_name(k)
            } else {
                format!("{}/{}", m.folder, file_name(k))
            };
            progress(&format!(
                "wrote {label} ({} tensors, {:.2} GB)",
                shard.len(),
                shard_bytes as f64 / 1e9
            ));
        }
        if count > 1 {
            let index = serde_json::json!({
                "metadata": { "total_size": folder_bytes },
                "weight_map": weight_map,
            });
            write_json(&dir.join(format!("{stem}.safetensors.index.json")), &index)?;
        }
        tensors += m.tensors.len();
        bytes += folder_bytes;
        folders.push((m.folder.clone(), count, folder_bytes));
    }
    Ok((folders, tensors, bytes))
}

/// The tensors of `m` (indices, in writing order) grouped into shards of at most `shard_bytes`
/// (a larger tensor alone).
fn shard_plan(m: &GeneratedWeights, shard_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut filled = 0u64;
    for (i, (_, shape, dtype)) in m.tensors.iter().enumerate() {
        let n = size(shape, *dtype);
        if !cur.is_empty() && filled + n > shard_bytes {
            shards.push(std::mem::take(&mut cur));
            filled = 0;
        }
        cur.push(i);
        filled += n;
    }
    shards.push(cur);
    shards
}

/// Writes `v` as pretty JSON with a final newline.
fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::msg(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path.display().to_string(), e))
}

/// Bytes of a tensor; `None` past `u64`.
fn nbytes(shape: &[usize], dtype: DType) -> Option<u64> {
    guard::product(shape)?.checked_mul(dtype.size_in_bytes() as u64)
}

/// Bytes of a tensor that [`check_sizes`] accepted.
fn size(shape: &[usize], dtype: DType) -> u64 {
    nbytes(shape, dtype).unwrap_or(u64::MAX)
}

/// Every tensor's size is computed, checked, before anything is generated, and the largest one
/// must fit in memory while it is written (generated in f32, converted, serialized): a size from
/// `[model.overrides]` past any memory is a one-line error, not a wrapped size or an abort.
fn check_sizes(cfg: &RunConfig, file: &str, models: &[GeneratedWeights]) -> Result<()> {
    let knob = if cfg.model.overrides.as_ref().is_some_and(|t| !t.is_empty()) {
        "model.overrides"
    } else {
        "model.preset"
    };
    let mut largest: Option<(&str, &[usize], u64)> = None;
    for m in models {
        for (name, shape, dtype) in &m.tensors {
            let b = nbytes(shape, *dtype).ok_or_else(|| {
                Error::config(
                    file,
                    knob,
                    format!("tensor `{name}` of shape {shape:?} is larger than any memory"),
                )
            })?;
            if largest.is_none_or(|(_, _, l)| b > l) {
                largest = Some((name, shape, b));
            }
        }
    }
    let Some((name, shape, b)) = largest else {
        return Ok(());
    };
    let f32_bytes = guard::product(shape).and_then(|n| n.checked_mul(4));
    let mut fp = Footprint::default();
    fp.add(
        format!("largest tensor `{name}` while written (f32, converted, serialized)"),
        knob,
        guard::sum(&[f32_bytes, Some(b), Some(b)]),
    );
    fp.check(file)
}

/// One tensor, generated when the writer asks for its bytes. `View::data` cannot fail, so a
/// failure is kept in `failed` (the export then fails) and empty bytes are handed back.
struct Lazy<'a> {
    model: &'a GeneratedWeights,
    name: &'a str,
    shape: &'a [usize],
    dtype: DType,
    failed: &'a Mutex<Option<Error>>,
}

impl safetensors::View for Lazy<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self.dtype {
            DType::BF16 => safetensors::Dtype::BF16,
            DType::F16 => safetensors::Dtype::F16,
            _ => safetensors::Dtype::F32,
        }
    }

    fn shape(&self) -> &[usize] {
        self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let made = (self.model.generate)(self.name, self.shape).and_then(|t| {
            let t = t.to_dtype(self.dtype)?;
            // Checked in the written dtype: a value past f16's range becomes `inf` there. A
            // non-finite weight is refused, naming the tensor (`run` would refuse the file).
            if !magcache_core::finite::all_finite(&t)? {
                return Err(Error::msg(format!(
                    "export: tensor `{}` holds non-finite values in {:?} ({}); nothing written",
                    self.name,
                    self.dtype,
                    magcache_core::finite::describe_non_finite(&t)?
                )));
            }
            if t.dims() != self.shape {
                return Err(Error::msg(format!(
                    "export: `{}` generated with shape {:?}, declared {:?}",
                    self.name,
                    t.dims(),
                    self.shape
                )));
            }
            Ok(safetensors::View::data(&t).into_owned())
        });
        match made {
            Ok(b) => std::borrow::Cow::Owned(b),
            Err(e) => {
                if let Ok(mut f) = self.failed.lock() {
                    f.get_or_insert(e);
                }
                std::borrow::Cow::Owned(Vec::new())
            }
        }
    }

    fn data_len(&self) -> usize {
        size(self.shape, self.dtype) as usize
    }
}

/// Renames the finished folder into place, failing when `to` exists: a plain rename would replace
/// an empty folder created there meanwhile.
#[cfg(target_os = "linux")]
fn rename_new(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call; no other memory is touched.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // A filesystem (or kernel) without RENAME_NOREPLACE: check, then rename.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => rename_checked(from, to),
        _ => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn rename_new(from: &Path, to: &Path) -> std::io::Result<()> {
    rename_checked(from, to)
}

/// Refuses an existing `to`, then renames (a folder created between the two is still replaced
/// when empty; only where the atomic form is missing).
fn rename_checked(from: &Path, to: &Path) -> std::io::Result<()> {
    if to.exists() || to.is_symlink() {
        return Err(std::io::ErrorKind::AlreadyExists.into());
    }
    std::fs::rename(from, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finished_folder_never_replaces_one_that_appeared_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join(".new.partial"), dir.path().join("new"));
        std::fs::create_dir(&from).unwrap();
        std::fs::write(from.join("config.json"), "{}").unwrap();
        // An empty folder, which a plain rename would replace.
        std::fs::create_dir(&to).unwrap();
        let e = rename_new(&from, &to).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::DirectoryNotEmpty
            ),
            "{e}"
        );
        assert!(from.join("config.json").is_file());
        assert_eq!(std::fs::read_dir(&to).unwrap().count(), 0);
        std::fs::remove_dir(&to).unwrap();
        rename_new(&from, &to).unwrap();
        assert!(to.join("config.json").is_file() && !from.exists());
    }

    #[test]
    fn tensor_sizes_past_u64_are_none() {
        assert_eq!(nbytes(&[2, 3], DType::BF16), Some(12));
        assert_eq!(nbytes(&[usize::MAX, 4], DType::F32), None);
        assert_eq!(nbytes(&[1 << 62], DType::F32), None);
    }
}
