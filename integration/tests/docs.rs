//! The docs a reader follows (README.md, docs/*.md, chart/README.md):
//!
//! - every relative link and image resolves to a file of the repository, and
//!   every `#anchor` to a heading of its target, by GitHub's slug rules;
//! - no doc names a repository path that does not exist (`scripts/nope`,
//!   `src/gone.rs`, a bare `facts.md`), in text, code spans or code blocks;
//! - every `runbook_url` of the alert rules points at a heading of
//!   docs/operations.md;
//! - the settings table of docs/configuration.md is the one `tally --help`
//!   prints (flags, environment variables, defaults).
//!
//! The checker is tested on a planted broken tree too, so it is seen failing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use tally_integration::harness::{tally_bin, workspace_root};

/// Top-level folders whose paths docs name; a word that starts with one of
/// these and a `/` is taken as a path of the repository.
const TOP_DIRS: &[&str] = &[
    "src",
    "chart",
    "integration",
    "scripts",
    "docs",
    "fuzz",
    "benches",
    "examples",
    "tests",
    ".github",
];

/// The docs the check covers, relative to `root`.
fn doc_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from("README.md"), PathBuf::from("chart/README.md")];
    if let Ok(entries) = std::fs::read_dir(root.join("docs")) {
        let mut pages: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "md"))
            .map(|p| p.strip_prefix(root).unwrap().to_path_buf())
            .collect();
        pages.sort();
        files.extend(pages);
    }
    files.retain(|f| root.join(f).is_file());
    files
}

/// GitHub's anchor for a heading: lower case, markup and punctuation
/// dropped (letters, digits, `-`, `_` and spaces stay), spaces to `-`.
fn slug(heading: &str) -> String {
    let text = strip_links(heading);
    text.trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// `[text](target)` to `text`, as GitHub renders a heading before slugging.
fn strip_links(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](").map(|i| open + i) else {
            break;
        };
        let Some(end) = rest[close..].find(')').map(|i| close + i) else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Lines of a Markdown file with whether each is inside a fenced code block.
fn lines_with_fences(text: &str) -> Vec<(usize, &str, bool)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            out.push((i + 1, line, true));
            continue;
        }
        out.push((i + 1, line, fenced));
    }
    out
}

/// The anchors a Markdown file defines: its headings' slugs (a repeated
/// slug gets `-1`, `-2`, … as on GitHub) and explicit `id`/`name`s.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for (_, line, fenced) in lines_with_fences(text) {
        if fenced {
            continue;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
            let base = slug(&line[hashes..]);
            let n = seen.entry(base.clone()).or_insert(0);
            out.insert(if *n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            });
            *n += 1;
        }
        for attr in ["id=\"", "name=\""] {
            let mut rest = line;
            while let Some(i) = rest.find(attr) {
                rest = &rest[i + attr.len()..];
                if let Some(end) = rest.find('"') {
                    out.insert(rest[..end].to_string());
                }
            }
        }
    }
    out
}

/// Text outside inline code spans (links inside code are not links).
fn outside_code(line: &str) -> String {
    line.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(_, s)| s)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The targets of `[text](target)` and `![alt](target)` in a line.
fn link_targets(line: &str) -> Vec<String> {
    let line = outside_code(line);
    let mut out = Vec::new();
    let mut rest = line.as_str();
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        let end = rest.find(')').unwrap_or(rest.len());
        let target = rest[..end].split_whitespace().next().unwrap_or("");
        if !target.is_empty() {
            out.push(target.to_string());
        }
        rest = &rest[end..];
    }
    out
}

/// Words of a line that name a path of the repository.
fn named_paths(line: &str) -> Vec<String> {
    line.split(|c: char| c.is_whitespace() || "`()[]<>,;\"'|=".contains(c))
        .map(|w| w.trim_start_matches("./"))
        .map(|w| w.trim_end_matches(['.', ':', ',', ';', '!', '?']))
        // `chart/templates/statefulset.yaml:2:4` names the file.
        .map(|w| w.split(':').next().unwrap_or(w))
        .filter(|w| !w.contains(['*', '{', '$', '…', '#', '%']) && !w.contains("//"))
        .filter(|w| {
            TOP_DIRS
                .iter()
                .any(|d| w.starts_with(&format!("{d}/")) && w.len() > d.len() + 1)
                || (w.ends_with(".md") && !w.contains('/'))
        })
        .map(str::to_string)
        .collect()
}

/// Paths the repository ignores (`.gitignore`): named in docs as places
/// runs write to, not as files it has.
fn ignored(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join(".gitignore"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with('/'))
        .map(|l| l.trim_start_matches('/').trim_end_matches('/').to_string())
        .collect()
}

