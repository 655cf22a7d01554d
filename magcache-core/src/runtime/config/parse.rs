//! Reading a TOML file into a typed config: a parse error becomes one line naming the file, the
//! line, the key and, for a misspelt required key, the key the table has instead.

use crate::error::{Error, Result};

/// Parses TOML into `T`, turning a parse error into one line that names the file, the key and the
/// position.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, file: &str) -> Result<T> {
    toml::from_str::<T>(text).map_err(|e| toml_error(text, file, &e))
}

fn toml_error(text: &str, file: &str, e: &toml::de::Error) -> Error {
    let msg = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    let Some(span) = e.span() else {
        return Error::config(file, "(document)", msg);
    };
    // A missing top-level field comes with an empty span at 0: name the field (a whole table), not
    // the first table of the file.
    if span.is_empty() {
        if let Some(f) = msg
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            return Error::config(file, f, format!("missing: the file has no `[{f}]` table"));
        }
    }
    let mut start = span.start.min(text.len());
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let mut line_no = text[..start].matches('\n').count() + 1;
    // The table the error is in: the last `[header]` before the error.
    // An array of tables (`[[model.lora]]`) names the entry: `model.lora[1]`.
    let mut table = String::new();
    let mut entries: std::collections::HashMap<String, usize> = Default::default();
    for line in text[..start].lines() {
        let t = line.trim();
        if t.starts_with('[') {
            let name = t.split('#').next().unwrap_or(t).trim();
            let name = name
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string();
            table = if t.starts_with("[[") {
                let n = entries.entry(name.clone()).or_insert(0);
                *n += 1;
                format!("{name}[{}]", *n - 1)
            } else {
                name
            };
        }
    }
    let line_start = text[..start].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    let key = if line.starts_with('[') {
        // The span covers a whole table (typetag tables are read as one value): name the field from
        // the message when it says which.
        let header = line
            .trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_string();
        let field = field_in_message(&msg);
        let key = match &field {
            Some(f) => format!("{header}.{f}"),
            None => header.clone(),
        };
        // The line of that key in the table, where the file has it (a missing one has none).
        let at = field
            .as_deref()
            .and_then(|f| key_line(&text[line_start..], f.rsplit('.').next().unwrap_or(f)));
        line_no += at.unwrap_or(0);
        // A strategy's key under another strategy: name the strategies it belongs to.
        if header == "cache" {
            if let Some(owners) =
                quoted_after(&msg, "unknown field `").and_then(|f| strategies_with_key(&f))
            {
                let msg = format!("{} ({owners})", plain_words(&msg));
                return Error::config(format!("{file}:{line_no}"), key, msg);
            }
        }
        // A missing field spelt nearly right in the table: name the key that was meant.
        if let Some(near) = missing_field_misspelt(&msg, &text[line_start..]) {
            return Error::config(
                format!("{file}:{line_no}"),
                key,
                format!("{msg} (the table has `{}`: a misspelling?)", near),
            );
        }
        key
    } else if let Some((k, _)) = line.split_once('=') {
        let k = k.trim();
        if table.is_empty() {
            k.to_string()
        } else {
            format!("{table}.{k}")
        }
    } else if table.is_empty() {
        "(document)".to_string()
    } else {
        format!("[{table}]")
    };
    // A strategy no one registered: one of another crate is known only to a binary that links
    // that crate (the linker drops the registrations of an unreferenced crate).
    let mut msg = plain_words(&msg);
    if key == "cache.strategy" && msg.starts_with("unknown variant `") {
        msg.push_str(" (a strategy of another crate is known only to a binary that links it: call its crate's `link()`)");
    }
    Error::config(format!("{file}:{line_no}"), key, msg)
}

/// The text between the first `pat` of `msg` (ending in a backquote) and the next backquote: the
/// field of "unknown field `f`", "missing field `f`".
fn quoted_after(msg: &str, pat: &str) -> Option<String> {
    let rest = &msg[msg.find(pat)? + pat.len()..];
    Some(rest[..rest.find('`')?].to_string())
}

/// "a key of `a` and `b`" for the registered strategies whose configs have key `k`.
fn strategies_with_key(k: &str) -> Option<String> {
    let mut owners: Vec<String> = inventory::iter::<super::StrategyRegistration>
        .into_iter()
        .filter(|st| st.knobs().iter().any(|(key, _)| key == k))
        .map(|st| format!("`{}`", st.name))
        .collect();
    owners.sort();
    (!owners.is_empty()).then(|| format!("a key of strategy {}", owners.join(", ")))
}

