//! ftfy's `fix_text` as diffusers' `WanImageToVideoPipeline` runs it on every prompt (its
//! `basic_clean` calls `ftfy.fix_text` unconditionally; `WanPipeline` only where ftfy is installed,
//! which the reference's text-to-video fixtures were not: [`crate::clean`]). It repairs mojibake
//! (`cafÃ©` -> `café`), straightens curly quotes, expands Latin ligatures, folds full-width and
//! half-width forms, normalises line breaks, drops control characters and terminal escapes, and
//! applies NFC: all of which change the UMT5 token ids.
//!
//! The fixes are plsfix's (a Rust port of ftfy 6), around two places where plsfix departs from
//! ftfy 6.3.1, which this module restores:
//! - ftfy stops unescaping HTML entities at the first line that holds a `<` (it may be markup):
//!   that line and every later one keep theirs; plsfix unescapes every line. Those lines' `&` are
//!   hidden from plsfix behind a private-use character.
//! - ftfy removes terminal escapes (`ESC [ digits-and-semicolons letter`); plsfix removes the `ESC`
//!   and leaves the rest. They are removed here first. (An entity never makes one: HTML's rules
//!   turn `&#27;` into nothing, in ftfy's unescaping and in the pipeline's.)
//!
//! Known residue: some mojibake of the Windows-1252 byte `0x9C` (`œ`) is left as it is (`Ãœ`, which
//! ftfy turns into `Ü`: plsfix's); a terminal escape whose digits are not ASCII is kept (Python's
//! `\d` takes any decimal digit). Prompts free of mojibake and escapes are unaffected.

use magcache_core::{Error, Result};

/// A character no prompt is expected to hold, standing for `&` on lines ftfy would not unescape.
const AMP_STANDIN: char = '\u{F8FF}';

/// `ftfy.fix_text(text)` (ftfy 6.3.1's defaults). An error only where plsfix panics (never seen on
/// the cases tested), naming the step.
pub fn fix_text(text: &str) -> Result<String> {
    let stripped = remove_terminal_escapes(text);
    // ftfy reads the text a line (segment) at a time and stops unescaping for good at the first
    // line with a `<`.
    let protect = !stripped.contains(AMP_STANDIN);
    let mut hidden = String::with_capacity(stripped.len());
    let mut markup = false;
    for line in stripped.split_inclusive('\n') {
        markup |= line.contains('<');
        if protect && markup {
            hidden.extend(line.chars().map(|c| if c == '&' { AMP_STANDIN } else { c }));
        } else {
            hidden.push_str(line);
        }
    }
    let fixed = std::panic::catch_unwind(|| plsfix::fix_text(&hidden, None))
        .map_err(|_| Error::msg("[prompt]: cleaning a prompt as ftfy does (plsfix) failed"))?;
    Ok(match protect {
        true => fixed.replace(AMP_STANDIN, "&"),
        false => fixed,
    })
}

/// ftfy's `remove_terminal_escapes`: every `ESC [`, digits and `;`, then an ASCII letter, removed.
fn remove_terminal_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("\u{1b}[") {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 2..];
        let params = after
            .find(|c: char| !(c.is_ascii_digit() || c == ';'))
            .unwrap_or(after.len());
        match after[params..].chars().next() {
            Some(c) if c.is_ascii_alphabetic() => rest = &after[params + 1..],
            _ => {
                out.push_str("\u{1b}[");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ftfy 6.3.1's output for each input (computed with it).
    #[test]
    fn matches_ftfy() {
        let cases = [
            ("It\u{2019}s a \u{201c}quiet\u{201d} lake", "It's a \"quiet\" lake"),
            ("A \u{fb01}sh in the \u{ff32}\u{ff29}\u{ff36}\u{ff25}\u{ff32}", "A fish in the RIVER"),
            ("caf\u{c3}\u{a9} &amp;amp; tea", "caf\u{e9} & tea"),
            ("<b>&amp;</b>  x", "<b>&amp;</b>  x"),
            ("<b>\n&amp;amp;amp; x", "<b>\n&amp;amp;amp; x"),
            ("&amp;amp; x\n<b>", "& x\n<b>"),
            ("\u{1b}[36;44mI'm blue\u{1b}[0m", "I'm blue"),
            ("The Mona Lisa doesn\u{c3}\u{a2}\u{e2}\u{201a}\u{ac}\u{e2}\u{201e}\u{a2}t have eyebrows.", "The Mona Lisa doesn't have eyebrows."),
            ("e\u{301}cole", "\u{e9}cole"),
            ("a\r\nb\rc", "a\nb\nc"),
            ("\u{201c}Hello,\u{201d} she said \u{2014} \u{2018}quietly\u{2019}.", "\"Hello,\" she said \u{2014} 'quietly'."),
            ("x\u{0}y", "xy"),
            ("plain text, nothing to fix", "plain text, nothing to fix"),
        ];
        for (input, want) in cases {
            assert_eq!(fix_text(input).unwrap(), want, "{input:?}");
        }
    }

    /// Whole cleanings (`prompt_clean(ftfy.fix_text(text))`, computed with ftfy 6.3.1) where plsfix
    /// alone differs from ftfy but the pipeline's own unescaping evens it out.
    #[test]
    fn whole_cleaning_matches_the_pipeline() {
        assert_eq!(crate::prompt_clean_ftfy("&#27;[1mbold").unwrap(), "[1mbold");
    }

    #[test]
    fn terminal_escapes_are_removed_as_ftfy_does() {
        assert_eq!(remove_terminal_escapes("a\u{1b}[1;2mb\u{1b}[c"), "ab");
        assert_eq!(remove_terminal_escapes("a\u{1b}[1;2"), "a\u{1b}[1;2");
        assert_eq!(remove_terminal_escapes("\u{1b}[\u{1b}[0m"), "\u{1b}[");
    }
}
