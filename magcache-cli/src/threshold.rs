//! Runs that explain their threshold: a cached scope that computed (nearly) every call, or whose
//! threshold decided no call at all (every value below it: only the guards and limits computed),
//! says how the values its strategy compared were spread against the threshold, and which
//! threshold would have computed half the calls (2x), from the same values. `run`, `compare` and `plan` (data-free
//! rules) warn with it; the JSON report carries it per scope.

use serde::Serialize;

/// A scope computes "nearly every call" above this share.
const NEARLY_ALL: f64 = 0.9;

/// The spread of one scope's compared values against the threshold.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ThresholdCheck {
    /// `computes_nearly_all` (more than 90% of the calls computed) or `decides_nothing` (every
    /// value compared stayed below the threshold: the threshold computed no call).
    pub kind: &'static str,
    pub expert: usize,
    pub branch: String,
    pub calls: usize,
    pub computed: usize,
    /// What the values measure (the strategy's metric).
    pub metric: String,
    pub threshold: f64,
    /// Of the values compared on the calls the strategy was free to decide.
    pub min: f64,
    pub p25: f64,
    pub p50: f64,
    pub p75: f64,
    pub max: f64,
    /// The smallest threshold under which replaying the values computes at most half the calls
    /// (accumulated since the last computed call when the strategy accumulates).
    pub threshold_for_2x: f64,
}

const NEARLY_ALL_KIND: &str = "computes_nearly_all";
const DECIDES_NOTHING: &str = "decides_nothing";

impl ThresholdCheck {
    /// The warning line.
    pub fn warning(&self, strategy: &str) -> String {
        let scope = format!("{strategy}: scope expert {} {}", self.expert, self.branch);
        let spread = format!(
            "min {}, p25 {}, p50 {}, p75 {}, max {}",
            g(self.min),
            g(self.p25),
            g(self.p50),
            g(self.p75),
            g(self.max)
        );
        let (t, metric) = (g(self.threshold), &self.metric);
        let half = match self.threshold_for_2x.is_finite() {
            true => format!(
                "replayed on these values, a threshold of about {} computes half the calls",
                g(self.threshold_for_2x)
            ),
            false => "replayed on these values, no finite threshold computes half the calls".into(),
        };
        if self.kind == DECIDES_NOTHING {
            return format!(
                "{scope} reused {} of {} calls and its threshold {t} decided none of them: the {metric} it compared ({spread}) never reached it, so only the guards and the strategy's own limits computed calls and nothing bounds the error; {half} (2x) (--json: threshold_check)",
                self.calls - self.computed,
                self.calls,
            );
        }
        format!(
            "{scope} computed {} of {} calls: the {metric} it compared ranged {spread} against threshold {t}; {half} (2x; the guards and the strategy's own limits can compute more, and reused calls change the values that follow) (--json: threshold_check)",
            self.computed, self.calls,
        )
    }
}

/// Four significant digits (in scientific notation below 1e-3 and from 1e6 up).
fn g(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let digits = (3 - x.abs().log10().floor() as i32).max(0) as usize;
    if x.abs() < 1e-3 || x.abs() >= 1e6 {
        format!("{x:.3e}")
    } else {
        format!("{x:.digits$}")
    }
}

