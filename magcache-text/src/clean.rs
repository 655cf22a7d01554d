//! Prompt cleaning as diffusers' `WanPipeline` does it (`prompt_clean` in `pipeline_wan.py`):
//! `basic_clean` = `ftfy.fix_text` (only when ftfy is installed) then `html.unescape` twice and
//! `strip()`, then `whitespace_clean` = every run of `\s+` becomes one space, then `strip()`.
//!
//! **ftfy runs only for image-to-video: a choice.** `WanPipeline` runs ftfy where it is installed
//! (and any environment that runs `WanImageToVideoPipeline` has it); the text-to-video reference
//! (`wan_pipeline.*`) was produced without it, and its `cleaned` strings are the truth
//! [`prompt_clean`] matches, so text-only runs clean as a `WanPipeline` without ftfy does. `WanImageToVideoPipeline` calls `ftfy.fix_text` unconditionally:
//! [`prompt_clean_ftfy`] ([`crate::ftfy`]) first fixes mojibake (UTF-8 decoded as
//! Latin-1/Windows-1252), straightens curly quotes, expands Latin ligatures, folds full-width
//! characters, normalises line breaks, drops control characters and terminal escapes, and applies
//! NFC, and unescapes upper-case entities (`&EACUTE;`) that `html.unescape` leaves. Prompts free of
//! those produce identical text either way.

/// `prompt_clean(text)`: HTML-unescape twice, strip, collapse whitespace runs to one space, strip.
pub fn prompt_clean(text: &str) -> String {
    let unescaped = html_unescape(&html_unescape(text));
    let mut out = String::with_capacity(unescaped.len());
    let mut pending_space = false;
    for c in unescaped.chars() {
        if py_isspace(c) {
            pending_space = true;
            continue;
        }
        if pending_space && !out.is_empty() {
            out.push(' ');
        }
        pending_space = false;
        out.push(c);
    }
    out
}

/// `WanImageToVideoPipeline`'s `prompt_clean`: [`crate::ftfy::fix_text`] (ftfy always runs there),
/// then [`prompt_clean`].
pub fn prompt_clean_ftfy(text: &str) -> magcache_core::Result<String> {
    Ok(prompt_clean(&crate::ftfy::fix_text(text)?))
}

/// Python's `str.isspace` (which `\s` in a `str` regex and `str.strip()` use): Unicode `White_Space`
/// plus the information separators U+001C..U+001F.
pub fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `html.unescape`: numeric references `&#N;` / `&#xH;` (the `;` optional) with the HTML5
/// replacement rules for invalid code points, and named references from the HTML5 table, the
/// longest known prefix winning when the whole name is unknown (`&ampx` -> `&x`).
pub fn html_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        match charref(after) {
            Some((replacement, used)) => {
                out.push_str(&replacement);
                rest = &after[used..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// One reference after an `&`: `(replacement, bytes consumed)`, or `None` when nothing matches (the
/// `&` stays).
fn charref(s: &str) -> Option<(String, usize)> {
    if let Some(num) = s.strip_prefix('#') {
        let (hex, digits) = match num.strip_prefix(['x', 'X']) {
            Some(h) => (true, h),
            None => (false, num),
        };
        let n = digits
            .bytes()
            .take_while(|b| {
                if hex {
                    b.is_ascii_hexdigit()
                } else {
                    b.is_ascii_digit()
                }
            })
            .count();
        if n == 0 {
            // `&#` followed by neither digits nor `x` + hex digits: the name alternative excludes
            // `#`, so nothing matches.
            return None;
        }
        let radix = if hex { 16 } else { 10 };
        // Saturates: any value past U+10FFFF is replaced the same way.
        let value = digits[..n].bytes().fold(0u64, |acc, b| {
            let d = (b as char).to_digit(radix).unwrap_or(0) as u64;
            acc.saturating_mul(radix as u64)
                .saturating_add(d)
                .min(1 << 40)
        });
        let mut used = 1 + (hex as usize) + n;
        if digits[n..].starts_with(';') {
            used += 1;
        }
        return Some((numeric_replacement(value), used));
    }
    // `[^\t\n\f <&#;]{1,32};?`
    let mut name_end = 0;
    for (count, (i, c)) in s.char_indices().enumerate() {
        if count == 32 || matches!(c, '\t' | '\n' | '\u{c}' | ' ' | '<' | '&' | '#' | ';') {
            break;
        }
        name_end = i + c.len_utf8();
    }
    if name_end == 0 {
        return None;
    }
    let used = if s[name_end..].starts_with(';') {
        name_end + 1
    } else {
        name_end
    };
    let name = &s[..used];
    if let Some(v) = entity(name) {
        return Some((v.to_string(), used));
    }
    // The longest known prefix of at least 2 characters (shorter than the whole match).
    let bounds: Vec<usize> = name.char_indices().map(|(i, _)| i).skip(2).collect();
    for &end in bounds.iter().rev() {
        if let Some(v) = entity(&name[..end]) {
            return Some((format!("{v}{}", &name[end..]), used));
        }
    }
    Some((format!("&{name}"), used))
}

/// The HTML5 named reference `name` (`amp;`, or a legacy bare `amp`): WHATWG's table, which is
/// Python's `html.entities.html5`, carried by the `htmlize` crate. Its `unescape` is not used: it
/// keeps invalid numeric references that Python drops (`&#1;`), and the fixtures follow Python.
fn entity(name: &str) -> Option<&'static str> {
    let key = format!("&{name}");
    htmlize::ENTITIES
        .get(key.as_bytes())
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Python's `_replace_charref` for a numeric reference.
fn numeric_replacement(n: u64) -> String {
    const WINDOWS_1252: [char; 32] = [
        '\u{20ac}', '\u{81}', '\u{201a}', '\u{192}', '\u{201e}', '\u{2026}', '\u{2020}',
        '\u{2021}', '\u{2c6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8d}', '\u{17d}',
        '\u{8f}', '\u{90}', '\u{2018}', '\u{2019}', '\u{201c}', '\u{201d}', '\u{2022}', '\u{2013}',
        '\u{2014}', '\u{2dc}', '\u{2122}', '\u{161}', '\u{203a}', '\u{153}', '\u{9d}', '\u{17e}',
        '\u{178}',
    ];
    match n {
        0x00 => return '\u{fffd}'.to_string(),
        0x0d => return '\r'.to_string(),
        0x80..=0x9f => return WINDOWS_1252[(n - 0x80) as usize].to_string(),
        0xd800..=0xdfff => return '\u{fffd}'.to_string(),
        _ if n > 0x10ffff => return '\u{fffd}'.to_string(),
        _ => {}
    }
    let invalid = matches!(n, 0x1..=0x8 | 0xb | 0xe..=0x1f | 0x7f..=0x9f | 0xfdd0..=0xfdef)
        || (n & 0xfffe) == 0xfffe;
    if invalid {
        return String::new();
    }
    char::from_u32(n as u32)
        .map(String::from)
        .unwrap_or_else(|| '\u{fffd}'.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_table_is_pythons_html5() {
        // Python's `html.entities.html5` has 2231 names, 106 of them legacy ones without `;`.
        assert_eq!(htmlize::ENTITIES.len(), 2231);
        assert_eq!(entity("amp;"), Some("&"));
        assert_eq!(entity("amp"), Some("&"));
        assert_eq!(entity("notin;"), Some("\u{2209}"));
        assert_eq!(entity("notin"), None);
        assert_eq!(
            html_unescape("&ampx &notit; &#1;&#x80;"),
            "&x \u{ac}it; \u{20ac}"
        );
    }
}
