//! Guards shared by every strategy: calls forced to compute, a cap on consecutive reuses, CFG
//! sharing, and the few-step warning.
//!
//! Each strategy config carries the same four keys (flat in `[cache]`, see docs/config.md; declared
//! once by [`crate::strategy_config!`]):
//! - `warmup_steps`: the first `n` calls of every scope compute;
//! - `last_steps`: the last `n` calls of every scope compute;
//! - `max_consecutive`: at most `n` reused calls in a row per scope (absent: no cap);
//! - `cfg_shared`: the uncond call of a step takes the decision the cond call of the same step and
//!   expert took, instead of deciding itself (as Wan2.2's cache manager does); it still computes when
//!   it has no residual yet.
//!
//! The engine ([`crate::engine`]) asks [`Guards::verdict`] before a rule decides, gives the verdict to
//! the rule, turns the rule's wish into the decision ([`crate::Wish::decide`]) and reports it with
//! [`Guards::record`]. The guards never see a tensor.

use magcache_core::{Branch, Error, GenerationPlan, Result, ScopeKey};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Fewer calls than this per scope and caching gains little while each reused call covers a large
/// part of the noise range (mold refuses to cache below 12 steps): [`few_step_warnings`] speaks up.
pub const FEW_STEPS: usize = 12;

/// The guard keys of a strategy config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GuardConfig {
    pub warmup_steps: usize,
    pub last_steps: usize,
    pub max_consecutive: Option<usize>,
    pub cfg_shared: bool,
    /// The strategy's own names of the two keys, for messages.
    #[serde(skip)]
    pub names: GuardNames,
}

/// What a strategy's run file calls [`GuardConfig::warmup_steps`] and
/// [`GuardConfig::last_steps`] (SeaCache: diffusers' `retention_steps`, `cache_end_steps`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GuardNames {
    pub warmup: &'static str,
    pub last: &'static str,
}

impl Default for GuardNames {
    fn default() -> Self {
        GuardNames {
            warmup: "warmup_steps",
            last: "last_steps",
        }
    }
}

impl GuardConfig {
    /// The keys under their usual names (`warmup_steps`, `last_steps`).
    pub fn new(
        warmup_steps: usize,
        last_steps: usize,
        max_consecutive: Option<usize>,
        cfg_shared: bool,
    ) -> Self {
        GuardConfig {
            warmup_steps,
            last_steps,
            max_consecutive,
            cfg_shared,
            names: GuardNames::default(),
        }
    }

    /// The warnings on `plan`: [`Self::dense_warning`], [`Self::cfg_shared_warning`] and
    /// [`idle_expert_warning`].
    pub fn plan_warnings(&self, name: &str, plan: &GenerationPlan) -> Vec<String> {
        let dense = self.dense_warning(name, plan);
        dense
            .into_iter()
            .chain(self.cfg_shared_warning(name, plan))
            .chain(idle_expert_warning(name, plan))
            .collect()
    }

    /// A warning when `warmup_steps` and `last_steps` compute every call of a scope of `plan`
    /// (the cache then runs dense); `name`: the strategy's.
    pub fn dense_warning(&self, name: &str, plan: &GenerationPlan) -> Option<String> {
        let sp = plan.scopes.iter().find(|sp| {
            (0..sp.steps).all(|s| s < self.warmup_steps || s + self.last_steps >= sp.steps)
        })?;
        let GuardNames { warmup, last } = self.names;
        Some(format!(
            "{name}: cache.{warmup} ({}) and cache.{last} ({}) compute every one of the {} calls of scope {}: nothing can be reused (the run is dense)",
            self.warmup_steps, self.last_steps, sp.steps, sp.key
        ))
    }

    /// A warning when `cfg_shared` is set and no scope of `plan` has an unconditional twin (no
    /// CFG, or CFG batched into one call): it then changes nothing.
    pub fn cfg_shared_warning(&self, name: &str, plan: &GenerationPlan) -> Option<String> {
        let uncond = plan.scopes.iter().any(|sp| sp.key.branch == Branch::Uncond);
        (self.cfg_shared && !uncond).then(|| format!(
            "{name}: cache.cfg_shared = true has no unconditional calls to share with here (no CFG, or CFG batched into one call per step): it changes nothing"
        ))
    }

    /// Checks the keys (`cache.max_consecutive` must allow at least one reuse when given).
    pub fn validate(&self, file: &str) -> Result<()> {
        if self.max_consecutive == Some(0) {
            return Err(Error::config(
                file,
                "cache.max_consecutive",
                "0 would forbid every reuse: give at least 1, or remove the key (no cap)",
            ));
        }
        Ok(())
    }

    /// The calls a scope of `steps` calls must compute whatever the data says: the first call, the
    /// warm-up and the last steps, and one call after every `max_consecutive` reuses. A lower bound,
    /// used for the best speedup a strategy could reach.
    pub fn min_computed(&self, steps: usize) -> usize {
        if steps == 0 {
            return 0;
        }
        let head = self.warmup_steps.max(1).min(steps);
        let tail = self.last_steps.min(steps - head);
        let free = steps - head - tail;
        let capped = match self.max_consecutive {
            Some(k) => free / (k + 1),
            None => 0,
        };
        head + tail + capped
    }
}

