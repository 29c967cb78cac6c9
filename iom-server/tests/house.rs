//! Tests that keep the house standing (issue 14): the modules' imports
//! follow the declared room graph, the rooms that no longer take the node
//! (`Iom`) stay free of it, the graph without the node is acyclic, and
//! every protocol step's crash point sits in the file and function that
//! docs/architecture.md names for it.
//!
//! They read the sources as text: no build of the server is involved, so
//! they fail on a wrong `use` or a moved step before any review does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/`, as (module path like `standin/handover`, text).
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read src") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&src_dir(), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(src_dir()).unwrap().with_extension("");
            let mut m = rel.to_string_lossy().into_owned();
            if let Some(parent) = m.strip_suffix("/mod") {
                m = parent.to_string();
            }
            (m, std::fs::read_to_string(&p).expect("read source"))
        })
        .collect()
}

/// The code of a file without comments (line comments and doc comments;
/// string literals are kept, which is harmless for the names looked for).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Paths reached through `crate::`, as `a::b::c`: `crate::a::b::X` gives
/// `a::b::X`, `use crate::{a::x, b, Iom}` gives `a::x`, `b`, `Iom`.
fn crate_names(code: &str) -> BTreeSet<String> {
    let path_char = |c: char| is_ident(c) || c == ':';
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| is_ident(c) || c == '$') {
            continue; // `$crate::` in macros, or part of a longer path
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            // Top-level entries of the group (nested groups are rare here).
            let mut depth = 0;
            let mut item = String::new();
            for c in group[..end].chars().chain(std::iter::once(',')) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        let name: String = item.trim().chars().take_while(|&c| path_char(c)).collect();
                        if !name.is_empty() {
                            out.insert(name.trim_end_matches(':').to_string());
                        }
                        item.clear();
                    }
                    _ if depth == 0 => item.push(c),
                    _ => {}
                }
            }
        } else {
            let name: String = rest.chars().take_while(|&c| path_char(c)).collect();
            if !name.is_empty() {
                out.insert(name.trim_end_matches(':').to_string());
            }
        }
    }
    out
}

/// The room a `crate::` path belongs to: the longest module path it
/// starts with (`standin::handover::X` is in `standin/handover`), the
/// crate-root re-exports by where they are defined.
fn room_of(path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let parts: Vec<&str> = path.split("::").collect();
    for n in (1..=parts.len()).rev() {
        let m = parts[..n].join("/");
        if modules.contains(&m) {
            return Some(m);
        }
    }
    match parts[0] {
        "Iom" | "StartOptions" => Some("server".into()),
        "crash_point" | "crash_point_sync" => Some("failpoint".into()),
        "disk_fault" => Some("fsutil".into()),
        "Error" | "Result" => None, // the crate's error type (lib.rs)
        other => panic!("`crate::{other}` is neither a module nor a known re-export: add it to room_of"),
    }
}

