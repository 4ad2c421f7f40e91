//! The rendered chart as typed Kubernetes objects.
//!
//! `helm template` prints a stream of YAML documents; each one is read into a
//! `serde_yaml::Value` only long enough to see its `kind`, then into the typed
//! `k8s-openapi` struct for the kinds the simulator models. `helm test` hook
//! Pods are kept apart ([`Manifests::test_pods`]): they are not installed,
//! only run by `scripts/cluster test`. Every other kind and hook is listed in
//! [`Manifests::ignored`] so `up` can say what it does not model.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;

/// Everything the simulator reads from one rendering of the chart.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    /// The StatefulSets (the simulator runs exactly one).
    pub stateful_sets: Vec<StatefulSet>,
    /// Services: the DNS server and the Service proxy are built from these.
    pub services: Vec<Service>,
    /// ConfigMaps: volumes and `configMapKeyRef` env read them.
    pub config_maps: Vec<ConfigMap>,
    /// Secrets: volumes and `secretKeyRef` env read them.
    pub secrets: Vec<Secret>,
    /// NetworkPolicies: enforced in the pods' network namespaces (`netpol`).
    pub network_policies: Vec<NetworkPolicy>,
    /// Pods annotated `helm.sh/hook: test`: run by `test`, never installed.
    pub test_pods: Vec<Pod>,
    /// `Kind/name` of every object the simulator does not model
    /// (PodDisruptionBudget, ServiceAccount, other hooks, ...), for the `up`
    /// report.
    pub ignored: Vec<String>,
}

impl Manifests {
    /// Parses a multi-document YAML stream as printed by `helm template`.
    pub fn parse(yaml: &str) -> Result<Self> {
        let mut out = Manifests::default();
        for (index, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
            let value = serde_yaml::Value::deserialize(doc).with_context(|| {
                format!("rendered manifest document #{index} is not valid YAML")
            })?;
            if value.is_null() {
                continue;
            }
            let kind = value
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or("")
                .to_string();
            let name = value
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(|n| n.as_str())
                .unwrap_or("<unnamed>")
                .to_string();
            let hook = value
                .get("metadata")
                .and_then(|m| m.get("annotations"))
                .and_then(|a| a.get("helm.sh/hook"))
                .map(|h| h.as_str().unwrap_or("").to_string());
            let ctx = || format!("rendered {kind} {name:?} does not match the Kubernetes schema");
            if let Some(hook) = hook {
                // `helm test` runs the hooks of event `test` (`test-success`
                // is its old name); every other hook event is not modelled.
                let test = hook
                    .split(',')
                    .any(|e| matches!(e.trim(), "test" | "test-success"));
                if test && kind == "Pod" {
                    out.test_pods
                        .push(serde_yaml::from_value(value).with_context(ctx)?);
                } else {
                    out.ignored
                        .push(format!("{kind}/{name} (helm hook {hook:?})"));
                }
                continue;
            }
            match kind.as_str() {
                "StatefulSet" => out
                    .stateful_sets
                    .push(serde_yaml::from_value(value).with_context(ctx)?),
                "Service" => out
                    .services
                    .push(serde_yaml::from_value(value).with_context(ctx)?),
                "ConfigMap" => out
                    .config_maps
                    .push(serde_yaml::from_value(value).with_context(ctx)?),
                "Secret" => out
                    .secrets
                    .push(serde_yaml::from_value(value).with_context(ctx)?),
                "NetworkPolicy" => out
                    .network_policies
                    .push(serde_yaml::from_value(value).with_context(ctx)?),
                "" => bail!("rendered manifest document #{index} has no `kind`"),
                _ => out.ignored.push(format!("{kind}/{name}")),
            }
        }
        if out.stateful_sets.len() != 1 {
            bail!(
                "the rendered chart has {} StatefulSets; the simulator runs exactly one",
                out.stateful_sets.len()
            );
        }
        Ok(out)
    }

