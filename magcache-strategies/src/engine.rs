//! The engine every strategy runs on: a strategy is its decision [`Rule`]; [`Cached`] does the rest.
//!
//! A rule says, for one call of one scope, whether it would reuse and with what metric. The engine
//! owns everything the strategies share:
//! - the per-scope state and step accounting ([`ScopeStates`]: one slot per (expert, branch), a call
//!   past the announced steps is an error);
//! - the guards ([`crate::guards`]: `warmup_steps`, `last_steps`, `max_consecutive`, `cfg_shared`)
//!   and the final decision under them;
//! - the residual store and the estimator ([`crate::residual`]: `reuse | taylor1 | taylor2 | foca`,
//!   in step index or in sigma);
//! - running the chain: the rule's front blocks (always run, measured by the rule), then the middle
//!   computed or stood in for by the input plus the estimated residual (added once), then the
//!   rule's back blocks (always run);
//! - the decision synchronisation of sequence-parallel runs (handed to the rule's metric);
//! - predictions of data-free rules (`magcache plan`), by replaying the plan's calls;
//! - the few-step warning, the cache's size.
//!
//! The final decision of a call: it reuses only when a residual exists, and then as the guards'
//! [`Verdict`] says: `Free` follows the rule's [`Want`], `Compute` computes, `Reuse` (the cond call of
//! this step reused, `cfg_shared`) reuses unless the rule forces a compute ([`Want::Force`]).
//!
//! A residual over the whole chain (no front blocks) keeps the hidden stream only: the model reads
//! only the hidden stream after its chain. A residual of the middle blocks keeps the encoder stream
//! too (FLUX's joint blocks), which the back blocks read.

use crate::guards::{few_step_warnings, GuardConfig, Guards, Verdict};
use crate::residual::{Combination, Estimator, EstimatorAxis, ResidualHistory};
use magcache_core::candle_core::Tensor;
use magcache_core::{
    BlockChain, CallDecision, DecisionSync, Error, GenerationPlan, Indicator, Result, ScopeKey,
    ScopePlan, ScopeStates, SingleProcess, Streams, TimestepCache,
};
use std::collections::HashMap;

mod predict;

/// The keys every rule-based strategy shares: the guards and the estimator.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Shared {
    pub guards: GuardConfig,
    pub estimator: Estimator,
    /// The coordinate the estimator extrapolates in.
    pub estimator_axis: EstimatorAxis,
}

impl Shared {
    /// Checks the keys; errors name `file` and the key.
    pub fn validate(&self, file: &str) -> Result<()> {
        if self.estimator == Estimator::Fitted {
            return Err(Error::config(
                file,
                "cache.estimator",
                "\"fitted\" reads per-call coefficients from a fitted profile: use strategy = \"schedule\" with profile = \"...\" (written by `magcache calibrate --fit`)",
            ));
        }
        self.guards.validate(file)
    }

    /// Checks that `plan` gives what the estimator axis needs (a sigma for every call).
    pub fn check_plan(&self, plan: &GenerationPlan) -> Result<()> {
        if self.estimator_axis == EstimatorAxis::Sigma {
            if let Some(sp) = plan
                .scopes
                .iter()
                .find(|sp| sp.sigmas.len() < sp.steps || sp.sigmas.iter().any(|s| !s.is_finite()))
            {
                return Err(Error::msg(format!(
                    "cache.estimator_axis = \"sigma\": the plan gives scope {} no sigma for some of its {} calls; use estimator_axis = \"step\"",
                    sp.key, sp.steps
                )));
            }
        }
        Ok(())
    }
}

/// A config that carries the shared keys (implemented by [`crate::strategy_config!`]).
pub trait SharedKeys {
    fn shared(&self) -> Shared;
}

/// What a rule would do with a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Reuse (when the guards leave the decision to the rule and a residual exists).
    Reuse,
    /// Compute, unless the guards impose a reuse (`cfg_shared`).
    Compute,
    /// Compute whatever the guards say (a rule's own warm-up, say).
    Force,
}

/// A rule's answer for one call: what it wants and the metric it decided from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Wish {
    pub want: Want,
    pub metric: Option<f64>,
}

impl Wish {
    /// Reuse when `reuse`, else compute (overridable by the guards).
    pub fn reuse_if(reuse: bool, metric: Option<f64>) -> Self {
        Wish {
            want: if reuse { Want::Reuse } else { Want::Compute },
            metric,
        }
    }

