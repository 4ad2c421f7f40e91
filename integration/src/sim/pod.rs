//! A pod: what the kubelet would do with the rendered pod template.
//!
//! [`plan`] reads the pod template against the [`Image`] the way the
//! kubelet and the container runtime do (image ENTRYPOINT/CMD under
//! command/args, image ENV under env with the Downward API and key
//! references, WORKDIR, USER, volumes and their mounts, security context,
//! probes) and writes the pod's files (ConfigMap and Secret volumes,
//! `resolv.conf`, `hosts`, `hostname`). The result is a [`LaunchSpec`] that
//! [`pod_init`] — running as `tally-sim pod-init` in a fresh process — turns
//! into a container: it joins the pod's network namespace, creates its own
//! UTS and mount namespaces, sets the hostname, builds the root filesystem
//! from the image's layers (an overlay, writes going to a tmpfs), bind-mounts
//! the kubelet's files and the volumes into it, pivots into it, drops to the
//! container's user and execs its command. Nothing of the host's `/` is
//! visible: a command the image does not ship is not found, as on a cluster.
//! [`exec_in`] does what `kubectl exec` does: joins a running container's
//! namespaces as its user, with its environment; [`run_as_client`] runs a
//! host tool in the client namespace, as a debug pod with the host's tools
//! (`kubectl run --image=debian`) would.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Container, PodTemplateSpec, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::unistd::{Gid, Uid, chown, pivot_root, setgroups, sethostname, setresgid, setresuid};
use serde::{Deserialize, Serialize};

use super::image::Image;
use super::manifest::Manifests;

/// One bind mount into the container's root.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountSpec {
    /// Host path (a directory or a file).
    pub source: PathBuf,
    /// Absolute path inside the container.
    pub target: PathBuf,
    /// `readOnly: true` on the volumeMount.
    pub read_only: bool,
}

/// Everything `tally-sim pod-init` needs to start one container.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// `/run/netns/<pod netns>`.
    pub netns: PathBuf,
    /// The pod's hostname (its name, for a StatefulSet pod).
    pub hostname: String,
    /// A host directory where the container's root is assembled (a tmpfs is
    /// mounted over it inside the container's private mount namespace only).
    pub scratch: PathBuf,
    /// The image's layers, lowest first: the container's root.
    pub layers: Vec<PathBuf>,
    /// The kubelet's files (`/etc/resolv.conf`, `/etc/hosts`,
    /// `/etc/hostname`) and the volume mounts.
    pub mounts: Vec<MountSpec>,
    /// `readOnlyRootFilesystem`.
    pub read_only_root: bool,
    /// The process's uid (`runAsUser`, else the image's USER, else 0).
    pub uid: u32,
    /// The process's gid (`runAsGroup`, else the image's USER group, else 0).
    pub gid: u32,
    /// Supplementary groups (`fsGroup`, `supplementalGroups`).
    pub groups: Vec<u32>,
    /// `workingDir`, else the image's WORKDIR.
    pub workdir: String,
    /// The container's environment, in order.
    pub env: Vec<(String, String)>,
    /// The command line (entrypoint or `command`, then `args`).
    pub argv: Vec<String>,
}

/// What a probe checks.
#[derive(Clone, Debug, PartialEq)]
pub enum ProbeAction {
    /// `httpGet`: success is a status in 200..400.
    Http {
        /// Resolved container port.
        port: u16,
        /// Request path.
        path: String,
    },
    /// `tcpSocket`: success is an accepted connection.
    Tcp {
        /// Resolved container port.
        port: u16,
    },
}

/// One probe with the kubelet's defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeSpec {
    /// What to check.
    pub action: ProbeAction,
    /// initialDelaySeconds.
    pub initial_delay: Duration,
    /// periodSeconds (default 10).
    pub period: Duration,
    /// timeoutSeconds (default 1).
    pub timeout: Duration,
    /// failureThreshold (default 3).
    pub failure_threshold: u32,
    /// successThreshold (default 1).
    pub success_threshold: u32,
}

