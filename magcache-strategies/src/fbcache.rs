//! First-Block Cache and its generalisation DBCache (cache-dit's dual-block cache).
//!
//! DBCache with `front_blocks = Fn`, `back_blocks = Bn` over a chain of `N` blocks, per scope:
//! the first `Fn` blocks always run; their change since the last *computed* call is measured (the
//! `metric` key, below); the middle blocks `Fn..N-Bn` compute when there is no previous measurement
//! or the change exceeds `threshold`, otherwise the front output plus the cached residual of the
//! middle blocks (hidden and, where the blocks carry it, encoder stream) stands in for them, or its
//! forecast with `estimator = "taylor1" | "taylor2"` (see [`crate::residual`]); the last `Bn` blocks
//! always run. FBCache is DBCache with `Fn = 1`, `Bn = 0`.
//!
//! `metric`:
//! - `"residual_rel_l1"` (default): `mean|r - r_prev| / mean|r_prev|` of the front residual
//!   `r = front output - chain input` (hidden stream);
//! - `"hidden_rel_l1"`: the same on the front output itself;
//! - `"hidden_rel_l2"`: `||h - h_prev||_2 / ||h_prev||_2` on the front output.
//!
//! `downsample = s` measures every `s`-th token only (dimension 1 of `[B, L, D]`); `ema = a` smooths
//! the measured change, `m <- a * m_prev + (1 - a) * m`, over the calls of a scope (0: off). Under
//! sequence parallelism the metric's numerator and denominator are averaged over the ranks first
//! ([`magcache_core::DecisionSync`]). The guards of [`crate::guards`] apply.

use crate::guards::{few_step_warnings, GuardConfig, Guards};
use crate::residual::{Estimator, ResidualHistory};
use magcache_core::candle_core::{DType, Tensor};
use magcache_core::maths::{safe_ratio, tensor_bytes};
use magcache_core::registry::StrategyRegistration;
use magcache_core::sync::synced_rel_l1;
use magcache_core::{
    BlockChain, BuildEnv, CallDecision, DecisionSync, Error, GenerationPlan, Result, ScopeKey,
    ScopeStates, StrategyConfig, Streams, TimestepCache,
};
use serde::{Deserialize, Serialize};

/// What the front blocks' change is measured on (`metric = ...`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadMetric {
    /// Relative L1 change of the front blocks' residual.
    #[default]
    ResidualRelL1,
    /// Relative L1 change of the front blocks' output.
    HiddenRelL1,
    /// Relative L2 change of the front blocks' output.
    HiddenRelL2,
}

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
    /// What the change is measured on (see the module docs).
    #[serde(default)]
    pub metric: HeadMetric,
    /// Token stride of the measurement (1: every token).
    #[serde(default = "d_one")]
    pub downsample: usize,
    /// Smoothing factor of the measured change over a scope's calls, in [0, 1) (0: off).
    #[serde(default)]
    pub ema: f64,
    /// Guards: see [`crate::guards`].
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub last_steps: usize,
    #[serde(default)]
    pub max_consecutive: Option<usize>,
    #[serde(default)]
    pub cfg_shared: bool,
}

/// `[cache] strategy = "dbcache"`: cache-dit's dual-block cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbCacheConfig {
    /// `Fn`: blocks at the front of the chain that always compute and are measured.
    #[serde(default = "d_front")]
    pub front_blocks: usize,
    /// `Bn`: blocks at the back of the chain that always compute.
    #[serde(default)]
    pub back_blocks: usize,
    /// Largest relative change of the front blocks that still reuses.
    #[serde(default = "d_db_threshold")]
    pub threshold: f64,
    #[serde(default)]
    pub estimator: Estimator,
    #[serde(default)]
    pub metric: HeadMetric,
    #[serde(default = "d_one")]
    pub downsample: usize,
    #[serde(default)]
    pub ema: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub last_steps: usize,
    #[serde(default)]
    pub max_consecutive: Option<usize>,
    #[serde(default)]
    pub cfg_shared: bool,
}

fn d_threshold() -> f64 {
    0.05
}
fn d_db_threshold() -> f64 {
    0.08
}
fn d_front() -> usize {
    8
}
fn d_one() -> usize {
    1
}

impl Default for FbCacheConfig {
    fn default() -> Self {
        FbCacheConfig {
            threshold: d_threshold(),
            estimator: Estimator::Reuse,
            metric: HeadMetric::ResidualRelL1,
            downsample: 1,
            ema: 0.0,
            warmup_steps: 0,
            last_steps: 0,
            max_consecutive: None,
            cfg_shared: false,
        }
    }
}

