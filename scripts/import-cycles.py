#!/usr/bin/env python3
"""File-level import cycles inside Rust crates.

For each crate directory given (default: every workspace member with a
src/ directory, read from the root Cargo.toml), maps each source file to
its module path, collects the modules each file names through `crate::`,
`super::` or `self::` paths (in `use` items and in expressions), and
reports every strongly connected component of more than one file.

A file's own submodules (`mod foo;` declared in it, or `foo::` paths that
resolve to its children) do not count as an edge back to the parent: a
parent naming its child is the module tree, not a cycle. Edges from a child
to its parent module's file (or any other file) count.

Usage: scripts/import-cycles.py [CRATE_DIR ...]
Exit status: 0 when no crate has a cycle, 1 otherwise, 2 on bad input.
Output: one line per cycle, `crate: a.rs -> b.rs -> a.rs` (a shortest
cycle through the component), then a summary line.
"""

import glob
import os
import re
import sys

try:
    import tomllib  # Python 3.11+
except ImportError:  # pragma: no cover
    tomllib = None


def workspace_crates(root):
    """Member directories of the workspace at `root` that have a src/."""
    with open(os.path.join(root, "Cargo.toml"), "rb") as f:
        text = f.read().decode()
    if tomllib is not None:
        members = tomllib.loads(text).get("workspace", {}).get("members", [])
    else:  # minimal fallback: the members = [ ... ] array
        m = re.search(r"members\s*=\s*\[(.*?)\]", text, re.S)
        members = re.findall(r'"([^"]+)"', m.group(1)) if m else []
    out = []
    for pat in members:
        for d in sorted(glob.glob(os.path.join(root, pat))):
            if os.path.isdir(os.path.join(d, "src")):
                out.append(d)
    return out


def strip_comments_and_strings(src):
    """Removes comments, string and char literals (keeps line structure)."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if src.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif src.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    if src[i] == "\n":
                        out.append("\n")
                    i += 1
        elif c == "r" and re.match(r'r#*"', src[i:i + 10]) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            m = re.match(r'r(#*)"', src[i:])
            end = '"' + m.group(1)
            j = src.find(end, i + len(m.group(0)))
            j = n if j < 0 else j + len(end)
            out.append("\n" * src.count("\n", i, j))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append("\n" * src.count("\n", i, j))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", src[i:i + 4]) or src.startswith("'\\u{", i):
            j = src.find("'", i + 1 if src[i + 1] != "\\" else i + 2)
            i = j + 1 if j > 0 else i + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def strip_cfg_test_modules(text):
    """Removes inline `#[cfg(test)] mod name { ... }` blocks: unit tests may
    name any module of their crate (e.g. a lock a test must hold) without
    making the production files a knot."""
    out, i = [], 0
    pat = re.compile(r"#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{")
    while True:
        m = pat.search(text, i)
        if not m:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        out.append("\n" * text.count("\n", m.start(), j))
        i = j


def module_files(src_dir):
    """{module path tuple: file} for every .rs file under src_dir."""
    mods = {}
    for path in glob.glob(os.path.join(src_dir, "**", "*.rs"), recursive=True):
        rel = os.path.relpath(path, src_dir)[:-3].split(os.sep)
        if rel in (["lib"], ["main"]):
            key = ()
        elif rel[0] == "bin":
            continue  # separate crates
        elif rel[-1] == "mod":
            key = tuple(rel[:-1])
        else:
            key = tuple(rel)
        mods[key] = path
    return mods


def resolve(mods, path):
    """The file owning the longest module prefix of `path`."""
    for k in range(len(path), -1, -1):
        if tuple(path[:k]) in mods:
            return tuple(path[:k])
    return None


PATH_RE = re.compile(r"\b(crate|super|self)((?:\s*::\s*(?:super|[A-Za-z_][A-Za-z0-9_]*))+)")
GROUP_RE = re.compile(r"\b(crate|super|self)((?:\s*::\s*(?:super|[A-Za-z_][A-Za-z0-9_]*))*)\s*::\s*\{")


def referenced(mod, text):
    """Module paths named from file `mod` (lists of segments)."""
    refs = []

    def absolute(root, rest):
        segs = [s for s in re.split(r"\s*::\s*", rest.strip()) if s]
        if root == "crate":
            base = []
        elif root == "self":
            base = list(mod)
        else:
            base = list(mod[:-1])
        while segs and segs[0] == "super":
            base = base[:-1]
            segs = segs[1:]
        return base + segs

    for m in PATH_RE.finditer(text):
        refs.append(absolute(m.group(1), m.group(2)))
    # `use crate::{a, b::c}` groups: each first segment inside the braces.
    for m in GROUP_RE.finditer(text):
        prefix = absolute(m.group(1), m.group(2))
        depth, j = 1, m.end()
        start = j
        items = []
        while j < len(text) and depth:
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            elif text[j] == "," and depth == 1:
                items.append(text[start:j])
                start = j + 1
            j += 1
        items.append(text[start:j])
        for it in items:
            first = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:::\s*([A-Za-z_][A-Za-z0-9_]*))?", it)
            if first and first.group(1) not in ("self",):
                segs = [first.group(1)] + ([first.group(2)] if first.group(2) else [])
                refs.append(prefix + segs)
            elif first:
                refs.append(prefix)
    return refs


def graph(crate_dir):
    mods = module_files(os.path.join(crate_dir, "src"))
    edges = {k: set() for k in mods}
    for mod, path in mods.items():
        with open(path, encoding="utf-8", errors="replace") as f:
            text = strip_comments_and_strings(f.read())
        text = strip_cfg_test_modules(text)
        for ref in referenced(mod, text):
            target = resolve(mods, ref)
            if target is None or target == mod:
                continue
            # A parent naming its own descendants is the module tree.
            if target[: len(mod)] == mod:
                continue
            edges[mod].add(target)
    return mods, edges


def sccs(edges):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def shortest_cycle(edges, comp):
    comp = set(comp)
    best = None
    for s in sorted(comp):
        prev, frontier, seen = {s: None}, [s], {s}
        found = None
        while frontier and not found:
            nxt = []
            for v in frontier:
                for w in sorted(edges[v]):
                    if w == s:
                        found = v
                        break
                    if w in comp and w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if found:
                    break
            frontier = nxt
        if found is not None:
            path, v = [], found
            while v is not None:
                path.append(v)
                v = prev[v]
            path.reverse()
            if best is None or len(path) < len(best):
                best = path
    return best + [best[0]]


def main(argv):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    crates = argv[1:] or workspace_crates(root)
    if not crates:
        print("import-cycles: no crates found", file=sys.stderr)
        return 2
    total = 0
    for crate in crates:
        if not os.path.isdir(os.path.join(crate, "src")):
            print(f"import-cycles: {crate}: no src/ directory", file=sys.stderr)
            return 2
        mods, edges = graph(crate)
        name = os.path.relpath(crate, root) if os.path.isabs(crate) else crate
        for comp in sccs(edges):
            cyc = shortest_cycle(edges, comp)
            src = os.path.join(crate, "src")
            files = [os.path.relpath(mods[m], src) for m in cyc]
            others = len(comp) - (len(cyc) - 1)
            extra = f" (+{others} more file(s) in the same knot)" if others > 0 else ""
            print(f"{name}: " + " -> ".join(files) + extra)
            total += 1
    print(f"import-cycles: {total} cycle(s) in {len(crates)} crate(s)")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
