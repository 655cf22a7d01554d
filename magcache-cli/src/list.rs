//! `magcache list`: the registered model families, presets and strategies.

use crate::prepare::link_strategies;
use magcache_core::runtime::registry;

/// Text of `magcache list`.
pub fn list() -> String {
    link_strategies();
    let mut s = String::from("model families:\n");
    for f in registry::families() {
        s.push_str(&format!("  {:<10} {}\n", f.name, f.description));
        if !f.presets.is_empty() {
            s.push_str(&format!("             presets: {}\n", f.presets.join(", ")));
        }
        if !f.published.is_empty() {
            s.push_str(&format!(
                "             published: {}\n",
                f.published.join(", ")
            ));
        }
        let kinds: Vec<String> = f
            .blocks
            .iter()
            .map(|b| format!("{} ({})", b.kind, b.streams()))
            .collect();
        s.push_str(&format!("             blocks: {}\n", kinds.join("; ")));
    }
    s.push_str("strategies:\n");
    for st in registry::strategies() {
        s.push_str(&format!("  {:<10} {}\n", st.name, st.description));
        let knobs: Vec<String> = st
            .knobs()
            .into_iter()
            .map(|(k, v)| format!("{k} = {v}"))
            .collect();
        if !knobs.is_empty() {
            s.push_str(&format!("             keys: {}\n", knobs.join(", ")));
        }
    }
    s
}