/// The probes of the container.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Probes {
    /// startupProbe: until it succeeds the others do not run.
    pub startup: Option<ProbeSpec>,
    /// livenessProbe: failing restarts the container.
    pub liveness: Option<ProbeSpec>,
    /// readinessProbe: gates the client Service; without one, a running
    /// container is ready.
    pub readiness: Option<ProbeSpec>,
}

/// The result of reading a pod template for one pod.
#[derive(Clone, Debug)]
pub struct PodPlan {
    /// How to start the container.
    pub launch: LaunchSpec,
    /// Its probes.
    pub probes: Probes,
    /// terminationGracePeriodSeconds (default 30).
    pub grace: Duration,
    /// Container ports (name, number), for named targetPorts and probes.
    pub container_ports: Vec<(Option<String>, u16)>,
    /// The pod's labels.
    pub labels: BTreeMap<String, String>,
}

/// The facts about one pod that the template is read against.
#[derive(Clone, Debug)]
pub struct PodFacts<'a> {
    /// The rendered chart (ConfigMaps and Secrets are read from it).
    pub manifests: &'a Manifests,
    /// The template of this pod's revision.
    pub template: &'a PodTemplateSpec,
    /// Pod name `<sts>-<ordinal>`.
    pub pod_name: &'a str,
    /// Namespace.
    pub namespace: &'a str,
    /// The StatefulSet's serviceName (the pod's subdomain); empty for a
    /// pod without one.
    pub subdomain: &'a str,
    /// Cluster domain.
    pub domain: &'a str,
    /// The pod's IP.
    pub pod_ip: Ipv4Addr,
    /// The cluster DNS server's address.
    pub dns_ip: Ipv4Addr,
    /// `/run/netns/<pod netns>`.
    pub netns: PathBuf,
    /// This pod's directory in the state dir (volumes, scratch).
    pub pod_dir: PathBuf,
    /// Claim name -> its data directory (the "PersistentVolume").
    pub claims: BTreeMap<String, PathBuf>,
    /// The image, around the local build.
    pub image: &'a Image,
}

fn image_repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    match no_digest.rfind(':') {
        Some(colon) if !no_digest[colon..].contains('/') => &no_digest[..colon],
        _ => no_digest,
    }
}

fn port_of(container: &Container, port: &IntOrString, what: &str) -> Result<u16> {
    match port {
        IntOrString::Int(n) => {
            u16::try_from(*n).map_err(|_| anyhow!("{what}: port {n} is out of range"))
        }
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| anyhow!("{what}: the container has no port named {name:?}")),
    }
}

fn secs(v: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(u64::try_from(v.unwrap_or(default)).unwrap_or(0))
}

fn probe(container: &Container, p: Option<&Probe>, what: &str) -> Result<Option<ProbeSpec>> {
    let Some(p) = p else { return Ok(None) };
    let action = if let Some(h) = &p.http_get {
        if h.scheme
            .as_deref()
            .is_some_and(|s| !s.eq_ignore_ascii_case("HTTP"))
        {
            bail!(
                "{what}: only HTTP httpGet probes are modelled, not {:?}",
                h.scheme
            );
        }
        ProbeAction::Http {
            port: port_of(container, &h.port, what)?,
            path: h.path.clone().unwrap_or_else(|| "/".into()),
        }
    } else if let Some(t) = &p.tcp_socket {
        ProbeAction::Tcp {
            port: port_of(container, &t.port, what)?,
        }
    } else {
        bail!("{what}: only httpGet and tcpSocket probes are modelled (exec and grpc are not)");
    };
    Ok(Some(ProbeSpec {
        action,
        initial_delay: secs(p.initial_delay_seconds, 0),
        period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
        failure_threshold: u32::try_from(p.failure_threshold.unwrap_or(3))
            .unwrap_or(3)
            .max(1),
        success_threshold: u32::try_from(p.success_threshold.unwrap_or(1))
            .unwrap_or(1)
            .max(1),
    }))
}

/// Kubernetes `$(VAR)` expansion (`$$` escapes; unknown references stay).
pub fn expand(input: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn write_file(path: &Path, bytes: &[u8], mode: u32, gid: Option<u32>) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    if let Some(g) = gid {
        chown(path, None, Some(Gid::from_raw(g)))?;
    }
    Ok(())
}