/// Every room and the rooms it may use. `server` is the node (`Iom`): the
/// rooms that still take it are the ones whose roles are methods on `Iom`
/// (docs/plan-issue-14.md, steps 9, 12, 14, 15, 16 not done yet). A room
/// missing here, or an edge missing here, fails the test: extend the table
/// on purpose, never in passing.
const ALLOWED: &[(&str, &[&str])] = &[
    // Pure vocabulary and machinery: no other room.
    ("cache", &[]),
    ("format", &[]),
    ("liveness", &[]),
    ("locks", &[]),
    ("records", &[]),
    ("recovery", &[]),
    ("stripe_table", &[]),
    ("restart", &[]),
    ("scrub_book", &["format", "fsutil"]),
    ("seen", &["fsutil"]),
    ("birth", &["fsutil", "map", "membership_state", "seen", "service", "storage", "store"]),
    ("timeouts", &[]),
    ("fsutil", &[]),
    ("failpoint", &[]),
    ("workers", &[]),
    ("inflight", &[]),
    ("standin/handover", &[]),
    ("parity/plan", &[]),
    ("parity/stripes", &[]),
    ("namespace/state", &[]),
    ("namespace/sessions", &[]),
    // Storage: the block file, journal, map and their surface.
    ("store", &["format", "fsutil"]),
    ("journal", &["format", "fsutil", "records", "store"]),
    ("map", &["format", "fsutil", "records"]),
    ("membership_state", &["format", "fsutil"]),
    ("storage", &["cache", "failpoint", "fsutil", "journal", "map", "records", "seen", "store", "timeouts"]),
    // Membership (pure state + persistence) and the outgoing calls.
    ("membership", &["liveness", "membership_state"]),
    ("caller", &["membership", "timeouts"]),
    ("group", &["caller", "membership", "timeouts"]),
    // Rooms whose roles are still methods on the node.
    ("fence", &[]),
    ("data", &["failpoint", "fence", "group", "inflight", "links", "locks", "storage", "timeouts", "workers"]),
    (
        "write_path",
        &[
            "cache",
            "data",
            "failpoint",
            "group",
            "inflight",
            "journal",
            "links",
            "map",
            "records",
            "storage",
            "workers",
        ],
    ),
    ("read_path", &["cache", "data", "fsutil", "journal", "records", "storage"]),
    ("links", &["caller", "inflight", "membership", "timeouts", "workers"]),
    (
        "parity",
        &[
            "cache",
            "failpoint",
            "group",
            "journal",
            "map",
            "membership",
            "parity/plan",
            "parity/stripes",
            "records",
            "standin/handover",
            "storage",
            "store",
            "timeouts",
            "workers",
        ],
    ),
    (
        "standin",
        &[
            "cache",
            "caller",
            "failpoint",
            "group",
            "journal",
            "links",
            "locks",
            "map",
            "membership",
            "parity",
            "records",
            "standin/handover",
            "storage",
            "timeouts",
            "write_path",
        ],
    ),
    (
        "recovery_exec",
        &[
            "cache", "caller", "data", "fence", "group", "journal", "locks", "map", "parity", "records", "recovery",
            "storage", "timeouts",
        ],
    ),
    (
        "rejoin",
        &[
            "caller",
            "failover",
            "failpoint",
            "fsutil",
            "group",
            "journal",
            "locks",
            "membership",
            "parity",
            "records",
            "recovery_exec",
            "storage",
            "timeouts",
        ],
    ),
    ("failover", &["caller", "fsutil", "membership", "restart", "standin", "standin/handover", "timeouts", "workers"]),
    (
        "namespace",
        &["caller", "failover", "format", "fsutil", "journal", "membership", "storage", "timeouts", "workers"],
    ),
    // The router reaches every role a request can be for.
    (
        "service",
        &[
            "caller",
            "data",
            "failover",
            "fsutil",
            "group",
            "membership",
            "namespace",
            "parity",
            "recovery_exec",
            "rejoin",
            "scrub_book",
            "seen",
            "standin",
            "standin/handover",
            "storage",
            "timeouts",
            "workers",
            "write_path",
        ],
    ),
    // The node wires every room together.
    (
        "server",
        &[
            "birth",
            "caller",
            "data",
            "failover",
            "failpoint",
            "fence",
            "group",
            "inflight",
            "links",
            "locks",
            "map",
            "membership",
            "membership_state",
            "namespace",
            "parity",
            "recovery_exec",
            "rejoin",
            "scrub_book",
            "seen",
            "service",
            "standin",
            "standin/handover",
            "storage",
            "timeouts",
            "workers",
            "write_path",
        ],
    ),
    ("lib", &["server"]),
    ("main", &["server"]),
];

/// Rooms that must never take the node: the roles already built as types.
const FREE_OF_THE_NODE: &[&str] = &[
    "cache",
    "caller",
    "data",
    "failover",
    "failpoint",
    "fence",
    "format",
    "fsutil",
    "group",
    "inflight",
    "journal",
    "links",
    "liveness",
    "locks",
    "map",
    "membership",
    "membership_state",
    "namespace",
    "namespace/sessions",
    "namespace/state",
    "parity",
    "parity/plan",
    "parity/stripes",
    "read_path",
    "records",
    "recovery",
    "recovery_exec",
    "rejoin",
    "restart",
    "service",
    "standin",
    "standin/handover",
    "storage",
    "store",
    "timeouts",
    "workers",
    "write_path",
];

fn actual_graph() -> BTreeMap<String, BTreeSet<String>> {
    let files = sources();
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, text) in &files {
        let room = m.clone();
        let deps = g.entry(room.clone()).or_default();
        for name in crate_names(&code(text)) {
            if let Some(r) = room_of(&name, &modules) {
                if r != room {
                    deps.insert(r);
                }
            }
        }
    }
    g
}

