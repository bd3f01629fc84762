//! The library's modules form no import cycle, and the fan-out core knows
//! nothing of connections: read from the sources, so a change that ties the
//! knot again fails here with the cycle named.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// Top-level modules, each with the crate modules its code names.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let module = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let code = strip_comments(&fs::read_to_string(&file).unwrap());
        let used = graph.entry(module.clone()).or_default();
        for name in crate_paths(&code) {
            if name != module {
                used.insert(name);
            }
        }
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for used in graph.values_mut() {
        // Items re-exported at the crate root (`crate::Frame`) name their module.
        *used = used
            .iter()
            .map(|name| reexported(name).unwrap_or(name).to_owned())
            .filter(|name| modules.contains(name))
            .collect();
    }
    graph
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// The module each crate-root re-export comes from.
fn reexported(name: &str) -> Option<&'static str> {
    Some(match name {
        "CloseReason" => "close",
        "Config" | "ListenAddr" => "config",
        "ErrorCode" | "HandlerError" => "error",
        "Frame" | "FrameError" => "frame",
        "Handler" | "HandlerResult" | "Reply" => "handler",
        "Hub" => "hub",
        "Node" => "node",
        "Router" => "router",
        "Server" | "shutdown_signal" => "server",
        "Session" => "session",
        _ => return None,
    })
}

fn strip_comments(code: &str) -> String {
    code.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every first segment after `crate::`, including inside `use crate::{a, b::c}`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = matching_brace(group);
            for part in split_top_level(&group[..end]) {
                names.insert(first_segment(part.trim()));
            }
        } else {
            names.insert(first_segment(rest));
        }
    }
    names.remove("");
    names
}

fn matching_brace(s: &str) -> usize {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return i,
            '}' => depth -= 1,
            _ => {}
        }
    }
    s.len()
}

fn split_top_level(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn first_segment(path: &str) -> String {
    path.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// A path from `from` back to itself, if there is one.
fn cycle_through(
    graph: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    path: &mut Vec<String>,
    seen: &mut BTreeSet<String>,
) -> bool {
    let last = path.last().unwrap().clone();
    for next in &graph[&last] {
        if next == from {
            path.push(next.clone());
            return true;
        }
        if seen.insert(next.clone()) {
            path.push(next.clone());
            if cycle_through(graph, from, path, seen) {
                return true;
            }
            path.pop();
        }
    }
    false
}

#[test]
fn the_library_modules_form_no_import_cycle() {
    let graph = imports();
    assert!(graph.len() > 20, "found the modules: {:?}", graph.keys());
    for module in graph.keys() {
        let mut path = vec![module.clone()];
        if cycle_through(&graph, module, &mut path, &mut BTreeSet::new()) {
            panic!("import cycle: {}", path.join(" → "));
        }
    }
}

#[test]
fn the_fan_out_core_knows_nothing_of_sessions_or_sockets() {
    let graph = imports();
    for core in ["broker", "queue", "hub", "node"] {
        let used = &graph[core];
        for edge in ["session", "connection", "router", "handlers", "server"] {
            assert!(!used.contains(edge), "{core} imports {edge}");
        }
    }
    assert!(
        graph["broker"].iter().all(|m| m == "topic"),
        "the broker knows only topics: {:?}",
        graph["broker"]
    );
    assert!(
        !graph["router"].contains("handlers"),
        "handlers register onto the router"
    );
}
