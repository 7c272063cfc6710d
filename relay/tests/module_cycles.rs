//! Dependencies between modules run one way: no module (file) of the relay or the agent
//! imports another that (directly or around a ring) imports it back. Checked from the source
//! text: every `crate::a::b::Item` and `super::x::Item` path outside comments and test
//! modules is an edge from the file's module to the longest module prefix of the path; the
//! test fails naming each ring it finds. A parent module's own re-exports of its children
//! (`pub use child::Item;` in `mod.rs`) are relative paths and not edges: a folder's
//! `mod.rs` is its table of contents.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module (`a::b`) → the modules it refers to.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The module path of a file (`session/runtime.rs` → `session::runtime`, `store/mod.rs` →
/// `store`); `None` for the crate roots `lib.rs` and `main.rs`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    let path = parts.join("::");
    (!matches!(path.as_str(), "lib" | "main" | "")).then_some(path)
}

/// The paths of a use tree starting at `s` (after `crate::` or `super::`): `a::{b, c::d}`
/// → `a::b`, `a::c::d`. Stops at the first character that is not part of a path.
fn expand(s: &str) -> Vec<String> {
    let word = |s: &str| -> usize {
        s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len())
    };
    if let Some(rest) = s.strip_prefix('{') {
        // Split the group at its top-level commas.
        let (mut depth, mut start, mut out) = (0usize, 0usize, Vec::new());
        for (i, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    out.extend(expand(rest[start..i].trim_start()));
                    return out;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.extend(expand(rest[start..i].trim_start()));
                    start = i + 1;
                }
                _ => {}
            }
        }
        return out;
    }
    let n = word(s);
    if n == 0 {
        return Vec::new();
    }
    let head = &s[..n];
    match s[n..].strip_prefix("::") {
        Some(rest) => {
            let tails = expand(rest);
            if tails.is_empty() {
                vec![head.to_owned()]
            } else {
                tails.into_iter().map(|t| format!("{head}::{t}")).collect()
            }
        }
        None => vec![head.to_owned()],
    }
}

/// The absolute paths referred to by `text` (the file of module `module`), outside comments
/// and `#[cfg(test)]` modules.
fn references(module: &str, text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
    let mut paths = BTreeSet::new();
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        for (prefix, base) in [("crate::", ""), ("super::", parent)] {
            for (i, _) in line.match_indices(prefix) {
                let before = line[..i].chars().next_back();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                    continue;
                }
                for p in expand(&line[i + prefix.len()..]) {
                    paths.insert(if base.is_empty() {
                        p
                    } else {
                        format!("{base}::{p}")
                    });
                }
            }
        }
    }
    paths
}

/// The longest prefix of `path` that is one of `modules`.
fn module_prefix(path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find(|p| modules.contains(p))
}

fn graph(src: &Path) -> std::io::Result<Graph> {
    let mut files = Vec::new();
    rust_files(src, &mut files)?;
    let mut texts = BTreeMap::new();
    for file in &files {
        if let Some(module) = module_of(src, file) {
            texts.insert(module, std::fs::read_to_string(file)?);
        }
    }
    let modules: BTreeSet<String> = texts.keys().cloned().collect();
    let mut g = Graph::new();
    for (module, text) in &texts {
        let deps = references(module, text)
            .iter()
            .filter_map(|p| module_prefix(p, &modules))
            .filter(|d| d != module && !module.starts_with(&format!("{d}::")))
            .collect();
        g.insert(module.clone(), deps);
    }
    Ok(g)
}

/// Rings of the graph (strongly connected components of more than one module).
fn rings(g: &Graph) -> Vec<Vec<String>> {
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(m) = todo.pop() {
            for d in g.get(&m).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&String, BTreeSet<String>> = g.keys().map(|m| (m, reach(m))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for m in g.keys() {
        if done.contains(m) || !reachable[m].contains(m) {
            continue;
        }
        let ring: Vec<String> = g
            .keys()
            .filter(|o| reachable[m].contains(*o) && reachable[*o].contains(m))
            .cloned()
            .collect();
        done.extend(ring.iter().cloned());
        out.push(ring);
    }
    out
}

fn check(crate_dir: &str) -> std::io::Result<()> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(crate_dir)
        .join("src");
    let g = graph(&src)?;
    assert!(g.len() > 5, "{}: found only {:?}", src.display(), g.keys());
    let found = rings(&g);
    assert!(
        found.is_empty(),
        "{crate_dir} has import cycles between modules: {found:?}\n(move the shared piece into a module of its own that both use)"
    );
    Ok(())
}

#[test]
fn the_relay_has_no_import_cycles() -> std::io::Result<()> {
    check("relay")
}

#[test]
fn the_agent_has_no_import_cycles() -> std::io::Result<()> {
    check("agent-client")
}

#[test]
fn a_ring_is_found() {
    let mut g = Graph::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")] {
        g.entry(a.into()).or_default().insert(b.into());
        g.entry(b.into()).or_default();
    }
    g.entry("d".into()).or_default();
    assert_eq!(
        rings(&g),
        vec![vec!["a".to_owned(), "b".into(), "c".into()]]
    );
    assert_eq!(
        references(
            "a::b",
            "use crate::{alpha, beta::{Gamma, delta::E}};\n// crate::comment\nlet x = crate::zeta::f();\nuse super::{c, d::F};"
        ),
        ["a::c", "a::d::F", "alpha", "beta::Gamma", "beta::delta::E", "zeta::f"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    let modules: BTreeSet<String> = ["beta", "beta::delta"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        module_prefix("beta::delta::E", &modules).as_deref(),
        Some("beta::delta")
    );
    assert_eq!(module_prefix("alpha::x", &modules), None);
}
