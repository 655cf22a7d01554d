//! Published calibration data (MagCache ratio curves, TeaCache coefficients) shipped with the crate:
//! `data/published_curves.toml`, facts from the MagCache and TeaCache papers' public repositories.

use magcache_core::{Branch, Error, RatioCurves, Result, ScheduleMeta};
use std::collections::BTreeMap;

const DATA: &str = include_str!("../data/published_curves.toml");

fn table() -> Result<toml::Table> {
    DATA.parse::<toml::Table>()
        .map_err(|e| Error::msg(format!("published_curves.toml: {e}")))
}

/// The raw schedule and ratio array of a published MagCache curve.
fn raw(name: &str) -> Result<(Vec<f64>, ScheduleMeta)> {
    let t = table()?;
    let entry = t
        .get("magcache")
        .and_then(|m| m.get(name))
        .ok_or_else(|| Error::msg(format!("no published MagCache curve `{name}`")))?;
    let ratios: Vec<f64> = entry
        .get("ratios")
        .and_then(|r| r.as_array())
        .ok_or_else(|| Error::msg(format!("published curve `{name}` has no ratios")))?
        .iter()
        .filter_map(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64)))
        .collect();
    let s = entry.get("schedule");
    let f = |k: &str| {
        s.and_then(|s| s.get(k))
            .and_then(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64)))
    };
    let schedule = ScheduleMeta {
        steps: f("steps").unwrap_or(0.0) as usize,
        shift: f("shift"),
        scheduler: s
            .and_then(|s| s.get("scheduler"))
            .and_then(|v| v.as_str())
            .map(String::from),
        boundary_ratio: f("boundary_ratio"),
        sigmas: None,
    };
    Ok((ratios, schedule))
}

/// Splits an interleaved `[cond0, uncond0, cond1, uncond1, ...]` array into per-branch curves.
pub fn deinterleave(v: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let cond = v.iter().step_by(2).copied().collect();
    let uncond = v.iter().skip(1).step_by(2).copied().collect();
    (cond, uncond)
}

/// A published Wan curve (interleaved cond/uncond), as one expert, or split between two experts after
/// `high_steps` steps (Wan2.2 A14B).
pub fn wan_curves(name: &str, high_steps: Option<usize>) -> Result<RatioCurves> {
    let (r, schedule) = raw(name)?;
    let (cond, uncond) = deinterleave(&r);
    let experts = match high_steps {
        None => vec![BTreeMap::from([
            (Branch::Cond, cond),
            (Branch::Uncond, uncond),
        ])],
        Some(n) => {
            let n = n.min(cond.len());
            vec![
                BTreeMap::from([
                    (Branch::Cond, cond[..n].to_vec()),
                    (Branch::Uncond, uncond[..n].to_vec()),
                ]),
                BTreeMap::from([
                    (Branch::Cond, cond[n..].to_vec()),
                    (Branch::Uncond, uncond[n..].to_vec()),
                ]),
            ]
        }
    };
    Ok(RatioCurves {
        experts,
        schedule: Some(schedule),
        source: format!("published curve `{name}`"),
        expert_sigmas: Vec::new(),
    })
}

/// A published single-branch curve (FLUX: one forward per step).
pub fn single_curve(name: &str) -> Result<RatioCurves> {
    let (r, schedule) = raw(name)?;
    Ok(RatioCurves {
        experts: vec![BTreeMap::from([(Branch::Cond, r)])],
        schedule: Some(schedule),
        source: format!("published curve `{name}`"),
        expert_sigmas: Vec::new(),
    })
}

/// TeaCache coefficients `(plain, ret_steps)` of a published model.
pub fn tea_coefficients(name: &str) -> Result<magcache_core::registry::TeaCoefficients> {
    let t = table()?;
    let e = t
        .get("teacache")
        .and_then(|m| m.get(name))
        .ok_or_else(|| Error::msg(format!("no published TeaCache coefficients `{name}`")))?;
    let arr = |k: &str| -> Option<Vec<f64>> {
        e.get(k)?
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_float()).collect())
    };
    Ok(magcache_core::registry::TeaCoefficients {
        plain: arr("coefficients")
            .ok_or_else(|| Error::msg(format!("teacache.{name} has no coefficients")))?,
        ret_steps: arr("coefficients_ret_steps"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wan_curve_deinterleaves() {
        let c = wan_curves("wan21_t2v_1_3b", None).unwrap();
        let cond = &c.experts[0][&Branch::Cond];
        let uncond = &c.experts[0][&Branch::Uncond];
        assert_eq!(cond.len(), 50);
        assert_eq!(uncond.len(), 50);
        assert_eq!(cond[1], 1.0124);
        assert_eq!(uncond[1], 1.02213);
        assert_eq!(c.schedule.as_ref().unwrap().shift, Some(5.0));
    }
}