/// Applies the kubelet's fsGroup ownership to a volume: group `fs_group`,
/// group-writable, setgid directories, recursively.
pub fn apply_fs_group(dir: &Path, fs_group: u32) -> Result<()> {
    let meta = fs::symlink_metadata(dir)?;
    chown(dir, None, Some(Gid::from_raw(fs_group)))
        .with_context(|| format!("chgrp {fs_group} {}", dir.display()))?;
    let mode = meta.permissions().mode() & 0o7777;
    if meta.is_dir() {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o2070))?;
        for entry in fs::read_dir(dir)? {
            apply_fs_group(&entry?.path(), fs_group)?;
        }
    } else if meta.is_file() {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o060))?;
    }
    Ok(())
}

/// Reads the pod template for one pod and writes the pod's files.
pub fn plan(f: &PodFacts<'_>) -> Result<PodPlan> {
    let spec = f
        .template
        .spec
        .as_ref()
        .ok_or_else(|| anyhow!("the StatefulSet's pod template has no spec"))?;
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        bail!("init containers are not modelled by the simulator");
    }
    let container = match spec.containers.as_slice() {
        [one] => one,
        other => bail!(
            "the simulator runs pods with exactly one container; the template has {}",
            other.len()
        ),
    };
    let what = format!("container {:?} of pod {}", container.name, f.pod_name);
    let image = container.image.clone().unwrap_or_default();
    if !image_repository(&image).ends_with("tally") {
        bail!(
            "{what}: image {image:?} is not modelled; the simulator maps only images whose repository \
             ends in `tally` to the image built around the local build"
        );
    }
    // The image's ENV first: the container's env overrides it.
    let mut env: Vec<(String, String)> = f.image.env.clone();
    env.push(("HOSTNAME".into(), f.pod_name.into()));
    let labels = f
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let annotations = f
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let entries = if let Some(cm) = &from.config_map_ref {
            match f.manifests.config_map_entries(&cm.name) {
                Some(e) => e,
                None if cm.optional == Some(true) => vec![],
                None => bail!(
                    "{what}: envFrom ConfigMap {:?} is not in the rendered chart",
                    cm.name
                ),
            }
        } else if let Some(s) = &from.secret_ref {
            match f.manifests.secret_entries(&s.name) {
                Some(e) => e,
                None if s.optional == Some(true) => vec![],
                None => bail!(
                    "{what}: envFrom Secret {:?} is not in the rendered chart",
                    s.name
                ),
            }
        } else {
            vec![]
        };
        for (k, v) in entries {
            env.push((
                format!("{prefix}{k}"),
                String::from_utf8_lossy(&v).into_owned(),
            ));
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(src) = &var.value_from {
            if let Some(field) = &src.field_ref {
                let path = field.field_path.as_str();
                let label_of = |map: &BTreeMap<String, String>, prefix: &str| {
                    path.strip_prefix(prefix)
                        .and_then(|r| r.strip_suffix("']"))
                        .map(|k| map.get(k).cloned().unwrap_or_default())
                };
                match path {
                    "metadata.name" => f.pod_name.to_string(),
                    "metadata.namespace" => f.namespace.to_string(),
                    "status.podIP" | "status.podIPs" => f.pod_ip.to_string(),
                    "status.hostIP" | "status.hostIPs" => f.pod_ip.to_string(),
                    "spec.nodeName" => "tally-sim-node".to_string(),
                    "spec.serviceAccountName" => spec
                        .service_account_name
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                    _ => match label_of(&labels, "metadata.labels['")
                        .or_else(|| label_of(&annotations, "metadata.annotations['"))
                    {
                        Some(v) => v,
                        None => bail!(
                            "{what}: env {}: fieldRef {path:?} is not modelled",
                            var.name
                        ),
                    },
                }
            } else if let Some(r) = &src.config_map_key_ref {
                match f.manifests.config_map_key(&r.name, &r.key) {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None if r.optional == Some(true) => continue,
                    None => bail!(
                        "{what}: env {} refers to key {:?} of ConfigMap {:?}, which the rendered chart does not have",
                        var.name,
                        r.key,
                        r.name
                    ),
                }
            } else if let Some(r) = &src.secret_key_ref {
                match f.manifests.secret_key(&r.name, &r.key) {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None if r.optional == Some(true) => continue,
                    None => bail!(
                        "{what}: env {} refers to key {:?} of Secret {:?}, which the rendered chart does not have",
                        var.name,
                        r.key,
                        r.name
                    ),
                }
            } else {
                bail!(
                    "{what}: env {}: only value, fieldRef, configMapKeyRef and secretKeyRef are modelled",
                    var.name
                );
            }
        } else {
            expand(var.value.as_deref().unwrap_or(""), &env)
        };
        env.retain(|(k, _)| *k != var.name);
        env.push((var.name.clone(), value));
    }
    // As the runtime combines them: `command` replaces ENTRYPOINT and drops
    // CMD; `args` replaces CMD.
    let args: Vec<String> = container
        .args
        .iter()
        .flatten()
        .map(|a| expand(a, &env))
        .collect();
    let argv: Vec<String> = match &container.command {
        Some(cmd) if !cmd.is_empty() => cmd.iter().map(|c| expand(c, &env)).chain(args).collect(),
        _ if args.is_empty() => f
            .image
            .entrypoint
            .iter()
            .chain(&f.image.cmd)
            .cloned()
            .collect(),
        _ => f.image.entrypoint.iter().cloned().chain(args).collect(),
    };

    // Security context: container level wins over pod level.
    let psc = spec.security_context.clone().unwrap_or_default();
    let csc = container.security_context.clone().unwrap_or_default();
    let (image_uid, image_gid) = f.image.user.unwrap_or((0, 0));
    let uid = csc
        .run_as_user
        .or(psc.run_as_user)
        .unwrap_or(i64::from(image_uid));
    let gid = csc
        .run_as_group
        .or(psc.run_as_group)
        .unwrap_or(i64::from(image_gid));
    let non_root = csc.run_as_non_root.or(psc.run_as_non_root).unwrap_or(false);
    if non_root && uid == 0 {
        bail!(
            "{what}: runAsNonRoot is set but the container would run as uid 0 (CreateContainerConfigError)"
        );
    }
    let fs_group = psc.fs_group.map(|g| g as u32);
    let mut groups: Vec<u32> = fs_group.into_iter().collect();
    groups.extend(psc.supplemental_groups.iter().flatten().map(|g| *g as u32));

    // Volumes.
    let vol_root = f.pod_dir.join("volumes");
    let mut volumes: BTreeMap<String, PathBuf> = BTreeMap::new();
    for vol in spec.volumes.iter().flatten() {
        let dir = vol_root.join(&vol.name);
        if let Some(cm) = &vol.config_map {
            fs::create_dir_all(&dir)?;
            let mode = cm.default_mode.unwrap_or(0o644) as u32;
            let entries = match f.manifests.config_map_entries(&cm.name) {
                Some(e) => e,
                None if cm.optional == Some(true) => vec![],
                None => bail!(
                    "volume {:?}: ConfigMap {:?} is not in the rendered chart",
                    vol.name,
                    cm.name
                ),
            };
            write_items(
                &dir,
                &entries,
                cm.items.as_deref(),
                mode,
                fs_group,
                &vol.name,
            )?;
        } else if let Some(sec) = &vol.secret {
            fs::create_dir_all(&dir)?;
            let mode = sec.default_mode.unwrap_or(0o644) as u32;
            let name = sec.secret_name.clone().unwrap_or_default();
            let entries = match f.manifests.secret_entries(&name) {
                Some(e) => e,
                None if sec.optional == Some(true) => vec![],
                None => bail!(
                    "volume {:?}: Secret {name:?} is not in the rendered chart",
                    vol.name
                ),
            };
            write_items(
                &dir,
                &entries,
                sec.items.as_deref(),
                mode,
                fs_group,
                &vol.name,
            )?;
        } else if vol.empty_dir.is_some() {
            fs::create_dir_all(&dir)?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))?;
            if let Some(g) = fs_group {
                apply_fs_group(&dir, g)?;
            }
        } else if let Some(pvc) = &vol.persistent_volume_claim {
            match f.claims.get(&pvc.claim_name) {
                Some(d) => {
                    volumes.insert(vol.name.clone(), d.clone());
                    continue;
                }
                None => bail!(
                    "volume {:?}: PersistentVolumeClaim {:?} is not modelled",
                    vol.name,
                    pvc.claim_name
                ),
            }
        } else {
            bail!(
                "volume {:?}: only configMap, secret, emptyDir and the StatefulSet's volumeClaimTemplates are modelled",
                vol.name
            );
        }
        volumes.insert(vol.name.clone(), dir);
    }
    for (claim, dir) in &f.claims {
        if let Some(g) = fs_group {
            apply_fs_group(dir, g)?;
        }
        volumes.insert(claim.clone(), dir.clone());
    }
    let mut mounts = Vec::new();
    for vm in container.volume_mounts.iter().flatten() {
        let base = volumes
            .get(&vm.name)
            .ok_or_else(|| anyhow!("{what}: volumeMount {:?} names no volume or claim", vm.name))?;
        let source = match vm.sub_path.as_deref() {
            Some(sub) if !sub.is_empty() => {
                if sub.starts_with('/') || sub.split('/').any(|c| c == "..") {
                    bail!("{what}: subPath {sub:?} must be a relative path without `..`");
                }
                let p = base.join(sub);
                if !p.exists() {
                    // The kubelet creates a missing subPath as a directory.
                    fs::create_dir_all(&p)?;
                }
                p
            }
            _ => base.clone(),
        };
        if !vm.mount_path.starts_with('/') {
            bail!("{what}: mountPath {:?} must be absolute", vm.mount_path);
        }
        mounts.push(MountSpec {
            source,
            target: PathBuf::from(&vm.mount_path),
            read_only: vm.read_only.unwrap_or(false),
        });
    }

    // The kubelet's files, bind-mounted over the image's /etc as the kubelet
    // does (from the pod's directory).
    // A pod without a subdomain (the `helm test` pod) has no FQDN of its own.
    let names = if f.subdomain.is_empty() {
        f.pod_name.to_string()
    } else {
        format!(
            "{}.{}.{}.svc.{}\t{}",
            f.pod_name, f.subdomain, f.namespace, f.domain, f.pod_name
        )
    };
    let files = [
        (
            "resolv.conf",
            "/etc/resolv.conf",
            resolv_conf(f.namespace, f.domain, f.dns_ip),
        ),
        (
            "etc-hosts",
            "/etc/hosts",
            format!(
                "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
                 fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n\
                 {ip}\t{names}\n",
                ip = f.pod_ip,
            ),
        ),
        ("hostname", "/etc/hostname", format!("{}\n", f.pod_name)),
    ];
    for (file, target, content) in files {
        let source = f.pod_dir.join(file);
        write_file(&source, content.as_bytes(), 0o644, None)?;
        mounts.push(MountSpec {
            source,
            target: PathBuf::from(target),
            read_only: false,
        });
    }
    let container_ports = container
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            u16::try_from(p.container_port)
                .ok()
                .map(|n| (p.name.clone(), n))
        })
        .collect();
    let probes = Probes {
        startup: probe(
            container,
            container.startup_probe.as_ref(),
            &format!("{what} startupProbe"),
        )?,
        liveness: probe(
            container,
            container.liveness_probe.as_ref(),
            &format!("{what} livenessProbe"),
        )?,
        readiness: probe(
            container,
            container.readiness_probe.as_ref(),
            &format!("{what} readinessProbe"),
        )?,
    };
    Ok(PodPlan {
        launch: LaunchSpec {
            netns: f.netns.clone(),
            hostname: f.pod_name.to_string(),
            scratch: f.pod_dir.join("rootfs"),
            layers: f.image.layers.clone(),
            mounts,
            read_only_root: csc.read_only_root_filesystem.unwrap_or(false),
            uid: uid as u32,
            gid: gid as u32,
            groups,
            workdir: container
                .working_dir
                .clone()
                .unwrap_or_else(|| f.image.workdir.clone()),
            env,
            argv,
        },
        probes,
        grace: secs(spec.termination_grace_period_seconds.map(|g| g as i32), 30),
        container_ports,
        labels,
    })
}