#[test]
fn every_import_follows_the_room_graph() {
    let allowed: BTreeMap<&str, BTreeSet<&str>> =
        ALLOWED.iter().map(|(m, d)| (*m, d.iter().copied().collect())).collect();
    let mut wrong = Vec::new();
    for (room, deps) in actual_graph() {
        let Some(ok) = allowed.get(room.as_str()) else {
            wrong.push(format!("room `{room}` is not in the table (iom-server/tests/house.rs ALLOWED)"));
            continue;
        };
        for d in deps {
            if !ok.contains(d.as_str()) {
                wrong.push(format!("`{room}` uses `{d}`, which the room graph does not allow"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Every room `from` reaches through imports (itself excluded).
fn reach(g: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_string()];
    while let Some(r) = todo.pop() {
        for d in g.get(&r).into_iter().flatten() {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn the_rooms_built_as_types_never_take_the_node() {
    let g = actual_graph();
    for room in FREE_OF_THE_NODE {
        assert!(g.contains_key(*room), "room `{room}` has no file");
        let reached = reach(&g, room);
        assert!(
            !reached.contains("server"),
            "`{room}` reaches the node (`Iom`) through its imports ({reached:?}): pass it the narrow handles it needs"
        );
        let allowed = ALLOWED.iter().find(|(m, _)| m == room).map(|(_, d)| *d).unwrap_or(&[]);
        assert!(!allowed.contains(&"server"), "the table lets `{room}` take the node");
    }
}

#[test]
fn the_room_graph_without_the_node_is_acyclic() {
    // Depth-first search for a cycle, the node (`server`) and its two
    // entry points removed: every other dependency must point one way.
    let g: BTreeMap<&str, Vec<&str>> = ALLOWED
        .iter()
        .filter(|(m, _)| !["server", "lib", "main"].contains(m))
        .map(|(m, d)| (*m, d.iter().copied().filter(|x| *x != "server").collect()))
        .collect();
    fn visit<'a>(
        n: &'a str,
        g: &BTreeMap<&'a str, Vec<&'a str>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) {
        match state.get(n) {
            Some(2) => return,
            Some(1) => panic!("cycle: {} -> {n}", path.join(" -> ")),
            _ => {}
        }
        state.insert(n, 1);
        path.push(n);
        for d in g.get(n).into_iter().flatten() {
            visit(d, g, state, path);
        }
        path.pop();
        state.insert(n, 2);
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        visit(n, &g, &mut state, &mut Vec::new());
    }
}

/// The step table of docs/architecture.md: rows `| a5 | `file` | `function` | …`.
fn step_table() -> Vec<(String, String, String)> {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/architecture.md");
    let text = std::fs::read_to_string(&doc).expect("read docs/architecture.md");
    let mut rows = Vec::new();
    for l in text.lines() {
        let cells: Vec<&str> = l.split('|').map(|c| c.trim().trim_matches('`')).collect();
        if cells.len() < 4 {
            continue;
        }
        let step = cells[1];
        let numbered = |p: char| step.strip_prefix(p).is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n >= 1));
        if numbered('a') || numbered('b') {
            rows.push((step.to_string(), cells[2].to_string(), cells[3].to_string()));
        }
    }
    rows
}

#[test]
fn each_steps_crash_point_sits_where_the_step_table_says() {
    let rows = step_table();
    let steps: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    for s in (1..=14).map(|i| format!("a{i}")).chain((1..=13).map(|i| format!("b{i}"))) {
        assert!(steps.contains(&s.as_str()), "docs/architecture.md's step table has no row for {s}");
    }
    for (step, file, func) in rows {
        let point = if step.starts_with('a') {
            format!("\"write::after-{step}\"")
        } else {
            format!("\"parity::after-{step}\"")
        };
        let path = src_dir().join(file.trim_start_matches("iom-server/src/"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{step}: the table names {file}, which cannot be read: {e}"));
        let mut current_fn = String::new();
        let mut found = Vec::new();
        for l in text.lines() {
            let t = l.trim_start();
            if let Some(i) = t.find("fn ") {
                let head = &t[..i];
                if head.is_empty()
                    || head.split_whitespace().all(|w| w == "pub" || w.starts_with("pub(") || w == "async")
                {
                    current_fn = t[i + 3..].chars().take_while(|&c| is_ident(c)).collect();
                }
            }
            if t.contains(&point) && (t.contains("crash_point!") || t.contains("crash_point_sync!")) {
                found.push(current_fn.clone());
            }
        }
        assert!(!found.is_empty(), "{step}: no crash point {point} in {file}");
        assert!(
            found.iter().all(|f| f == &func),
            "{step}: the crash point {point} is in function(s) {found:?} of {file}, the table says `{func}`"
        );
    }
}
