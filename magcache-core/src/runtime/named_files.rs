//! The files a run file names by key, checked before anything reads them.

use crate::error::Result;
use crate::runtime::config::RunConfig;
use std::path::Path;

impl RunConfig {
    /// The files core's keys name, as `(key, path as written)`: `inputs.file`, `model.config`
    /// and each adapter's `model.lora[i].path`.
    pub fn named_files(&self) -> Vec<(String, String)> {
        let mut named: Vec<(String, String)> = Vec::new();
        if let Some(f) = &self.inputs.file {
            named.push(("inputs.file".into(), f.clone()));
        }
        if let Some(c) = &self.model.config {
            named.push(("model.config".into(), c.clone()));
        }
        for (i, l) in self.model.lora.iter().enumerate() {
            named.push((format!("model.lora[{i}].path"), l.path.clone()));
        }
        named
    }

    /// The files the run file names by key, checked before anything reads them, so the error
    /// names the key: `inputs.file`, `model.config` and adapters must be regular files; the
    /// strategy's files (a profile) must not be a FIFO, a device, a folder or a dangling link when
    /// they are there (the family's are checked as the run resolves, see
    /// [`crate::runtime::registry::ModelFamily::check_files`]).
    pub(crate) fn check_named_files(&self, file: &str, base: &Path) -> Result<()> {
        for (key, p) in self.named_files() {
            crate::error::check_named_file(file, base, &key, &p, true)?;
        }
        for (key, p) in self.strategy().input_files() {
            crate::error::check_named_file(file, base, key, &p, false)?;
        }
        Ok(())
    }
}