/// The line, counted from 0 at the table's header, of key `k` in `table` (its text from its
/// header on), before the next header.
fn key_line(table: &str, k: &str) -> Option<usize> {
    table
        .lines()
        .enumerate()
        .skip(1)
        .take_while(|(_, l)| !is_header(l))
        .find(|(_, l)| {
            l.split_once('=')
                .is_some_and(|(key, _)| key.trim().trim_matches('"') == k)
        })
        .map(|(i, _)| i)
}

/// Whether a line opens a table (`[name]`, `[[name]]`): a continued array's line `[1, 2],` does
/// not.
fn is_header(l: &str) -> bool {
    let t = l.trim_start().trim_start_matches('[');
    l.trim_start().starts_with('[')
        && !l.contains(',')
        && t.starts_with(|c: char| c.is_alphabetic() || c == '"')
}

/// serde's message in a user's words: its Rust type names (`expected usize`, `expected f64`,
/// `expected dyn StrategyConfig`) as what the file should hold, and without the trailing
/// `` in `key` `` (the key is named before the message).
fn plain_words(msg: &str) -> String {
    const WORDS: [(&str, &str); 10] = [
        ("expected usize", "expected a whole number, 0 or more"),
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected u32", "expected a whole number, 0 or more"),
        ("expected u16", "expected a whole number, 0 or more"),
        ("expected u8", "expected a whole number, 0 to 255"),
        ("expected i64", "expected a whole number"),
        ("expected i32", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        (
            "expected dyn StrategyConfig",
            "expected a strategy's name in quotes (`magcache list` lists them)",
        ),
    ];
    let mut m = msg.to_string();
    if let Some(i) = m.rfind(" in `") {
        if m.ends_with('`') && !m[i + 5..m.len() - 1].contains('`') {
            m.truncate(i);
        }
    }
    for (rust, plain) in WORDS {
        let mut from = 0;
        while let Some(i) = m[from..].find(rust).map(|i| i + from) {
            let end = i + rust.len();
            if m[end..].starts_with(|c: char| c.is_alphanumeric() || c == '_') {
                from = end;
                continue;
            }
            m.replace_range(i..end, plain);
            from = i + plain.len();
        }
    }
    m.replace("invalid type: sequence", "invalid type: an array")
        .replace("invalid type: map", "invalid type: a table")
}

/// For a "missing field `f`" message, the key of the table (`table`: its text from its header on)
/// nearest to `f`, within a third of its length in edits (at least one): what the user most likely
/// meant to write. Comment lines are not keys.
fn missing_field_misspelt(msg: &str, table: &str) -> Option<String> {
    let f = quoted_after(msg, "missing field `")?;
    let most = (f.chars().count() / 3).max(1);
    table
        .lines()
        .skip(1)
        .take_while(|l| !is_header(l))
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().trim_matches('"')))
        .filter(|k| *k != f)
        .map(|k| (edit_distance(k, &f), k))
        .filter(|(d, _)| *d <= most)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.to_string())
}

/// Levenshtein distance between two short keys.
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The field a serde message is about: "unknown field `x`", "missing field `x`", each under the
/// path of "... in `a.b`" when the message gives one.
fn field_in_message(msg: &str) -> Option<String> {
    let field =
        quoted_after(msg, "unknown field `").or_else(|| quoted_after(msg, "missing field `"));
    let path = (|| {
        let i = msg.rfind(" in `")? + 5;
        let rest = &msg[i..];
        Some(rest[..rest.find('`')?].to_string())
    })();
    match (path, field) {
        (Some(p), Some(f)) => Some(format!("{p}.{f}")),
        (p, f) => p.or(f),
    }
}

#[cfg(test)]
mod tests {
    use super::{key_line, plain_words};

    #[test]
    fn rust_types_become_the_files_words() {
        assert_eq!(
            plain_words("invalid type: floating point `1.5`, expected usize in `warmup_steps`"),
            "invalid type: floating point `1.5`, expected a whole number, 0 or more"
        );
        assert_eq!(
            plain_words("invalid type: sequence, expected f64"),
            "invalid type: an array, expected a number"
        );
        // Only whole words: a type name inside a longer one stays.
        assert_eq!(plain_words("expected u8x"), "expected u8x");
        // A message whose last quote is not a key's path is kept whole.
        assert_eq!(
            plain_words("unknown field `x`, expected one of `a`, `b`"),
            "unknown field `x`, expected one of `a`, `b`"
        );
    }

    #[test]
    fn a_key_is_found_in_its_table_only() {
        let t =
            "[cache]\n# threshold = 1\nstrategy = \"x\"\n\"threshold\" = 2\n[next]\nother = 1\n";
        assert_eq!(key_line(t, "threshold"), Some(3));
        assert_eq!(key_line(t, "strategy"), Some(2));
        assert_eq!(key_line(t, "other"), None);
    }
}
