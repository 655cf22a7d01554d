//! Writing output files safely: through a temporary file beside the target and a rename.

use candle_core::Tensor;
use magcache_core::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a failed
/// run never leaves a partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_via_temp(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| e.to_string())
    })
}

/// Writes the final latents as safetensors (`final`), through a temporary file.
pub fn write_latents(path: &Path, t: &Tensor) -> Result<()> {
    let map: HashMap<String, Tensor> = HashMap::from([("final".to_string(), t.contiguous()?)]);
    write_via_temp(path, |tmp| {
        candle_core::safetensors::save(&map, tmp).map_err(|e| e.to_string())
    })
}

/// Runs `write` on a temporary name beside `path` and renames it into place; on any failure the
/// temporary file is removed and the error names `path`.
fn write_via_temp(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), String>,
) -> Result<()> {
    let shown = path.display().to_string();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(Error::io(&shown, "the output folder does not exist"));
    }
    let name = path
        .file_name()
        .ok_or_else(|| Error::io(&shown, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(&shown, e)
    })
}
