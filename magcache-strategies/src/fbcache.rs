//! First-Block Cache: run the first block, and skip the others while its residual barely changes.
//!
//! Per scope: `r1 = first block's hidden output - its hidden input`;
//! `diff = mean|r1 - r1_prev| / mean|r1_prev|`, `r1_prev` being the first-block residual of the last
//! *computed* call. The remaining blocks compute when there is no previous residual or
//! `diff > threshold`; otherwise the first block's output plus the cached residual of the remaining
//! blocks (hidden and, where the blocks carry it, encoder stream) is returned, or its forecast with
//! `estimator = "taylor1" | "taylor2"` (see [`crate::residual`]).

use crate::residual::{Estimator, ResidualHistory};
use magcache_core::candle_core::Tensor;
use magcache_core::maths::{rel_l1, tensor_bytes};
use magcache_core::registry::StrategyRegistration;
use magcache_core::{
    BlockChain, BuildEnv, CallDecision, GenerationPlan, Result, ScopeKey, ScopeStates,
    StrategyConfig, Streams, TimestepCache,
};
use serde::{Deserialize, Serialize};

/// `[cache] strategy = "fbcache"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FbCacheConfig {
    /// Largest relative change of the first-block residual that still reuses.
    #[serde(default = "d_threshold")]
    pub threshold: f64,
    /// What a reused call returns: `"reuse"` (the last computed residual), `"taylor1"` or
    /// `"taylor2"` (its forecast from the last computed calls of the scope, see [`crate::residual`]).
    #[serde(default)]
    pub estimator: Estimator,
}

fn d_threshold() -> f64 {
    0.05
}

impl Default for FbCacheConfig {
    fn default() -> Self {
        FbCacheConfig {
            threshold: d_threshold(),
            estimator: Estimator::Reuse,
        }
    }
}

#[typetag::serde(name = "fbcache")]
impl StrategyConfig for FbCacheConfig {
    fn validate(&self, file: &str) -> Result<()> {
        crate::check_threshold(file, self.threshold)?;
        Ok(())
    }
    fn build(&self, _env: &BuildEnv<'_>) -> Result<Option<Box<dyn TimestepCache>>> {
        Ok(Some(Box::new(FbCache::new(self.clone()))))
    }
    fn threshold(&self) -> Option<f64> {
        Some(self.threshold)
    }
    fn metric_name(&self) -> &'static str {
        "FBCache relative L1 of the first-block residual"
    }
}

inventory::submit! {
    StrategyRegistration { name: "fbcache", description: "First-Block Cache: relative L1 change of the first block's residual (decides from data)" }
}

#[derive(Debug, Default)]
struct FbState {
    /// First-block residual of the last computed call.
    head_residual: Option<Tensor>,
    /// Residuals of the remaining blocks (last output - first output) of the last computed calls.
    tail_residual: ResidualHistory,
}

/// The FBCache strategy.
pub struct FbCache {
    cfg: FbCacheConfig,
    states: ScopeStates<FbState>,
}

impl FbCache {
    pub fn new(cfg: FbCacheConfig) -> Self {
        FbCache {
            cfg,
            states: ScopeStates::default(),
        }
    }
}

impl TimestepCache for FbCache {
    fn name(&self) -> &str {
        "fbcache"
    }

    fn begin_generation(&mut self, plan: &GenerationPlan) -> Result<Vec<String>> {
        let e = self.cfg.estimator;
        self.states.begin(plan, |_| {
            Ok(FbState {
                head_residual: None,
                tail_residual: ResidualHistory::new(e),
            })
        })?;
        Ok(Vec::new())
    }

    fn run(
        &mut self,
        scope: ScopeKey,
        chain: &dyn BlockChain,
        x: Streams,
    ) -> Result<(Streams, CallDecision)> {
        let (step, slot) = self.states.start_call(scope)?;
        let st = &mut slot.state;
        let input = x.hidden.clone();
        let first = chain.run(0..1, x)?;
        let r1 = (&first.hidden - &input)?;
        let metric = match &st.head_residual {
            Some(prev) => Some(rel_l1(&r1, prev)?),
            None => None,
        };
        if let (Some(d), Some(res)) = (metric, st.tail_residual.estimate(step)?) {
            if d <= self.cfg.threshold {
                return Ok((first.add(&res)?, CallDecision::reused(metric)));
            }
        }
        st.head_residual = Some(r1);
        let last = chain.run(1..chain.num_blocks(), first.clone())?;
        st.tail_residual.push(step, last.sub(&first)?);
        Ok((last, CallDecision::computed(metric)))
    }

    fn cached_bytes_by_scope(&self) -> Vec<(ScopeKey, usize)> {
        self.states
            .iter()
            .map(|(k, s)| {
                (
                    *k,
                    s.state
                        .head_residual
                        .as_ref()
                        .map(tensor_bytes)
                        .unwrap_or(0)
                        + s.state.tail_residual.bytes(),
                )
            })
            .collect()
    }
}
