//! The product's structure, checked: every module sits in one layer, imports only go down the
//! layers (or sideways inside one, never in a circle), the adapters never import each other, and
//! each layer says in its first line what it owns.
//!
//! The check reads `driver/src` as Rust tokens (comments and strings never count), follows every
//! `crate::…`, `super::…` and `self::…` path — in `use` trees and in expressions alike — to the
//! file that defines the module it names, and leaves out code under `#[cfg(test)]`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use proc_macro2::{Delimiter, TokenStream, TokenTree};

/// The layers, lowest first, and the top-level modules in each. A module may import from its own
/// layer and the ones before it. Where a layer holds several modules (the adapters), they may not
/// import each other.
const LAYERS: &[(&str, &[&str])] = &[
    ("model", &["model"]),
    ("os", &["os"]),
    ("discover", &["discover"]),
    ("attach", &["attach"]),
    ("publish", &["publish"]),
    ("observe", &["observe"]),
    ("adapters", &["dra", "nri", "k8s"]),
    ("daemon", &["daemon"]),
    ("cli", &["cli"]),
];

/// A module path below the crate root, like `["os", "netlink"]`.
type ModulePath = Vec<String>;

fn source_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every file of the library with its module path (`main.rs` is the binary, not the library).
fn modules(root: &Path) -> BTreeMap<ModulePath, PathBuf> {
    let mut found = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("source directory readable") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(root).expect("below the root");
            let mut module: ModulePath = relative
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            match module.last().map(String::as_str) {
                Some("lib") if module.len() == 1 => module.clear(),
                Some("main") if module.len() == 1 => continue,
                Some("mod") => {
                    module.pop();
                }
                _ => {}
            }
            found.insert(module, path);
        }
    }
    found
}

/// The paths one file names, already resolved against its own module path (still unresolved to
/// a file: `["os", "netlink", "Link", "connect"]`).
fn named_paths(file: &Path, module: &ModulePath) -> Vec<ModulePath> {
    let text = std::fs::read_to_string(file).expect("source readable");
    let tokens: TokenStream = text
        .parse()
        .unwrap_or_else(|err| panic!("{} does not tokenize: {err:?}", file.display()));
    let children = child_modules(&tokens);
    let mut out = Vec::new();
    walk(tokens, module, &children, &mut out);
    out
}

/// The modules a file declares in files of their own (`mod name;`): a path may start with one
/// of them without `self::`.
fn child_modules(tokens: &TokenStream) -> BTreeSet<String> {
    let tokens: Vec<TokenTree> = tokens.clone().into_iter().collect();
    tokens
        .windows(3)
        .filter_map(|w| match w {
            [
                TokenTree::Ident(kw),
                TokenTree::Ident(name),
                TokenTree::Punct(end),
            ] if kw == "mod" && end.as_char() == ';' => Some(name.to_string()),
            _ => None,
        })
        .collect()
}

fn walk(
    tokens: TokenStream,
    module: &ModulePath,
    children: &BTreeSet<String>,
    out: &mut Vec<ModulePath>,
) {
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    let mut i = 0;
    while i < tokens.len() {
        // `#[cfg(test)] item`: skip the attribute and the item up to its body or `;`.
        if is_cfg_test(&tokens, i) {
            i += 2;
            while i < tokens.len() {
                match &tokens[i] {
                    TokenTree::Group(g) if g.delimiter() == Delimiter::Brace => break,
                    TokenTree::Punct(p) if p.as_char() == ';' => break,
                    _ => i += 1,
                }
            }
            i += 1;
            continue;
        }
        // `mod name { … }`: paths inside resolve against `module::name`.
        if let (
            Some(TokenTree::Ident(kw)),
            Some(TokenTree::Ident(name)),
            Some(TokenTree::Group(body)),
        ) = (tokens.get(i), tokens.get(i + 1), tokens.get(i + 2))
            && kw == "mod"
            && body.delimiter() == Delimiter::Brace
        {
            let mut inner = module.clone();
            inner.push(name.to_string());
            walk(body.stream(), &inner, &BTreeSet::new(), out);
            i += 3;
            continue;
        }
        if let TokenTree::Ident(start) = &tokens[i]
            && matches!(start.to_string().as_str(), "crate" | "super" | "self")
            && is_path_separator(&tokens, i + 1)
            && !preceded_by_separator(&tokens, i)
        {
            let mut base: ModulePath = match start.to_string().as_str() {
                "crate" => Vec::new(),
                "super" => module[..module.len().saturating_sub(1)].to_vec(),
                _ => module.clone(),
            };
            i = path_at(&tokens, i + 1, &mut base, module, out);
            continue;
        }
        // `child::…`, a path into a module this file declares.
        if let TokenTree::Ident(start) = &tokens[i]
            && children.contains(&start.to_string())
            && is_path_separator(&tokens, i + 1)
            && !preceded_by_separator(&tokens, i)
        {
            let mut base = module.clone();
            base.push(start.to_string());
            i = path_at(&tokens, i + 1, &mut base, module, out);
            continue;
        }
        if let TokenTree::Group(group) = &tokens[i] {
            walk(group.stream(), module, children, out);
        }
        i += 1;
    }
}

