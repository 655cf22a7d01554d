#!/usr/bin/env python3
"""The framework's shape, checked in CI (issue 40): library files stay under 600 lines and
functions under ~100; no two modules of a crate import each other (directly or round a circle);
no model family imports another family; no public function that nothing calls (its name appears
nowhere else in the workspace's code, tests or docs); each family's cache plumbing (its block
kinds, the chain's field, `impl ChainModel` up to `assemble`, each call's chain, and the
`ModelFamily` registration of one family name) stays within 30 lines of code (blank, comment and
lone-punctuation lines aside, as `duplicates` counts).

Library code is every `src/` file of the workspace crates except tests (`*_tests.rs`, `tests.rs`)
and `#[cfg(test)]` modules at a file's end. Files and functions that were over the limits when the
check came in are listed in `scripts/framework-debt.txt` with the size they had: they may shrink,
never grow, and a new one may not join them. Prints every finding and exits 1 when there is one.

    python3 scripts/check-framework.py            # the check
    python3 scripts/check-framework.py --debt     # prints today's offenders in the debt format
    python3 scripts/check-framework.py --plumbing # also prints each family's plumbing by piece
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRATES = [
    "magcache-core",
    "magcache-strategies",
    "magcache-layers",
    "magcache-text",
    "magcache-models",
    "magcache-cli",
    "examples/toy-model",
]
# The family folders of magcache-models: none may import another.
FAMILIES = ["wan", "flux", "flux2", "zimage", "qwenimage"]
MAX_PLUMBING = 30
MAX_FILE = 600
MAX_FN = 100
DEBT = os.path.join(ROOT, "scripts", "framework-debt.txt")

FN_RE = re.compile(r"^\s*(pub(\([a-z:]+\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")


def library_files():
    for crate in CRATES:
        src = os.path.join(ROOT, crate, "src")
        for dirpath, _, names in os.walk(src):
            for n in sorted(names):
                if not n.endswith(".rs") or n == "tests.rs" or n.endswith("_tests.rs"):
                    continue
                if os.sep + "bin" in dirpath[len(src):]:
                    continue
                path = os.path.join(dirpath, n)
                yield crate, os.path.relpath(path, ROOT)


def library_lines(path):
    """The file's lines up to its trailing `#[cfg(test)]` module, if any."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if line.strip() == "#[cfg(test)]" and i + 1 < len(lines) and (
            lines[i + 1].startswith("mod ") or lines[i + 1].startswith("#[path")
        ):
            return lines[:i]
    return lines


def strip_strings(line):
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    line = re.sub(r"'(\\.|[^'\\])'", "''", line)
    return line.split("//")[0]


def functions(lines):
    """(name, first line number, length) of every fn with a body."""
    out = []
    i = 0
    while i < len(lines):
        m = FN_RE.match(lines[i])
        if not m:
            i += 1
            continue
        depth, started, j = 0, False, i
        while j < len(lines):
            code = strip_strings(lines[j])
            if not started and ";" in code and "{" not in code:
                break  # a declaration without a body (trait method)
            for ch in code:
                if ch == "{":
                    depth += 1
                    started = True
                elif ch == "}":
                    depth -= 1
            if started and depth <= 0:
                out.append((m.group(6), i + 1, j - i + 1))
                break
            j += 1
        i += 1
    return out


def module_of(crate, path):
    """The crate-level module a file belongs to (`wan`, `nn`, ...); `lib` for lib.rs/main.rs."""
    rel = os.path.relpath(os.path.join(ROOT, path), os.path.join(ROOT, crate, "src"))
    first = rel.split(os.sep)[0]
    return first[:-3] if first.endswith(".rs") else first


def submodule_of(crate, path):
    """The module path of a file inside its crate (`wan::vae::load`)."""
    rel = os.path.relpath(os.path.join(ROOT, path), os.path.join(ROOT, crate, "src"))
    parts = rel[:-3].split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    return parts


USE_RE = re.compile(r"\b(crate|super)((?:::\w+)+)")


def imports(crate, path, lines):
    """Module paths (as lists) this file names through `crate::` or `super::`."""
    me = submodule_of(crate, path)
    is_mod = path.endswith("mod.rs") or path.endswith("lib.rs")
    found = set()
    for line in lines:
        code = strip_strings(line)
        if code.lstrip().startswith("//"):
            continue
        for m in USE_RE.finditer(code):
            segs = [s for s in m.group(2).split("::") if s]
            if m.group(1) == "crate":
                target = segs
            else:
                base = me if is_mod else me[:-1]
                ups = 1
                while segs and segs[0] == "super":
                    ups += 1
                    segs = segs[1:]
                target = (base[: len(base) - (ups - 1)] if ups > 1 else base) + segs
            found.add(tuple(target))
    return found


def circles(crate, files):
    """Pairs (and longer circles) of sibling modules that import each other, per parent module."""
    edges = {}
    for path in files:
        lines = library_lines(path)
        me = submodule_of(crate, path)
        for target in imports(crate, path, lines):
            # Compare at the first level where the two paths differ (siblings under one parent).
            k = 0
            while k < len(me) and k < len(target) and me[k] == target[k]:
                k += 1
            if k >= len(me) or k >= len(target):
                continue  # an ancestor or the file itself
            a, b = tuple(me[: k + 1]), tuple(target[: k + 1])
            if a != b:
                edges.setdefault(a, set()).add(b)
    found, seen = [], set()

    def walk(start, node, trail):
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                cyc = tuple(sorted(trail))
                if cyc not in seen:
                    seen.add(cyc)
                    found.append(trail + [start])
            elif nxt not in trail and len(trail) < 6:
                walk(start, nxt, trail + [nxt])

    for start in sorted(edges):
        walk(start, start, [start])
    return [" -> ".join("::".join(n) for n in c) for c in found]


