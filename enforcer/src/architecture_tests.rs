//! ARCHITECTURE.md names every source file of `enforcer/src`,
//! `enforcer-ebpf/src` and `enforcer-common/src` (one table per tree, a
//! file per row), and nothing else.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate is in the workspace")
        .to_path_buf()
}

/// The `.rs` files under `dir`, relative to it.
fn sources(dir: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(root).unwrap();
                out.insert(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// The files named in the first column of the table under `## <tree>`.
fn listed(doc: &str, tree: &str) -> BTreeSet<String> {
    let heading = format!("## {tree} ");
    let section = doc
        .split("\n## ")
        .find(|s| format!("## {s}").starts_with(&heading))
        .unwrap_or_else(|| panic!("ARCHITECTURE.md has no section {heading}"));
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once("` |"))
        .map(|(f, _)| f.to_string())
        .collect()
}

#[test]
fn architecture_md_names_every_source_file() {
    let doc = std::fs::read_to_string(repo().join("ARCHITECTURE.md")).unwrap();
    for tree in ["enforcer/src", "enforcer-ebpf/src", "enforcer-common/src"] {
        let have = sources(&repo().join(tree));
        assert!(have.len() > 10 || tree != "enforcer/src", "{have:?}");
        let named = listed(&doc, tree);
        let missing: Vec<_> = have.difference(&named).collect();
        let stale: Vec<_> = named.difference(&have).collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "ARCHITECTURE.md, {tree}: not named: {missing:?}; named but gone: {stale:?}"
        );
    }
    // The check can fail: a section lists what its table rows name.
    let sample = "intro\n## enforcer/src (x)\n\n| file | what |\n|---|---|\n| `a.rs` | a |\n";
    assert_eq!(
        listed(sample, "enforcer/src"),
        BTreeSet::from(["a.rs".to_string()])
    );
}
