//! Tidy tests in the manner of rust-analyzer's: the "never" rules of ARCHITECTURE.md that can
//! be checked by reading the sources are checked here, so a change that breaks one fails the
//! build instead of making the document false.
//!
//! Each rule's detector is also run on a small snippet that breaks it, so a detector that can
//! no longer see a violation fails too.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, sorted, as (path relative to the workspace, text).
fn sources(dir: &str) -> Vec<(String, String)> {
    let root = workspace();
    let mut out = Vec::new();
    let mut stack = vec![root.join(dir)];
    while let Some(d) = stack.pop() {
        let entries = fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
                let rel = path
                    .strip_prefix(&root)
                    .expect("under the workspace")
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, text));
            }
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no sources under {dir}");
    out
}

/// The files of `files` that are test modules (`#[cfg(test)] mod name;` in their parent),
/// as paths relative to the workspace.
fn test_module_files(files: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (path, text) in files {
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for pair in lines.windows(2) {
            if pair[0] == "#[cfg(test)]"
                && let Some(name) = pair[1]
                    .strip_prefix("mod ")
                    .and_then(|r| r.strip_suffix(';'))
            {
                let dir = Path::new(path).parent().expect("a parent");
                let stem = Path::new(path).file_stem().expect("a stem");
                let nested = if stem == "mod" || stem == "lib" || stem == "main" {
                    dir.join(format!("{name}.rs"))
                } else {
                    dir.join(stem).join(format!("{name}.rs"))
                };
                out.push(nested.to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// The code of `text` that ships: comments and every `#[cfg(test)]` item (a test module or
/// a test-only function, up to its matching brace) are blanked, line numbers are kept.
fn shipped_code(text: &str) -> Vec<(usize, String)> {
    let mut lines: Vec<(usize, String)> = Vec::new();
    let mut skip_depth: Option<i64> = None;
    let mut pending_test_attr = false;
    for (i, raw) in text.lines().enumerate() {
        let line = match raw.find("//") {
            // A `//` inside a string literal is rare in our code; good enough for a lint.
            Some(at) if !raw[..at].contains('"') => &raw[..at],
            _ => raw,
        };
        let trimmed = line.trim();
        if let Some(depth) = skip_depth.as_mut() {
            *depth += braces(line);
            if *depth <= 0 && line.contains('}') {
                skip_depth = None;
            }
            continue;
        }
        if trimmed.starts_with("#[cfg(test)]") || trimmed.starts_with("#[cfg(all(test") {
            pending_test_attr = true;
            continue;
        }
        if pending_test_attr {
            if trimmed.starts_with("#[") || trimmed.is_empty() {
                continue;
            }
            pending_test_attr = false;
            let depth = braces(line);
            if line.contains('{') && depth > 0 {
                skip_depth = Some(depth);
            } else if !line.contains('{') && !trimmed.ends_with(';') {
                // The item's brace opens on a later line.
                skip_depth = Some(0);
                lines.push((i + 1, String::new()));
            }
            continue;
        }
        lines.push((i + 1, line.to_string()));
    }
    lines
}

fn braces(line: &str) -> i64 {
    line.chars()
        .map(|c| match c {
            '{' => 1,
            '}' => -1,
            _ => 0,
        })
        .sum()
}

/// What `shared` may not name: IO, the clock, the operating system's randomness, a runtime.
const IMPURE: &[&str] = &[
    "std::fs",
    // Addresses are values; sockets and name lookups are IO.
    "TcpStream",
    "TcpListener",
    "UdpSocket",
    "to_socket_addrs",
    "std::process",
    "std::env",
    "std::thread",
    "std::io::stdin",
    "std::io::stdout",
    "SystemTime",
    "Instant::now",
    "OsRng",
    "thread_rng",
    "rand::random",
    "getrandom",
    "tokio",
    "println!",
    "eprintln!",
];

/// The one dependency that draws randomness on its own: age takes no RNG. Its two calls in
/// `shared` are listed here (ARCHITECTURE.md says so); a third needs a decision, not a lint fix.
const AGE_ENCRYPT_ALLOWED: &[&str] = &["shared/src/envelope.rs", "shared/src/paper.rs"];

fn impurities(path: &str, text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (n, line) in shipped_code(text) {
        for word in IMPURE {
            if line.contains(word) {
                found.push(format!("{path}:{n}: `{word}` in `{}`", line.trim()));
            }
        }
        if line.contains("age::encrypt") && !AGE_ENCRYPT_ALLOWED.contains(&path) {
            found.push(format!(
                "{path}:{n}: age::encrypt draws OS randomness; only {AGE_ENCRYPT_ALLOWED:?} may"
            ));
        }
    }
    found
}

#[test]
fn shared_does_no_io_reads_no_clock_and_draws_no_randomness_it_was_not_handed() {
    let mut found = Vec::new();
    let files = sources("shared/src");
    let tests = test_module_files(&files);
    assert!(
        tests.contains(&"shared/src/hub/tests.rs".to_string()),
        "{tests:?}"
    );
    for (path, text) in &files {
        if !tests.contains(path) {
            found.extend(impurities(path, text));
        }
    }
    assert!(
        found.is_empty(),
        "shared must stay pure:\n{}",
        found.join("\n")
    );
    let calls: usize = sources("shared/src")
        .iter()
        .map(|(_, t)| {
            shipped_code(t)
                .iter()
                .filter(|(_, l)| l.contains("age::encrypt") || l.contains("age::Encryptor"))
                .count()
        })
        .sum();
    assert_eq!(
        calls, 2,
        "age encrypts in shared's SessionKey::wrap_to (age::Encryptor) and \
         PaperEntry::seal_for_authority (age::encrypt) only (ARCHITECTURE.md names them); update \
         both if this changes"
    );
}

#[test]
fn the_purity_detector_sees_io_clock_and_randomness_but_not_tests_or_comments() {
    let bad = "use std::fs::File;\nfn now() -> u64 { std::time::SystemTime::now(); 0 }\n\
               fn r() { let _ = rand::rngs::OsRng; }\n";
    assert_eq!(impurities("shared/src/x.rs", bad).len(), 3);
    let fine = "// std::fs is named in a comment\nfn f() {}\n#[cfg(test)]\nmod tests {\n    \
                use std::fs;\n    fn g() { let _ = std::time::Instant::now(); }\n}\n\
                fn h() -> u8 { 1 }\n";
    assert_eq!(impurities("shared/src/x.rs", fine), Vec::<String>::new());
    let after_tests =
        "#[cfg(test)]\nmod tests {\n    fn a() {}\n}\nfn late() { std::fs::read(\"x\"); }\n";
    assert_eq!(impurities("shared/src/x.rs", after_tests).len(), 1);
    assert_eq!(
        impurities(
            "shared/src/sync/y.rs",
            "fn w() { age::encrypt(&r, b\"\"); }"
        )
        .len(),
        1
    );
}

/// `unwrap`/`expect` in shipped code, with the reasons we accept: each is an invariant of our
/// own constants, never of bytes from outside. Keyed by file, each entry a piece of the line.
fn allowed_panics() -> BTreeMap<&'static str, Vec<&'static str>> {
    BTreeMap::from([
        (
            "shared/src/daykey.rs",
            vec![
                "32 bytes under the age secret-key HRP always encode as Bech32",
                "a Bech32 AGE-SECRET-KEY of 32 bytes is always a valid age identity",
            ],
        ),
        // The fuzz drivers must panic: a panic is how cargo-fuzz reports a finding.
        (
            "shared/src/sync/harness.rs",
            vec!["a decoded frame re-encodes", "a re-encoded frame decodes"],
        ),
    ])
}

fn panics(path: &str, text: &str, allowed: &BTreeMap<&str, Vec<&str>>) -> Vec<String> {
    let ok = allowed.get(path).cloned().unwrap_or_default();
    let code = shipped_code(text);
    let mut found = Vec::new();
    for (i, (n, line)) in code.iter().enumerate() {
        if !(line.contains(".unwrap()") || line.contains(".expect(")) {
            continue;
        }
        // An `.expect(` whose message is on the next line (rustfmt splits long ones).
        let next = code.get(i + 1).map(|(_, l)| l.as_str()).unwrap_or("");
        if ok.iter().any(|m| line.contains(m) || next.contains(m)) {
            continue;
        }
        found.push(format!("{path}:{n}: {}", line.trim()));
    }
    found
}

#[test]
fn no_unwrap_or_expect_in_shipped_code_outside_the_reasoned_list() {
    let allowed = allowed_panics();
    let mut found = Vec::new();
    for dir in [
        "shared/src",
        "shared/host/src",
        "edge-node/src",
        "sync-hub/src",
    ] {
        let files = sources(dir);
        let tests = test_module_files(&files);
        for (path, text) in &files {
            if tests.contains(path) {
                continue;
            }
            found.extend(panics(path, text, &allowed));
        }
    }
    assert!(
        found.is_empty(),
        "bytes from outside must never panic the process; return an error instead \
         (or add the line, with its reason, to allowed_panics):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_panic_detector_sees_unwrap_and_expect_outside_tests() {
    let allowed = allowed_panics();
    let src = "fn a(b: &[u8]) -> u8 { *b.first().unwrap() }\nfn c(s: &str) -> u32 {\n    \
               s.parse()\n        .expect(\"a number\")\n}\n#[cfg(test)]\nmod t {\n    \
               fn d() { None::<u8>.unwrap(); }\n}\n";
    assert_eq!(panics("edge-node/src/x.rs", src, &allowed).len(), 2);
}

#[test]
fn every_crate_takes_the_workspace_lints_that_forbid_unsafe() {
    let root = workspace();
    let manifest = fs::read_to_string(root.join("Cargo.toml")).expect("workspace manifest");
    assert!(
        manifest.contains("unsafe_code = \"forbid\""),
        "the workspace lints forbid unsafe code"
    );
    let members = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("a members line");
    let names: Vec<&str> = members
        .split('"')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s)
        .collect();
    assert!(names.len() >= 6, "members: {names:?}");
    for name in names {
        let text = fs::read_to_string(root.join(name).join("Cargo.toml"))
            .unwrap_or_else(|e| panic!("{name}/Cargo.toml: {e}"));
        assert!(
            text.contains("[lints]\nworkspace = true"),
            "{name}/Cargo.toml must take the workspace lints ([lints] workspace = true)"
        );
    }
}

/// Types that carry tokens, names, phone numbers or credentials: their `Debug` redacts, so
/// none may derive it.
const REDACTED: &[&str] = &[
    "Token",
    "Payload",
    "Record",
    "RecordBody",
    "PaperEntry",
    "Credential",
    "EnrollmentTicket",
    "SessionKey",
    "DaySecret",
    "DayKeyRatchet",
];

fn derives_debug(text: &str, name: &str) -> Option<bool> {
    let lines: Vec<&str> = text.lines().collect();
    let at = lines.iter().position(|l| {
        let t = l.trim_start();
        t.starts_with(&format!("pub struct {name} "))
            || t.starts_with(&format!("pub enum {name} "))
            || t.starts_with(&format!("pub struct {name}("))
            || t.starts_with(&format!("pub struct {name}<"))
            || t == format!("pub struct {name};")
    })?;
    // The attributes directly above the definition.
    let mut derived = false;
    for l in lines[..at].iter().rev() {
        let t = l.trim_start();
        if t.starts_with("#[") || t.starts_with("///") || t.starts_with("//") || t.ends_with(")]") {
            if t.starts_with("#[derive") && t.contains("Debug") {
                derived = true;
            }
            continue;
        }
        break;
    }
    Some(derived)
}

#[test]
fn types_holding_personal_data_or_secrets_redact_their_debug() {
    let files = sources("shared/src");
    for name in REDACTED {
        let mut defined = false;
        for (path, text) in &files {
            if let Some(derived) = derives_debug(text, name) {
                defined = true;
                assert!(
                    !derived,
                    "{path}: {name} derives Debug; write a redacting impl"
                );
                let manual = [
                    format!("impl fmt::Debug for {name} "),
                    format!("impl std::fmt::Debug for {name} "),
                ];
                assert!(
                    manual.iter().any(|m| text.contains(m.as_str())),
                    "{path}: {name} needs a redacting Debug impl"
                );
            }
        }
        assert!(
            defined,
            "{name} is not defined in shared/src any more: update REDACTED"
        );
    }
    assert_eq!(
        derives_debug("#[derive(Clone, Debug)]\npub struct Token {\n}\n", "Token"),
        Some(true)
    );
}

/// The lines of shipped code in `text` that build or read untyped JSON: `serde_json::Value`
/// (by any path), `json!`, `from_value`. (`to_value` is counted apart: printing through it
/// sorts the keys.)
fn untyped_json(path: &str, text: &str) -> Vec<String> {
    shipped_code(text)
        .into_iter()
        .filter(|(_, l)| {
            l.contains("json!")
                || l.contains("from_value")
                || l.split(|c: char| !c.is_alphanumeric() && c != '_')
                    .any(|w| w == "Value")
        })
        .map(|(n, l)| format!("{path}:{n}: {}", l.trim()))
        .collect()
}

/// A binary's `main.rs` only parses arguments, sets up logging and calls its library's `run`:
/// no JSON at all, and short.
fn thin_main(main: &str, max_lines: usize) -> Vec<String> {
    let text = fs::read_to_string(workspace().join(main)).expect("main.rs");
    let mut found: Vec<String> = shipped_code(&text)
        .into_iter()
        .filter(|(_, l)| l.contains("serde_json") || l.contains("Value") || l.contains("json!"))
        .map(|(n, l)| format!("{main}:{n}: untyped JSON: {}", l.trim()))
        .collect();
    let lines = text.lines().count();
    if lines >= max_lines {
        found.push(format!(
            "{main}: {lines} lines; it parses arguments and calls the library's run (< {max_lines})"
        ));
    }
    found
}

/// The hub's command answers are typed structs: no `serde_json::Value` crosses from the
/// hub's library into its `main` (a renamed field must fail to compile, not print blank),
/// and `main` only parses arguments and calls the library's `run`.
#[test]
fn no_untyped_json_crosses_into_the_hubs_main() {
    let found = thin_main("sync-hub/src/main.rs", 200);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// The same for the device: `edge-node`'s `main` only parses arguments and calls
/// `edge_node::cli::run`, and every command's answer in `cli.rs` is a typed struct printed
/// once (the running device's answers are read into the same structs): no `Value`, no
/// `json!`, and `to_value` only in the one printer that sorts the keys.
#[test]
fn edge_nodes_main_is_thin_and_its_commands_answer_typed() {
    let mut found = thin_main("edge-node/src/main.rs", 80);
    let cli = "edge-node/src/cli.rs";
    let text = fs::read_to_string(workspace().join(cli)).expect("cli.rs");
    found.extend(untyped_json(cli, &text));
    let printers = shipped_code(&text)
        .iter()
        .filter(|(_, l)| l.contains("to_value"))
        .count();
    if printers > 1 {
        found.push(format!(
            "{cli}: to_value {printers} times; only Answer::json may use it"
        ));
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn the_untyped_json_detector_sees_value_and_json_macros() {
    let src = "use serde_json::Value;\nfn a() -> Value { json!({}) }\n\
               fn b(v: serde_json::Value) -> u8 { serde_json::from_value(v).unwrap_or(0) }\n\
               fn c(x: u8) -> String { serde_json::to_value(x).map(|v| v.to_string()).unwrap_or_default() }\n\
               // a Value in a comment\nstruct ValueLike;\n";
    assert_eq!(untyped_json("edge-node/src/x.rs", src).len(), 3);
}
