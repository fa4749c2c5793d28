//! Data flows one way (ARCHITECTURE.md): no module under `src/` reaches
//! itself again through the modules it uses. Checked at every level: the
//! crate's top-level modules (a directory counts as one), and the files of
//! each directory among themselves. A module using its own parent or
//! children (`super::Item` in a child, `child::f` in `mod.rs`) is the usual
//! Rust layout and not a loop.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A module by its path below the crate root: `["proxy", "hold"]`.
type Module = Vec<String>;
type Graph = BTreeMap<Module, BTreeSet<Module>>;

/// Every `.rs` file under `root`, as its module path and its text.
fn modules(root: &Path) -> BTreeMap<Module, String> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(root).unwrap().with_extension("");
            let mut module: Module = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if module.last().is_some_and(|m| m == "mod") {
                module.pop();
            }
            if module == ["lib"] || module == ["main"] {
                module.clear();
            }
            found.insert(module, std::fs::read_to_string(&path).unwrap());
        }
    }
    found
}

/// The first path segments named after each `crate::` and `super::` in
/// `text` (a `{...}` group gives each of its members), comments skipped.
fn references(text: &str) -> Vec<(&'static str, String)> {
    let code: String = text
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = Vec::new();
    for kind in ["crate", "super"] {
        let marker = format!("{kind}::");
        let mut rest = code.as_str();
        while let Some(at) = rest.find(&marker) {
            let preceded_by_ident = rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$');
            rest = &rest[at + marker.len()..];
            if preceded_by_ident {
                continue;
            }
            for name in first_segments(rest) {
                found.push((kind, name));
            }
        }
    }
    found
}

/// `a::b` gives `a`; `{a, b::{c, d}, e}` gives `a`, `b` and `e`.
fn first_segments(text: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    if !text.starts_with('{') {
        return vec![ident(text)]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect();
    }
    let mut names = Vec::new();
    let mut depth = 0;
    let mut member_start = true;
    for (i, c) in text.char_indices() {
        match c {
            '{' => {
                depth += 1;
                member_start = depth == 1;
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => member_start = true,
            c if depth == 1 && member_start && !c.is_whitespace() => {
                member_start = false;
                names.push(ident(&text[i..]));
            }
            _ => {}
        }
    }
    names.retain(|n| !n.is_empty() && n != "self");
    names
}

/// Edges between siblings: `a` uses something in `b`, both under the same
/// parent, each standing for its whole subtree.
fn graph(modules: &BTreeMap<Module, String>) -> Graph {
    let mut graph = Graph::new();
    for (from, text) in modules {
        for (kind, name) in references(text) {
            let mut to: Module = match kind {
                "crate" => Vec::new(),
                _ => from[..from.len().saturating_sub(1)].to_vec(),
            };
            to.push(name);
            let shared = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if shared >= from.len() || shared >= to.len() {
                continue; // a module and its own parent or child
            }
            let (a, b) = (from[..=shared].to_vec(), to[..=shared].to_vec());
            let is_module = modules.keys().any(|m| m.starts_with(&b));
            if is_module {
                graph.entry(a).or_default().insert(b);
            }
        }
    }
    graph
}

/// One loop through each group of modules that reach each other.
fn loops(graph: &Graph) -> Vec<Vec<Module>> {
    fn visit<'g>(
        graph: &'g Graph,
        node: &'g Module,
        path: &mut Vec<&'g Module>,
        done: &mut BTreeSet<&'g Module>,
        found: &mut Vec<Vec<Module>>,
    ) {
        if let Some(at) = path.iter().position(|m| *m == node) {
            found.push(path[at..].iter().map(|m| (*m).clone()).collect());
            return;
        }
        if !done.insert(node) {
            return;
        }
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            visit(graph, next, path, done, found);
        }
        path.pop();
    }
    let mut found = Vec::new();
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(graph, node, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

fn describe(found: &[Vec<Module>]) -> String {
    found
        .iter()
        .map(|cycle| {
            let mut names: Vec<String> = cycle.iter().map(|m| m.join("/")).collect();
            names.push(names[0].clone());
            names.join(" -> ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn no_module_reaches_itself_through_the_modules_it_uses() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    assert!(
        modules.len() > 40,
        "src/ was not read: {} files",
        modules.len()
    );
    let graph = graph(&modules);
    assert!(
        graph.values().map(BTreeSet::len).sum::<usize>() > 50,
        "too few uses found: the reader is broken"
    );
    let found = loops(&graph);
    assert!(
        found.is_empty(),
        "import loops (move what both sides need below them):\n{}",
        describe(&found)
    );
}

#[test]
fn the_check_finds_loops_at_the_top_and_between_files_of_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let write = |path: &str, text: &str| {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("lib.rs", "pub mod a;\npub mod b;\npub mod c;\npub mod d;\n");
    write(
        "a.rs",
        "use crate::{b::Thing, c};\n// crate::d is only a comment\n",
    );
    write("b.rs", "pub struct Thing(crate::d::Other);\n");
    write(
        "d/mod.rs",
        "mod x;\nmod y;\npub struct Other;\nuse self::x::X;\n",
    );
    write("d/x.rs", "use super::y::Y;\nuse super::Other;\n");
    write("d/y.rs", "pub fn f() { super::x::g(); crate::a::h(); }\n");
    write("c.rs", "use crate::b;\n");
    let graph = graph(&modules(dir.path()));
    let text = describe(&loops(&graph));
    assert!(text.contains("a -> b -> d -> a"), "{text}");
    assert!(text.contains("d/x -> d/y -> d/x"), "{text}");
    // c uses b, nothing comes back to c: no loop names it.
    assert!(!text.contains('c'), "{text}");
}
