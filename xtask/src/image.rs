//! `cargo xtask image`: the DaemonSet's container image, as an OCI image
//! archive (`oci-archive`), built without a container engine.
//!
//! No Docker engine runs on these machines and no base image can be pulled,
//! so the image is assembled from what the build host has: one layer with
//! the `enforcer` binary at `/usr/bin/enforcer` and the shared libraries it
//! loads (as `ldd` lists them, glibc and the dynamic loader; the eBPF
//! objects are embedded in the binary), plus the empty directories the
//! DaemonSet mounts over. The layer is deterministic (sorted entries, mtime
//! 0, uid/gid 0), so the same binary gives the same digest.
//!
//! Load it with `docker load -i`, `ctr -n k8s.io images import`, `podman
//! load -i`, or push it with `skopeo copy oci-archive:<file>
//! docker://<registry>/enforcer:<version>`. Its name is `enforcer:<version>`,
//! the `image:` of `deploy/40-daemonset.yaml`.
use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{util, BinArgs};

#[derive(clap::Args)]
pub struct ImageArgs {
    #[command(flatten)]
    pub bin: BinArgs,
    /// Where to write the archive (default: target/image/enforcer-<version>.oci.tar).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Image name and tag; the DaemonSet's `image:`.
pub fn image_ref() -> String {
    format!("enforcer:{}", env!("CARGO_PKG_VERSION"))
}

/// Directories the DaemonSet mounts host paths or volumes over
/// (`deploy/40-daemonset.yaml`): present in the image so that runtimes
/// that want an existing mount point find one.
const MOUNT_POINTS: &[&str] = &[
    "etc/enforcer",
    "sys",
    "proc",
    "run/enforcer",
    "var/log/enforcer",
    "tmp",
];

pub fn run(args: &ImageArgs) -> Result<u8> {
    let root = util::repo_root();
    let bin = util::enforcer_bin(&root, &args.bin)?;
    let out = args.out.clone().unwrap_or_else(|| {
        root.join("target/image")
            .join(format!("enforcer-{}.oci.tar", env!("CARGO_PKG_VERSION")))
    });
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let digest = build(&bin, &out)?;
    println!(
        "image {} ({digest}) written to {}\n  load: docker load -i {0}  |  ctr -n k8s.io images import {0}\n  push: skopeo copy oci-archive:{0} docker://<registry>/{}",
        image_ref(),
        out.display(),
        image_ref(),
    );
    Ok(0)
}

/// The shared libraries `bin` loads, with the dynamic loader: `ldd`'s
/// absolute paths. A statically linked binary has none.
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd (Debian package libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)" or "linux-vdso.so.1 (0x...)".
        if line.contains("not found") {
            bail!(
                "{}: a shared library is missing: {}",
                bin.display(),
                line.trim()
            );
        }
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// One deterministic tar entry header.
fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// The layer: files (image path -> host path, content of the symlink target)
/// and directories (`mount_points` and every file's parents, parents first).
fn layer(
    files: &BTreeMap<String, PathBuf>,
    mount_points: &[&str],
    symlinks: &[(&str, &str)],
) -> Result<Vec<u8>> {
    let mut dirs: std::collections::BTreeSet<String> =
        mount_points.iter().map(|s| s.to_string()).collect();
    for path in files.keys() {
        let mut p = Path::new(path);
        while let Some(parent) = p.parent() {
            if parent.as_os_str().is_empty() {
                break;
            }
            dirs.insert(parent.to_string_lossy().into_owned());
            p = parent;
        }
    }
    // Every parent of a mount point too.
    for d in dirs.clone() {
        let mut p = Path::new(&d);
        while let Some(parent) = p.parent() {
            if parent.as_os_str().is_empty() {
                break;
            }
            dirs.insert(parent.to_string_lossy().into_owned());
            p = parent;
        }
    }
    let mut b = tar::Builder::new(Vec::new());
    for d in &dirs {
        let mode = if d == "tmp" { 0o1777 } else { 0o755 };
        let mut h = header(tar::EntryType::Directory, mode, 0);
        b.append_data(&mut h, format!("{d}/"), std::io::empty())?;
    }
    for (path, host) in files {
        let data = std::fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        let mut h = header(tar::EntryType::Regular, 0o755, data.len() as u64);
        b.append_data(&mut h, path, data.as_slice())?;
    }
    for (path, target) in symlinks {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, path, target)?;
    }
    Ok(b.into_inner()?)
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Write the OCI image archive of `bin` to `out`; returns the manifest digest.
pub fn build(bin: &Path, out: &Path) -> Result<String> {
    let mut files = BTreeMap::new();
    files.insert("usr/bin/enforcer".to_string(), bin.to_path_buf());
    add_shared_libraries(&mut files, bin)?;
    write_archive(
        &Image {
            name: format!("docker.io/library/{}", image_ref()),
            tag: env!("CARGO_PKG_VERSION").to_string(),
            files,
            mount_points: MOUNT_POINTS,
            config: json!({
                "Entrypoint": ["/usr/bin/enforcer"],
                "Cmd": ["daemon", "--config", "/etc/enforcer/config.yaml"],
                "Env": ["PATH=/usr/bin:/bin"],
                "Labels": {
                    "org.opencontainers.image.title": "enforcer",
                    "org.opencontainers.image.version": env!("CARGO_PKG_VERSION"),
                    "org.opencontainers.image.description":
                        "Kernel-level egress enforcer for AI-agent workloads (node daemon)",
                },
            }),
            history: "enforcer binary and the shared libraries it loads",
            symlinks: &[],
        },
        out,
    )
}

/// The shared libraries `bin` loads, stored in `files` under the paths
/// `ldd` printed (the file each resolves to).
pub fn add_shared_libraries(files: &mut BTreeMap<String, PathBuf>, bin: &Path) -> Result<()> {
    for lib in shared_libraries(bin)? {
        let in_image = lib
            .strip_prefix("/")
            .unwrap_or(&lib)
            .to_string_lossy()
            .into_owned();
        // The loader follows the path ldd printed: store the file it
        // resolves to under that path.
        let real = lib
            .canonicalize()
            .with_context(|| format!("resolving {}", lib.display()))?;
        files.insert(in_image, real);
    }
    Ok(())
}

/// A one-layer image.
pub struct Image {
    /// Its full name (`io.containerd.image.name`), e.g.
    /// `docker.io/library/enforcer:0.1.0`.
    pub name: String,
    /// The tag (`org.opencontainers.image.ref.name`).
    pub tag: String,
    /// Image path (no leading `/`) -> the host file copied there.
    pub files: BTreeMap<String, PathBuf>,
    /// Empty directories the image has (besides every file's parents).
    pub mount_points: &'static [&'static str],
    /// The image config's `config` object (Entrypoint, Cmd, Env, ...).
    pub config: serde_json::Value,
    pub history: &'static str,
    /// Symbolic links: image path -> target (as stored, e.g. absolute).
    pub symlinks: &'static [(&'static str, &'static str)],
}

