//! Dependencies between modules run one way: no module of the relay or the agent imports
//! another that (directly or around a ring) imports it back. Checked from the source text:
//! every `crate::NAME` outside comments and test modules is an edge from the file's
//! top-level module to `NAME`; the test fails naming each ring it finds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → the top-level modules it refers to.
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

/// The top-level module a file belongs to (`None` for lib.rs and main.rs).
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    let name = first.trim_end_matches(".rs").to_owned();
    (!matches!(name.as_str(), "lib" | "main")).then_some(name)
}

/// The `crate::NAME` references of `text`, outside comments and `#[cfg(test)]` modules.
fn references(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    let mut names = BTreeSet::new();
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        for (i, _) in line.match_indices("crate::") {
            let rest = &line[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                names.insert(name);
            }
            // `use crate::{a, b::c}`: every name in the group.
            if let Some(group) = rest.strip_prefix('{') {
                for part in group.split([',', '}']) {
                    let n: String = part
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !n.is_empty() {
                        names.insert(n);
                    }
                }
            }
        }
    }
    names
}

fn graph(src: &Path) -> std::io::Result<Graph> {
    let mut files = Vec::new();
    rust_files(src, &mut files)?;
    let mut g = Graph::new();
    for file in &files {
        if let Some(top) = top_module(src, file) {
            let refs = references(&std::fs::read_to_string(file)?);
            g.entry(top.clone())
                .or_default()
                .extend(refs.into_iter().filter(|r| *r != top));
        }
    }
    let modules: BTreeSet<String> = g.keys().cloned().collect();
    for deps in g.values_mut() {
        deps.retain(|d| modules.contains(d));
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
            "use crate::{alpha, beta::Gamma};\n// crate::comment\nlet x = crate::delta::f();"
        ),
        ["alpha", "beta", "delta"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
}
