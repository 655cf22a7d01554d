//! Resolution of MagCache ratio curves to one curve per scope.
//!
//! Sources, in order of precedence: `mag_ratios` in the config (one curve, or `high_noise` /
//! `low_noise` per expert), then the curves the model registered. Every curve is resampled to the
//! number of steps its scope runs.

use magcache_core::maths::nearest_interp;
use magcache_core::{Branch, Error, GenerationPlan, ModelInfo, Result, ScheduleMeta, ScopePlan};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A MagCache ratio curve per expert and branch, with the schedule it was calibrated on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RatioCurves {
    /// Index = expert. Each expert's curves cover that expert's own steps.
    pub experts: Vec<BTreeMap<Branch, Vec<f64>>>,
    pub schedule: Option<ScheduleMeta>,
    /// Sigma of each entry of each expert's curves, where known (calibration profiles); enables
    /// `resample = "sigma"`.
    pub expert_sigmas: Vec<Vec<f64>>,
    /// Where the curves come from, for messages (`published wan21_t2v_1_3b`, a profile path, ...).
    pub source: String,
}

/// What a model publishes for MagCache under the `magcache` key: a ratio curve from the MagCache
/// authors with the schedule it was calibrated on.
#[derive(Clone, Debug, Deserialize)]
pub struct MagPublished {
    /// Name of the curve, for messages.
    pub name: String,
    pub ratios: Vec<f64>,
    #[serde(default)]
    pub schedule: Option<ScheduleMeta>,
    /// `[cond 0, uncond 0, cond 1, uncond 1, ...]` (models calibrated with CFG) rather than one curve.
    #[serde(default)]
    pub interleaved: bool,
    /// Dual-expert models: the curve spans both experts; the high-noise expert ran this many steps.
    #[serde(default)]
    pub high_steps: Option<usize>,
}

/// Splits an interleaved `[cond0, uncond0, cond1, uncond1, ...]` array into per-branch curves.
pub fn deinterleave(v: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let cond = v.iter().step_by(2).copied().collect();
    let uncond = v.iter().skip(1).step_by(2).copied().collect();
    (cond, uncond)
}

impl MagPublished {
    /// The curves per expert and branch.
    pub fn curves(&self) -> RatioCurves {
        let branches = |lo: usize, hi: Option<usize>| -> BTreeMap<Branch, Vec<f64>> {
            if self.interleaved {
                let (c, u) = deinterleave(&self.ratios);
                let cut = |v: Vec<f64>| -> Vec<f64> {
                    let hi = hi.unwrap_or(v.len()).min(v.len());
                    v.get(lo.min(hi)..hi)
                        .map(<[f64]>::to_vec)
                        .unwrap_or_default()
                };
                BTreeMap::from([(Branch::Cond, cut(c)), (Branch::Uncond, cut(u))])
            } else {
                let hi = hi.unwrap_or(self.ratios.len()).min(self.ratios.len());
                let v = self.ratios.get(lo.min(hi)..hi).map(<[f64]>::to_vec);
                BTreeMap::from([(Branch::Cond, v.unwrap_or_default())])
            }
        };
        let experts = match self.high_steps {
            None => vec![branches(0, None)],
            Some(n) => vec![branches(0, Some(n)), branches(n, None)],
        };
        RatioCurves {
            experts,
            schedule: self.schedule.clone(),
            expert_sigmas: Vec::new(),
            source: format!("published curve `{}`", self.name),
        }
    }
}

/// The curves the model publishes for MagCache, if any.
/// Each curve is checked as a run file's would be (a model crate's table with a NaN, a zero or too
/// few entries for its `high_steps` is an error naming it, not a silently dense or skipping run).
pub fn published_curves(model: &ModelInfo) -> Result<Option<RatioCurves>> {
    let Some(p) = model.published::<MagPublished>("magcache")? else {
        return Ok(None);
    };
    let curves = p.curves();
    let what = format!(
        "{} ({}): published MagCache curve `{}`",
        model.family,
        model.variant.as_deref().unwrap_or("no variant"),
        p.name
    );
    for (e, branches) in curves.experts.iter().enumerate() {
        for (b, c) in branches {
            let at = match curves.experts.len() {
                1 => format!("ratios ({b})"),
                _ => format!("ratios (expert {e}, {b})"),
            };
            check_curve(&what, &at, c)?;
        }
    }
    Ok(Some(curves))
}

