//! `magcache export`: a preset's seeded random weights written as a checkpoint folder in the
//! diffusers layout (`config.json`, `diffusion_pytorch_model*.safetensors`, sharded with an index
//! past the shard size), for runs that load real files: `offload = "stream"` needs a checkpoint, and
//! memory and loading figures at real sizes need one that no hub has to provide.
//!
//! Tensors are generated one at a time as they are written (a 14B preset is 28 GB in bf16, more than
//! this machine's memory). The folder is written beside its target under a temporary name and
//! renamed into place when complete: it appears whole or not at all, and an existing one is never
//! touched.

use crate::prepare::link_all;
use candle_core::DType;
use magcache_core::{registry, Error, GeneratedWeights, Result, RunConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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
    link_all();
    let cfg = RunConfig::load(config)?;
    let file = config.display().to_string();
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
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .ok_or_else(|| Error::io(&shown, "names no folder"))?;
    let models = (exporter.export)(&cfg, &file)?;
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    std::fs::create_dir(&tmp).map_err(|e| Error::io(tmp.display().to_string(), e))?;
    crate::output::register(&tmp);
    let result = write_all(&tmp, &models, shard_bytes, progress).and_then(|r| {
        std::fs::rename(&tmp, out).map_err(|e| Error::io(&shown, e))?;
        Ok(r)
    });
    crate::output::unregister(&tmp);
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

type Written = (Vec<(String, usize, u64)>, usize, u64);

fn write_all(
    root: &Path,
    models: &[GeneratedWeights],
    shard_bytes: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<Written> {
    let mut folders = Vec::new();
    let (mut tensors, mut bytes) = (0, 0u64);
    for m in models {
        let dir = if m.folder.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&m.folder)
        };
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
        let cfg_path = dir.join("config.json");
        let text =
            serde_json::to_string_pretty(&m.config).map_err(|e| Error::msg(e.to_string()))?;
        std::fs::write(&cfg_path, text + "\n")
            .map_err(|e| Error::io(cfg_path.display().to_string(), e))?;
        // Shards in writing order, each at most `shard_bytes` (a larger tensor alone).
        let mut shards: Vec<Vec<usize>> = Vec::new();
        let mut cur: Vec<usize> = Vec::new();
        let mut filled = 0u64;
        for (i, (_, shape, dtype)) in m.tensors.iter().enumerate() {
            let n = nbytes(shape, *dtype);
            if !cur.is_empty() && filled + n > shard_bytes {
                shards.push(std::mem::take(&mut cur));
                filled = 0;
            }
            cur.push(i);
            filled += n;
        }
        shards.push(cur);
        let count = shards.len();
        let file_name = |k: usize| {
            if count == 1 {
                "diffusion_pytorch_model.safetensors".to_string()
            } else {
                format!(
                    "diffusion_pytorch_model-{:05}-of-{count:05}.safetensors",
                    k + 1
                )
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
                .map_err(|e| Error::io(&shown, format!("{e:?}")))?;
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
                .map(|&i| nbytes(&m.tensors[i].1, m.tensors[i].2))
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
            let path = dir.join("diffusion_pytorch_model.safetensors.index.json");
            let text =
                serde_json::to_string_pretty(&index).map_err(|e| Error::msg(e.to_string()))?;
            std::fs::write(&path, text + "\n")
                .map_err(|e| Error::io(path.display().to_string(), e))?;
        }
        tensors += m.tensors.len();
        bytes += folder_bytes;
        folders.push((m.folder.clone(), count, folder_bytes));
    }
    Ok((folders, tensors, bytes))
}

fn nbytes(shape: &[usize], dtype: DType) -> u64 {
    shape.iter().map(|&d| d as u64).product::<u64>() * dtype.size_in_bytes() as u64
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
        nbytes(self.shape, self.dtype) as usize
    }
}