def dead_functions():
    """Public functions of library code whose name appears nowhere else (code, tests, docs)."""
    defs = []
    for _crate, path in library_files():
        for i, line in enumerate(library_lines(path)):
            m = re.match(r"\s*pub(\([a-z:]+\))? fn (\w+)", line)
            if m:
                defs.append((m.group(2), path, i + 1))
    texts = []
    for root in CRATES + ["tests", "docs"]:
        for dirpath, _, names in os.walk(os.path.join(ROOT, root)):
            if os.sep + "target" in dirpath:
                continue
            for n in names:
                if n.endswith((".rs", ".md")):
                    with open(os.path.join(dirpath, n), encoding="utf-8") as f:
                        texts.append(f.read())
    words = {}
    for t in texts:
        for w in re.findall(r"\w+", t):
            words[w] = words.get(w, 0) + 1
    common = {"main", "new", "default", "fmt", "from", "drop", "len", "is_empty"}
    return [
        f"{path}:{line}: public fn `{name}` is called nowhere (remove it, or use it)"
        for name, path, line in defs
        if name not in common and words.get(name, 0) <= 1
    ]


def code_count(text):
    """Lines with code: not blank, not a comment, not lone punctuation."""
    return sum(
        1
        for l in text.split("\n")
        if l.strip() and not l.strip().startswith("//") and re.search(r"[A-Za-z0-9]", l)
    )


def plumbing(fam):
    """A family's cache plumbing in lines of code, by piece (see the module's doc)."""
    folder = os.path.join(ROOT, "magcache-models", "src", fam)
    texts = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".rs"):
            with open(os.path.join(folder, name)) as f:
                texts[name] = f.read()
    allt = "\n".join(texts.values())
    pieces = {
        "block kinds": len(re.findall(r"BlockMetadata::(?:joint|hidden)\(", allt)),
        "chain field": len(re.findall(r"^\s*pub(?:\(crate\))? blocks: ModelBlocks<", allt, re.M)),
    }
    model = next(t for t in texts.values() if "impl ChainModel for" in t)
    a = model.index("impl ChainModel for")
    pieces["impl ChainModel"] = code_count(model[a : model.index("fn assemble(", a)])
    joint = re.search(r"joint_(?:chain_call|forward)\(", model)
    if joint:
        a = model.rfind("let parts", 0, joint.start())
        a = joint.start() if a < 0 else a
        pieces["each call"] = code_count(model[a : model.index("\n    }", a)])
    else:
        a = model.index("let chain = (self.blocks)")
        pieces["each call"] = code_count(model[a : model.index("drop(chain);", a)])
    regs = re.findall(r"inventory::submit! \{\n    ModelFamily \{.*?\n\}\n", allt, re.S)
    pieces["registration"] = max((code_count(r) for r in regs), default=0)
    return pieces


def load_debt():
    debt = {}
    if os.path.exists(DEBT):
        for line in open(DEBT, encoding="utf-8"):
            line = line.split("#")[0].strip()
            if line:
                key, size = line.rsplit(" ", 1)
                debt[key] = int(size)
    return debt


def main():
    print_debt = "--debt" in sys.argv
    debt = load_debt()
    problems, offenders = [], []
    by_crate = {}
    for crate, path in library_files():
        by_crate.setdefault(crate, []).append(path)
        lines = library_lines(path)
        n = len(lines)
        if n > MAX_FILE:
            offenders.append((f"file {path}", n))
        for name, start, length in functions(lines):
            if length > MAX_FN:
                offenders.append((f"fn {path}:{name}", length))
    for key, size in offenders:
        allowed = debt.get(key)
        if allowed is None:
            problems.append(f"{key}: {size} lines (limit {MAX_FILE if key.startswith('file') else MAX_FN})")
        elif size > allowed:
            problems.append(f"{key}: grew to {size} lines (was {allowed}; it may only shrink)")
    for crate, files in by_crate.items():
        for c in circles(crate, files):
            problems.append(f"{crate}: modules import each other: {c}")
    for path in by_crate.get("magcache-models", []):
        fam = module_of("magcache-models", path)
        if fam not in FAMILIES:
            continue
        for target in imports("magcache-models", path, library_lines(path)):
            if target and target[0] in FAMILIES and target[0] != fam:
                problems.append(f"{path}: family `{fam}` imports family `{target[0]}` ({'::'.join(target)})")
    problems += dead_functions()
    for fam in FAMILIES:
        pieces = plumbing(fam)
        total = sum(pieces.values())
        if "--plumbing" in sys.argv:
            print(f"{fam}: {total} ({', '.join(f'{k} {v}' for k, v in pieces.items())})")
        if total > MAX_PLUMBING:
            problems.append(f"{fam}: cache plumbing {total} lines (limit {MAX_PLUMBING}): {pieces}")
    if print_debt:
        for key, size in sorted(offenders):
            print(f"{key} {size}")
        return 0
    for p in problems:
        print(p)
    stale = sorted(set(debt) - {k for k, _ in offenders})
    print(
        f"framework check: {len(problems)} problem(s); {len(offenders)} listed offender(s) left"
        + (f"; {len(stale)} paid off (remove from framework-debt.txt): {', '.join(stale)}" if stale else "")
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