/// Write `image` as an OCI image archive to `out`; returns the manifest
/// digest. Deterministic: the same files give the same digest.
pub fn write_archive(image: &Image, out: &Path) -> Result<String> {
    let layer = layer(&image.files, image.mount_points, image.symlinks)?;
    let layer_digest = sha256(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": image.config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "cargo xtask image", "comment": image.history}],
    }))?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))?;
    let manifest_digest = sha256(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                // containerd (ctr import, docker load of OCI archives) names the image from this...
                "io.containerd.image.name": image.name,
                // ...skopeo/podman from this (the tag).
                "org.opencontainers.image.ref.name": image.tag,
            },
        }],
    }))?;

    let blob = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
    let mut entries: Vec<(String, &[u8])> = vec![
        ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#),
        ("index.json".into(), &index),
        (blob(&manifest_digest), &manifest),
        (blob(&config_digest), &config),
        (blob(&layer_digest), &layer),
    ];
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let tmp = out.with_extension("tmp");
    let f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(f));
    for d in ["blobs/", "blobs/sha256/"] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, d, std::io::empty())?;
    }
    for (name, data) in entries {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        b.append_data(&mut h, name, data)?;
    }
    b.into_inner()?.flush()?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(manifest_digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(cmd: &mut Command) -> std::process::Output {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn json(path: &Path) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// The image of the real `enforcer` binary: a well-formed OCI archive
    /// (digests check out, the layer is what the config says), named as
    /// the DaemonSet says, reproducible, and runnable: its root file system,
    /// unpacked and entered with chroot, runs `enforcer` with nothing from
    /// the host.
    #[test]
    fn image_of_the_enforcer_binary_runs_in_its_own_root() {
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var_os("CI").is_none(),
                "the image test needs root (chroot); CI is set, so not skipping"
            );
            eprintln!("SKIP: needs root (chroot)");
            return;
        }
        let root = util::repo_root();
        let bin = match std::env::var_os("ENFORCER_BIN") {
            Some(p) => PathBuf::from(p),
            None => util::cargo_build_bin(&root, "enforcer", false).unwrap(),
        };
        let tmp = std::env::temp_dir().join(format!("enforcer-image-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let archive = tmp.join("enforcer.oci.tar");
        let digest = build(&bin, &archive).unwrap();
        assert_eq!(
            build(&bin, &tmp.join("again.tar")).unwrap(),
            digest,
            "the same binary gives the same image"
        );

        let oci = tmp.join("oci");
        std::fs::create_dir(&oci).unwrap();
        sh(Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&oci));
        assert_eq!(json(&oci.join("oci-layout"))["imageLayoutVersion"], "1.0.0");
        let index = json(&oci.join("index.json"));
        let m = &index["manifests"][0];
        assert_eq!(m["digest"], digest);
        assert_eq!(
            m["annotations"]["io.containerd.image.name"],
            format!("docker.io/library/{}", image_ref())
        );
        let blob = |d: &serde_json::Value| {
            let p = oci
                .join("blobs/sha256")
                .join(d.as_str().unwrap().trim_start_matches("sha256:"));
            let data = std::fs::read(&p).unwrap();
            assert_eq!(
                sha256(&data),
                d.as_str().unwrap(),
                "blob digest of {}",
                p.display()
            );
            data
        };
        let manifest: serde_json::Value = serde_json::from_slice(&blob(&m["digest"])).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&blob(&manifest["config"]["digest"])).unwrap();
        let layer = blob(&manifest["layers"][0]["digest"]);
        assert_eq!(manifest["layers"][0]["size"], layer.len());
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            manifest["layers"][0]["digest"]
        );
        assert_eq!(config["config"]["Entrypoint"], json!(["/usr/bin/enforcer"]));

        // deploy/40-daemonset.yaml runs this image with these arguments.
        let ds = std::fs::read_to_string(root.join("deploy/40-daemonset.yaml")).unwrap();
        assert!(
            ds.lines()
                .any(|l| l.trim() == format!("image: {}", image_ref())),
            "the DaemonSet's image is not {}",
            image_ref()
        );
        assert!(
            ds.lines()
                .any(|l| l.trim() == "args: [daemon, --config, /etc/enforcer/config.yaml]"),
            "the DaemonSet's args differ from the image's Cmd"
        );

        let rootfs = tmp.join("rootfs");
        std::fs::create_dir(&rootfs).unwrap();
        std::fs::write(tmp.join("layer.tar"), &layer).unwrap();
        sh(Command::new("tar")
            .arg("-xf")
            .arg(tmp.join("layer.tar"))
            .arg("-C")
            .arg(&rootfs));
        for d in MOUNT_POINTS {
            assert!(rootfs.join(d).is_dir(), "mount point {d} missing");
        }
        let version = sh(Command::new("chroot")
            .arg(&rootfs)
            .args(["/usr/bin/enforcer", "--version"]));
        let version = String::from_utf8_lossy(&version.stdout);
        assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
        let crd = sh(Command::new("chroot")
            .arg(&rootfs)
            .args(["/usr/bin/enforcer", "k8s", "crd"]));
        assert!(
            String::from_utf8_lossy(&crd.stdout).contains("kind: CustomResourceDefinition"),
            "enforcer k8s crd in the image"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