    /// Compute, with no metric.
    pub fn compute() -> Self {
        Wish {
            want: Want::Compute,
            metric: None,
        }
    }

    /// Compute whatever the guards say.
    pub fn force(metric: Option<f64>) -> Self {
        Wish {
            want: Want::Force,
            metric,
        }
    }

    /// The final decision (`true`: reuse) under the guards' `verdict`.
    pub fn decide(self, verdict: Verdict, has_residual: bool) -> bool {
        has_residual
            && match verdict {
                Verdict::Free => self.want == Want::Reuse,
                Verdict::Compute => false,
                Verdict::Reuse => self.want != Want::Force,
            }
    }
}

/// The blocks a rule runs before it decides.
pub struct Front<'a> {
    /// The hidden stream entering block 0.
    pub input: &'a Tensor,
    /// The streams leaving the front blocks.
    pub output: &'a Streams,
}

/// What a rule sees of one call.
pub struct Call<'a> {
    pub scope: ScopeKey,
    /// The call's index within its scope (0-based).
    pub step: usize,
    /// The scope's number of calls.
    pub steps: usize,
    /// The call's noise level, when the plan gives one.
    pub sigma: Option<f64>,
    /// What the guards impose on the call.
    pub verdict: Verdict,
    /// Whether a residual is stored (a reuse needs one).
    pub has_residual: bool,
    /// The front blocks' input and output, for rules with front blocks.
    pub front: Option<Front<'a>>,
    /// The hidden stream entering the cached (middle) blocks: the chain's input, or the front
    /// blocks' output; `None` when the call is predicted (no model runs).
    pub input: Option<&'a Tensor>,
    /// The decision synchronisation a data metric goes through.
    pub sync: &'a dyn DecisionSync,
    chain: Option<&'a dyn BlockChain>,
    strategy: &'a str,
}

impl Call<'_> {
    /// The model's indicator `kind` for this call; an error naming the strategy when the model has
    /// none, or when the call is being predicted (no model runs).
    pub fn indicator(&self, kind: Indicator) -> Result<Tensor> {
        let chain = self.chain.ok_or_else(|| {
            Error::msg(format!(
                "{}: decisions depend on the `{kind}` indicator and cannot be predicted",
                self.strategy
            ))
        })?;
        chain.indicator(kind)?.ok_or_else(|| {
            Error::msg(format!(
                "{}: the model offers no `{kind}` indicator (pick another, or another strategy)",
                self.strategy
            ))
        })
    }

    /// The front blocks' input and output; an error for a rule without front blocks.
    pub fn front(&self) -> Result<&Front<'_>> {
        self.front.as_ref().ok_or_else(|| {
            Error::msg(format!(
                "{}: the rule measures front blocks but runs none",
                self.strategy
            ))
        })
    }
}

