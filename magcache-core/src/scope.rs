//! Cache scopes: every (expert, branch) pair keeps its own cache state and its own step count.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The classifier-free-guidance branch of a transformer call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Branch {
    Cond,
    Uncond,
    /// One call for both branches batched together (`[cond; uncond]` rows, as Z-Image's pipeline
    /// runs classifier-free guidance): one cache decision per call. Named after the context
    /// diffusers' hooks open for such a call.
    #[serde(rename = "inference")]
    Batched,
}

impl Branch {
    pub fn as_str(self) -> &'static str {
        match self {
            Branch::Cond => "cond",
            Branch::Uncond => "uncond",
            Branch::Batched => "inference",
        }
    }

    /// The branch a name (`cond`, `uncond`, `inference`) stands for.
    pub fn parse(name: &str) -> Option<Branch> {
        [Branch::Cond, Branch::Uncond, Branch::Batched]
            .into_iter()
            .find(|b| b.as_str() == name)
    }
}

impl fmt::Display for Branch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Key of one cache scope. `expert` is 0 for single-model families and for the high-noise expert of a
/// dual-expert model, 1 for the low-noise expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ScopeKey {
    pub expert: usize,
    pub branch: Branch,
}

impl ScopeKey {
    pub const fn new(expert: usize, branch: Branch) -> Self {
        ScopeKey { expert, branch }
    }
}

impl fmt::Display for ScopeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "(expert {}, {})", self.expert, self.branch)
    }
}

/// What a cache is told about one scope before a generation starts.
#[derive(Clone, Debug, PartialEq)]
pub struct ScopePlan {
    pub key: ScopeKey,
    /// Number of calls this scope will receive in the generation (the steps its expert runs).
    pub steps: usize,
    /// The noise level (sigma, 0..1) of each of those calls, in call order.
    pub sigmas: Vec<f64>,
    /// The sampler step (over the whole generation) of each of those calls.
    pub step_indices: Vec<usize>,
}

/// Everything a cache is told before a generation: the scopes, and what the run samples with.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationPlan {
    pub scopes: Vec<ScopePlan>,
    /// Steps of the whole generation (all experts together).
    pub total_steps: usize,
    /// Model family name (`wan2.1`, ...), for messages.
    pub family: String,
    /// Sampler name (`flow-euler`, ...).
    pub scheduler: String,
    /// Static flow shift, where the sampler has one.
    pub shift: Option<f64>,
    /// Expert boundary (dual-expert models).
    pub boundary_ratio: Option<f64>,
}

/// What a loop knows before it runs, from which [`GenerationPlan::from_steps`] derives the plan.
#[derive(Clone, Debug, Default)]
pub struct StepsSpec<'a> {
    pub family: &'a str,
    /// Sampler name (`flow-euler`, `unipc`, ...).
    pub scheduler: &'a str,
    pub shift: Option<f64>,
    pub boundary_ratio: Option<f64>,
    /// Noise level (sigma, 0..1) of every sampler step.
    pub sigmas: &'a [f64],
    /// The expert of every sampler step (empty: expert 0 everywhere).
    pub experts: &'a [usize],
    /// The CFG branches every step calls, in call order.
    pub branches: &'a [Branch],
}

impl<'a> StepsSpec<'a> {
    /// One expert, no shift or boundary: `family`'s loop with `scheduler` over `sigmas`, calling
    /// `branches` at every step. Set `experts`, `shift`, `boundary_ratio` on the result as needed.
    pub fn new(
        family: &'a str,
        scheduler: &'a str,
        sigmas: &'a [f64],
        branches: &'a [Branch],
    ) -> Self {
        StepsSpec {
            family,
            scheduler,
            sigmas,
            branches,
            ..Default::default()
        }
    }
}

impl GenerationPlan {
    /// The plan of a loop that calls, at every step, each of `spec.branches` on the step's expert:
    /// one scope per (expert, branch) that runs at least one step, with its own step count.
    pub fn from_steps(spec: &StepsSpec<'_>) -> GenerationPlan {
        let steps = spec.sigmas.len();
        let expert_of = |i: usize| spec.experts.get(i).copied().unwrap_or(0);
        let mut experts: Vec<usize> = (0..steps).map(expert_of).collect();
        experts.sort_unstable();
        experts.dedup();
        let mut scopes = Vec::new();
        for e in experts {
            let idx: Vec<usize> = (0..steps).filter(|&i| expert_of(i) == e).collect();
            let sigmas: Vec<f64> = idx.iter().map(|&i| spec.sigmas[i]).collect();
            for &b in spec.branches {
                scopes.push(ScopePlan {
                    key: ScopeKey::new(e, b),
                    steps: idx.len(),
                    sigmas: sigmas.clone(),
                    step_indices: idx.clone(),
                });
            }
        }
        GenerationPlan {
            scopes,
            total_steps: steps,
            family: spec.family.to_string(),
            scheduler: spec.scheduler.to_string(),
            shift: spec.shift,
            boundary_ratio: spec.boundary_ratio,
        }
    }

    pub fn scope(&self, key: ScopeKey) -> Option<&ScopePlan> {
        self.scopes.iter().find(|s| s.key == key)
    }
    /// Every call of the generation in order: `(step, scope key, index of the call within its scope)`.
    /// Within a step, the cond call comes before the uncond call.
    pub fn calls(&self) -> Vec<(usize, ScopeKey, usize)> {
        let mut v: Vec<(usize, ScopeKey, usize)> = self
            .scopes
            .iter()
            .flat_map(|sp| {
                sp.step_indices
                    .iter()
                    .enumerate()
                    .map(move |(i, &step)| (step, sp.key, i))
            })
            .collect();
        v.sort_by_key(|(step, key, _)| (*step, key.branch, key.expert));
        v
    }

    /// The experts in the plan, ascending.
    pub fn experts(&self) -> Vec<usize> {
        let mut e: Vec<usize> = self.scopes.iter().map(|s| s.key.expert).collect();
        e.sort_unstable();
        e.dedup();
        e
    }
}
