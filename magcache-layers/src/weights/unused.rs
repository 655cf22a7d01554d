//! The checkpoint tensors a model never asked for: a warning, or an error for whole blocks.

use super::*;

impl WeightStore {
    /// Checkpoint tensors the model never fetched, sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = match self.used.lock() {
            Ok(u) => u.clone(),
            Err(_) => return Vec::new(),
        };
        let mut v: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// After a model is built from this store: the warning naming checkpoint tensors it did not use
    /// (`None` when it used them all), or an error when a whole block (`blocks.N.*`,
    /// `transformer_blocks.N.*`, ...: every tensor under a numbered prefix) is left over: the model
    /// was built with fewer blocks than the checkpoint holds. `depth_key` maps a block prefix
    /// (`blocks`) to what sets that number of blocks (`model.overrides.num_layers = 2`, or
    /// `num_layers = 2 in config.json`); a key under `model.overrides.` makes the error name the
    /// run file and that key, any other the checkpoint file and the block.
    pub fn check_unused(
        &self,
        cfg_file: &str,
        depth_key: impl Fn(&str) -> String,
    ) -> Result<Option<String>> {
        let unused = self.unused();
        if unused.is_empty() {
            return Ok(None);
        }
        let used = match self.used.lock() {
            Ok(u) => u.clone(),
            Err(_) => HashSet::new(),
        };
        // Numbered prefixes (`blocks.2`) none of whose tensors was used.
        let mut left_blocks: BTreeSet<(String, usize)> = BTreeSet::new();
        for k in &unused {
            if let Some((prefix, n)) = block_of(k) {
                let p = format!("{prefix}.{n}.");
                if !used.iter().any(|u| u.starts_with(&p)) {
                    left_blocks.insert((prefix.to_string(), n));
                }
            }
        }
        if let Some((prefix, first)) = left_blocks.iter().next() {
            let names: Vec<String> = left_blocks
                .iter()
                .map(|(p, n)| format!("{p}.{n}.*"))
                .collect();
            let depth_key = depth_key(prefix);
            let msg = format!(
                "{} holds block(s) {} that the model does not build (its depth comes from {depth_key}): a model shallower than its checkpoint would run silently wrong; set the number of blocks to match the checkpoint",
                self.origin,
                names.join(", ")
            );
            return Err(if depth_key.starts_with("model.overrides.") {
                let key = depth_key.split(' ').next().unwrap_or_default().to_string();
                Error::config(cfg_file, key, msg)
            } else {
                let p = format!("{prefix}.{first}.");
                let file = unused
                    .iter()
                    .find(|k| k.starts_with(&p))
                    .map(|k| self.file_of(k))
                    .unwrap_or(&self.origin);
                Error::weights(file, format!("{prefix}.{first}.*"), msg)
            });
        }
        const SHOWN: usize = 8;
        let mut list: Vec<&str> = unused.iter().take(SHOWN).map(|s| s.as_str()).collect();
        let more = unused.len().saturating_sub(SHOWN);
        let extra = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        list.sort();
        Ok(Some(format!(
            "{}: {} checkpoint tensor(s) not used by the model: {}{extra}",
            self.origin,
            unused.len(),
            list.join(", ")
        )))
    }
}
