//! The image the pods run: its file tree and its config, from the same
//! definitions the real image is built from, so the two cannot drift.
//!
//! [`stage`] asks `scripts/build-image --stage` for the image's file tree
//! around the local build (the function the image itself is assembled with),
//! and reads the Containerfile that `scripts/build-image --containerfile`
//! assembles from the Dockerfile: its `COPY --chown` lines are the layers
//! (owners applied as the builder would), `ENV`, `WORKDIR`, `USER`,
//! `ENTRYPOINT` and `CMD` are what a container runtime takes from the image.
//!
//! One difference remains, and it is stated: the real image carries a
//! static binary, while the local debug build is linked dynamically, so its
//! loader and libraries (as `ldd` lists them) are added in a layer of their
//! own under their usual paths. Nothing else of the host is there: no
//! shell, no dnsutils.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use nix::unistd::{Gid, Uid, fchownat};
use serde::{Deserialize, Serialize};

use crate::harness::workspace_root;

/// Where a cluster's image lives under its state directory.
pub const IMAGE_DIR: &str = "image";
const CONFIG_FILE: &str = "image.json";
/// The layer that holds the local build's loader and libraries.
const LIBS_LAYER: &str = "host-libs";

/// The image as a container runtime sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Layer directories, lowest first (overlay lower dirs).
    pub layers: Vec<PathBuf>,
    /// `ENV`, in order.
    pub env: Vec<(String, String)>,
    /// `WORKDIR` (default `/`).
    pub workdir: String,
    /// `USER` as `uid:gid` numbers, when set.
    pub user: Option<(u32, u32)>,
    /// `ENTRYPOINT` (exec form).
    pub entrypoint: Vec<String>,
    /// `CMD` (exec form).
    pub cmd: Vec<String>,
}

/// What the Containerfile says, before its layers are staged.
#[derive(Debug, Default, PartialEq, Eq)]
struct Containerfile {
    /// `COPY --chown=UID:GID SRC /`: source dir in the build context, owner.
    copies: Vec<(String, u32, u32)>,
    env: Vec<(String, String)>,
    workdir: Option<String>,
    user: Option<(u32, u32)>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

/// Joins `\`-continued lines and drops comments and blank lines.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn owner(spec: &str) -> Result<(u32, u32)> {
    let (u, g) = spec.split_once(':').unwrap_or((spec, spec));
    let parse = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| anyhow!("{spec:?} is not numeric uid:gid"))
    };
    Ok((parse(u)?, parse(g)?))
}

/// `KEY=VALUE KEY2="VALUE 2"` (the `ENV` form the Dockerfile uses).
fn env_pairs(rest: &str) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    for word in rest.split_whitespace() {
        let (k, v) = word
            .split_once('=')
            .ok_or_else(|| anyhow!("ENV {rest:?}: only the KEY=VALUE form is understood"))?;
        pairs.push((k.to_string(), v.trim_matches('"').to_string()));
    }
    Ok(pairs)
}

fn parse_containerfile(text: &str) -> Result<Containerfile> {
    let mut cf = Containerfile::default();
    for line in instructions(text) {
        let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let rest = rest.trim();
        match word.to_ascii_uppercase().as_str() {
            "COPY" => {
                let parts: Vec<&str> = rest.split_whitespace().collect();
                let [chown, src, "/"] = parts.as_slice() else {
                    bail!("COPY {rest:?}: expected `COPY --chown=UID:GID DIR/ /`");
                };
                let spec = chown
                    .strip_prefix("--chown=")
                    .ok_or_else(|| anyhow!("COPY {rest:?}: expected --chown=UID:GID"))?;
                let (uid, gid) = owner(spec)?;
                cf.copies
                    .push((src.trim_end_matches('/').to_string(), uid, gid));
            }
            "ENV" => cf.env.extend(env_pairs(rest)?),
            "WORKDIR" => cf.workdir = Some(rest.to_string()),
            "USER" => cf.user = Some(owner(rest)?),
            "ENTRYPOINT" => {
                cf.entrypoint = serde_json::from_str(rest)
                    .with_context(|| format!("ENTRYPOINT {rest}: exec (JSON) form expected"))?
            }
            "CMD" => {
                cf.cmd = serde_json::from_str(rest)
                    .with_context(|| format!("CMD {rest}: exec (JSON) form expected"))?
            }
            _ => {}
        }
    }
    if cf.copies.is_empty() {
        bail!("the Containerfile copies nothing into the image");
    }
    Ok(cf)
}

