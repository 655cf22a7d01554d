//! Who owns which key of a run file. Core owns the keys every family shares (`[model]`,
//! `[prompt]`, `[inputs]`, `[sampling]` in [`super::config`]); a family declares the keys it adds
//! as typed structs of its own ([`FamilyKeys`] in its [`super::registry::ModelFamily`]) and reads
//! them with [`super::config::RunConfig::family_keys`]. A key that neither core nor the run's family
//! owns is refused before anything loads, naming the file, its line and `table.key`, and the family
//! that does own it when there is one.

use crate::error::{Error, Result};
use serde::de::{self, Deserialize, Visitor};

/// The keys a family adds to one table of the run file (`[sampling]`, `[inputs]`, or a table of its
/// own): the fields of a serde struct, read by [`fields_of`].
#[derive(Clone, Copy)]
pub struct FamilyKeys {
    /// The table (`"sampling"`).
    pub table: &'static str,
    /// Its field names; `fields_of::<MyStruct>`.
    pub keys: fn() -> &'static [&'static str],
    /// Those of its keys that name files the run reads (outputs may never replace them).
    pub paths: &'static [&'static str],
}

/// The field names of a struct with a serde `Deserialize` derive (not `flatten`ed: such a struct
/// reads a map and names no fields), read without any data: serde hands them to the deserializer.
pub fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut out = None;
    // The probe always fails (it has no data); what it records is the point.
    let _ = T::deserialize(FieldProbe { out: &mut out });
    out.unwrap_or(&[])
}

/// A deserializer that records the field list a struct asks for and stops.
struct FieldProbe<'a> {
    out: &'a mut Option<&'static [&'static str]>,
}

impl<'de> de::Deserializer<'de> for FieldProbe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _v: V) -> std::result::Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _v: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        *self.out = Some(fields);
        Err(de::Error::custom("fields recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

/// The owners of a run file's keys: core's tables with their keys, and the family's additions.
pub(crate) struct Owners<'a> {
    /// Core's tables and keys (`None`: a table core reads whole, e.g. `[cache]`).
    pub core: &'a [(&'static str, Option<&'static [&'static str]>)],
    pub family: &'a str,
    pub family_keys: &'a [FamilyKeys],
    /// Every registered family's additions, to say who owns a key this family does not.
    pub others: Vec<(&'static str, &'static [FamilyKeys])>,
}