/// `mag_ratios = [...]` or `[cache.mag_ratios] high_noise = [...], low_noise = [...]`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum RatioSpec {
    Curve(Vec<f64>),
    PerExpert(PerExpert),
}

/// What `mag_ratios` accepts, for messages.
const RATIO_SHAPES: &str = "a list of positive numbers (`mag_ratios = [1.0, 0.99, ...]`, one curve) or a table of two lists, `high_noise` and `low_noise` (`[cache.mag_ratios]`, one curve per expert of a two-expert wan2.2)";

impl<'de> Deserialize<'de> for RatioSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RatioSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(RATIO_SHAPES)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<RatioSpec, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = seq.next_element::<f64>().map_err(|e| {
                    serde::de::Error::custom(format!(
                        "entry {}: {e}; expected {RATIO_SHAPES}",
                        v.len()
                    ))
                })? {
                    v.push(x);
                }
                Ok(RatioSpec::Curve(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<RatioSpec, A::Error> {
                PerExpert::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RatioSpec::PerExpert)
                    .map_err(|e| serde::de::Error::custom(format!("{e}; expected {RATIO_SHAPES}")))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerExpert {
    pub high_noise: Vec<f64>,
    pub low_noise: Vec<f64>,
}

/// Checks a curve: non-empty, every entry finite and positive.
pub fn check_curve(file: &str, key: &str, c: &[f64]) -> Result<()> {
    if c.is_empty() {
        return Err(Error::config(file, key, "the ratio curve is empty"));
    }
    if let Some((i, v)) = c
        .iter()
        .enumerate()
        .find(|(_, v)| !(v.is_finite() && **v > 0.0))
    {
        return Err(Error::config(
            file,
            key,
            format!("entry {i} is {v}: ratios must be positive and finite"),
        ));
    }
    Ok(())
}

impl RatioSpec {
    pub fn validate(&self, file: &str) -> Result<()> {
        match self {
            RatioSpec::Curve(c) => check_curve(file, "cache.mag_ratios", c),
            RatioSpec::PerExpert(p) => {
                check_curve(file, "cache.mag_ratios.high_noise", &p.high_noise)?;
                check_curve(file, "cache.mag_ratios.low_noise", &p.low_noise)
            }
        }
    }
}

/// How a curve is mapped onto a scope's steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resample {
    /// Nearest step index (`round(i * (len - 1) / (steps - 1))`), as the reference implementations.
    #[default]
    Index,
    /// Nearest noise level: each step takes the calibrated step whose sigma is closest. Needs a
    /// calibration profile (which records the sigmas); lets a profile serve another shift.
    Sigma,
}

/// Where the curves of a run come from.
#[derive(Clone, Debug)]
pub enum RatioSource {
    Config(RatioSpec),
    Registered(RatioCurves),
}

/// Number of steps the given expert runs in the plan (0 if none).
fn expert_steps(plan: &GenerationPlan, expert: usize) -> usize {
    plan.scopes
        .iter()
        .filter(|s| s.key.expert == expert)
        .map(|s| s.steps)
        .max()
        .unwrap_or(0)
}

impl RatioSource {
    /// The curve of one scope, mapped onto its steps by `mode`.
    pub fn curve_for_mode(
        &self,
        plan: &GenerationPlan,
        sp: &ScopePlan,
        mode: Resample,
    ) -> Result<Vec<f64>> {
        match (mode, self) {
            (Resample::Index, _) => self.curve_for(plan, sp),
            (Resample::Sigma, RatioSource::Registered(rc)) => {
                let per = rc.experts.get(sp.key.expert).ok_or_else(|| {
                    Error::msg(format!("{} has no ratio curve for expert {}", rc.source, sp.key.expert))
                })?;
                let c = per
                    .get(&sp.key.branch)
                    .or_else(|| per.get(&Branch::Cond))
                    .ok_or_else(|| Error::msg(format!("{} has no `{}` curve", rc.source, sp.key.branch)))?;
                let sig = match rc.expert_sigmas.get(sp.key.expert) {
                    Some(s) if s.len() == c.len() => s,
                    Some(s) => {
                        return Err(Error::msg(format!(
                            "resample = \"sigma\" pairs each calibrated step's ratio with its sigma; {} records {} sigmas for expert {} and {} `{}` ratios",
                            rc.source,
                            s.len(),
                            sp.key.expert,
                            c.len(),
                            sp.key.branch
                        )))
                    }
                    None => {
                        return Err(Error::msg(format!(
                            "resample = \"sigma\" needs the sigma of every calibrated step; {} does not record them",
                            rc.source
                        )))
                    }
                };
                magcache_core::maths::sigma_interp(c, sig, &sp.sigmas)
            }
            (Resample::Sigma, RatioSource::Config(_)) => Err(Error::msg(
                "resample = \"sigma\" needs a calibration profile (`profile = ...`): a bare `mag_ratios` curve has no sigmas",
            )),
        }
    }

    /// The curve of one scope, resampled to its steps by index.
    pub fn curve_for(&self, plan: &GenerationPlan, sp: &ScopePlan) -> Result<Vec<f64>> {
        let experts = plan.experts();
        match self {
            RatioSource::Config(RatioSpec::Curve(c)) => {
                if experts.len() <= 1 {
                    nearest_interp(c, sp.steps)
                } else {
                    // One curve over the whole generation: resample to all steps, then each expert
                    // takes its own consecutive part (high-noise expert first).
                    let all = nearest_interp(c, plan.total_steps)?;
                    let before: usize = experts
                        .iter()
                        .filter(|&&e| e < sp.key.expert)
                        .map(|&e| expert_steps(plan, e))
                        .sum();
                    all.get(before..before + sp.steps)
                        .map(|s| s.to_vec())
                        .ok_or_else(|| {
                            Error::msg(format!(
                                "mag_ratios: scope {} needs steps {}..{} of a {}-step curve",
                                sp.key,
                                before,
                                before + sp.steps,
                                plan.total_steps
                            ))
                        })
                }
            }
            RatioSource::Config(RatioSpec::PerExpert(p)) => {
                let c = match sp.key.expert {
                    0 => &p.high_noise,
                    1 => &p.low_noise,
                    e => {
                        return Err(Error::msg(format!(
                            "mag_ratios has curves for experts 0 and 1, not {e}"
                        )))
                    }
                };
                nearest_interp(c, sp.steps)
            }
            RatioSource::Registered(rc) => {
                let per = rc.experts.get(sp.key.expert).ok_or_else(|| {
                    Error::msg(format!(
                        "{} has no ratio curve for expert {}",
                        rc.source, sp.key.expert
                    ))
                })?;
                let c = per
                    .get(&sp.key.branch)
                    .or_else(|| per.get(&Branch::Cond))
                    .ok_or_else(|| {
                        Error::msg(format!("{} has no `{}` curve", rc.source, sp.key.branch))
                    })?;
                nearest_interp(c, sp.steps)
            }
        }
    }

    /// Warnings for a curve calibrated on a schedule other than the run's. With `resample = "sigma"`
    /// a different shift is what the mapping by noise level is for, and is not warned about.
    pub fn schedule_warnings(&self, plan: &GenerationPlan, mode: Resample) -> Vec<String> {
        let RatioSource::Registered(rc) = self else {
            return Vec::new();
        };
        let Some(s) = &rc.schedule else {
            return Vec::new();
        };
        let src = &rc.source;
        schedule_differences(
            s.scheduler.as_deref(),
            s.shift,
            s.boundary_ratio,
            plan,
        )
        .into_iter()
        .filter_map(|d| match d {
            Difference::Sampler(a, b) => Some(format!(
                "MagCache ratios from {src} were calibrated with the `{a}` sampler, this run uses `{b}`: skips may land on the wrong steps"
            )),
            Difference::Shift(a, b) => (mode == Resample::Index).then(|| format!(
                "MagCache ratios from {src} were calibrated with shift {a}, this run uses shift {b}: skips may land on the wrong steps (resample = \"sigma\" maps a profile by noise level instead)"
            )),
            Difference::Boundary(a, b) => Some(format!(
                "MagCache ratios from {src} were calibrated with boundary_ratio {a}, this run uses {b}: the experts' curves are split differently"
            )),
        })
        .collect()
    }
}

/// One way a calibration's noise schedule differs from a run's: (calibrated, run).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Difference {
    Sampler(String, String),
    Shift(f64, f64),
    Boundary(f64, f64),
}

