//! What a strategy may know of the model it runs on ([`ModelInfo`]) and of the sampling a curve was
//! measured on ([`ScheduleMeta`]): shared by the run config, the registry and the pipeline.

use crate::error::Result;
use std::collections::BTreeMap;

/// The sampling a published or calibrated curve was measured on.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScheduleMeta {
    pub steps: usize,
    #[serde(default)]
    pub shift: Option<f64>,
    #[serde(default)]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub boundary_ratio: Option<f64>,
    /// Sigmas of the calibrated steps, where known (enables `resample = "sigma"`).
    #[serde(default)]
    pub sigmas: Option<Vec<f64>>,
}

/// What a strategy may know about the model it runs on.
#[derive(Clone, Debug, Default)]
pub struct ModelInfo {
    pub family: String,
    /// Preset name, or the published variant the loaded weights were matched to, if any.
    pub variant: Option<String>,
    /// Published calibration data of the variant, one table per key. Each strategy owns a key (its
    /// name) and gives the table its own type ([`ModelInfo::published`]); neither core nor the
    /// models interpret it.
    pub published: BTreeMap<String, toml::Value>,
    /// The indicators the model's block chain offers ([`crate::BlockChain::indicator`] answers
    /// `Some` for these), so that a strategy that needs one can refuse the model before any weights
    /// load. Empty: the model lists none.
    pub indicators: Vec<crate::chain::Indicator>,
}

impl ModelInfo {
    /// The published table under `key`, typed by the reader. `Ok(None)` when there is none.
    pub fn published<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.published.get(key) {
            None => Ok(None),
            Some(v) => v.clone().try_into().map(Some).map_err(|e| {
                crate::error::Error::msg(format!(
                    "published `{key}` data of model family `{}`: {e}",
                    self.family
                ))
            }),
        }
    }
}
