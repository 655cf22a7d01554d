//! Opening a FLUX.2 transformer checkpoint in the diffusers layout: its `config.json` and its
//! weights (one file or shards with their index), headers only.

use super::config::Flux2Config;
use magcache_core::{Error, Result};
use magcache_layers::config_util::ModelConfig;
use magcache_layers::weights::WeightStore;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// A transformer checkpoint opened for loading.
pub struct Flux2Checkpoint {
    pub config: Flux2Config,
    pub store: WeightStore,
    /// The weights path as given (a folder or a file).
    pub path: PathBuf,
}

pub use magcache_layers::config_util::transformer_dir;

/// Opens `path` (a `transformer/` folder with `config.json`, a pipeline folder, or a weights file
/// with `config` or a `config.json` beside it). Errors name the file and the key or tensor.
pub fn load_flux2(
    path: &Path,
    config: Option<&Path>,
    overrides: &Map<String, Value>,
    file: &str,
) -> Result<Flux2Checkpoint> {
    let (path, config) = flux2_config(path, config, overrides, file)?;
    Ok(Flux2Checkpoint {
        config,
        store: open_flux2(&path)?,
        path,
    })
}

/// The transformer's weights path (`transformer/` of a pipeline folder, or `path`) and its config,
/// read and checked (no weight opened).
pub fn flux2_config(
    path: &Path,
    config: Option<&Path>,
    overrides: &Map<String, Value>,
    file: &str,
) -> Result<(PathBuf, Flux2Config)> {
    if magcache_layers::weights::gguf::is_gguf(path) {
        return Err(Error::config(
            file,
            "model.weights",
            format!("`{}` is a GGUF file: FLUX.2 runs read diffusers folders (a pipeline folder, or a transformer folder with its config.json); GGUF checkpoints are not read for it yet", path.display()),
        ));
    }
    let path = transformer_dir(path);
    let cfg_path = match config {
        Some(c) => c.to_path_buf(),
        None if path.is_dir() => path.join("config.json"),
        None => path.parent().unwrap_or(Path::new(".")).join("config.json"),
    };
    if let Some(why) = magcache_core::error::not_a_file(&cfg_path) {
        return Err(Error::config(
            file,
            "model.weights",
            format!(
                "a FLUX.2 transformer needs its diffusers config.json; {} {why}",
                cfg_path.display()
            ),
        ));
    }
    Ok((path, Flux2Config::read(&cfg_path, overrides)?))
}

/// The checkpoint's store (headers read, tensors on demand), checked to be a FLUX.2 transformer.
pub fn open_flux2(path: &Path) -> Result<WeightStore> {
    let store = WeightStore::load_checkpoint(path)?;
    if !store.contains("x_embedder.weight") {
        return Err(Error::weights(
            &store.origin,
            "x_embedder.weight",
            "missing: not a diffusers Flux2Transformer2DModel checkpoint",
        ));
    }
    Ok(store)
}