/// A strategy's decision rule: what differs between strategies. [`Cached`] runs it.
pub trait Rule: Send + 'static {
    /// Per-scope state, made fresh for every generation.
    type State: Default + Send;

    /// The strategy's name (`magcache`, ...), for reports and messages.
    fn name(&self) -> &str;

    /// The state of scope `scope` at the start of a generation (default: `State::default()`).
    fn init(&self, plan: &GenerationPlan, scope: &ScopePlan) -> Result<Self::State> {
        let _ = (plan, scope);
        Ok(Self::State::default())
    }

    /// Warnings for the user at the start of a generation (the few-step warning is the engine's).
    fn warnings(&self, plan: &GenerationPlan) -> Vec<String> {
        let _ = plan;
        Vec::new()
    }

    /// Notes for the user on where the rule's settings come from (a fitted profile's provenance):
    /// shown with a run, not warnings.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }

    /// `(front, back)`: blocks of a chain of `n` that always run, before and after the cached middle
    /// (default none: the whole chain is cached).
    fn blocks(&self, n: usize) -> Result<(usize, usize)> {
        let _ = n;
        Ok((0, 0))
    }

    /// What the rule would do with `call`.
    fn decide(&self, state: &mut Self::State, call: &Call<'_>) -> Result<Wish>;

    /// Told, after a computed call, the hidden stream entering the cached (middle) blocks and the
    /// one leaving them (rules that learn from the model's response, as EasyCache's
    /// transformation rate does; default: nothing). Called after [`Rule::settle`].
    fn observe(&self, state: &mut Self::State, input: &Tensor, output: &Tensor) -> Result<()> {
        let _ = (state, input, output);
        Ok(())
    }

    /// The value the rule compared with its threshold for the call it just decided (`wish`), read
    /// before [`Rule::settle`] (default: the wish's metric).
    fn compared(&self, state: &Self::State, wish: &Wish) -> Option<f64> {
        let _ = state;
        wish.metric
    }

    /// Told the call's final decision (`reused`); returns the metric the call reports (default: the
    /// one the rule decided from).
    fn settle(&self, state: &mut Self::State, reused: bool, metric: Option<f64>) -> Option<f64> {
        let _ = (state, reused);
        metric
    }

    /// Computed residuals the rule's own forecast ([`Rule::forecast`]) reads: the engine keeps the
    /// last `history()` of them per scope, or what the estimator reads when that is more (default
    /// 0: the rule has no forecast of its own).
    fn history(&self) -> usize {
        0
    }

    /// The rule's own forecast of the reused call `call` at coordinate `at` (on the estimator's
    /// axis): weights over the stored computed calls `past` (`(step, coordinate)`, oldest first)
    /// and the share of the estimate they take, the estimator's forecast taking the rest (see
    /// [`Combination`]). Default: none, the estimator alone.
    fn forecast(
        &self,
        state: &Self::State,
        call: &Call<'_>,
        past: &[(usize, f64)],
        at: f64,
    ) -> Result<Option<Combination>> {
        let _ = (state, call, past, at);
        Ok(None)
    }

    /// Bytes of tensors the state holds (indicators kept for the next call).
    fn state_bytes(&self, state: &Self::State) -> usize {
        let _ = state;
        0
    }

    /// True when decisions depend on the plan alone (never on [`Call::indicator`] or
    /// [`Call::front`]): the engine can then predict a whole generation.
    fn data_free(&self) -> bool {
        false
    }

    /// What a data-free rule's metric on a reused call is, for `plan`'s prediction line (default:
    /// the predicted forecast error).
    fn predicted_metric(&self) -> &'static str {
        "predicted forecast error"
    }
}

/// Whether the rule's own comparison decided the call: the guards left it free, the rule did not
/// force a compute, and a residual could be reused.
fn free_choice(verdict: Verdict, wish: &Wish, has_residual: bool) -> bool {
    verdict == Verdict::Free && wish.want != Want::Force && has_residual
}

/// One scope's state in the engine: the rule's, and the residuals.
struct Slot<S> {
    rule: S,
    residuals: ResidualHistory,
}

/// A strategy: a [`Rule`] on the shared engine. Implements [`TimestepCache`].
pub struct Cached<R: Rule> {
    rule: R,
    shared: Shared,
    guards: Guards,
    states: ScopeStates<Slot<R::State>>,
    plan: GenerationPlan,
}

impl<R: Rule> Cached<R> {
    /// `rule` under the shared keys `shared`.
    pub fn with_rule(rule: R, shared: Shared) -> Self {
        Cached {
            guards: Guards::new(shared.guards.clone()),
            rule,
            shared,
            states: ScopeStates::default(),
            plan: GenerationPlan::default(),
        }
    }

    /// The rule.
    pub fn rule(&self) -> &R {
        &self.rule
    }

    fn fresh_slots(&self, plan: &GenerationPlan) -> Result<ScopeStates<Slot<R::State>>> {
        let mut states = ScopeStates::default();
        let e = self.shared.estimator;
        let keep = self.rule.history();
        states.begin(plan, |sp| {
            Ok(Slot {
                rule: self.rule.init(plan, sp)?,
                residuals: ResidualHistory::keeping(e, keep),
            })
        })?;
        Ok(states)
    }
}

impl<R: Rule> TimestepCache for Cached<R> {
    fn name(&self) -> &str {
        self.rule.name()
    }

