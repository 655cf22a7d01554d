//! `docs/adding-a-model.md` shows this crate's code: every Rust snippet must appear verbatim in
//! `src/lib.rs`, and the plumbing count it states must be the number of `// cache` lines.

const DOC: &str = include_str!("../../../docs/adding-a-model.md");
const SRC: &str = include_str!("../src/lib.rs");

fn snippets(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in md.lines() {
        match (&mut cur, line.trim_start()) {
            (None, l) if l.starts_with("```rust") => cur = Some(String::new()),
            (Some(_), "```") => out.extend(cur.take()),
            (Some(s), _) => {
                s.push_str(line);
                s.push('\n');
            }
            _ => {}
        }
    }
    out
}

#[test]
fn every_snippet_is_in_the_crate() {
    let snips = snippets(DOC);
    assert!(snips.len() >= 5, "found {} snippets", snips.len());
    for s in snips {
        assert!(
            SRC.contains(&s),
            "not in examples/toy-model/src/lib.rs:\n{s}"
        );
    }
}

#[test]
fn the_stated_plumbing_count_is_the_marked_lines() {
    let marked = SRC.lines().filter(|l| l.ends_with("// cache")).count();
    let stated = format!("**Cache plumbing: {marked} lines**");
    assert!(DOC.contains(&stated), "the doc must say {stated}");
    assert!(marked <= 15);
}