impl Default for DbCacheConfig {
    fn default() -> Self {
        DbCacheConfig {
            front_blocks: d_front(),
            back_blocks: 0,
            threshold: d_db_threshold(),
            estimator: Estimator::Reuse,
            metric: HeadMetric::ResidualRelL1,
            downsample: 1,
            ema: 0.0,
            warmup_steps: 0,
            last_steps: 0,
            max_consecutive: None,
            cfg_shared: false,
        }
    }
}

impl FbCacheConfig {
    /// The same strategy as a DBCache with `Fn = 1`, `Bn = 0`.
    pub fn as_dbcache(&self) -> DbCacheConfig {
        DbCacheConfig {
            front_blocks: 1,
            back_blocks: 0,
            threshold: self.threshold,
            estimator: self.estimator,
            metric: self.metric,
            downsample: self.downsample,
            ema: self.ema,
            warmup_steps: self.warmup_steps,
            last_steps: self.last_steps,
            max_consecutive: self.max_consecutive,
            cfg_shared: self.cfg_shared,
        }
    }
}

impl DbCacheConfig {
    pub fn guards(&self) -> GuardConfig {
        GuardConfig {
            warmup_steps: self.warmup_steps,
            last_steps: self.last_steps,
            max_consecutive: self.max_consecutive,
            cfg_shared: self.cfg_shared,
        }
    }

    fn check(&self, file: &str) -> Result<()> {
        crate::check_threshold(file, self.threshold)?;
        if self.front_blocks == 0 {
            return Err(Error::config(
                file,
                "cache.front_blocks",
                "must be at least 1: the decision is taken on the front blocks' output",
            ));
        }
        if self.downsample == 0 {
            return Err(Error::config(
                file,
                "cache.downsample",
                "must be at least 1 (1 measures every token)",
            ));
        }
        if !(0.0..1.0).contains(&self.ema) {
            return Err(Error::config(
                file,
                "cache.ema",
                format!("must lie in [0, 1) (0: no smoothing), got {}", self.ema),
            ));
        }
        self.guards().validate(file)
    }
}

#[typetag::serde(name = "fbcache")]
impl StrategyConfig for FbCacheConfig {
    fn validate(&self, file: &str) -> Result<()> {
        self.as_dbcache().check(file)
    }
    fn build(&self, _env: &BuildEnv<'_>) -> Result<Option<Box<dyn TimestepCache>>> {
        Ok(Some(Box::new(FbCache::named("fbcache", self.as_dbcache()))))
    }
    fn threshold(&self) -> Option<f64> {
        Some(self.threshold)
    }
    fn metric_name(&self) -> &'static str {
        match self.metric {
            HeadMetric::ResidualRelL1 => "FBCache relative L1 of the first-block residual",
            HeadMetric::HiddenRelL1 => "FBCache relative L1 of the first block's output",
            HeadMetric::HiddenRelL2 => "FBCache relative L2 of the first block's output",
        }
    }
}

#[typetag::serde(name = "dbcache")]
impl StrategyConfig for DbCacheConfig {
    fn validate(&self, file: &str) -> Result<()> {
        self.check(file)
    }
    fn build(&self, _env: &BuildEnv<'_>) -> Result<Option<Box<dyn TimestepCache>>> {
        Ok(Some(Box::new(FbCache::named("dbcache", self.clone()))))
    }
    fn threshold(&self) -> Option<f64> {
        Some(self.threshold)
    }
    fn metric_name(&self) -> &'static str {
        match self.metric {
            HeadMetric::ResidualRelL1 => "DBCache relative L1 of the front blocks' residual",
            HeadMetric::HiddenRelL1 => "DBCache relative L1 of the front blocks' output",
            HeadMetric::HiddenRelL2 => "DBCache relative L2 of the front blocks' output",
        }
    }
}

inventory::submit! {
    StrategyRegistration { name: "fbcache", description: "First-Block Cache: relative change of the first block's residual (decides from data)", defaults: || Box::new(FbCacheConfig::default()) }
}

inventory::submit! {
    StrategyRegistration { name: "dbcache", description: "DBCache (cache-dit): front_blocks always run and decide, back_blocks always run, the middle is cached", defaults: || Box::new(DbCacheConfig::default()) }
}

#[derive(Debug, Default)]
struct FbState {
    /// What the metric compares with: the front residual or output of the last computed call.
    head: Option<Tensor>,
    /// Smoothed metric of the previous call (`ema`).
    smoothed: Option<f64>,
    /// Residuals of the middle blocks (middle output - front output) of the last computed calls.
    middle: ResidualHistory,
}

/// The FBCache / DBCache strategy.
pub struct FbCache {
    name: &'static str,
    cfg: DbCacheConfig,
    guards: Guards,
    states: ScopeStates<FbState>,
}

impl FbCache {
    /// FBCache from its config.
    pub fn new(cfg: FbCacheConfig) -> Self {
        Self::named("fbcache", cfg.as_dbcache())
    }