/// The files `ldd` says `binary` loads (the loader included); none for a
/// static binary.
fn shared_libraries(ldd_output: &str) -> Vec<PathBuf> {
    ldd_output
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, right)) => right.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `chown -R uid:gid dir`, links themselves rather than their targets.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<()> {
    fchownat(
        nix::fcntl::AT_FDCWD,
        dir,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .with_context(|| format!("chown {uid}:{gid} {}", dir.display()))?;
    if fs::symlink_metadata(dir)?.is_dir() {
        for entry in fs::read_dir(dir)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Copies the loader and libraries `binary` needs into `layer`, at the same
/// paths (symlinks resolved: `/lib64` may be a link on the host).
fn stage_libraries(binary: &Path, layer: &Path) -> Result<()> {
    let ldd = Command::new("ldd").arg(binary).output();
    let listing = match ldd {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => bail!(
            "could not run ldd on {} ({e}); install libc-bin",
            binary.display()
        ),
    };
    for lib in shared_libraries(&listing) {
        let target = layer.join(lib.strip_prefix("/").unwrap_or(&lib));
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(&lib, &target)
            .with_context(|| format!("copying {} into the image", lib.display()))?;
        let mode = fs::metadata(&lib)?.mode() & 0o7777;
        fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Assembles the image around `tally_bin` in `dir` (replacing what was
/// there) and records its config in `dir/image.json`.
pub fn stage(tally_bin: &Path, dir: &Path) -> Result<Image> {
    let script = workspace_root().join("scripts/build-image");
    if !script.is_file() {
        bail!(
            "{} is missing: the simulator builds the pods' file tree with it",
            script.display()
        );
    }
    let _ = fs::remove_dir_all(dir);
    let context = dir.join("context");
    fs::create_dir_all(&context)?;
    run(Command::new("bash")
        .arg(&script)
        .arg("--stage")
        .arg(tally_bin)
        .arg(&context))?;
    let cf = parse_containerfile(&run(Command::new("bash")
        .arg(&script)
        .arg("--containerfile"))?)?;
    let libs = dir.join(LIBS_LAYER);
    fs::create_dir_all(&libs)?;
    stage_libraries(tally_bin, &libs)?;
    let mut layers = vec![libs];
    for (src, uid, gid) in &cf.copies {
        let layer = context.join(src);
        if !layer.is_dir() {
            bail!(
                "the Containerfile copies {src}/, which scripts/build-image --stage did not make"
            );
        }
        chown_tree(&layer, *uid, *gid)?;
        layers.push(layer);
    }
    let image = Image {
        layers,
        env: cf.env,
        workdir: cf.workdir.unwrap_or_else(|| "/".into()),
        user: cf.user,
        entrypoint: cf.entrypoint,
        cmd: cf.cmd,
    };
    fs::write(dir.join(CONFIG_FILE), serde_json::to_vec_pretty(&image)?)?;
    Ok(image)
}

/// The image [`stage`] left in `dir`.
pub fn load(dir: &Path) -> Result<Image> {
    let path = dir.join(CONFIG_FILE);
    let bytes = fs::read(&path).with_context(|| {
        format!(
            "reading {} (the cluster's image is staged when it starts)",
            path.display()
        )
    })?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTAINERFILE: &str = r#"# Assembled by scripts/build-image from the final stage of Dockerfile.
FROM scratch
ARG VERSION
LABEL org.opencontainers.image.title="tally" \
      org.opencontainers.image.version="${VERSION}"
COPY --chown=0:0 rootfs/ /
COPY --chown=65532:65532 rootfs-data/ /
ENV PATH=/usr/local/bin \
    TALLY_DATA_DIR=/data \
    TALLY_LISTEN=0.0.0.0:8080
WORKDIR /data
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tally"]
CMD ["serve"]
"#;

    #[test]
    fn reads_the_containerfile_as_a_runtime_would() {
        let cf = parse_containerfile(CONTAINERFILE).unwrap();
        assert_eq!(
            cf.copies,
            vec![
                ("rootfs".to_string(), 0, 0),
                ("rootfs-data".to_string(), 65532, 65532)
            ]
        );
        assert_eq!(
            cf.env,
            vec![
                ("PATH".to_string(), "/usr/local/bin".to_string()),
                ("TALLY_DATA_DIR".to_string(), "/data".to_string()),
                ("TALLY_LISTEN".to_string(), "0.0.0.0:8080".to_string()),
            ]
        );
        assert_eq!(cf.workdir.as_deref(), Some("/data"));
        assert_eq!(cf.user, Some((65532, 65532)));
        assert_eq!(cf.entrypoint, vec!["/usr/local/bin/tally"]);
        assert_eq!(cf.cmd, vec!["serve"]);
    }

    #[test]
    fn refuses_what_it_cannot_stage() {
        let err = parse_containerfile("FROM scratch\nCOPY rootfs/ /\n").unwrap_err();
        assert!(err.to_string().contains("--chown"), "{err:#}");
        let err = parse_containerfile("FROM scratch\nCMD serve\n").unwrap_err();
        assert!(err.to_string().contains("exec (JSON) form"), "{err:#}");
        let err = parse_containerfile("FROM scratch\n").unwrap_err();
        assert!(err.to_string().contains("copies nothing"), "{err:#}");
    }

    #[test]
    fn lists_the_loader_and_libraries_of_a_dynamic_build() {
        let ldd = "\tlinux-vdso.so.1 (0x00007efd70f92000)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007efd70f61000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007efd6fd3e000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007efd70f94000)\n";
        assert_eq!(
            shared_libraries(ldd),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(shared_libraries("\tstatically linked\n").is_empty());
        assert!(shared_libraries("\tnot a dynamic executable\n").is_empty());
    }
}
