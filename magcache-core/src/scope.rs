//! Cache scopes: every (expert, branch) pair keeps its own cache state and its own step count.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The classifier-free-guidance branch of a transformer call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Branch {
    Cond,
    Uncond,
}

impl Branch {
    pub fn as_str(self) -> &'static str {
        match self {
            Branch::Cond => "cond",
            Branch::Uncond => "uncond",
        }
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

impl GenerationPlan {
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
