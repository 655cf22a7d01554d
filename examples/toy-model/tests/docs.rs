//! `docs/adding-a-model.md` shows this crate's code: every Rust snippet must appear verbatim in
//! `src/lib.rs` or the runner binary `src/bin/toy-magcache.rs` (or, for the one real family it
//! shows, Wan's `magcache-models/src/wan/model.rs`), every TOML snippet in the run file `toy.toml`,
//! and the plumbing count it states must be the number of `// cache` lines.

const DOC: &str = include_str!("../../../docs/adding-a-model.md");
const SRC: &str = include_str!("../src/lib.rs");
const BIN: &str = include_str!("../src/bin/toy-magcache.rs");
const RUN_FILE: &str = include_str!("../toy.toml");
const WAN: &str = include_str!("../../../magcache-models/src/wan/model.rs");

/// The fenced blocks of `md` whose opening line starts with ```` ```lang ````.
fn snippets_of(md: &str, lang: &str) -> Vec<String> {
    let fence = format!("```{lang}");
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in md.lines() {
        match (&mut cur, line.trim_start()) {
            (None, l) if l.starts_with(&fence) => cur = Some(String::new()),
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

fn snippets(md: &str) -> Vec<String> {
    snippets_of(md, "rust")
}

#[test]
fn every_snippet_is_in_the_crate() {
    let snips = snippets(DOC);
    assert!(snips.len() >= 6, "found {} snippets", snips.len());
    for s in snips {
        assert!(
            SRC.contains(&s) || BIN.contains(&s) || WAN.contains(&s),
            "not in examples/toy-model/src/lib.rs, src/bin/toy-magcache.rs nor wan/model.rs:\n{s}"
        );
    }
    assert!(
        DOC.contains(BIN.split("\n\n").last().unwrap_or_default()),
        "the doc shows the runner binary's whole `main`"
    );
}

#[test]
fn every_toml_snippet_is_in_the_run_file() {
    let snips = snippets_of(DOC, "toml");
    assert!(!snips.is_empty(), "the doc shows toy.toml");
    for s in snips {
        assert!(
            RUN_FILE.contains(&s),
            "not in examples/toy-model/toy.toml:\n{s}"
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