/// `/etc/resolv.conf` as the kubelet writes it for a pod in `namespace`
/// (`dnsPolicy: ClusterFirst`).
pub fn resolv_conf(namespace: &str, domain: &str, dns_ip: Ipv4Addr) -> String {
    format!(
        "search {namespace}.svc.{domain} svc.{domain} {domain}\nnameserver {dns_ip}\noptions ndots:5\n"
    )
}

fn write_items(
    dir: &Path,
    entries: &[(String, Vec<u8>)],
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    mode: u32,
    gid: Option<u32>,
    volume: &str,
) -> Result<()> {
    match items {
        Some(items) => {
            for item in items {
                let (_, bytes) = entries
                    .iter()
                    .find(|(k, _)| *k == item.key)
                    .ok_or_else(|| {
                        anyhow!("volume {volume:?}: item key {:?} does not exist", item.key)
                    })?;
                write_file(
                    &dir.join(&item.path),
                    bytes,
                    item.mode.map_or(mode, |m| m as u32),
                    gid,
                )?;
            }
        }
        None => {
            for (k, bytes) in entries {
                write_file(&dir.join(k), bytes, mode, gid)?;
            }
        }
    }
    if let Some(g) = gid {
        chown(dir, None, Some(Gid::from_raw(g)))?;
    }
    Ok(())
}

fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn bind(source: &Path, target: &Path, read_only: bool) -> Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("bind-mounting {} on {}", source.display(), target.display()))?;
    if read_only {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .with_context(|| format!("making {} read-only", target.display()))?;
    }
    Ok(())
}

/// Becomes the container described by `spec` (runs in `tally-sim pod-init`,
/// a single-threaded process started by the simulator as root). Never returns
/// on success: the process is replaced by the container's command.
pub fn pod_init(spec: &LaunchSpec) -> Result<Infallible> {
    let netns =
        fs::File::open(&spec.netns).with_context(|| format!("opening {}", spec.netns.display()))?;
    setns(&netns, CloneFlags::CLONE_NEWNET).context("joining the pod's network namespace")?;
    drop(netns);
    unshare(CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWNS)
        .context("creating UTS and mount namespaces")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making mounts private")?;
    sethostname(&spec.hostname).context("setting the hostname")?;

    // The root filesystem: the image's layers, read-only; writes go to a
    // tmpfs that lives only as long as this mount namespace.
    fs::create_dir_all(&spec.scratch)?;
    mount(
        Some("tmpfs"),
        &spec.scratch,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .context("mounting the container's scratch tmpfs")?;
    let (upper, work, root) = (
        spec.scratch.join("upper"),
        spec.scratch.join("work"),
        spec.scratch.join("root"),
    );
    for d in [&upper, &work, &root] {
        fs::create_dir_all(d)?;
    }
    if spec.layers.is_empty() {
        bail!("the image has no layers");
    }
    // overlayfs wants the uppermost lower layer first.
    let lower: Vec<String> = spec
        .layers
        .iter()
        .rev()
        .map(|l| l.display().to_string())
        .collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .context("mounting the container's root overlay")?;
    for sys in ["/dev", "/proc", "/sys"] {
        let target = inside(&root, Path::new(sys));
        fs::create_dir_all(&target)?;
        bind(Path::new(sys), &target, false)?;
    }
    for m in &spec.mounts {
        let target = inside(&root, &m.target);
        if let Ok(meta) = fs::symlink_metadata(&target)
            && meta.file_type().is_symlink()
        {
            fs::remove_file(&target)?;
        }
        if m.source.is_dir() {
            fs::create_dir_all(&target)?;
        } else {
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)?;
            }
            if !target.exists() {
                fs::write(&target, b"")?;
            }
        }
        bind(&m.source, &target, m.read_only)?;
    }
    let old = root.join(".oldroot");
    fs::create_dir_all(&old)?;
    pivot_root(&root, &old).context("pivot_root into the container's root")?;
    std::env::set_current_dir("/")?;
    umount2("/.oldroot", MntFlags::MNT_DETACH).context("detaching the host's root")?;
    let _ = fs::remove_dir("/.oldroot");
    if spec.read_only_root {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .context("making the root filesystem read-only (readOnlyRootFilesystem)")?;
    }
    become_user(spec.uid, spec.gid, &spec.groups)?;
    let err = exec_command(&spec.argv, &spec.env, &spec.workdir);
    Err(err)
}

