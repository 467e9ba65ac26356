//! The daemon's shape, checked on its source: its top-level modules import
//! each other without a cycle (`run` → tasks → `bus` → `phalanx-protocol`),
//! the shared types depend on no task, and the sans-IO core reads no clock.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Top-level module of a file under `src/` (`None`: the crate root or a
/// binary).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    match first.as_str() {
        "lib.rs" | "bin" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

/// The top-level modules `text` names through `crate::`.
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(&src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let deps = graph.entry(module.clone()).or_default();
        deps.extend(imports(&text).into_iter().filter(|d| *d != module));
    }
    graph
}

fn cycle_from(
    graph: &BTreeMap<String, BTreeSet<String>>,
    at: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(i) = path.iter().position(|p| p == at) {
        let mut cycle = path[i..].to_vec();
        cycle.push(at.to_string());
        return Some(cycle);
    }
    if done.contains(at) {
        return None;
    }
    path.push(at.to_string());
    for next in graph.get(at).into_iter().flatten() {
        if let Some(c) = cycle_from(graph, next, path, done) {
            return Some(c);
        }
    }
    path.pop();
    done.insert(at.to_string());
    None
}

#[test]
fn the_daemons_modules_import_each_other_without_a_cycle() {
    let graph = graph();
    for name in ["bus", "runner", "control", "transport", "local", "run"] {
        assert!(
            graph.contains_key(name),
            "module {name} is missing: {graph:?}"
        );
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, module, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
    // The shared types and the metric names depend on no task.
    assert_eq!(
        graph["bus"],
        BTreeSet::new(),
        "bus imports {:?}",
        graph["bus"]
    );
    assert_eq!(graph["metrics"], BTreeSet::new());
    // Only `run` wires the tasks together.
    for (module, deps) in &graph {
        if module != "run" {
            assert!(!deps.contains("run"), "{module} imports run");
            for task in ["runner", "control", "transport"] {
                if module != task {
                    assert!(!deps.contains(task), "{module} imports the task {task}");
                }
            }
        }
    }
}

#[test]
fn the_detector_finds_a_cycle_when_there_is_one() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.insert("a".into(), ["b".to_string()].into());
    g.insert("b".into(), ["c".to_string()].into());
    g.insert("c".into(), ["a".to_string()].into());
    let cycle = cycle_from(&g, "a", &mut Vec::new(), &mut BTreeSet::new());
    assert_eq!(cycle.unwrap().join(" -> "), "a -> b -> c -> a");
    assert_eq!(
        imports("use crate::bus::{A, B};\nlet x = crate::metrics::OPS;"),
        ["bus".to_string(), "metrics".to_string()].into()
    );
}

#[test]
fn the_sans_io_core_reads_no_clock() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 10);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for forbidden in [
            "Instant::now",
            "SystemTime",
            "tokio",
            "std::net",
            "std::fs",
            "thread_rng",
        ] {
            assert!(
                !text.contains(forbidden),
                "{} uses {forbidden}",
                file.display()
            );
        }
    }
}