/// Reads `::a::b::{c, d::e}` from `tokens[i]` on, after a path's first segment already resolved
/// into `base`; pushes every full path and returns the index after the path.
fn path_at(
    tokens: &[TokenTree],
    mut i: usize,
    base: &mut ModulePath,
    module: &ModulePath,
    out: &mut Vec<ModulePath>,
) -> usize {
    while is_path_separator(tokens, i) {
        i += 2;
        match tokens.get(i) {
            Some(TokenTree::Ident(segment)) if segment == "super" => {
                base.pop();
                i += 1;
            }
            Some(TokenTree::Ident(segment)) => {
                base.push(segment.to_string());
                i += 1;
            }
            Some(TokenTree::Group(group)) if group.delimiter() == Delimiter::Brace => {
                use_group(group.stream(), base, module, out);
                return i + 1;
            }
            _ => break,
        }
    }
    out.push(base.clone());
    i
}

/// The inside of `{a, b::c, self}` in a `use` tree.
fn use_group(
    tokens: TokenStream,
    base: &ModulePath,
    module: &ModulePath,
    out: &mut Vec<ModulePath>,
) {
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    for part in tokens.split(|t| matches!(t, TokenTree::Punct(p) if p.as_char() == ',')) {
        let mut path = base.clone();
        match part.first() {
            Some(TokenTree::Ident(first)) if first == "self" => {}
            Some(TokenTree::Ident(first)) => path.push(first.to_string()),
            Some(TokenTree::Group(group)) if group.delimiter() == Delimiter::Brace => {
                use_group(group.stream(), &path, module, out);
                continue;
            }
            _ => continue,
        }
        path_at(part, 1, &mut path, module, out);
    }
}

fn is_path_separator(tokens: &[TokenTree], i: usize) -> bool {
    matches!((tokens.get(i), tokens.get(i + 1)),
        (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b))) if a.as_char() == ':' && b.as_char() == ':')
}

/// `x::self` or `x::crate` are not path starts.
fn preceded_by_separator(tokens: &[TokenTree], i: usize) -> bool {
    i >= 2 && is_path_separator(tokens, i - 2)
}

fn is_cfg_test(tokens: &[TokenTree], i: usize) -> bool {
    let (Some(TokenTree::Punct(hash)), Some(TokenTree::Group(attr))) =
        (tokens.get(i), tokens.get(i + 1))
    else {
        return false;
    };
    hash.as_char() == '#'
        && attr.delimiter() == Delimiter::Bracket
        && attr.stream().to_string().replace(' ', "") == "cfg(test)"
}

/// The longest known module a path starts with.
fn owning_module<'a>(
    path: &ModulePath,
    known: &'a BTreeMap<ModulePath, PathBuf>,
) -> &'a ModulePath {
    (0..=path.len())
        .rev()
        .find_map(|n| known.get_key_value(&path[..n]).map(|(k, _)| k))
        .expect("the crate root is always known")
}

fn layer_of(module: &ModulePath) -> Option<(usize, &'static str)> {
    let top = module.first()?;
    LAYERS
        .iter()
        .enumerate()
        .find(|(_, (_, members))| members.contains(&top.as_str()))
        .map(|(rank, (name, _))| (rank, *name))
}

