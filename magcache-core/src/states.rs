//! Per-scope state with its own step accounting, shared by every strategy.

use crate::error::{Error, Result};
use crate::scope::{GenerationPlan, ScopeKey, ScopePlan};
use std::collections::BTreeMap;

/// One scope's slot: how many steps it runs, how many calls it has had, and the strategy's state.
#[derive(Clone, Debug)]
pub struct ScopeSlot<S> {
    pub steps: usize,
    pub calls: usize,
    pub sigmas: Vec<f64>,
    pub state: S,
}

/// Strategy state keyed by scope. Built anew by [`ScopeStates::begin`] for every generation, so no
/// state survives a generation or crosses scopes.
#[derive(Clone, Debug)]
pub struct ScopeStates<S> {
    map: BTreeMap<ScopeKey, ScopeSlot<S>>,
}

impl<S> Default for ScopeStates<S> {
    fn default() -> Self {
        ScopeStates {
            map: BTreeMap::new(),
        }
    }
}

impl<S> ScopeStates<S> {
    /// Drops all state and creates one fresh slot per planned scope.
    pub fn begin(
        &mut self,
        plan: &GenerationPlan,
        mut init: impl FnMut(&ScopePlan) -> Result<S>,
    ) -> Result<()> {
        self.map.clear();
        for sp in &plan.scopes {
            if self.map.contains_key(&sp.key) {
                return Err(Error::msg(format!(
                    "generation plan lists scope {} twice",
                    sp.key
                )));
            }
            let state = init(sp)?;
            self.map.insert(
                sp.key,
                ScopeSlot {
                    steps: sp.steps,
                    calls: 0,
                    sigmas: sp.sigmas.clone(),
                    state,
                },
            );
        }
        Ok(())
    }

    pub fn get(&self, key: ScopeKey) -> Result<&ScopeSlot<S>> {
        self.map.get(&key).ok_or(Error::ScopeNotPlanned(key))
    }

    pub fn get_mut(&mut self, key: ScopeKey) -> Result<&mut ScopeSlot<S>> {
        self.map.get_mut(&key).ok_or(Error::ScopeNotPlanned(key))
    }

    /// Counts a new call of `key` and returns its step index within the scope. A call beyond the
    /// announced steps is an error.
    pub fn start_call(&mut self, key: ScopeKey) -> Result<(usize, &mut ScopeSlot<S>)> {
        let slot = self.get_mut(key)?;
        let step = slot.calls;
        if step >= slot.steps {
            return Err(Error::ScopeOverrun {
                scope: key,
                call: step + 1,
                steps: slot.steps,
            });
        }
        slot.calls += 1;
        Ok((step, slot))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ScopeKey, &ScopeSlot<S>)> {
        self.map.iter()
    }

    pub fn values(&self) -> impl Iterator<Item = &ScopeSlot<S>> {
        self.map.values()
    }
}
