//! The agent's module graph is layered: a module names only modules of lower layers. This test
//! reads the sources and fails on an upward (or sideways) import, naming the file and line, so
//! the knot the review found (`proxy` naming `admin` types for its direction, `state` holding
//! gateway types, `admin` using the proxy's accept loop) cannot come back unnoticed.

use std::path::{Path, PathBuf};

/// Each top-level module of `agent/src` and its layer. A module may name `crate::m` only for an
/// `m` of a strictly lower layer.
const LAYERS: &[(&str, u8)] = &[
    // Leaves: no crate imports at all.
    ("clock", 0),
    ("config", 0),
    ("drain", 0),
    ("flow", 0),
    ("net", 0),
    // The Gateway API model, metrics and the admin port, workload certificates.
    ("routing", 1),
    ("admin", 1),
    ("certs", 1),
    // The read model.
    ("state", 2),
    // What is derived from it: verdicts and status, the kernel's entries, identity collection.
    ("policy", 3),
    ("datapath", 3),
    ("identity", 3),
    // Own addresses on this node: routes, leases, ARP.
    ("vip", 3),
    // The mesh proxy, and kernel flow reports.
    ("proxy", 4),
    ("observe", 4),
    // The edge, over the proxy.
    ("gateway", 5),
    // Loops that keep the parts in step, readiness over them, and the wiring.
    ("reconcile", 6),
    ("health", 7),
    ("app", 8),
    ("cli", 8),
    ("main", 9),
    ("lib", 9),
    ("bin", 9),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("agent/src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::<module>` a line of code names (comments are not imports).
fn named_modules(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // `signet_crate::x` or `mycrate::x` are other paths, not this crate's.
        let before = rest[..i].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push(if name.is_empty() {
                after.chars().take(1).collect()
            } else {
                name
            });
        }
        rest = after;
    }
    out
}

#[test]
fn no_module_names_a_module_above_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    files.sort();
    let mut problems = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&root).expect("under src");
        let top = rel
            .components()
            .next()
            .expect("a first component")
            .as_os_str()
            .to_string_lossy();
        let module = top.trim_end_matches(".rs").to_owned();
        let Some(own) = layer(&module) else {
            problems.push(format!(
                "{}: module `{module}` has no layer in LAYERS",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("a readable source");
        for (n, line) in text.lines().enumerate() {
            for named in named_modules(line) {
                if named == module {
                    continue;
                }
                match layer(&named) {
                    None => problems.push(format!(
                        "{}:{}: `crate::{named}` is no module with a layer (a grouped \
                         `use crate::{{..}}` cannot be checked: name each path)",
                        rel.display(),
                        n + 1
                    )),
                    Some(theirs) if theirs >= own => problems.push(format!(
                        "{}:{}: `{module}` (layer {own}) names `crate::{named}` (layer {theirs})",
                        rel.display(),
                        n + 1
                    )),
                    Some(_) => {}
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "imports against the layering:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checker_sees_what_it_must() {
    assert_eq!(
        named_modules("use crate::state::snapshot::Snapshot;"),
        ["state"]
    );
    assert_eq!(
        named_modules("    x: crate::admin::metrics::UNKNOWN, y: crate::flow::Reporter"),
        ["admin", "flow"]
    );
    assert_eq!(
        named_modules("//! (`crate::gateway::server`) share"),
        Vec::<String>::new()
    );
    assert_eq!(named_modules("use signet_crate::x;"), Vec::<String>::new());
    assert_eq!(named_modules("use crate::{a, b};"), ["{"]);
}
