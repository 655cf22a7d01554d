//! The walkthrough of `docs/adding-a-strategy.md`: a new strategy written as a user would, outside
//! the strategies' own sources, on the shared engine. Its rule: reuse while the timestep embedding
//! moved by less than `threshold` (relative L1) since the last computed call. The doc quotes this
//! file; `the_doc_quotes_this_file` keeps them in step.

use magcache_core::candle_core::Tensor;
use magcache_core::runtime::registry::StrategyRegistration;
use magcache_core::sync::synced_rel_l1;
use magcache_core::{BuildEnv, Indicator, Result, StrategyConfig, TimestepCache};
use magcache_strategies::{Cached, Call, Rule, SharedKeys, Wish};

// --- strategy: begin
magcache_strategies::strategy_config! {
    /// `[cache] strategy = "drift"`: the config's own keys; the shared ones are added.
    pub struct DriftConfig {
        /// Largest relative change of the timestep embedding that still reuses.
        pub threshold: f64 = 0.1,
    }
}

/// Per scope: the embedding of the last computed call, and this call's.
#[derive(Default)]
pub struct DriftState {
    last_computed: Option<Tensor>,
    now: Option<Tensor>,
}

pub struct DriftRule {
    threshold: f64,
}

impl Rule for DriftRule {
    type State = DriftState;

    fn name(&self) -> &str {
        "drift"
    }

    fn decide(&self, st: &mut DriftState, call: &Call<'_>) -> Result<Wish> {
        let now = call.indicator(Indicator::TimestepEmbedding)?;
        let metric = match &st.last_computed {
            Some(prev) => Some(synced_rel_l1(&now, prev, call.sync)?),
            None => None,
        };
        st.now = Some(now);
        Ok(Wish::reuse_if(
            metric.is_some_and(|m| m < self.threshold),
            metric,
        ))
    }

    fn settle(&self, st: &mut DriftState, reused: bool, metric: Option<f64>) -> Option<f64> {
        if !reused {
            st.last_computed = st.now.take();
        }
        metric
    }
}

#[typetag::serde(name = "drift")]
impl StrategyConfig for DriftConfig {
    fn validate(&self, file: &str) -> Result<()> {
        magcache_strategies::check_threshold(file, self.threshold)?;
        self.shared().validate(file)
    }
    fn build(&self, _env: &BuildEnv<'_>) -> Result<Option<Box<dyn TimestepCache>>> {
        let rule = DriftRule {
            threshold: self.threshold,
        };
        Ok(Some(Box::new(Cached::with_rule(rule, self.shared()))))
    }
    fn threshold(&self) -> Option<f64> {
        Some(self.threshold)
    }
}

inventory::submit! {
    StrategyRegistration { name: "drift", description: "reuse while the timestep embedding drifts less than `threshold`", defaults: || Box::new(DriftConfig::default()) }
}
// --- strategy: end

use magcache_core::candle_core::Device;
use magcache_core::{Branch, CacheHandle, CallCx, GenerationPlan, PerBlock, StepsSpec, Streams};

/// Runs `steps` calls of one scope through a two-block chain (`x -> 2x + 1`) whose embedding is
/// `emb(step)`; returns the computed flags and the outputs.
fn drive(toml: &str, steps: usize, emb: impl Fn(usize) -> f32) -> (Vec<bool>, Vec<f32>) {
    let cfg: Box<dyn StrategyConfig> = toml::from_str(toml).unwrap();
    cfg.validate("run.toml").unwrap();
    let info = magcache_core::ModelInfo::default();
    let env = BuildEnv {
        file: "run.toml",
        base_dir: std::path::Path::new("."),
        model: &info,
    };
    let cache = CacheHandle::new(cfg.build(&env).unwrap().unwrap());
    let sigmas: Vec<f64> = (0..steps).map(|i| 1.0 - i as f64 / steps as f64).collect();
    let plan =
        GenerationPlan::from_steps(&StepsSpec::new("toy", "euler", &sigmas, &[Branch::Cond]));
    cache.lock().unwrap().begin_generation(&plan).unwrap();
    let (mut computed, mut outs) = (Vec::new(), Vec::new());
    for step in 0..steps {
        let e = Tensor::new(&[emb(step)], &Device::Cpu).unwrap();
        let chain = PerBlock::new(2, |_, x: Streams| {
            Ok(Streams::hidden(((x.hidden * 2.0)? + 1.0)?))
        })
        .with_indicator(Indicator::TimestepEmbedding, &e);
        let cx = CallCx::new(magcache_core::ScopeKey::new(0, Branch::Cond), Some(&cache));
        let x = Tensor::new(&[step as f32], &Device::Cpu).unwrap();
        let out = cx.run_chain(&chain, Streams::hidden(x)).unwrap();
        computed.push(cx.decision().unwrap().computed);
        outs.push(out.hidden.to_vec1::<f32>().unwrap()[0]);
    }
    (computed, outs)
}

#[test]
fn the_rule_decides_and_the_engine_reuses_the_residual_once() {
    // Embedding 1, 1.05, 1.2, 2, 2.05: reuse while within 10 % of the last computed one.
    let emb = [1.0, 1.05, 1.2, 2.0, 2.05];
    let (computed, outs) = drive("strategy = \"drift\"", 5, |i| emb[i]);
    assert_eq!(computed, [true, false, true, true, false]);
    // Computed: 4x + 3. Reused at step 1: x + the residual of step 0 (3x + 3 at x = 0) = 1 + 3.
    assert_eq!(outs[0], 3.0);
    assert_eq!(outs[1], 4.0);
    assert_eq!(outs[2], 11.0);
}

#[test]
fn the_shared_keys_come_with_the_config() {
    // `warmup_steps = 2` forces step 1 to compute; `estimator = "taylor1"` forecasts step 4 from
    // the residuals of steps 1 and 3 (3x + 3 at x = 1 and 3: 6 and 12, so 15 at step 4).
    let toml = "strategy = \"drift\"\nwarmup_steps = 2\nestimator = \"taylor1\"";
    let (computed, outs) = drive(toml, 5, |i| [1.0, 1.0, 1.0, 2.0, 2.0][i]);
    assert_eq!(computed, [true, true, false, true, false]);
    assert_eq!(outs[4], 4.0 + 15.0);
    let bad: Box<dyn StrategyConfig> =
        toml::from_str("strategy = \"drift\"\nmax_consecutive = 0").unwrap();
    let e = bad.validate("run.toml").unwrap_err().to_string();
    assert!(
        e.contains("run.toml") && e.contains("cache.max_consecutive"),
        "{e}"
    );
}

#[test]
fn the_doc_quotes_this_file() {
    let doc = include_str!("../../docs/adding-a-strategy.md");
    let src = include_str!("new_strategy.rs");
    let begin = "// --- strategy: begin\n";
    let end = "// --- strategy: end";
    let start = src.find(begin).unwrap() + begin.len();
    let code = &src[start..src.find(end).unwrap()];
    assert!(
        doc.contains(code),
        "docs/adding-a-strategy.md must quote the strategy verbatim"
    );
    let lines = code.lines().filter(|l| !l.trim().is_empty()).count();
    let stated = format!("**{lines} lines**");
    assert!(doc.contains(&stated), "the doc must say {stated}");
}