impl Owners<'_> {
    fn owns(&self, table: &str, key: &str) -> bool {
        let core = self
            .core
            .iter()
            .any(|(t, keys)| *t == table && keys.map(|k| k.contains(&key)).unwrap_or(true));
        core || self
            .family_keys
            .iter()
            .any(|f| f.table == table && (f.keys)().contains(&key))
    }

    fn table_known(&self, table: &str) -> bool {
        self.core.iter().any(|(t, _)| *t == table)
            || self.family_keys.iter().any(|f| f.table == table)
    }

    fn keys_of(&self, table: &str) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = Vec::new();
        for (t, keys) in self.core {
            if *t == table {
                v.extend(keys.unwrap_or(&[]).iter());
            }
        }
        for f in self.family_keys.iter().filter(|f| f.table == table) {
            v.extend((f.keys)().iter());
        }
        v
    }

    fn owned_elsewhere(&self, table: &str, key: Option<&str>) -> Vec<&'static str> {
        self.others
            .iter()
            .filter(|(name, keys)| {
                *name != self.family
                    && keys.iter().any(|f| {
                        f.table == table && key.map(|k| (f.keys)().contains(&k)).unwrap_or(true)
                    })
            })
            .map(|(name, _)| *name)
            .collect()
    }

    /// Refuses the first key of `doc` nobody owns; `text` (the file's text) gives its line.
    pub fn check(&self, doc: &toml::Table, text: &str, file: &str) -> Result<()> {
        for (table, value) in doc {
            if !self.table_known(table) {
                let tables: Vec<&str> = self
                    .core
                    .iter()
                    .map(|(t, _)| *t)
                    .chain(self.family_keys.iter().map(|f| f.table))
                    .collect();
                return Err(Error::config(
                    located(file, text, None, table),
                    table.as_str(),
                    format!(
                        "unknown table for family `{}`{} (tables: {})",
                        self.family,
                        owned_by(&self.owned_elsewhere(table, None)),
                        dedup(tables).join(", ")
                    ),
                ));
            }
            let Some(t) = value.as_table() else {
                continue; // a wrong type: the typed parse names it
            };
            if self.core.iter().any(|(c, k)| c == table && k.is_none()) {
                continue;
            }
            for key in t.keys() {
                if !self.owns(table, key) {
                    return Err(Error::config(
                        located(file, text, Some(table), key),
                        format!("{table}.{key}"),
                        format!(
                            "unknown key for family `{}`{} ([{table}] keys: {})",
                            self.family,
                            owned_by(&self.owned_elsewhere(table, Some(key))),
                            dedup(self.keys_of(table)).join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn owned_by(families: &[&str]) -> String {
    match families {
        [] => String::new(),
        f => format!(": it is a key of {}", f.join(", ")),
    }
}

fn dedup(mut v: Vec<&str>) -> Vec<&str> {
    let mut seen = std::collections::BTreeSet::new();
    v.retain(|k| seen.insert(*k));
    v
}

/// `file:LINE` of `key` in `[table]` (or of `[key]` itself when `table` is `None`), found by reading
/// the text's table headers; `file` alone where the key is not written on a line of its own (inline
/// tables, dotted keys).
fn located(file: &str, text: &str, table: Option<&str>, key: &str) -> String {
    let mut current: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            let name = t
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches('"')
                .to_string();
            if table.is_none() && (name == key || name.starts_with(&format!("{key}."))) {
                return format!("{file}:{}", i + 1);
            }
            current = Some(name);
            continue;
        }
        let Some((k, _)) = t.split_once('=') else {
            continue;
        };
        let k = k.trim().trim_matches('"');
        let hit = match table {
            Some(tb) => current.as_deref() == Some(tb) && k == key,
            None => current.is_none() && (k == key || k.starts_with(&format!("{key}."))),
        };
        if hit {
            return format!("{file}:{}", i + 1);
        }
    }
    file.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Probe {
        a: f64,
        #[serde(rename = "b_key")]
        b: Option<String>,
    }

    #[test]
    fn fields_are_read_from_the_derive() {
        assert_eq!(fields_of::<Probe>(), &["a", "b_key"]);
        assert!(fields_of::<f64>().is_empty());
    }

    static WAN: [FamilyKeys; 1] = [FamilyKeys {
        table: "sampling",
        keys: fields_of::<Probe>,
        paths: &[],
    }];

    #[test]
    fn unowned_keys_name_line_key_and_owner() {
        let text = "[model]\nfamily = \"x\"\n[sampling]\nsteps = 2\nboundary_ratio = 0.9\n";
        let doc: toml::Table = text.parse().unwrap();
        let owners = Owners {
            core: &[("model", Some(&["family"])), ("sampling", Some(&["steps"]))],
            family: "x",
            family_keys: &[],
            others: vec![("y", &[]), ("wan", &WAN)],
        };
        owners.check(&doc, text, "run.toml").unwrap_err();
        let text2 = "[model]\nfamily = \"x\"\n[sampling]\nsteps = 2\nb_key = \"u\"\n";
        let doc2: toml::Table = text2.parse().unwrap();
        let err = owners
            .check(&doc2, text2, "run.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("run.toml:5"), "{err}");
        assert!(err.contains("sampling.b_key"), "{err}");
        assert!(err.contains("a key of wan") && !err.contains(" y"), "{err}");
        let mine = Owners {
            family_keys: &WAN,
            ..owners
        };
        mine.check(&doc2, text2, "run.toml").unwrap();
        let text3 = "[model]\nfamily = \"x\"\n[vae]\ntiling = true\n";
        let doc3: toml::Table = text3.parse().unwrap();
        let err = mine
            .check(&doc3, text3, "run.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("run.toml:3") && err.contains("vae"), "{err}");
    }
}
