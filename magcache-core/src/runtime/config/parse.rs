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
    let line_no = text[..start].matches('\n').count() + 1;
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
        let key = match field_in_message(&msg) {
            Some(f) => format!("{header}.{f}"),
            None => header,
        };
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
    Error::config(format!("{file}:{line_no}"), key, msg)
}

/// For a "missing field `f`" message, the key of the table (`table`: its text from its header on)
/// nearest to `f`, within a third of its length in edits (at least one): what the user most likely
/// meant to write. Comment lines are not keys.
fn missing_field_misspelt(msg: &str, table: &str) -> Option<String> {
    let f = msg
        .split("missing field `")
        .nth(1)?
        .split('`')
        .next()?
        .to_string();
    let most = (f.chars().count() / 3).max(1);
    // The next table's header (a continued array's line `[1, 2],` is not one).
    let header = |l: &str| {
        let t = l.trim_start().trim_start_matches('[');
        l.trim_start().starts_with('[')
            && !l.contains(',')
            && t.starts_with(|c: char| c.is_alphabetic() || c == '"')
    };
    table
        .lines()
        .skip(1)
        .take_while(|l| !header(l))
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
    let after = |pat: &str| -> Option<String> {
        let i = msg.find(pat)? + pat.len();
        let rest = &msg[i..];
        Some(rest[..rest.find('`')?].to_string())
    };
    let field = after("unknown field `").or_else(|| after("missing field `"));
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