/// What the guards impose on one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The strategy decides.
    Free,
    /// The call computes (warm-up, last steps, consecutive cap, or the cond call computed).
    Compute,
    /// The call reuses if it can (`cfg_shared`: the cond call of this step reused).
    Reuse,
}

impl Verdict {
    /// True when the strategy's own rule is overridden (its metric is not needed).
    pub fn imposed(self) -> bool {
        self != Verdict::Free
    }
}

/// The guards' state over one generation.
#[derive(Clone, Debug, Default)]
pub struct Guards {
    cfg: GuardConfig,
    consecutive: HashMap<ScopeKey, usize>,
    /// Decision (`true`: reused) of the cond call of each (expert, step within the scope).
    cond: HashMap<(usize, usize), bool>,
    /// Scopes with a cond twin in the plan (`cfg_shared` applies to them).
    shared: Vec<ScopeKey>,
}

impl Guards {
    pub fn new(cfg: GuardConfig) -> Self {
        Guards {
            cfg,
            ..Default::default()
        }
    }

    pub fn config(&self) -> &GuardConfig {
        &self.cfg
    }

    /// Resets for a new generation.
    pub fn begin(&mut self, plan: &GenerationPlan) {
        self.consecutive.clear();
        self.cond.clear();
        self.shared = plan
            .scopes
            .iter()
            .filter(|s| {
                s.key.branch == Branch::Uncond
                    && plan
                        .scope(ScopeKey::new(s.key.expert, Branch::Cond))
                        .is_some_and(|c| c.steps == s.steps)
            })
            .map(|s| s.key)
            .collect();
    }

    /// The verdict for call `step` (0-based within the scope) of a scope with `steps` calls.
    pub fn verdict(&self, scope: ScopeKey, step: usize, steps: usize) -> Verdict {
        let c = &self.cfg;
        if step < c.warmup_steps || step + c.last_steps >= steps {
            return Verdict::Compute;
        }
        if let Some(k) = c.max_consecutive {
            if self.consecutive.get(&scope).copied().unwrap_or(0) >= k {
                return Verdict::Compute;
            }
        }
        if c.cfg_shared && self.shared.contains(&scope) {
            if let Some(&reused) = self.cond.get(&(scope.expert, step)) {
                return if reused {
                    Verdict::Reuse
                } else {
                    Verdict::Compute
                };
            }
        }
        Verdict::Free
    }

    /// Records the final decision of call `step` of `scope`.
    pub fn record(&mut self, scope: ScopeKey, step: usize, reused: bool) {
        let n = self.consecutive.entry(scope).or_insert(0);
        *n = if reused { *n + 1 } else { 0 };
        if scope.branch == Branch::Cond {
            self.cond.insert((scope.expert, step), reused);
        }
    }
}

/// A warning when a two-expert run (`plan.boundary_ratio` set) gives one expert no step: that
/// model is loaded and never runs, and the cache's settings for it (a ratio curve, coefficients)
/// are not used.
pub fn idle_expert_warning(name: &str, plan: &GenerationPlan) -> Option<String> {
    let b = plan.boundary_ratio?;
    let runs = |e: usize| {
        plan.scopes
            .iter()
            .any(|sp| sp.key.expert == e && sp.steps > 0)
    };
    let idle = (0..2).find(|&e| !runs(e))?;
    let which = ["high-noise", "low-noise"][idle];
    Some(format!(
        "{name}: sampling.boundary_ratio ({b}) gives expert {idle} (the {which} one) none of the {} steps: it is loaded and never runs, and the cache's settings for it are not used",
        plan.total_steps
    ))
}

