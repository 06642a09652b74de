//! The two images the CRI tests run (`cargo xtask vm-test` guests have no
//! registry): a pause image for pod sandboxes (Debian's static `catatonit`,
//! what the kubelet's pause image does: an init that reaps) and an agent
//! image with Python (the host's `python3`, the shared libraries it and its
//! extension modules load, the standard-library modules the test agents
//! import, the agents of `tests/agents/` under `/agents`, and the files
//! the pod file-policy test protects: `/secret/{token,taint}` from
//! `tests/pod-image`, and `/etc/agent`, an absolute symlink to `/secret`). Both are
//! one-layer OCI archives written by [`crate::image::write_archive`]
//! (deterministic), imported with `ctr -n k8s.io images import`.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::image::{write_archive, Image};

/// The pause image's name (the CRI plugin's `sandbox_image`).
pub const PAUSE: &str = "docker.io/library/enforcer-pause:1";
/// The agent image's name.
pub const AGENT: &str = "docker.io/library/enforcer-agent:1";

/// Directories a container runtime mounts over.
const RUNTIME_DIRS: &[&str] = &["proc", "sys", "dev", "tmp", "etc", "run", "var/run"];

/// `cargo xtask pod-images [--out DIR]`.
pub fn run(out: Option<PathBuf>) -> Result<u8> {
    let root = crate::util::repo_root();
    let dir = out.unwrap_or_else(|| root.join("target/pod-images"));
    let (pause, agent) = write(&root, &dir)?;
    println!(
        "{PAUSE} -> {}\n{AGENT} -> {}\n  load: ctr -n k8s.io images import FILE",
        pause.display(),
        agent.display()
    );
    Ok(0)
}

/// Write both archives into `dir`: (pause, agent).
pub fn write(root: &Path, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let pause = dir.join("pause.oci.tar");
    let catatonit = Path::new("/usr/bin/catatonit");
    if !catatonit.exists() {
        bail!("no /usr/bin/catatonit (Debian package catatonit; scripts/setup-vm.sh installs it)");
    }
    let mut files = BTreeMap::new();
    files.insert("pause".to_string(), catatonit.to_path_buf());
    crate::image::add_shared_libraries(&mut files, catatonit)?;
    write_archive(
        &Image {
            name: PAUSE.into(),
            tag: "1".into(),
            files,
            mount_points: RUNTIME_DIRS,
            config: json!({"Entrypoint": ["/pause", "-P"], "Env": ["PATH=/"]}),
            history: "catatonit as the pod sandbox's init",
            symlinks: &[],
        },
        &pause,
    )?;
    let agent = dir.join("agent.oci.tar");
    write_archive(
        &Image {
            name: AGENT.into(),
            tag: "1".into(),
            files: agent_files(root)?,
            mount_points: RUNTIME_DIRS,
            config: json!({
                "Entrypoint": ["/usr/bin/python3", "-I", "-S", "-B"],
                "Env": ["PATH=/usr/bin:/bin"],
                "WorkingDir": "/agents",
            }),
            history: "python3, the modules the test agents import, the agents, and files \
                      for the file-policy test (/secret, reached also through the absolute \
                      symlink /etc/agent)",
            symlinks: &[("etc/agent", "/secret")],
        },
        &agent,
    )?;
    Ok((pause, agent))
}

/// Asks the host's Python which files the agents need: it imports them and
/// prints the file of every module loaded.
const LIST_MODULES: &str = r#"
import importlib, sys
agents = sys.argv[1]
sys.path.insert(0, agents)
for m in sys.argv[2:]:
    importlib.import_module(m)
for m in ["encodings.idna", "encodings.ascii", "encodings.latin_1", "encodings.utf_8"]:
    importlib.import_module(m)
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None)
    if f and not f.startswith(agents):
        print(f)
"#;

/// The agent modules the image carries (imported to find their stdlib).
const AGENTS: &[&str] = &["hostile_agent", "dns_agent", "file_agent", "probe"];

fn agent_files(root: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let agents = root.join("tests/agents");
    let python = Path::new("/usr/bin/python3")
        .canonicalize()
        .context("resolving /usr/bin/python3")?;
    let out = Command::new(&python)
        .args(["-I", "-S", "-B", "-c", LIST_MODULES])
        .arg(&agents)
        .args(AGENTS)
        .output()
        .context("running python3")?;
    if !out.status.success() {
        bail!(
            "python3 could not import the agents: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut files = BTreeMap::new();
    let in_image = |p: &Path| {
        p.strip_prefix("/")
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned()
    };
    files.insert("usr/bin/python3".to_string(), python.clone());
    crate::image::add_shared_libraries(&mut files, &python)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in text.lines() {
        let p = PathBuf::from(line);
        files.insert(in_image(&p), p.clone());
        if line.ends_with(".so") {
            crate::image::add_shared_libraries(&mut files, &p)?;
        }
    }
    // Python finds its prefix from this landmark.
    let os_py = text
        .lines()
        .find(|l| l.ends_with("/os.py"))
        .context("python3 listed no os.py")?;
    files.insert(in_image(Path::new(os_py)), PathBuf::from(os_py));
    for entry in
        std::fs::read_dir(&agents).with_context(|| format!("listing {}", agents.display()))?
    {
        let p = entry?.path();
        if p.extension().is_some_and(|e| e == "py") {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            files.insert(format!("agents/{name}"), p);
        }
    }
    // Files the pod file-policy test protects (tests/tests/cri.rs).
    for name in ["token", "taint"] {
        files.insert(
            format!("secret/{name}"),
            root.join(format!("tests/pod-image/secret/{name}")),
        );
    }
    Ok(files)
}
