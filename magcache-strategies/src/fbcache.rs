//! First-Block Cache: run the first block, and skip the others while its residual barely changes.
//!
//! Per scope: `r1 = first block's hidden output - its hidden input`;
//! `diff = mean|r1 - r1_prev| / mean|r1_prev|`, `r1_prev` being the first-block residual of the last
//! *computed* call. The remaining blocks compute when there is no previous residual or
//! `diff > threshold`; otherwise the first block's output plus the cached residual of the remaining
//! blocks (hidden and, where the blocks carry it, encoder stream) is returned.

use magcache_core::candle_core::Tensor;
use magcache_core::maths::{rel_l1, tensor_bytes};
use magcache_core::registry::StrategyRegistration;
use magcache_core::{
    BuildEnv, CallDecision, Error, GenerationPlan, HeadAction, HookCx, Result, ScopeKey,
    ScopeStates, StrategyConfig, TimestepCache,
};
use serde::{Deserialize, Serialize};

/// `[cache] strategy = "fbcache"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FbCacheConfig {
    /// Largest relative change of the first-block residual that still reuses.
    #[serde(default = "d_threshold")]
    pub threshold: f64,
}

fn d_threshold() -> f64 {
    0.05
}

impl Default for FbCacheConfig {
    fn default() -> Self {
        FbCacheConfig {
            threshold: d_threshold(),
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
}

inventory::submit! {
    StrategyRegistration { name: "fbcache", description: "First-Block Cache: relative L1 change of the first block's residual (decides from data)" }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Idle,
    /// The first block is running (on a one-block chain the tail runs now).
    FirstBlock,
    Computing,
    Reusing,
}

/// The two streams of a block output.
#[derive(Debug, Clone)]
struct Streams {
    hidden: Tensor,
    encoder: Option<Tensor>,
}

#[derive(Debug, Default)]
struct FbState {
    phase: Phase,
    /// First-block residual of the last computed call.
    head_residual: Option<Tensor>,
    /// First block's output in the current computed call.
    head_out: Option<Streams>,
    /// Last block's output when the tail ran before the head finished (one-block chain).
    pending_tail: Option<Streams>,
    /// Residual of the remaining blocks (last output - first output) of the last computed call.
    tail_residual: Option<Streams>,
    last: Option<CallDecision>,
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

fn streams(meta: &magcache_core::BlockMetadata, outputs: &[Tensor]) -> Result<Streams> {
    Ok(Streams {
        hidden: meta.hidden_output(outputs)?.clone(),
        encoder: meta.encoder_output(outputs)?.cloned(),
    })
}

fn residual(last: &Streams, first: &Streams) -> Result<Streams> {
    let hidden = (&last.hidden - &first.hidden)?;
    let encoder = match (&last.encoder, &first.encoder) {
        (Some(a), Some(b)) => Some((a - b)?),
        _ => None,
    };
    Ok(Streams { hidden, encoder })
}

impl TimestepCache for FbCache {
    fn name(&self) -> &str {
        "fbcache"
    }

    fn begin_generation(&mut self, plan: &GenerationPlan) -> Result<Vec<String>> {
        self.states.begin(plan, |_| Ok(FbState::default()))?;
        Ok(Vec::new())
    }

    fn head(&mut self, cx: &HookCx<'_>, _inputs: &[Tensor]) -> Result<HeadAction> {
        let (_, slot) = self.states.start_call(cx.scope)?;
        slot.state.phase = Phase::FirstBlock;
        slot.state.pending_tail = None;
        Ok(HeadAction::RunFirstBlock)
    }

    fn after_first_block(
        &mut self,
        cx: &HookCx<'_>,
        inputs: &[Tensor],
        outputs: Vec<Tensor>,
    ) -> Result<Vec<Tensor>> {
        let st = &mut self.states.get_mut(cx.scope)?.state;
        let first = streams(cx.meta, &outputs)?;
        let r1 = (&first.hidden - cx.meta.hidden_input(inputs)?)?;
        let metric = match &st.head_residual {
            Some(prev) => Some(rel_l1(&r1, prev)?),
            None => None,
        };
        let compute = match (metric, &st.tail_residual) {
            (Some(d), Some(_)) => d > self.cfg.threshold,
            _ => true,
        };
        st.last = Some(CallDecision {
            computed: compute,
            metric,
        });
        if !compute {
            st.phase = Phase::Reusing;
            let res = st.tail_residual.as_ref().expect("checked above");
            let hidden = (&first.hidden + &res.hidden)?;
            let encoder = match (&first.encoder, &res.encoder) {
                (Some(e), Some(r)) => Some((e + r)?),
                (e, _) => e.clone(),
            };
            return cx.meta.make_output(hidden, encoder);
        }
        st.phase = Phase::Computing;
        st.head_residual = Some(r1);
        match st.pending_tail.take() {
            // One-block chain: the tail already ran inside the first block; nothing remains after it.
            Some(last) => {
                st.tail_residual = Some(residual(&last, &first)?);
                st.head_out = None;
            }
            None => st.head_out = Some(first),
        }
        Ok(outputs)
    }

    fn is_reusing(&self, scope: ScopeKey) -> bool {
        self.states
            .get(scope)
            .map(|s| s.state.phase == Phase::Reusing)
            .unwrap_or(false)
    }

    fn tail(&mut self, cx: &HookCx<'_>, outputs: &[Tensor]) -> Result<()> {
        let st = &mut self.states.get_mut(cx.scope)?.state;
        let last = streams(cx.meta, outputs)?;
        match st.phase {
            Phase::FirstBlock => st.pending_tail = Some(last),
            Phase::Computing => {
                let first = st.head_out.take().ok_or_else(|| {
                    Error::Hooks(format!(
                        "FBCache scope {}: tail ran without the first block's output",
                        cx.scope
                    ))
                })?;
                st.tail_residual = Some(residual(&last, &first)?);
            }
            p => {
                return Err(Error::Hooks(format!(
                    "FBCache scope {}: tail ran in phase {p:?}",
                    cx.scope
                )))
            }
        }
        Ok(())
    }

    fn last_decision(&self, scope: ScopeKey) -> Option<CallDecision> {
        self.states.get(scope).ok().and_then(|s| s.state.last)
    }

    fn cached_bytes_by_scope(&self) -> Vec<(ScopeKey, usize)> {
        let b = |s: &Option<Streams>| {
            s.as_ref()
                .map(|s| {
                    tensor_bytes(&s.hidden) + s.encoder.as_ref().map(tensor_bytes).unwrap_or(0)
                })
                .unwrap_or(0)
        };
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
                        + b(&s.state.tail_residual),
                )
            })
            .collect()
    }
}