    fn begin_generation(&mut self, plan: &GenerationPlan) -> Result<Vec<String>> {
        self.shared.check_plan(plan)?;
        self.states = self.fresh_slots(plan)?;
        self.guards.begin(plan);
        self.plan = plan.clone();
        let mut warnings = self.rule.warnings(plan);
        let (g, name) = (self.guards.config(), self.rule.name());
        warnings.extend(g.plan_warnings(name, plan));
        let few = few_step_warnings(name, plan, g);
        if !few.is_empty() {
            warnings.extend(few);
            warnings.extend(self.few_step_predictions(plan));
        }
        Ok(warnings)
    }

    fn notes(&self) -> Vec<String> {
        self.rule.notes()
    }

    fn run(
        &mut self,
        scope: ScopeKey,
        chain: &dyn BlockChain,
        x: Streams,
        sync: &dyn DecisionSync,
    ) -> Result<(Streams, CallDecision)> {
        let name = self.rule.name();
        let n = chain.num_blocks();
        let (fr, bk) = self.rule.blocks(n)?;
        // Front and back blocks always run: with none left between them a reused call would
        // skip nothing and count as saved. FBCache's single first block on a one-block model is
        // diffusers' case (a reuse adds a zero residual), kept.
        if fr + bk > n || (fr + bk == n && (fr, bk) != (1, 0) && (fr, bk) != (0, 0)) {
            return Err(Error::msg(format!(
                "{name}: cache.front_blocks ({fr}) + cache.back_blocks ({bk}) leave none of the model's {n} blocks to cache: their sum must be below {n}"
            )));
        }
        let (step, slot) = self.states.start_call(scope)?;
        let verdict = self.guards.verdict(scope, step, slot.steps);
        let input = x.hidden.clone();
        let front = if fr > 0 { chain.run(0..fr, x)? } else { x };
        let has_residual = !slot.state.residuals.is_empty();
        let sigma = slot.sigmas.get(step).copied();
        let call = Call {
            scope,
            step,
            steps: slot.steps,
            sigma,
            verdict,
            has_residual,
            front: (fr > 0).then_some(Front {
                input: &input,
                output: &front,
            }),
            input: Some(&front.hidden),
            sync,
            chain: Some(chain),
            strategy: name,
        };
        let wish = self.rule.decide(&mut slot.state.rule, &call)?;
        let reuse = wish.decide(verdict, has_residual);
        self.guards.record(scope, step, reuse);
        let compared = free_choice(verdict, &wish, has_residual)
            .then(|| self.rule.compared(&slot.state.rule, &wish))
            .flatten();
        let metric = self.rule.settle(&mut slot.state.rule, reuse, wish.metric);
        let residuals = &mut slot.state.residuals;
        let at = self.shared.estimator_axis.coordinate(step, sigma)?;
        let middle = if reuse {
            let own = self
                .rule
                .forecast(&slot.state.rule, &call, &residuals.points(), at)?;
            let res = residuals.estimate_with(at, own.as_ref())?.ok_or_else(|| {
                Error::Hooks(format!("{name} scope {scope}: reuse without a residual"))
            })?;
            if res.hidden.dims() != front.hidden.dims() {
                return Err(Error::msg(format!(
                    "{name} scope {scope}: cached residual has shape {:?} but the hidden states have {:?}; the input size changed within a generation",
                    res.hidden.dims(),
                    front.hidden.dims()
                )));
            }
            front.add(&res)?
        } else {
            let mid = chain.run(fr..n - bk, front.clone())?;
            let residual = if fr == 0 {
                Streams::hidden((&mid.hidden - &input)?)
            } else {
                mid.sub(&front)?
            };
            residuals.push(step, at, residual);
            self.rule
                .observe(&mut slot.state.rule, &front.hidden, &mid.hidden)?;
            mid
        };
        let out = if bk > 0 {
            chain.run(n - bk..n, middle)?
        } else {
            middle
        };
        let decision = CallDecision {
            computed: !reuse,
            metric,
            compared,
        };
        Ok((out, decision))
    }