    /// A dual-block cache reported under `name`.
    pub fn named(name: &'static str, cfg: DbCacheConfig) -> Self {
        FbCache {
            name,
            guards: Guards::new(cfg.guards()),
            cfg,
            states: ScopeStates::default(),
        }
    }
}

/// Every `s`-th token (dimension 1 of a `[B, L, ...]` tensor; dimension 0 of a vector).
fn downsample(t: &Tensor, s: usize) -> Result<Tensor> {
    if s <= 1 {
        return Ok(t.clone());
    }
    let dim = usize::from(t.rank() >= 2);
    let n = t.dim(dim)?;
    let idx: Vec<u32> = (0..n).step_by(s).map(|i| i as u32).collect();
    let idx = Tensor::new(idx.as_slice(), t.device())?;
    Ok(t.index_select(&idx, dim)?)
}

/// `||a - b||_2 / ||b||_2` over the whole sequence, sums of squares averaged over the ranks first.
fn synced_rel_l2(a: &Tensor, b: &Tensor, sync: &dyn DecisionSync) -> Result<f64> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let num = (&a - &b)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
    let den = b.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
    let m = sync.all_reduce_mean(&[num, den])?;
    match m.as_slice() {
        [n, d] => Ok(safe_ratio(n.sqrt(), d.sqrt())),
        _ => Err(Error::msg(format!(
            "decision sync returned {} values for 2",
            m.len()
        ))),
    }
}

impl TimestepCache for FbCache {
    fn name(&self) -> &str {
        self.name
    }

    fn begin_generation(&mut self, plan: &GenerationPlan) -> Result<Vec<String>> {
        let e = self.cfg.estimator;
        self.guards.begin(plan);
        self.states.begin(plan, |_| {
            Ok(FbState {
                middle: ResidualHistory::new(e),
                ..Default::default()
            })
        })?;
        Ok(few_step_warnings(self.name, plan, self.guards.config()))
    }

    fn run(
        &mut self,
        scope: ScopeKey,
        chain: &dyn BlockChain,
        x: Streams,
        sync: &dyn DecisionSync,
    ) -> Result<(Streams, CallDecision)> {
        let n = chain.num_blocks();
        let (fr, bk) = (self.cfg.front_blocks, self.cfg.back_blocks);
        if fr + bk > n {
            return Err(Error::msg(format!(
                "{}: front_blocks ({fr}) + back_blocks ({bk}) exceed the chain's {n} blocks",
                self.name
            )));
        }
        let cfg = &self.cfg;
        let (step, slot) = self.states.start_call(scope)?;
        let steps = slot.steps;
        let st = &mut slot.state;
        let verdict = self.guards.verdict(scope, step, steps);
        let input = x.hidden.clone();
        let front = chain.run(0..fr, x)?;
        let measured = match cfg.metric {
            HeadMetric::ResidualRelL1 => (&front.hidden - &input)?,
            HeadMetric::HiddenRelL1 | HeadMetric::HiddenRelL2 => front.hidden.clone(),
        };
        let measured = downsample(&measured, cfg.downsample)?;
        let metric = match &st.head {
            // Averaged over the ranks (sequence parallel): every rank decides alike.
            Some(prev) if !verdict.imposed() => {
                let d = match cfg.metric {
                    HeadMetric::HiddenRelL2 => synced_rel_l2(&measured, prev, sync)?,
                    _ => synced_rel_l1(&measured, prev, sync)?,
                };
                let m = match st.smoothed {
                    Some(p) if cfg.ema > 0.0 => cfg.ema * p + (1.0 - cfg.ema) * d,
                    _ => d,
                };
                st.smoothed = Some(m);
                Some(m)
            }
            _ => None,
        };
        let estimate = st.middle.estimate(step)?;
        let want = metric.is_some_and(|d| d <= cfg.threshold);
        let reuse = verdict.apply(want, st.head.is_some() && estimate.is_some());
        self.guards.record(scope, step, reuse);
        let mid = match estimate {
            Some(res) if reuse => front.add(&res)?,
            _ => {
                st.head = Some(measured);
                let mid = chain.run(fr..n - bk, front.clone())?;
                st.middle.push(step, mid.sub(&front)?);
                mid
            }
        };
        let out = chain.run(n - bk..n, mid)?;
        let d = if reuse {
            CallDecision::reused(metric)
        } else {
            CallDecision::computed(metric)
        };
        Ok((out, d))
    }

    fn cached_bytes_by_scope(&self) -> Vec<(ScopeKey, usize)> {
        self.states
            .iter()
            .map(|(k, s)| {
                (
                    *k,
                    s.state.head.as_ref().map(tensor_bytes).unwrap_or(0) + s.state.middle.bytes(),
                )
            })
            .collect()
    }
}
