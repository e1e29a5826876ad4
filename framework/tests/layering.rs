//! The framework's modules import each other without a cycle, and the low layers (the etcd and
//! wire code, the registries and pure state) never import the event loop, the application's
//! API or the exchange. Reads `src/**/*.rs` as text: every `crate::…` path (also inside
//! `use crate::{…}` groups) and `super::…` path outside `#[cfg(test)] mod tests`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`exchange::fetch`) → source text without its unit tests and line comments.
fn modules() -> BTreeMap<String, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(&root).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().map(String::as_str) == Some("mod") {
                parts.pop();
            }
            if parts == ["lib"] {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap_or_default()
                .lines()
                .map(|l| l.split("//").next().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n");
            out.insert(parts.join("::"), text);
        }
    }
    out
}

/// The longest known module that `path` (`a::b::c`) starts with.
fn module_of(path: &[&str], known: &BTreeMap<String, String>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|k| path[..k].join("::"))
        .find(|m| known.contains_key(m))
}

fn ident_path(s: &str) -> Vec<&str> {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(s.len());
    s[..end].split("::").filter(|p| !p.is_empty()).collect()
}

fn imports(module: &str, text: &str, known: &BTreeMap<String, String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                if let Some(m) = module_of(&ident_path(item.trim()), known) {
                    out.insert(m);
                }
            }
        } else if let Some(m) = module_of(&ident_path(rest), known) {
            out.insert(m);
        }
    }
    let parent: Vec<&str> = module.split("::").collect();
    let parent = &parent[..parent.len() - 1];
    for (i, _) in text.match_indices("super::") {
        let rest = &text[i + "super::".len()..];
        let mut path: Vec<&str> = parent.to_vec();
        let items: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => group[..group.find('}').unwrap_or(group.len())]
                .split(',')
                .collect(),
            None => vec![rest],
        };
        for item in items {
            path.truncate(parent.len());
            path.extend(ident_path(item.trim()));
            if let Some(m) = module_of(&path, known) {
                out.insert(m);
            }
        }
    }
    out.remove(module);
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let known = modules();
    known
        .iter()
        .map(|(m, text)| (m.clone(), imports(m, text, &known)))
        .collect()
}

#[test]
fn the_module_graph_has_no_cycle() {
    let g = graph();
    // Repeatedly remove modules that import nothing left: what remains is on a cycle.
    let mut left = g.clone();
    loop {
        let leaves: Vec<String> = left
            .iter()
            .filter(|(_, deps)| deps.iter().all(|d| !left.contains_key(d)))
            .map(|(m, _)| m.clone())
            .collect();
        if leaves.is_empty() {
            break;
        }
        for m in leaves {
            left.remove(&m);
        }
    }
    let cycle: Vec<String> = left
        .iter()
        .map(|(m, deps)| {
            let on: Vec<&String> = deps.iter().filter(|d| left.contains_key(*d)).collect();
            format!("{m} -> {on:?}")
        })
        .collect();
    assert!(
        cycle.is_empty(),
        "modules on an import cycle:\n{}",
        cycle.join("\n")
    );
    // The scan sees what it should: the loop imports the etcd code and the app's API.
    assert!(
        g["node"].contains("etcd") && g["node"].contains("app"),
        "{:?}",
        g["node"]
    );
}

#[test]
fn low_layers_never_import_the_loop_the_application_api_or_the_exchange() {
    let g = graph();
    let high = ["node", "app", "exchange", "framework", "client"];
    let low = [
        "etcd", "wire", "metrics", "role", "roles", "stall", "work", "inbox", "data", "config",
        "error", "security", "health",
    ];
    let mut bad = Vec::new();
    for (m, deps) in &g {
        let top = m.split("::").next().unwrap_or_default();
        if !low.contains(&top) {
            continue;
        }
        for d in deps {
            let dtop = d.split("::").next().unwrap_or_default();
            if high.contains(&dtop) {
                bad.push(format!("{m} imports {d}"));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_engine_is_pure() {
    let known = modules();
    let g = graph();
    let engine: Vec<&String> = known
        .keys()
        .filter(|m| m.as_str() == "node::engine" || m.starts_with("node::engine::"))
        // The engine's tests drive it with a clock; they are not the engine.
        .filter(|m| !m.starts_with("node::engine::tests"))
        .collect();
    assert!(
        engine.len() >= 3,
        "the engine's modules were not found: {engine:?}"
    );
    let high = ["node", "app", "exchange", "framework", "client", "http"];
    let mut bad = Vec::new();
    for m in &engine {
        for d in &g[*m] {
            let inside = d == "node::engine" || d.starts_with("node::engine::");
            let dtop = d.split("::").next().unwrap_or_default();
            if !inside && high.contains(&dtop) {
                bad.push(format!("{m} imports {d}"));
            }
        }
        // Whole words only: `Store` but not `StoredCheckpoint`.
        let text = &known[*m];
        for word in [
            "tokio::spawn",
            "Store",
            "Peers",
            "Instant::now",
            "dyn Task",
            "JoinSet",
        ] {
            let found = text.match_indices(word).any(|(i, _)| {
                let after = text[i + word.len()..].chars().next();
                !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            });
            if found {
                bad.push(format!("{m} uses {word}"));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