/// `base/rel`, with `..` and `.` resolved, or None when it leaves the root.
fn resolve(base: &Path, rel: &str) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in base.join(rel).components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    Some(out)
}

/// Every problem in the docs under `root`, as `file:line: what`.
fn check_docs(root: &Path) -> Vec<String> {
    let mut findings = Vec::new();
    let ignored = ignored(root);
    let mut anchor_cache: BTreeMap<PathBuf, BTreeSet<String>> = BTreeMap::new();
    let mut anchors_of = |path: &Path| -> BTreeSet<String> {
        anchor_cache
            .entry(path.to_path_buf())
            .or_insert_with(|| {
                anchors(&std::fs::read_to_string(root.join(path)).unwrap_or_default())
            })
            .clone()
    };
    for doc in doc_files(root) {
        let text = std::fs::read_to_string(root.join(&doc)).unwrap();
        let dir = doc.parent().unwrap_or(Path::new("")).to_path_buf();
        for (n, line, fenced) in lines_with_fences(&text) {
            let at = format!("{}:{n}", doc.display());
            if !fenced {
                for target in link_targets(line) {
                    if target.contains("://") || target.starts_with("mailto:") {
                        continue;
                    }
                    let (file, anchor) = match target.split_once('#') {
                        Some((f, a)) => (f, Some(a)),
                        None => (target.as_str(), None),
                    };
                    let path = if file.is_empty() {
                        Some(doc.clone())
                    } else {
                        resolve(&dir, file)
                    };
                    let Some(path) = path.filter(|p| root.join(p).exists()) else {
                        findings.push(format!("{at}: link to {target}: no such file"));
                        continue;
                    };
                    if let Some(anchor) = anchor
                        && path.extension().is_some_and(|e| e == "md")
                        && !anchors_of(&path).contains(anchor)
                    {
                        findings.push(format!(
                            "{at}: link to {target}: {} has no heading #{anchor}",
                            path.display()
                        ));
                    }
                }
            }
            // Link targets were checked above (relative to the doc).
            let mut words = line.to_string();
            for target in link_targets(line) {
                words = words.replace(&format!("]({target}"), "](");
            }
            for name in named_paths(&words) {
                if ignored
                    .iter()
                    .any(|i| name == *i || name.starts_with(&format!("{i}/")))
                {
                    continue;
                }
                let exists = if name.contains('/') {
                    root.join(&name).exists()
                } else {
                    root.join(&dir).join(&name).exists() || root.join(&name).exists()
                };
                if !exists {
                    findings.push(format!(
                        "{at}: names {name}, which the repository does not have"
                    ));
                }
            }
        }
    }
    findings
}

/// Every `runbook_url` anchor of the shipped rules that docs/operations.md
/// lacks.
fn runbook_findings(root: &Path) -> Vec<String> {
    let headings = anchors(&std::fs::read_to_string(root.join("docs/operations.md")).unwrap());
    let mut findings = Vec::new();
    let mut count = 0;
    for file in [
        "chart/files/alerts.rules.yaml",
        "chart/templates/prometheusrule.yaml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for url in text.split("docs/operations.md#").skip(1) {
            let anchor: String = url
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            count += 1;
            if !headings.contains(&anchor) {
                findings.push(format!(
                    "{file}: runbook_url #{anchor} is no heading of docs/operations.md"
                ));
            }
        }
    }
    assert!(count >= 9, "only {count} runbook_urls found");
    findings
}

#[test]
fn every_link_anchor_and_named_path_in_the_docs_resolves() {
    let root = workspace_root();
    let docs = doc_files(&root);
    assert!(docs.len() >= 12, "{docs:?}");
    let mut findings = check_docs(&root);
    findings.extend(runbook_findings(&root));
    assert!(
        findings.is_empty(),
        "the docs point at what does not exist:\n{}",
        findings.join("\n")
    );
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= 250,
        "README.md has {lines} lines: move details to docs/"
    );
    // The two commands come first.
    let first_block = readme.split("```sh\n").nth(1).unwrap();
    assert!(
        first_block.starts_with("cargo run --release ")
            && first_block
                .lines()
                .nth(1)
                .unwrap()
                .starts_with("scripts/test "),
        "README.md's first commands must be `cargo run --release` and `scripts/test`"
    );
    println!(
        "{} docs, README.md {lines} lines: every relative link, anchor and named path resolves",
        docs.len()
    );
}