/// Warnings for the scopes of `plan` too short for caching to pay, with the best call speedup the
/// guards allow (`name`: the strategy, for the message). One line per distinct step count, naming
/// every scope that has it (both experts of a Wan2.2 run, every CFG branch).
pub fn few_step_warnings(name: &str, plan: &GenerationPlan, cfg: &GuardConfig) -> Vec<String> {
    let mut counts: Vec<usize> = Vec::new();
    for sp in &plan.scopes {
        if sp.steps > 0 && sp.steps < FEW_STEPS && !counts.contains(&sp.steps) {
            counts.push(sp.steps);
        }
    }
    counts
        .into_iter()
        .map(|steps| {
            let scopes: Vec<String> = plan
                .scopes
                .iter()
                .filter(|sp| sp.steps == steps)
                .map(|sp| sp.key.to_string())
                .collect();
            let min = cfg.min_computed(steps).max(1);
            format!(
                "{name}: {} {} {} only {steps} steps (under {FEW_STEPS}): caching can skip at most {} of them (at best {:.2}x fewer calls for {}), and on a few-step schedule each skipped call spans a large part of the noise range and costs visible quality; consider a dense run (remove [cache]) for distilled few-step models",
                if scopes.len() == 1 { "scope" } else { "scopes" },
                scopes.join(", "),
                if scopes.len() == 1 { "has" } else { "have" },
                steps - min,
                steps as f64 / min as f64,
                if scopes.len() == 1 { "this scope" } else { "each" },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Wish;
    use magcache_core::StepsSpec;

    fn plan(steps: usize) -> GenerationPlan {
        let sig: Vec<f64> = (0..steps).map(|i| 1.0 - i as f64 / steps as f64).collect();
        GenerationPlan::from_steps(&StepsSpec::new(
            "wan2.1",
            "flow-euler",
            &sig,
            &[Branch::Cond, Branch::Uncond],
        ))
    }

    #[test]
    fn warmup_last_and_cap() {
        let cfg = GuardConfig {
            warmup_steps: 2,
            last_steps: 1,
            max_consecutive: Some(2),
            cfg_shared: false,
            names: Default::default(),
        };
        let mut g = Guards::new(cfg);
        g.begin(&plan(10));
        let s = ScopeKey::new(0, Branch::Cond);
        let mut got = Vec::new();
        for step in 0..10 {
            let v = g.verdict(s, step, 10);
            let reused = Wish::reuse_if(true, None).decide(v, step > 0);
            g.record(s, step, reused);
            got.push(reused);
        }
        // warm-up 0,1; then reuse 2,3; cap forces 4; reuse 5,6; cap 7; reuse 8; last step 9.
        assert_eq!(
            got,
            [false, false, true, true, false, true, true, false, true, false]
        );
        assert_eq!(g.config().min_computed(10), 2 + 1 + 7 / 3);
    }

    /// `cfg_shared` on a run without an unconditional branch changes nothing: said; with one (or
    /// off) nothing is said.
    #[test]
    fn cfg_shared_without_cfg_is_said() {
        let on = GuardConfig {
            cfg_shared: true,
            ..Default::default()
        };
        let sig = [1.0, 0.5, 0.2];
        for branches in [&[Branch::Cond][..], &[Branch::Batched]] {
            let p =
                GenerationPlan::from_steps(&StepsSpec::new("wan2.1", "flow-euler", &sig, branches));
            let w = on.cfg_shared_warning("fbcache", &p).unwrap();
            assert!(w.contains("cache.cfg_shared"), "{w}");
            assert!(GuardConfig::default()
                .cfg_shared_warning("fbcache", &p)
                .is_none());
        }
        assert!(on.cfg_shared_warning("fbcache", &plan(3)).is_none());
    }

    #[test]
    fn cfg_shared_follows_the_cond_call() {
        let cfg = GuardConfig {
            cfg_shared: true,
            ..Default::default()
        };
        let mut g = Guards::new(cfg);
        g.begin(&plan(6));
        let (c, u) = (
            ScopeKey::new(0, Branch::Cond),
            ScopeKey::new(0, Branch::Uncond),
        );
        let cond_wants = [false, true, false, true, true, false];
        for (step, &want) in cond_wants.iter().enumerate() {
            let reused = Wish::reuse_if(want, None).decide(g.verdict(c, step, 6), step > 0);
            g.record(c, step, reused);
            let v = g.verdict(u, step, 6);
            // The uncond call wants the opposite: the guard overrides it.
            let ru = Wish::reuse_if(!want, None).decide(v, step > 0);
            assert_eq!(ru, reused, "step {step}");
            assert!(v.imposed());
            g.record(u, step, ru);
        }
    }

    #[test]
    fn zero_cap_is_refused_and_few_steps_warn() {
        let cfg = GuardConfig {
            max_consecutive: Some(0),
            ..Default::default()
        };
        assert!(cfg.validate("r.toml").is_err());
        // The dense run's warning names the strategy's own keys (SeaCache's are diffusers').
        let sea = GuardConfig {
            warmup_steps: 1,
            last_steps: 1,
            names: GuardNames {
                warmup: "retention_steps",
                last: "cache_end_steps",
            },
            ..Default::default()
        };
        let w = sea.dense_warning("seacache", &plan(2)).unwrap();
        assert!(
            w.contains("cache.retention_steps (1)") && w.contains("cache.cache_end_steps (1)"),
            "{w}"
        );
        let w = few_step_warnings("fbcache", &plan(4), &GuardConfig::default());
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("4 steps") && w[0].contains("4.00x"),
            "{}",
            w[0]
        );
        // One line for both CFG branches, naming each of them.
        let keys: Vec<String> = plan(4).scopes.iter().map(|s| s.key.to_string()).collect();
        assert_eq!(keys.len(), 2);
        assert!(keys.iter().all(|k| w[0].contains(k.as_str())), "{}", w[0]);
        assert!(few_step_warnings("fbcache", &plan(12), &GuardConfig::default()).is_empty());
    }
}