fn become_user(uid: u32, gid: u32, groups: &[u32]) -> Result<()> {
    let gids: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
    setgroups(&gids).context("setgroups")?;
    let g = Gid::from_raw(gid);
    setresgid(g, g, g).with_context(|| format!("setgid {gid}"))?;
    let u = Uid::from_raw(uid);
    setresuid(u, u, u).with_context(|| format!("setuid {uid}"))?;
    Ok(())
}

fn exec_command(argv: &[String], env: &[(String, String)], workdir: &str) -> anyhow::Error {
    let Some((program, args)) = argv.split_first() else {
        return anyhow!("the container has an empty command line");
    };
    if let Err(e) = std::env::set_current_dir(workdir) {
        return anyhow!("workingDir {workdir}: {e}");
    }
    let err = std::process::Command::new(program)
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .exec();
    if err.kind() == std::io::ErrorKind::NotFound {
        // The container runtime's words (runc), so the simulator fails the
        // way `kubectl exec` does on a cluster.
        return anyhow!("exec: {program:?}: executable file not found in $PATH");
    }
    anyhow!("exec {program}: {err}")
}

/// Runs `argv` inside the running container whose main process is `pid`
/// (its network, UTS and mount namespaces), as its user, with its
/// environment, like `kubectl exec`. Never returns on success.
pub fn exec_in(
    pid: u32,
    uid: u32,
    gid: u32,
    groups: &[u32],
    env: &[(String, String)],
    argv: &[String],
) -> Result<Infallible> {
    let open = |ns: &str| {
        fs::File::open(format!("/proc/{pid}/ns/{ns}")).with_context(|| {
            format!("the container process {pid} is gone (opening its {ns} namespace)")
        })
    };
    let (net, uts, mnt) = (open("net")?, open("uts")?, open("mnt")?);
    setns(&net, CloneFlags::CLONE_NEWNET).context("joining the pod's network namespace")?;
    setns(&uts, CloneFlags::CLONE_NEWUTS).context("joining the pod's UTS namespace")?;
    setns(&mnt, CloneFlags::CLONE_NEWNS).context("joining the container's mount namespace")?;
    become_user(uid, gid, groups)?;
    Err(exec_command(argv, env, "/"))
}