    /// Prints the modelled objects back as a YAML stream (used by tests that
    /// patch a rendered object before starting the simulator).
    pub fn to_yaml(&self) -> Result<String> {
        let mut docs = Vec::new();
        for s in &self.stateful_sets {
            docs.push(serde_yaml::to_string(s)?);
        }
        for s in &self.services {
            docs.push(serde_yaml::to_string(s)?);
        }
        for c in &self.config_maps {
            docs.push(serde_yaml::to_string(c)?);
        }
        for s in &self.secrets {
            docs.push(serde_yaml::to_string(s)?);
        }
        for p in &self.network_policies {
            docs.push(serde_yaml::to_string(p)?);
        }
        for p in &self.test_pods {
            docs.push(serde_yaml::to_string(p)?);
        }
        Ok(docs.join("---\n"))
    }

    /// The one StatefulSet.
    pub fn stateful_set(&self) -> &StatefulSet {
        &self.stateful_sets[0]
    }

    /// The one StatefulSet, for patching.
    pub fn stateful_set_mut(&mut self) -> &mut StatefulSet {
        &mut self.stateful_sets[0]
    }

    /// The namespace everything lives in: the StatefulSet's, else `default`
    /// (what `helm template` without `--namespace` means).
    pub fn namespace(&self) -> String {
        self.stateful_set()
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string())
    }

    /// A ConfigMap by name.
    pub fn config_map(&self, name: &str) -> Option<&ConfigMap> {
        self.config_maps
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
    }

    /// A Secret by name.
    pub fn secret(&self, name: &str) -> Option<&Secret> {
        self.secrets
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
    }

    /// One key of a ConfigMap (`data`, then `binaryData`).
    pub fn config_map_key(&self, name: &str, key: &str) -> Option<Vec<u8>> {
        let cm = self.config_map(name)?;
        if let Some(v) = cm.data.as_ref().and_then(|d| d.get(key)) {
            return Some(v.as_bytes().to_vec());
        }
        cm.binary_data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
    }

    /// All keys of a ConfigMap.
    pub fn config_map_entries(&self, name: &str) -> Option<Vec<(String, Vec<u8>)>> {
        let cm = self.config_map(name)?;
        let mut out: Vec<(String, Vec<u8>)> = Vec::new();
        for (k, v) in cm.data.iter().flatten() {
            out.push((k.clone(), v.as_bytes().to_vec()));
        }
        for (k, v) in cm.binary_data.iter().flatten() {
            out.push((k.clone(), v.0.clone()));
        }
        Some(out)
    }

    /// One key of a Secret (`stringData` wins over `data`, as the API server
    /// merges them).
    pub fn secret_key(&self, name: &str, key: &str) -> Option<Vec<u8>> {
        let s = self.secret(name)?;
        if let Some(v) = s.string_data.as_ref().and_then(|d| d.get(key)) {
            return Some(v.as_bytes().to_vec());
        }
        s.data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
    }

    /// All keys of a Secret.
    pub fn secret_entries(&self, name: &str) -> Option<Vec<(String, Vec<u8>)>> {
        let s = self.secret(name)?;
        let mut out: std::collections::BTreeMap<String, Vec<u8>> =
            std::collections::BTreeMap::new();
        for (k, v) in s.data.iter().flatten() {
            out.insert(k.clone(), v.0.clone());
        }
        for (k, v) in s.string_data.iter().flatten() {
            out.insert(k.clone(), v.as_bytes().to_vec());
        }
        Some(out.into_iter().collect())
    }
}

/// The helm to run: `$HELM`, else `helm` from PATH, else the one
/// `scripts/lib.sh need_helm` installs into `.tools/bin`.
pub fn helm_binary() -> std::path::PathBuf {
    if let Some(h) = std::env::var_os("HELM") {
        return h.into();
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("helm").is_file()))
        .unwrap_or(false);
    if on_path {
        return "helm".into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/helm")
}

/// Runs `helm template <release> <chart> <args...>` and returns its output.
pub fn helm_template(chart: &Path, release: &str, args: &[String]) -> Result<String> {
    let output = Command::new(helm_binary())
        .arg("template")
        .arg(release)
        .arg(chart)
        .args(args)
        .output()
        .map_err(|e| {
            anyhow!(
                "could not run `helm` ({e}); install it with `source scripts/lib.sh && need_helm` \
                 (it goes into .tools/bin) and put it on PATH"
            )
        })?;
    if !output.status.success() {
        bail!(
            "`helm template {release} {} {}` failed: {}",
            chart.display(),
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).context("helm printed non-UTF-8 output")
}
