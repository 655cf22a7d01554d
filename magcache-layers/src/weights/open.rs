//! Opening a checkpoint's files into a [`WeightStore`].

use super::*;

impl WeightStore {
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
            let file = std::fs::File::open(f).map_err(|e| Error::io(&name, e))?;
            let len = file.metadata().map_err(|e| Error::io(&name, e))?.len();
            magcache_core::files::record_read(f);
            // SAFETY: the mapping is read-only and only its header is read, right now (the tensors
            // are read later with `pread`, see `read_range`); it is dropped at the end of this
            // iteration.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&name, e))?;
            let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap)
                .map_err(|e| super::safetensors_error(&name, &mmap, &e))?;
            let data_start = 8 + n;
            let mut entries: Vec<(String, safetensors::tensor::TensorInfo)> = meta
                .tensors()
                .into_iter()
                .map(|(k, i)| (k, i.clone()))
                .collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let map = store.handles.len();
            for (k, info) in entries {
                use safetensors::Dtype as S;
                let dtype = match info.dtype {
                    S::F32 => DType::F32,
                    S::F16 => DType::F16,
                    S::BF16 => DType::BF16,
                    // Integer `position_ids` buffers (older transformers CLIP checkpoints store
                    // `text_model.embeddings.position_ids`) are not weights: positions are 0..L.
                    S::I64 | S::U32 | S::U8 if k.ends_with("position_ids") => continue,
                    // A batch norm's training counter (FLUX.2's VAE `bn.num_batches_tracked`).
                    S::I64 if k.ends_with("num_batches_tracked") => continue,
                    other => {
                        return Err(Error::weights(
                            &name,
                            &k,
                            format!("has dtype {other:?}; weights must be f32, f16 or bf16"),
                        ))
                    }
                };
                if let Some((_, other)) = store.tensors.get(&k) {
                    let other = store.files.get(*other).cloned().unwrap_or_default();
                    return Err(Error::weights(
                        &name,
                        &k,
                        format!("is also in {other}: two shards hold the same tensor and neither can be chosen (remove one, or give an index *.safetensors.index.json)"),
                    ));
                }
                let (a, b) = info.data_offsets;
                let entry = Entry::Mapped {
                    map,
                    dtype,
                    shape: info.shape,
                    start: data_start + a,
                    end: data_start + b,
                };
                store.tensors.insert(k, (entry, fi));
            }
            drop(mmap);
            store.handles.push(Arc::new((file, len)));
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
            store.rename(|k| k.strip_prefix(PREFIX).unwrap_or(k).to_string())?;
        }
        Ok(store)
    }
}