/// How the schedule a curve or profile was calibrated on (its sampler, shift and expert boundary,
/// where recorded) differs from `plan`'s. Unrecorded values on either side are not compared.
pub(crate) fn schedule_differences(
    scheduler: Option<&str>,
    shift: Option<f64>,
    boundary_ratio: Option<f64>,
    plan: &GenerationPlan,
) -> Vec<Difference> {
    let mut d = Vec::new();
    if let Some(a) = scheduler.filter(|a| !a.is_empty()) {
        if !plan.scheduler.is_empty() && a != plan.scheduler {
            d.push(Difference::Sampler(a.to_string(), plan.scheduler.clone()));
        }
    }
    if let (Some(a), Some(b)) = (shift, plan.shift) {
        if (a - b).abs() > 1e-9 {
            d.push(Difference::Shift(a, b));
        }
    }
    if let (Some(a), Some(b)) = (boundary_ratio, plan.boundary_ratio) {
        if (a - b).abs() > 1e-9 {
            d.push(Difference::Boundary(a, b));
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use magcache_core::{ScheduleMeta, ScopeKey};
    use std::collections::BTreeMap;

    fn two_expert_plan(n_high: usize, n_low: usize) -> GenerationPlan {
        let mut scopes = Vec::new();
        for (e, n) in [(0, n_high), (1, n_low)] {
            for b in [Branch::Cond, Branch::Uncond] {
                scopes.push(ScopePlan {
                    key: ScopeKey::new(e, b),
                    steps: n,
                    sigmas: vec![0.5; n],
                    step_indices: (0..n).collect(),
                });
            }
        }
        GenerationPlan {
            scopes,
            total_steps: n_high + n_low,
            shift: Some(12.0),
            boundary_ratio: Some(0.9),
            ..Default::default()
        }
    }

    #[test]
    fn per_expert_curves_are_resampled_to_each_experts_steps() {
        let plan = two_expert_plan(3, 5);
        let src = RatioSource::Config(RatioSpec::PerExpert(PerExpert {
            high_noise: vec![1.0, 2.0],
            low_noise: vec![3.0, 4.0, 5.0],
        }));
        // 0.5 rounds to 0 (half to even, as numpy)
        assert_eq!(
            src.curve_for(&plan, &plan.scopes[0]).unwrap(),
            [1.0, 1.0, 2.0]
        );
        assert_eq!(
            src.curve_for(&plan, &plan.scopes[2]).unwrap(),
            [3.0, 3.0, 4.0, 5.0, 5.0]
        );
    }

    #[test]
    fn one_curve_is_split_at_the_boundary() {
        let plan = two_expert_plan(2, 3);
        let src = RatioSource::Config(RatioSpec::Curve(vec![1.0, 2.0, 3.0, 4.0, 5.0]));
        assert_eq!(src.curve_for(&plan, &plan.scopes[1]).unwrap(), [1.0, 2.0]);
        assert_eq!(
            src.curve_for(&plan, &plan.scopes[3]).unwrap(),
            [3.0, 4.0, 5.0]
        );
    }

    #[test]
    fn a_curve_from_another_boundary_or_shift_is_warned_about() {
        let per = BTreeMap::from([(Branch::Cond, vec![1.0; 4])]);
        let rc = RatioCurves {
            experts: vec![per.clone(), per],
            schedule: Some(ScheduleMeta {
                steps: 8,
                shift: Some(12.0),
                boundary_ratio: Some(0.875),
                ..Default::default()
            }),
            source: "published curve `x`".into(),
            expert_sigmas: Vec::new(),
        };
        let src = RatioSource::Registered(rc);
        let at = |shift: f64, boundary: f64| GenerationPlan {
            shift: Some(shift),
            boundary_ratio: Some(boundary),
            ..Default::default()
        };
        let w = src.schedule_warnings(&at(12.0, 0.9), Resample::Index);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("boundary_ratio 0.875") && w[0].contains("0.9"),
            "{w:?}"
        );
        assert_eq!(
            src.schedule_warnings(&at(5.0, 0.875), Resample::Index)
                .len(),
            1
        );
        assert!(src
            .schedule_warnings(&at(5.0, 0.875), Resample::Sigma)
            .is_empty());
        assert!(src
            .schedule_warnings(&at(12.0, 0.875), Resample::Index)
            .is_empty());
        // Registered per-branch curves fall back to cond when a branch has none.
        let plan = two_expert_plan(2, 2);
        assert_eq!(src.curve_for(&plan, &plan.scopes[3]).unwrap(), [1.0, 1.0]);
    }
}