    fn predict(&self, scope: ScopeKey) -> Option<Vec<CallDecision>> {
        // Replays every call of the plan in order on fresh states: exact for a data-free rule,
        // whose decisions depend on the plan and the guards only (`cfg_shared` included).
        if !self.rule.data_free() {
            return None;
        }
        self.states.get(scope).ok()?;
        let mut states = self.fresh_slots(&self.plan).ok()?;
        let mut has: HashMap<ScopeKey, bool> = HashMap::new();
        let mut guards = Guards::new(self.shared.guards.clone());
        guards.begin(&self.plan);
        let mut out = Vec::new();
        for (_, key, i) in self.plan.calls() {
            let slot = states.get_mut(key).ok()?;
            let has_residual = has.entry(key).or_insert(false);
            let verdict = guards.verdict(key, i, slot.steps);
            let call = Call {
                scope: key,
                step: i,
                steps: slot.steps,
                sigma: slot.sigmas.get(i).copied(),
                verdict,
                has_residual: *has_residual,
                front: None,
                input: None,
                sync: &SingleProcess,
                chain: None,
                strategy: self.rule.name(),
            };
            let wish = self.rule.decide(&mut slot.state.rule, &call).ok()?;
            let reuse = wish.decide(verdict, *has_residual);
            guards.record(key, i, reuse);
            let compared = free_choice(verdict, &wish, *has_residual)
                .then(|| self.rule.compared(&slot.state.rule, &wish))
                .flatten();
            let metric = self.rule.settle(&mut slot.state.rule, reuse, wish.metric);
            *has_residual |= !reuse;
            if key == scope {
                out.push(CallDecision {
                    computed: !reuse,
                    metric,
                    compared,
                });
            }
        }
        Some(out)
    }

    fn cached_bytes_by_scope(&self) -> Vec<(ScopeKey, usize)> {
        self.states
            .iter()
            .map(|(k, s)| {
                (
                    *k,
                    s.state.residuals.bytes() + self.rule.state_bytes(&s.state.rule),
                )
            })
            .collect()
    }
}

/// Declares a strategy's `[cache]` config: its own keys, each with its default, followed by the
/// shared keys of every rule-based strategy (`estimator`, `estimator_axis`, `warmup_steps`, `last_steps`,
/// `max_consecutive`, `cfg_shared`, see [`crate::guards`] and [`crate::residual`]), with
/// `Serialize`/`Deserialize` (unknown keys refused, missing keys defaulted), `Default` and
/// [`SharedKeys`]. The crate that uses it depends on `serde`.
///
/// ```
/// magcache_strategies::strategy_config! {
///     /// `[cache] strategy = "every_other"`.
///     pub struct EveryOtherConfig {
///         /// Reuse every `period`-th call.
///         pub period: usize = 2,
///     }
/// }
/// use magcache_strategies::engine::SharedKeys;
/// let c: EveryOtherConfig = toml::from_str("period = 3\nwarmup_steps = 1").unwrap();
/// assert_eq!((c.period, c.shared().guards.warmup_steps), (3, 1));
/// assert!(toml::from_str::<EveryOtherConfig>("perid = 3").is_err());
/// ```
#[macro_export]
macro_rules! strategy_config {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty = $default:expr ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
            /// What a reused call returns: `"reuse"` (the last computed residual), `"taylor1"`,
            /// `"taylor2"` or `"foca"` (its forecast from the last computed calls of the scope).
            pub estimator: $crate::residual::Estimator,
            /// The coordinate forecasts extrapolate in: `"step"` (the call's index) or `"sigma"`.
            pub estimator_axis: $crate::residual::EstimatorAxis,
            /// Guard: the first `n` calls of every scope compute.
            pub warmup_steps: usize,
            /// Guard: the last `n` calls of every scope compute.
            pub last_steps: usize,
            /// Guard: at most `n` reused calls in a row per scope (absent: no cap).
            pub max_consecutive: Option<usize>,
            /// Guard: the uncond call of a step takes the cond call's decision.
            pub cfg_shared: bool,
        }

        impl Default for $name {
            fn default() -> Self {
                $name {
                    $( $field: $default, )*
                    estimator: $crate::residual::Estimator::Reuse,
                    estimator_axis: $crate::residual::EstimatorAxis::Step,
                    warmup_steps: 0,
                    last_steps: 0,
                    max_consecutive: None,
                    cfg_shared: false,
                }
            }
        }

        impl $crate::engine::SharedKeys for $name {
            fn shared(&self) -> $crate::engine::Shared {
                $crate::engine::Shared {
                    guards: $crate::guards::GuardConfig::new(
                        self.warmup_steps,
                        self.last_steps,
                        self.max_consecutive,
                        self.cfg_shared,
                    ),
                    estimator: self.estimator,
                    estimator_axis: self.estimator_axis,
                }
            }
        }
    };
}
