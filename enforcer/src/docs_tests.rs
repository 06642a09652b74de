//! The docs stay true to the code: every relative link of README.md,
//! ARCHITECTURE.md, BENCHMARKS.md, deploy/README.md and docs/*.md points at
//! a file that exists (and a heading that exists, for `#anchors`), and every
//! `enforcer ...` command line in their code blocks parses with the current
//! command line (`Cli`).
use std::path::{Path, PathBuf};

use clap::Parser;

use crate::Cli;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn docs() -> Vec<PathBuf> {
    let r = root();
    let mut v: Vec<PathBuf> = [
        "README.md",
        "ARCHITECTURE.md",
        "BENCHMARKS.md",
        "deploy/README.md",
    ]
    .iter()
    .map(|f| r.join(f))
    .collect();
    let mut pages: Vec<PathBuf> = std::fs::read_dir(r.join("docs"))
        .expect("docs/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    v.extend(pages);
    v
}

/// GitHub's heading anchor: lower case, punctuation other than `-` and
/// `_` dropped, spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    let mut in_code = false;
    let mut v = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        }
        if !in_code && line.starts_with('#') {
            v.push(slug(line.trim_start_matches('#')));
        }
    }
    v
}

/// `](target)` of every inline link outside code blocks and code spans.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut in_code = false;
    let mut v = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        // Drop code spans: a `](x)` inside backticks is not a link.
        let mut plain = String::new();
        for (j, part) in line.split('`').enumerate() {
            if j % 2 == 0 {
                plain.push_str(part);
            }
        }
        let mut rest = plain.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            v.push((i + 1, after[..end].to_string()));
            rest = &after[end..];
        }
    }
    v
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let mut bad = Vec::new();
    let mut seen = 0;
    for doc in docs() {
        let text = std::fs::read_to_string(&doc).expect("read doc");
        let dir = doc.parent().expect("dir");
        for (line, target) in links(&text) {
            seen += 1;
            if target.starts_with("http://")
                || target.starts_with("https://")
                || target.starts_with("mailto:")
            {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let path = if file.is_empty() {
                doc.clone()
            } else {
                dir.join(file)
            };
            if !path.exists() {
                bad.push(format!("{}:{line}: {target}: no such file", doc.display()));
                continue;
            }
            if let Some(a) = anchor {
                let body = std::fs::read_to_string(&path).unwrap_or_default();
                if path.extension().is_some_and(|e| e == "md")
                    && !anchors(&body).iter().any(|h| h == a)
                {
                    bad.push(format!(
                        "{}:{line}: {target}: no heading #{a}",
                        doc.display()
                    ));
                }
            }
        }
    }
    assert!(
        seen >= 3,
        "only {seen} links found: is the extraction broken?"
    );
    assert!(bad.is_empty(), "broken links:\n{}", bad.join("\n"));
}

/// Words of a shell command line: quotes, backslash escapes; stops at a
/// comment, a pipe, a redirection or a command separator.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut started = false;
    let mut chars = line.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                started = true;
            }
            (None, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    started = true;
                }
            }
            (None, ' ' | '\t') => {
                if started {
                    out.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            (None, '#' | '|' | '>' | ';' | '&') if !started => break,
            (None, c) => {
                cur.push(c);
                started = true;
            }
        }
    }
    if started {
        out.push(cur);
    }
    out
}

/// `enforcer ...` lines of the code blocks (with `sudo ` or `$ ` before
/// them), continuation lines joined. Synopsis lines (`[optional]`, `A|B`,
/// `FILE...`) are not commands.
fn command_lines(text: &str) -> Vec<(usize, String)> {
    let mut v = Vec::new();
    let mut in_code = false;
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if !in_code {
            continue;
        }
        if let Some((n, mut acc)) = pending.take() {
            let t = line.trim();
            match t.strip_suffix('\\') {
                Some(more) => {
                    acc.push_str(more);
                    pending = Some((n, acc));
                }
                None => {
                    acc.push_str(t);
                    v.push((n, acc));
                }
            }
            continue;
        }
        let t = line.trim_start();
        let t = t.strip_prefix("$ ").unwrap_or(t);
        let t = t.strip_prefix("sudo ").unwrap_or(t);
        if !t.starts_with("enforcer ") {
            continue;
        }
        match t.trim_end().strip_suffix('\\') {
            Some(more) => pending = Some((i + 1, more.to_string())),
            None => v.push((i + 1, t.to_string())),
        }
    }
    v.into_iter()
        .filter(|(_, l)| !(l.contains('[') || l.contains("...") || l.contains("|--")))
        .collect()
}

#[test]
fn every_enforcer_command_line_in_the_docs_parses() {
    let mut bad = Vec::new();
    let mut seen = 0;
    for doc in docs() {
        let text = std::fs::read_to_string(&doc).expect("read doc");
        for (line, cmd) in command_lines(&text) {
            seen += 1;
            let argv = words(&cmd);
            if let Err(e) = Cli::try_parse_from(&argv) {
                bad.push(format!(
                    "{}:{line}: {cmd}\n  {}",
                    doc.display(),
                    e.to_string().lines().next().unwrap_or("")
                ));
            }
        }
    }
    assert!(
        seen >= 10,
        "only {seen} command lines found: is the extraction broken?"
    );
    assert!(
        bad.is_empty(),
        "command lines that do not parse:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_extraction_finds_commands_and_links() {
    let text = "x\n```sh\nsudo enforcer run --policy p.yaml -- curl 'a b' # note\n\
                enforcer policy learn a.jsonl \\\n  --exclude host=x -o out.yaml\n\
                enforcer run --policy FILE [--audit-log FILE]\n```\nsee [a](docs/x.md#y) `[b](c)`\n";
    assert_eq!(
        command_lines(text),
        vec![
            (
                3,
                "enforcer run --policy p.yaml -- curl 'a b' # note".to_string()
            ),
            (
                4,
                "enforcer policy learn a.jsonl --exclude host=x -o out.yaml".to_string()
            ),
        ]
    );
    assert_eq!(
        words("enforcer run --policy p.yaml -- curl 'a b' # note"),
        vec!["enforcer", "run", "--policy", "p.yaml", "--", "curl", "a b"]
    );
    assert_eq!(links(text), vec![(8, "docs/x.md#y".to_string())]);
    assert_eq!(
        slug(" `enforcer policy discover` / `learn`: watch first"),
        "enforcer-policy-discover--learn-watch-first"
    );
    assert!(Cli::try_parse_from(words("enforcer run --bogus")).is_err());
}
