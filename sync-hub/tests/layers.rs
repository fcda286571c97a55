//! The hub's modules form layers: a module may import (`crate::NAME`) only modules of lower
//! layers, or earlier ones of its own layer, so the graph of imports has no cycle and each
//! table has one owner. This test reads the sources and fails on an import the wrong way, on
//! a module missing from the order below, and on a table defined outside its owner.

use std::collections::BTreeSet;
use std::path::Path;

/// The layers, lowest first; inside a layer, a module may import the ones before it.
const LAYERS: &[(&str, &[&str])] = &[
    ("base", &["clock", "keys", "store", "health", "ahead"]),
    // `auth` keeps the keyed revocation list, which the ledger consults when it indexes.
    ("registry", &["registry", "auth"]),
    ("ledger", &["ledger"]),
    (
        "people",
        &[
            "audit", "gov", "trace", "nation", "replica", "people", "commands",
        ],
    ),
    ("opening", &["schema"]),
    (
        "shells",
        &["daemon", "link", "reads", "http", "control", "cli"],
    ),
];

fn rank(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .flat_map(|(_, ms)| ms.iter())
        .position(|m| *m == module)
}

fn layer(module: &str) -> &'static str {
    LAYERS
        .iter()
        .find(|(_, ms)| ms.contains(&module))
        .map_or("?", |(l, _)| l)
}

/// `crate::NAME` paths in the code of `text` (comments left out), test modules included.
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
            rest = after;
        }
        // `use crate::{a, b}` groups.
        if let Some(i) = code.find("crate::{") {
            for part in code[i + "crate::{".len()..].split([',', '}']) {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
    }
    out
}

fn sources() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if path.extension().and_then(|e| e.to_str()) != Some("rs")
            || ["lib", "main"].contains(&name)
        {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        out.push((name.to_owned(), text));
    }
    out.sort();
    out
}

#[test]
fn no_module_imports_a_higher_layer() {
    let mut wrong = Vec::new();
    for (module, text) in sources() {
        let Some(own) = rank(&module) else {
            wrong.push(format!("{module}.rs is in no layer of tests/layers.rs"));
            continue;
        };
        for import in imports(&text) {
            match rank(&import) {
                Some(r) if r < own => {}
                Some(r) if r == own => {}
                Some(_) => wrong.push(format!(
                    "{module} ({}) imports crate::{import} ({})",
                    layer(&module),
                    layer(&import)
                )),
                None => wrong.push(format!("{module} imports crate::{import}, in no layer")),
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn every_table_is_defined_by_the_module_that_owns_it() {
    // Table definitions name their layout ("facilities-1"); each belongs in one module.
    let owners: &[(&str, &[&str])] = &[
        ("store", &["config-1"]),
        (
            "registry",
            &["facilities-1", "devices-1", "credentials-1", "tombstones-1"],
        ),
        (
            "auth",
            &[
                "people-credentials-2",
                "people-credentials-1",
                "revocations-1",
            ],
        ),
        ("gov", &["designations-1"]),
        ("audit", &["audit-2", "audit-details-1", "audit-1"]),
    ];
    for (module, text) in sources() {
        for line in text.lines() {
            let Some(i) = line.find("TableDefinition::new(\"") else {
                continue;
            };
            let name = line[i + "TableDefinition::new(\"".len()..]
                .split('"')
                .next()
                .unwrap_or("");
            if module == "ledger" {
                continue; // the ledger owns every other table
            }
            let owner = owners
                .iter()
                .find(|(_, tables)| tables.contains(&name))
                .map(|(m, _)| *m);
            assert_eq!(
                owner,
                Some(module.as_str()),
                "table {name} is defined in {module}.rs"
            );
        }
    }
}

#[test]
fn the_checker_sees_an_import_the_wrong_way() {
    // The reader itself: a registry importing the people layer must be caught.
    let found = imports(
        "use crate::people::Desk; // crate::http in a comment\nlet x = crate::{audit, gov};",
    );
    assert!(found.contains("people") && found.contains("audit") && found.contains("gov"));
    assert!(!found.contains("http"));
    assert!(rank("people") > rank("registry"));
}
