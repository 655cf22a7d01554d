//! What `magcache plan` predicts for the few-step scopes of a data-free rule.

use super::{Cached, Rule};
use magcache_core::{GenerationPlan, TimestepCache};

impl<R: Rule> Cached<R> {
    /// For a data-free rule, what `magcache plan` predicts for each few-step scope (one per step
    /// count): its computed calls, and the share of the noise range its reused calls span (a flow
    /// sampler moves the sample by each call's output times its sigma interval, so a reused call
    /// over a tiny interval is nearly free); the predicted forecast error where the rule gives one.
    pub(super) fn few_step_predictions(&self, plan: &GenerationPlan) -> Vec<String> {
        if !self.rule.data_free() {
            return Vec::new();
        }
        // The sigma of every step of the generation, and 0 after the last.
        let mut all = vec![0.0; plan.total_steps + 1];
        for sp in &plan.scopes {
            for (&i, &sg) in sp.step_indices.iter().zip(&sp.sigmas) {
                if let Some(x) = all.get_mut(i) {
                    *x = sg;
                }
            }
        }
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for sp in &plan.scopes {
            if sp.steps == 0 || sp.steps >= crate::guards::FEW_STEPS || seen.contains(&sp.steps) {
                continue;
            }
            seen.push(sp.steps);
            let Some(d) = self.predict(sp.key) else {
                continue;
            };
            let marks: String = d
                .iter()
                .map(|c| if c.computed { '#' } else { '.' })
                .collect();
            let computed = d.iter().filter(|c| c.computed).count();
            let span: f64 = d
                .iter()
                .zip(&sp.step_indices)
                .filter(|(c, _)| !c.computed)
                .map(|(_, &i)| {
                    (all.get(i).copied().unwrap_or(0.0) - all.get(i + 1).copied().unwrap_or(0.0))
                        .abs()
                })
                // Not `sum()`: an empty f64 sum is -0.0, printed "-0.0 %".
                .fold(0.0, |a, b| a + b);
            let errs: Vec<f64> = d
                .iter()
                .filter(|c| !c.computed)
                .filter_map(|c| c.metric)
                .collect();
            let err = if errs.is_empty() {
                String::new()
            } else {
                let most = errs.iter().copied().fold(0.0, f64::max);
                let most = match most.abs() >= 1e6 {
                    true => format!("{most:.3e}"),
                    false => format!("{most:.4}"),
                };
                format!(
                    ", {} of the reused calls up to {most}",
                    self.rule.predicted_metric(),
                )
            };
            out.push(format!(
                "{}: `magcache plan` predicts for scope {}: `{marks}`, {computed} of {} calls computed ({:.2}x), the reused calls spanning {:.1} % of the noise range{err}",
                self.rule.name(),
                sp.key,
                sp.steps,
                sp.steps as f64 / computed.max(1) as f64,
                100.0 * span,
            ));
        }
        out
    }
}