#[test]
fn the_checker_fails_on_a_planted_broken_link_anchor_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::create_dir_all(root.join("scripts")).unwrap();
    std::fs::create_dir_all(root.join("chart")).unwrap();
    std::fs::write(root.join("scripts/test"), "").unwrap();
    std::fs::write(root.join(".gitignore"), "/target\n").unwrap();
    std::fs::write(
        root.join("README.md"),
        "# Tally\n\n## What `complete` promises\n\n\
         Good: [ops](docs/operations.md#a-runbook), [self](#what-complete-promises), `scripts/test`,\n\
         `target/debug/tally` (ignored), [web](https://example.com/x.md).\n\
         Broken: [gone](docs/nope.md) and [anchor](docs/operations.md#no-such-heading).\n\
         Also `scripts/nope` and facts.md.\n\n\
         ```sh\nscripts/missing --flag\n```\n",
    )
    .unwrap();
    std::fs::write(
        root.join("docs/operations.md"),
        "# Operations\n\n## A runbook\n\n## A runbook\n\nBack: [readme](../README.md#tally), [twice](#a-runbook-1).\n",
    )
    .unwrap();
    let findings = check_docs(root);
    assert_eq!(
        findings,
        [
            "README.md:7: link to docs/nope.md: no such file",
            "README.md:7: link to docs/operations.md#no-such-heading: docs/operations.md has no heading #no-such-heading",
            "README.md:8: names scripts/nope, which the repository does not have",
            "README.md:8: names facts.md, which the repository does not have",
            "README.md:11: names scripts/missing, which the repository does not have",
        ],
        "{findings:#?}"
    );
}

#[test]
fn slugs_follow_github() {
    assert_eq!(
        slug(" HTTP API (two ports: client 8080, peer 8081)"),
        "http-api-two-ports-client-8080-peer-8081"
    );
    assert_eq!(slug(" What `complete` promises"), "what-complete-promises");
    assert_eq!(
        slug(" Peer traffic by cluster size (`scripts/bench scale`)"),
        "peer-traffic-by-cluster-size-scriptsbench-scale"
    );
    assert_eq!(slug(" `visits.state` (format v2)"), "visitsstate-format-v2");
    assert_eq!(slug(" TallyTargetDown"), "tallytargetdown");
}

/// `--flag` → (environment variable, default) from `tally --help`.
fn help_settings() -> BTreeMap<String, (String, Option<String>)> {
    let out = Command::new(tally_bin())
        .arg("--help")
        .output()
        .expect("run tally --help (cargo build --bins first)");
    let help = String::from_utf8(out.stdout).unwrap();
    // Each option's text runs until the next line starting with `--` or `-`.
    let mut settings = BTreeMap::new();
    let mut blocks: Vec<String> = Vec::new();
    for line in help.lines() {
        let t = line.trim_start();
        if t.starts_with("--") || t.starts_with("-h") || t.starts_with("-V") {
            blocks.push(t.to_string());
        } else if let Some(last) = blocks.last_mut() {
            last.push(' ');
            last.push_str(t);
        }
    }
    for block in blocks {
        let Some(flag) = block
            .split_whitespace()
            .next()
            .filter(|f| f.starts_with("--"))
        else {
            continue;
        };
        let bracket = |key: &str| {
            block
                .split_once(&format!("[{key}: "))
                .map(|(_, rest)| rest.split(']').next().unwrap().trim().to_string())
        };
        let Some(env) = bracket("env") else { continue };
        settings.insert(flag.to_string(), (env, bracket("default")));
    }
    settings
}

#[test]
fn the_configuration_table_is_what_tally_help_says() {
    let help = help_settings();
    assert!(help.len() >= 25, "{help:?}");
    let doc = std::fs::read_to_string(workspace_root().join("docs/configuration.md")).unwrap();
    let mut table = BTreeMap::new();
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | key | flag | environment | default | meaning |
        if cells.len() < 6 || !cells[2].starts_with("`--") {
            continue;
        }
        let unquote = |s: &str| s.trim_matches('`').to_string();
        table.insert(unquote(cells[2]), (unquote(cells[3]), cells[4].to_string()));
    }
    let mut problems = Vec::new();
    for (flag, (env, default)) in &help {
        match table.get(flag) {
            None => problems.push(format!(
                "{flag} ({env}) is missing from docs/configuration.md"
            )),
            Some((doc_env, doc_default)) => {
                if doc_env != env {
                    problems.push(format!(
                        "{flag}: the doc says {doc_env}, tally --help {env}"
                    ));
                }
                if let Some(default) = default
                    && *doc_default != format!("`{default}`")
                {
                    problems.push(format!(
                        "{flag}: the doc's default is {doc_default}, tally --help says {default}"
                    ));
                }
            }
        }
    }
    for flag in table.keys().filter(|f| !help.contains_key(*f)) {
        problems.push(format!(
            "{flag} is in docs/configuration.md but not in tally --help"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