/// Module → the other modules it imports.
fn import_graph() -> (
    BTreeMap<ModulePath, PathBuf>,
    BTreeMap<ModulePath, BTreeSet<ModulePath>>,
) {
    let known = modules(&source_root());
    let mut graph = BTreeMap::new();
    for (module, file) in &known {
        let targets: BTreeSet<ModulePath> = named_paths(file, module)
            .iter()
            .map(|path| owning_module(path, &known).clone())
            .filter(|target| target != module)
            .collect();
        graph.insert(module.clone(), targets);
    }
    (known, graph)
}

fn show(module: &ModulePath) -> String {
    if module.is_empty() {
        "crate".to_owned()
    } else {
        module.join("::")
    }
}

#[test]
fn every_module_belongs_to_a_layer_that_says_what_it_owns() {
    let (known, graph) = import_graph();
    let mut problems = Vec::new();
    for module in known.keys().filter(|m| m.len() == 1) {
        if layer_of(module).is_none() {
            problems.push(format!(
                "`{}` is in no layer of tests/layers.rs",
                show(module)
            ));
        }
    }
    for (_, members) in LAYERS {
        for member in *members {
            let Some(file) = known.get(&vec![(*member).to_owned()]) else {
                problems.push(format!("layer module `{member}` does not exist"));
                continue;
            };
            let text = std::fs::read_to_string(file).expect("source readable");
            if !text.starts_with("//! ") {
                problems.push(format!(
                    "{} does not open with a `//!` line",
                    file.display()
                ));
            }
        }
    }
    // The crate root only declares the layers.
    for target in &graph[&Vec::new()] {
        if target.len() != 1 {
            problems.push(format!("lib.rs reaches into `{}`", show(target)));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn imports_only_go_down_the_layers_and_never_between_adapters() {
    let (_, graph) = import_graph();
    let mut problems = Vec::new();
    for (from, targets) in &graph {
        let Some((from_rank, from_layer)) = layer_of(from) else {
            continue;
        };
        for to in targets {
            let Some((to_rank, to_layer)) = layer_of(to) else {
                problems.push(format!("`{}` imports the crate root", show(from)));
                continue;
            };
            if to_rank > from_rank {
                problems.push(format!(
                    "`{}` ({from_layer}) imports `{}` from the higher layer {to_layer}",
                    show(from),
                    show(to)
                ));
            } else if to_rank == from_rank && from[0] != to[0] {
                problems.push(format!(
                    "adapter `{}` imports adapter `{}`; share through the model instead",
                    show(from),
                    show(to)
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn no_module_imports_itself_through_others() {
    // Depth-first search; a back edge closes a cycle, printed from where it starts.
    fn visit(
        node: &ModulePath,
        graph: &BTreeMap<ModulePath, BTreeSet<ModulePath>>,
        stack: &mut Vec<ModulePath>,
        done: &mut BTreeSet<ModulePath>,
        cycles: &mut Vec<String>,
    ) {
        if let Some(start) = stack.iter().position(|m| m == node) {
            let mut cycle: Vec<String> = stack[start..].iter().map(show).collect();
            cycle.push(show(node));
            cycles.push(cycle.join(" -> "));
            return;
        }
        if !done.insert(node.clone()) {
            return;
        }
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, stack, done, cycles);
        }
        stack.pop();
    }
    let (_, graph) = import_graph();
    let mut done = BTreeSet::new();
    let mut cycles = Vec::new();
    for node in graph.keys().filter(|m| !m.is_empty()) {
        visit(node, &graph, &mut Vec::new(), &mut done, &mut cycles);
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

/// The check itself: a path in a comment or a string is not an import, a `use` tree's branches
/// each are, and `super` inside an inline module resolves against that module.
#[test]
fn the_path_reader_sees_imports_and_only_imports() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("x.rs");
    std::fs::write(
        &file,
        r#"//! crate::doc::Ignored
use crate::{a::{self, B}, c::D};
// crate::comment::Ignored
fn f() { let _ = "crate::string::Ignored"; super::e::f(); }
mod inner { use super::super::g::H; }
mod child;
fn g() { child::run(); other::run(); }
#[cfg(test)]
mod tests { use crate::test_only::X; }
"#,
    )
    .expect("write");
    let mut paths: Vec<String> = named_paths(&file, &vec!["p".into(), "x".into()])
        .iter()
        .map(|p| p.join("::"))
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "a",
            "a::B",
            "c::D",
            "p::e::f",
            "p::g::H",
            "p::x::child::run"
        ]
    );
}