/// Linear-interpolated percentile `q` (0..=1) of sorted `v` (numpy's default).
fn percentile(v: &[f64], q: f64) -> f64 {
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// Calls a replay of `values` computes under threshold `t` (the first call always computes; a
/// call without a value computes).
fn replay(values: &[Option<f64>], t: f64, accumulates: bool) -> usize {
    let (mut computed, mut acc) = (0, 0.0);
    for (i, v) in values.iter().enumerate() {
        let reuse = match v {
            Some(d) if i > 0 => {
                let x = if accumulates { acc + d } else { *d };
                if x < t {
                    acc = x;
                    true
                } else {
                    false
                }
            }
            _ => false,
        };
        if !reuse {
            computed += 1;
            acc = 0.0;
        }
    }
    computed
}

/// The smallest threshold whose replay computes at most half the calls (bisection; the replay's
/// computed calls do not grow with the threshold).
fn threshold_for_half(values: &[Option<f64>], accumulates: bool) -> f64 {
    let half = values.len().div_ceil(2);
    let total: f64 = values.iter().flatten().map(|x| x.abs()).sum();
    let (mut lo, mut hi) = (0.0, total * 2.0 + 1e-12);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if replay(values, mid, accumulates) <= half {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// One call as the check reads it: its scope (expert, branch), whether it computed, and the value
/// its strategy compared with the threshold.
#[derive(Clone, Debug, PartialEq)]
pub struct Compared {
    pub expert: usize,
    pub branch: String,
    pub computed: bool,
    pub value: Option<f64>,
}

/// The checks of every scope of `calls` that computed more than 90% of its calls, or whose
/// `threshold` decided none of them.
pub fn threshold_checks(
    calls: &[Compared],
    threshold: Option<f64>,
    metric: &str,
    accumulates: bool,
) -> Vec<ThresholdCheck> {
    let Some(threshold) = threshold else {
        return Vec::new();
    };
    let mut scopes: Vec<(usize, String)> =
        calls.iter().map(|c| (c.expert, c.branch.clone())).collect();
    scopes.sort();
    scopes.dedup();
    let mut out = Vec::new();
    for (expert, branch) in scopes {
        let own: Vec<&Compared> = calls
            .iter()
            .filter(|c| c.expert == expert && c.branch == branch)
            .collect();
        let computed = own.iter().filter(|c| c.computed).count();
        let values: Vec<Option<f64>> = own
            .iter()
            .map(|c| c.value.filter(|x| x.is_finite()))
            .collect();
        let mut seen: Vec<f64> = values.iter().flatten().copied().collect();
        // The threshold decided nothing: replayed under it, the calls computed are those without
        // a value (the guards') and the first, as under an infinite threshold (while the run
        // reused some: a threshold that was never reached).
        let never = |t: f64| replay(&values, t, accumulates);
        let kind = if (computed as f64) > NEARLY_ALL * own.len() as f64 {
            NEARLY_ALL_KIND
        } else if computed < own.len() && never(threshold) == never(f64::INFINITY) {
            DECIDES_NOTHING
        } else {
            continue;
        };
        if seen.len() < 2 {
            continue;
        }
        seen.sort_by(f64::total_cmp);
        out.push(ThresholdCheck {
            kind,
            expert,
            branch,
            calls: own.len(),
            computed,
            metric: metric.to_string(),
            threshold,
            min: seen[0],
            p25: percentile(&seen, 0.25),
            p50: percentile(&seen, 0.5),
            p75: percentile(&seen, 0.75),
            max: seen[seen.len() - 1],
            threshold_for_2x: threshold_for_half(&values, accumulates),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calls(values: &[Option<f64>], computed: usize) -> Vec<Compared> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| Compared {
                expert: 0,
                branch: "cond".into(),
                computed: i < computed,
                value: *v,
            })
            .collect()
    }

    #[test]
    fn percentiles_and_the_2x_threshold_follow_the_values() {
        let v: Vec<Option<f64>> = (0..10).map(|i| Some(i as f64 + 1.0)).collect();
        let c = threshold_checks(&calls(&v, 10), Some(0.5), "m", false);
        assert_eq!(c.len(), 1);
        let c = &c[0];
        assert_eq!((c.min, c.p50, c.max), (1.0, 5.5, 10.0));
        assert_eq!((c.p25, c.p75), (3.25, 7.75));
        // One call's value alone: reusing the calls under t, at most 5 of 10 computed.
        assert!(replay(&v, c.threshold_for_2x, false) <= 5);
        assert!(replay(&v, c.threshold_for_2x * 0.999, false) > 5);
        // Accumulated: a reuse carries its value into the next call's comparison.
        let t = threshold_for_half(&v, true);
        assert!(replay(&v, t, true) <= 5 && replay(&v, t * 0.999, true) > 5);
        assert!(t > c.threshold_for_2x);
        assert!(c.warning("teacache").contains("p50 5.500"));
    }

    #[test]
    fn huge_values_are_short_and_no_infinite_threshold_is_suggested() {
        assert_eq!(g(1e308), "1.000e308");
        assert_eq!(g(12345.0), "12345");
        let v: Vec<Option<f64>> = vec![Some(1e308); 6];
        let c = threshold_checks(&calls(&v, 6), Some(0.25), "m", true);
        let w = c[0].warning("magcache");
        assert!(w.len() < 600 && w.contains("1.000e308"), "{w}");
        if !c[0].threshold_for_2x.is_finite() {
            assert!(
                w.contains("no finite threshold") && !w.contains("about inf"),
                "{w}"
            );
        }
    }

    #[test]
    fn only_scopes_that_computed_nearly_everything_are_checked() {
        let v: Vec<Option<f64>> = (0..10).map(|i| Some(i as f64)).collect();
        assert!(threshold_checks(&calls(&v, 9), Some(0.5), "m", true).is_empty());
        assert!(threshold_checks(&calls(&v, 10), None, "m", true).is_empty());
        assert_eq!(
            threshold_checks(&calls(&v, 10), Some(0.5), "m", true).len(),
            1
        );
    }

    /// A threshold above everything the run compared decided no call: the calls it computed were
    /// the value-less (guarded) ones and the limits'. Said, with the 2x threshold; a threshold
    /// the values reach is not.
    #[test]
    fn a_threshold_never_reached_is_said() {
        let mut v: Vec<Option<f64>> = (0..10).map(|i| Some(0.1 * i as f64)).collect();
        v[0] = None;
        v[1] = None;
        let c = threshold_checks(&calls(&v, 4), Some(1e9), "m", true);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].kind, DECIDES_NOTHING);
        assert!(c[0].warning("magcache").contains("decided none"));
        assert!(c[0].threshold_for_2x < 1e9);
        // Not accumulated, the largest value 0.9: a threshold of 1 is never reached either, 0.5 is.
        assert_eq!(
            threshold_checks(&calls(&v, 4), Some(1.0), "m", false).len(),
            1
        );
        assert!(threshold_checks(&calls(&v, 4), Some(0.5), "m", false).is_empty());
        // Accumulated, the values sum past 1: reached.
        assert!(threshold_checks(&calls(&v, 4), Some(1.0), "m", true).is_empty());
    }
}
