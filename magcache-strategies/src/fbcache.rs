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

use crate::engine::{Cached, Call, Rule, SharedKeys, Wish};
use magcache_core::candle_core::{DType, Tensor};
use magcache_core::maths::{safe_ratio, tensor_bytes};
use magcache_core::runtime::registry::StrategyRegistration;
use magcache_core::sync::synced_rel_l1;
use magcache_core::{BuildEnv, DecisionSync, Error, Result, StrategyConfig, TimestepCache};
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

crate::strategy_config! {
    /// `[cache] strategy = "fbcache"`.
    pub struct FbCacheConfig {
        /// Largest relative change of the first-block residual that still reuses.
        pub threshold: f64 = 0.05,
        /// What the change is measured on (see the module docs).
        pub metric: HeadMetric = HeadMetric::ResidualRelL1,
        /// Token stride of the measurement (1: every token).
        pub downsample: usize = 1,
        /// Smoothing factor of the measured change over a scope's calls, in [0, 1) (0: off).
        pub ema: f64 = 0.0,
    }
}

crate::strategy_config! {
    /// `[cache] strategy = "dbcache"`: cache-dit's dual-block cache.
    pub struct DbCacheConfig {
        /// `Fn`: blocks at the front of the chain that always compute and are measured.
        pub front_blocks: usize = 8,
        /// `Bn`: blocks at the back of the chain that always compute.
        pub back_blocks: usize = 0,
        /// Largest relative change of the front blocks that still reuses.
        pub threshold: f64 = 0.08,
        /// What the change is measured on (see the module docs).
        pub metric: HeadMetric = HeadMetric::ResidualRelL1,
        /// Token stride of the measurement (1: every token).
        pub downsample: usize = 1,
        /// Smoothing factor of the measured change over a scope's calls, in [0, 1) (0: off).
        pub ema: f64 = 0.0,
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
            estimator_axis: self.estimator_axis,
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
        self.shared().validate(file)
    }
}

#[typetag::serde(name = "fbcache")]
impl StrategyConfig for FbCacheConfig {
    fn validate(&self, file: &str) -> Result<()> {
        self.as_dbcache().check(file)
    }
    fn build(&self, env: &BuildEnv<'_>) -> Result<Option<Box<dyn TimestepCache>>> {
        self.validate(env.file)?;
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
    fn build(&self, env: &BuildEnv<'_>) -> Result<Option<Box<dyn TimestepCache>>> {
        self.validate(env.file)?;
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

/// One scope's last measurement.
#[derive(Debug, Default)]
pub struct FbState {
    /// What the metric compares with: the front residual or output of the last computed call.
    head: Option<Tensor>,
    /// This call's measurement, kept as `head` if the call computes.
    measured: Option<Tensor>,
    /// Smoothed metric of the previous call (`ema`).
    smoothed: Option<f64>,
}

/// The FBCache / DBCache decision rule.
pub struct FbRule {
    name: &'static str,
    cfg: DbCacheConfig,
}

/// The FBCache / DBCache strategy.
pub type FbCache = Cached<FbRule>;

impl Cached<FbRule> {
    /// FBCache from its config.
    pub fn new(cfg: FbCacheConfig) -> Self {
        Self::named("fbcache", cfg.as_dbcache())
    }

    /// A dual-block cache reported under `name`.
    pub fn named(name: &'static str, cfg: DbCacheConfig) -> Self {
        let shared = cfg.shared();
        Cached::with_rule(FbRule { name, cfg }, shared)
    }
}

impl Rule for FbRule {
    type State = FbState;

    fn name(&self) -> &str {
        self.name
    }

    fn blocks(&self, _n: usize) -> Result<(usize, usize)> {
        Ok((self.cfg.front_blocks, self.cfg.back_blocks))
    }

    /// Reuse when the front blocks changed by at most `threshold` since the last computed call.
    fn decide(&self, st: &mut FbState, call: &Call<'_>) -> Result<Wish> {
        let cfg = &self.cfg;
        let front = call.front()?;
        let measured = match cfg.metric {
            HeadMetric::ResidualRelL1 => (&front.output.hidden - front.input)?,
            HeadMetric::HiddenRelL1 | HeadMetric::HiddenRelL2 => front.output.hidden.clone(),
        };
        let measured = downsample(&measured, cfg.downsample)?;
        let metric = match &st.head {
            // Averaged over the ranks (sequence parallel): every rank decides alike.
            Some(prev) if !call.verdict.imposed() => {
                let d = match cfg.metric {
                    HeadMetric::HiddenRelL2 => synced_rel_l2(&measured, prev, call.sync)?,
                    _ => synced_rel_l1(&measured, prev, call.sync)?,
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
        st.measured = Some(measured);
        Ok(Wish::reuse_if(
            metric.is_some_and(|d| d <= cfg.threshold),
            metric,
        ))
    }

    fn settle(&self, st: &mut FbState, reused: bool, metric: Option<f64>) -> Option<f64> {
        let measured = st.measured.take();
        if !reused {
            st.head = measured;
        }
        metric
    }

    fn state_bytes(&self, st: &FbState) -> usize {
        st.head.as_ref().map(tensor_bytes).unwrap_or(0)
    }
}

/// Every `s`-th token (dimension 1 of a `[B, L, ...]` tensor; dimension 0 of a vector). A step
/// that leaves one token of several is refused, naming the key: the metric would be one token's.
fn downsample(t: &Tensor, s: usize) -> Result<Tensor> {
    if s <= 1 {
        return Ok(t.clone());
    }
    let dim = usize::from(t.rank() >= 2);
    let n = t.dim(dim)?;
    if s >= n && n > 1 {
        return Err(Error::msg(format!(
            "cache.downsample ({s}) is not below the {n} tokens the first block gives: one token alone would be measured; give at most {}",
            n - 1
        )));
    }
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

#[cfg(test)]
mod tests {
    use super::downsample;
    use magcache_core::candle_core::{Device, Tensor};

    /// Every `s`-th token of `[B, L, D]`; a step that leaves one token of several is refused
    /// naming the key, while a one-token sequence stays measurable.
    #[test]
    fn downsample_keeps_every_sth_token_and_refuses_one_of_many() {
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 8, 3))
            .unwrap();
        let d = downsample(&t, 3).unwrap();
        assert_eq!(d.dims(), &[1, 3, 3]);
        let first: Vec<f32> = d
            .squeeze(0)
            .unwrap()
            .get_on_dim(1, 0)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(first, vec![0.0, 9.0, 18.0]);
        assert_eq!(downsample(&t, 7).unwrap().dims(), &[1, 2, 3]);
        let err = downsample(&t, 8).unwrap_err().to_string();
        assert!(
            err.contains("cache.downsample") && err.contains("at most 7"),
            "{err}"
        );
        let one = t.narrow(1, 0, 1).unwrap();
        assert_eq!(downsample(&one, 4).unwrap().dims(), &[1, 1, 3]);
    }
}
