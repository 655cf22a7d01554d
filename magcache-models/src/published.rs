//! Published calibration data (MagCache ratio curves, TeaCache coefficients) shipped with the crate:
//! `data/published_curves.toml`, facts from the MagCache and TeaCache papers' public repositories.

use magcache_core::{Error, Indicator, Result};

const DATA: &str = include_str!("../data/published_curves.toml");

/// The file's shape, typed: unknown fields (a misspelt key would be dropped silently by the
/// readers) are refused, so a test can check every entry parses (`every_entry_is_typed_and_listed`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read by the typed check; the tables themselves go out as TOML values
struct Data {
    magcache: std::collections::BTreeMap<String, MagCacheEntry>,
    teacache: std::collections::BTreeMap<String, TeaCacheEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct MagCacheEntry {
    schedule: Schedule,
    ratios: Vec<f64>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Schedule {
    steps: usize,
    shift: Option<f64>,
    scheduler: String,
    boundary_ratio: Option<f64>,
    recipe: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct TeaCacheEntry {
    coefficients: Vec<f64>,
    coefficients_ret_steps: Option<Vec<f64>>,
    published: Option<String>,
}

fn entry(kind: &str, name: &str) -> Result<toml::Table> {
    toml::from_str::<Data>(DATA).map_err(|e| Error::msg(format!("published_curves.toml: {e}")))?;
    let t = DATA
        .parse::<toml::Table>()
        .map_err(|e| Error::msg(format!("published_curves.toml: {e}")))?;
    t.get(kind)
        .and_then(|m| m.get(name))
        .and_then(|e| e.as_table())
        .cloned()
        .ok_or_else(|| Error::msg(format!("no published {kind} data `{name}`")))
}

/// The `magcache` table of a published curve: its ratios and schedule as the file has them, its name,
/// whether the array interleaves cond and uncond steps (Wan), and where a two-expert curve splits.
pub fn magcache(name: &str, interleaved: bool, high_steps: Option<usize>) -> Result<toml::Value> {
    let mut t = entry("magcache", name)?;
    t.insert("name".into(), name.into());
    t.insert("interleaved".into(), interleaved.into());
    if let Some(n) = high_steps {
        t.insert("high_steps".into(), (n as i64).into());
    }
    Ok(toml::Value::Table(t))
}

/// The `teacache` table: the tensors the coefficients were fit on (plain and with `ret_steps`) and,
/// for a known variant, the coefficients.
pub fn teacache(
    name: Option<&str>,
    indicator: Indicator,
    indicator_ret_steps: Indicator,
) -> Result<toml::Value> {
    let mut t = match name {
        Some(n) => entry("teacache", n)?,
        None => toml::Table::new(),
    };
    t.insert("indicator".into(), indicator.as_str().into());
    t.insert(
        "indicator_ret_steps".into(),
        indicator_ret_steps.as_str().into(),
    );
    Ok(toml::Value::Table(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entry of the data parses into its typed shape, every `published` name a family
    /// registers has an entry, and every entry is registered by some family.
    #[test]
    fn every_entry_is_typed_and_listed() {
        let data: Data = toml::from_str(DATA).unwrap();
        let mut listed = std::collections::BTreeSet::new();
        for f in magcache_core::runtime::registry::families() {
            for p in f.published {
                let (kind, name) = p.split_once(' ').unwrap();
                assert!(entry(kind, name).is_ok(), "{}: `{p}` has no data", f.name);
                listed.insert((kind.to_string(), name.to_string()));
            }
        }
        let held: std::collections::BTreeSet<(String, String)> = data
            .magcache
            .keys()
            .map(|n| ("magcache".to_string(), n.clone()))
            .chain(
                data.teacache
                    .keys()
                    .map(|n| ("teacache".to_string(), n.clone())),
            )
            .collect();
        let unlisted: Vec<_> = held.difference(&listed).collect();
        assert!(unlisted.is_empty(), "entries no family lists: {unlisted:?}");
    }

    #[test]
    fn wan_curve_table_names_its_layout() {
        let c = magcache("wan21_t2v_1_3b", true, None).unwrap();
        let r = c["ratios"].as_array().unwrap();
        assert_eq!(r.len(), 100);
        assert_eq!(r[2].as_float(), Some(1.0124));
        assert_eq!(c["interleaved"].as_bool(), Some(true));
        assert_eq!(c["schedule"]["shift"].as_float(), Some(5.0));
        assert!(magcache("nope", true, None).is_err());
        let t = teacache(
            None,
            Indicator::TimestepEmbedding,
            Indicator::TimestepModulation,
        )
        .unwrap();
        assert_eq!(t["indicator"].as_str(), Some("timestep_embedding"));
        assert!(t.get("coefficients").is_none());
    }
}
