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
        self.check_weights_paths(file, base)?;
        for (key, p) in self.named_files() {
            crate::error::check_named_file(file, base, &key, &p, true)?;
        }
        for (key, p) in self.strategy().input_files() {
            crate::error::check_named_file(file, base, key, &p, false)?;
        }
        Ok(())
    }

    /// Each `model.weights` path (hub ids already resolved to their snapshots) must be a file or a
    /// folder: a missing path, a dangling link or a device is the run file's error, naming the key.
    fn check_weights_paths(&self, file: &str, base: &Path) -> Result<()> {
        use crate::runtime::config::WeightsSpec;
        let paths: Vec<(String, &String)> = match &self.model.weights {
            Some(WeightsSpec::One(w)) => vec![("model.weights".into(), w)],
            Some(WeightsSpec::Many(ws)) => ws
                .iter()
                .enumerate()
                .map(|(i, w)| (format!("model.weights[{i}]"), w))
                .collect(),
            None => Vec::new(),
        };
        for (key, w) in paths {
            let p = base.join(w);
            let why = match std::fs::metadata(&p) {
                Ok(m) if m.is_file() || m.is_dir() => continue,
                Ok(_) => "is not a regular file or a folder".to_string(),
                Err(e) => crate::error::describe_io(&p, &e),
            };
            return Err(crate::error::Error::config(
                file,
                key,
                format!("`{w}` {why}"),
            ));
        }
        Ok(())
    }
}