/// Runs `argv` (a host tool) in the network namespace `netns` with the file
/// `resolv_conf` bind-mounted on `/etc/resolv.conf` (in a private mount
/// namespace), as root: the client namespace as a debug pod with the host's
/// tools. Never returns on success.
pub fn run_as_client(netns: &Path, resolv_conf: &Path, argv: &[String]) -> Result<Infallible> {
    let ns = fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    setns(&ns, CloneFlags::CLONE_NEWNET).context("joining the client network namespace")?;
    unshare(CloneFlags::CLONE_NEWNS).context("creating a mount namespace")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making mounts private")?;
    bind(resolv_conf, Path::new("/etc/resolv.conf"), true)?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    Err(exec_command(argv, &env, "/"))
}

/// Creates a symlink, replacing what is there (used for `current` log links).
pub fn replace_symlink(target: &Path, link: &Path) -> Result<()> {
    let _ = fs::remove_file(link);
    symlink(target, link).with_context(|| format!("linking {}", link.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_kubernetes_references() {
        let env = vec![("POD_NAME".to_string(), "tally-0".to_string())];
        assert_eq!(expand("--name=$(POD_NAME)", &env), "--name=tally-0");
        assert_eq!(expand("$$(POD_NAME) $(NOPE)", &env), "$(POD_NAME) $(NOPE)");
    }

    #[test]
    fn image_repository_strips_tag_and_digest() {
        assert_eq!(
            image_repository("ghcr.io/tally-dev/tally:0.1.0"),
            "ghcr.io/tally-dev/tally"
        );
        assert_eq!(
            image_repository("localhost:5000/tally@sha256:abc"),
            "localhost:5000/tally"
        );
        assert_eq!(image_repository("tally"), "tally");
    }
}
