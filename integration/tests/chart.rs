//! Assertions on the Helm chart's rendered manifests (design.md §8).
//!
//! Every value set in `chart/ci/*-values.yaml` is rendered once with
//! `helm template` (release name from the file's `# release: <name>` header,
//! namespace `tally-ci`) and parsed into k8s-openapi types. The tests check
//! the wiring tally depends on, for every set: the StatefulSet's
//! `serviceName` is the headless Service, whose records make discovery work;
//! probes hit routes that never count a visit; the pods are hardened; the
//! peer token lives only in a Secret; names fit Kubernetes' limits; values
//! reach the manifests; and the real `tally check-config` accepts the config
//! file and environment the chart gives the pods.
//!
//! helm comes from PATH or `<workspace>/.tools/bin/helm` (`scripts/check-chart`
//! installs it there). tally is `<workspace>/target/debug/tally`, or `TALLY_BIN`.
//!
//! Run: `cargo test -p tally-integration --test chart`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::Resource;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, Pod, PodSecurityContext, PodSpec, Probe, Secret, SecurityContext,
    Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy, NetworkPolicyPort};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};
use tally_integration::harness::{tally_bin, workspace_root};
use tally_integration::sim::manifest::helm_binary;

const NAMESPACE: &str = "tally-ci";
/// The uid and gid the image runs as (the distroless `nonroot` user).
const UID: i64 = 65532;
/// Routes tally serves that never count a visit and may be probed.
const PROBE_ROUTES: [&str; 3] = ["/healthz", "/health", "/readyz"];
/// Environment names the chart may give tally (design.md §7 and the config
/// keys' environment twins). `TALLY_DNS_SERVER` is for tests only.
const KNOWN_ENV: [&str; 24] = [
    "POD_NAME",
    "POD_NAMESPACE",
    "TALLY_LISTEN",
    "TALLY_PEER_LISTEN",
    "TALLY_PROBE_LISTEN",
    "TALLY_DATA_DIR",
    "TALLY_CONFIG",
    "TALLY_PEERS_SERVICE",
    "TALLY_PEERS_PORT_NAME",
    "TALLY_CLUSTER_DOMAIN",
    "TALLY_TIMEZONE",
    "TALLY_DURABILITY",
    "TALLY_SYNC_INTERVAL_MS",
    "TALLY_PEER_TIMEOUT_MS",
    "TALLY_FANOUT_DEADLINE_MS",
    "TALLY_REFRESH_INTERVAL_MS",
    "TALLY_DNS_MAX_TTL_S",
    "TALLY_PEER_TOKEN_FILE",
    "TALLY_SHUTDOWN_GRACE_S",
    "TALLY_MAX_CONNECTIONS",
    "TALLY_REQUEST_TIMEOUT_MS",
    "TALLY_HEADER_READ_TIMEOUT_MS",
    "TALLY_LOG_FORMAT",
    "TALLY_LOG_LEVEL",
];

// ---------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------

fn chart_dir() -> PathBuf {
    workspace_root().join("chart")
}

/// Runs helm and returns its standard output, or an error carrying its
/// standard error.
fn run_helm(args: &[&str]) -> Result<String> {
    let out = Command::new(helm_binary())
        .args(args)
        .current_dir(workspace_root())
        .output()
        .context("running helm: run scripts/check-chart, which installs it into .tools/bin")?;
    if !out.status.success() {
        bail!(
            "helm {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `helm template` of the chart; `extra` are further flags (`-f`, `--set`).
fn template(release: &str, extra: &[&str]) -> Result<String> {
    let chart = chart_dir();
    let chart = chart.to_str().expect("utf-8 path");
    let mut args = vec!["template", release, chart, "--namespace", NAMESPACE];
    args.extend_from_slice(extra);
    run_helm(&args)
}

fn parse_documents(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(document)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// One value set, rendered.
struct Rendered {
    /// File name under chart/ci/, for messages.
    set: String,
    release: String,
    /// chart/values.yaml with the set's values merged over it.
    values: Value,
    /// The set's own values file, to pass to helm again.
    file: PathBuf,
    docs: Vec<Value>,
}

impl Rendered {
    fn all<T: Resource + DeserializeOwned>(&self) -> Vec<T> {
        self.docs
            .iter()
            .filter(|d| {
                d.get("apiVersion").and_then(Value::as_str) == Some(T::API_VERSION)
                    && d.get("kind").and_then(Value::as_str) == Some(T::KIND)
            })
            .map(|d| {
                serde_yaml::from_value(d.clone()).unwrap_or_else(|e| {
                    panic!(
                        "{}: a {} does not parse as Kubernetes expects: {e}",
                        self.set,
                        T::KIND
                    )
                })
            })
            .collect()
    }

    fn one<T: Resource + DeserializeOwned>(&self) -> T {
        let mut all = self.all::<T>();
        assert_eq!(
            all.len(),
            1,
            "{}: expected exactly one {}, found {}",
            self.set,
            T::KIND,
            all.len()
        );
        all.remove(0)
    }

    fn raw(&self, api_version: &str, kind: &str) -> Vec<&Value> {
        self.docs
            .iter()
            .filter(|d| {
                d.get("apiVersion").and_then(Value::as_str) == Some(api_version)
                    && d.get("kind").and_then(Value::as_str) == Some(kind)
            })
            .collect()
    }

    fn statefulset(&self) -> StatefulSet {
        self.one::<StatefulSet>()
    }

    fn service_named(&self, name: &str) -> Option<Service> {
        self.all::<Service>()
            .into_iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
    }

    /// The Service the StatefulSet names as its `serviceName`.
    fn headless(&self) -> Service {
        let name = sts_spec(&self.statefulset())
            .service_name
            .clone()
            .unwrap_or_default();
        self.service_named(&name).unwrap_or_else(|| {
            panic!(
                "{}: serviceName {name:?} names no rendered Service",
                self.set
            )
        })
    }

    /// The client Service: the one that is not headless.
    fn client(&self) -> Service {
        let clients: Vec<Service> = self
            .all::<Service>()
            .into_iter()
            .filter(|s| s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) != Some("None"))
            .collect();
        assert_eq!(
            clients.len(),
            1,
            "{}: expected one client Service",
            self.set
        );
        clients.into_iter().next().unwrap()
    }

    fn pod_spec(&self) -> PodSpec {
        sts_spec(&self.statefulset())
            .template
            .spec
            .clone()
            .expect("pod template has a spec")
    }

    /// The tally container: the first, followed by exactly the `sidecars`
    /// of the values.
    fn container(&self) -> Container {
        let spec = self.pod_spec();
        let sidecars = self.values["sidecars"].as_sequence().map_or(0, |s| s.len());
        assert_eq!(
            spec.containers.len(),
            1 + sidecars,
            "{}: tally and {sidecars} sidecar(s) expected",
            self.set
        );
        assert_eq!(spec.containers[0].name, "tally", "{}", self.set);
        spec.containers[0].clone()
    }

    fn test_pod(&self) -> Pod {
        self.one::<Pod>()
    }

    fn value(&self, path: &str) -> &Value {
        let mut node = &self.values;
        for part in path.split('.') {
            node = node
                .get(part)
                .unwrap_or_else(|| panic!("values have no {path}"));
        }
        node
    }

    fn bool(&self, path: &str) -> bool {
        self.value(path)
            .as_bool()
            .unwrap_or_else(|| panic!("{path} is not a boolean"))
    }

    fn int(&self, path: &str) -> i64 {
        self.value(path)
            .as_i64()
            .unwrap_or_else(|| panic!("{path} is not an integer"))
    }

    fn str(&self, path: &str) -> &str {
        self.value(path)
            .as_str()
            .unwrap_or_else(|| panic!("{path} is not a string"))
    }

    /// The config.json the chart renders into its ConfigMap.
    fn config_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let maps = self.all::<ConfigMap>();
        let text = maps
            .iter()
            .find_map(|m| m.data.as_ref()?.get("config.json"))
            .unwrap_or_else(|| panic!("{}: no ConfigMap holds config.json", self.set));
        match serde_json::from_str(text) {
            Ok(serde_json::Value::Object(map)) => map,
            other => panic!("{}: config.json is not a JSON object: {other:?}", self.set),
        }
    }

    fn env(&self) -> Vec<EnvVar> {
        self.container().env.unwrap_or_default()
    }

    fn env_value(&self, name: &str) -> Option<String> {
        self.env()
            .into_iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value)
    }
}

fn sts_spec(sts: &StatefulSet) -> &k8s_openapi::api::apps::v1::StatefulSetSpec {
    &sts.spec
}

fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Mapping(base), Value::Mapping(over)) => {
            for (key, value) in over {
                match base.get_mut(key) {
                    Some(slot) if slot.is_mapping() && value.is_mapping() => merge(slot, value),
                    _ => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, over) => *base = over.clone(),
    }
}

fn load_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: Value =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if value.is_null() {
        Value::Mapping(Mapping::new())
    } else {
        value
    }
}

/// Every chart/ci/*-values.yaml, rendered once for all tests.
fn renders() -> &'static [Rendered] {
    static RENDERS: OnceLock<Vec<Rendered>> = OnceLock::new();
    RENDERS.get_or_init(|| {
        let dir = chart_dir().join("ci");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .filter(|p| p.to_string_lossy().ends_with("-values.yaml"))
            .collect();
        files.sort();
        assert!(
            files.len() >= 6,
            "expected at least 6 value sets in {}",
            dir.display()
        );
        let defaults = load_yaml(&chart_dir().join("values.yaml"));
        files
            .into_iter()
            .map(|file| {
                let set = file.file_name().unwrap().to_string_lossy().into_owned();
                let text = std::fs::read_to_string(&file).unwrap();
                let release = text
                    .lines()
                    .find_map(|l| l.strip_prefix("# release:"))
                    .map(|r| r.trim().to_owned())
                    .unwrap_or_else(|| panic!("{set}: first lines must say `# release: <name>`"));
                let mut values = defaults.clone();
                merge(&mut values, &load_yaml(&file));
                let rendered = template(&release, &["-f", file.to_str().unwrap()])
                    .unwrap_or_else(|e| panic!("{set}: {e:#}"));
                let docs = parse_documents(&rendered).unwrap_or_else(|e| panic!("{set}: {e:#}"));
                Rendered {
                    set,
                    release,
                    values,
                    file,
                    docs,
                }
            })
            .collect()
    })
}

/// Runs `check` on every value set and reports every failure at once.
fn for_each_set(check: impl Fn(&Rendered) -> Result<()>) {
    let failures: Vec<String> = renders()
        .iter()
        .filter_map(|r| check(r).err().map(|e| format!("{}: {e:#}", r.set)))
        .collect();
    assert!(failures.is_empty(), "\n{}\n", failures.join("\n"));
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn pod_labels(r: &Rendered) -> BTreeMap<String, String> {
    sts_spec(&r.statefulset())
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Discovery wiring
// ---------------------------------------------------------------------------

#[test]
fn service_name_is_the_headless_service() {
    for_each_set(|r| {
        let sts = r.statefulset();
        let service_name = sts_spec(&sts).service_name.clone().unwrap_or_default();
        let headless: Vec<Service> = r
            .all::<Service>()
            .into_iter()
            .filter(|s| s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None"))
            .collect();
        ensure!(
            headless.len() == 1,
            "expected one headless Service, found {}",
            headless.len()
        );
        let name = headless[0].metadata.name.clone().unwrap_or_default();
        ensure!(
            service_name == name,
            "serviceName {service_name:?} but the headless Service is {name:?}"
        );
        let peers = r.env_value("TALLY_PEERS_SERVICE");
        ensure!(
            peers.as_deref() == Some(name.as_str()),
            "TALLY_PEERS_SERVICE is {peers:?}, not the headless Service {name:?}"
        );
        Ok(())
    });
}

#[test]
fn headless_service_publishes_every_pod_for_discovery() {
    for_each_set(|r| {
        let headless = r.headless();
        let spec = headless
            .spec
            .as_ref()
            .context("headless Service has no spec")?;
        ensure!(
            spec.cluster_ip.as_deref() == Some("None"),
            "clusterIP is {:?}",
            spec.cluster_ip
        );
        ensure!(
            spec.publish_not_ready_addresses == Some(true),
            "publishNotReadyAddresses is {:?}: starting pods would be invisible to their siblings",
            spec.publish_not_ready_addresses
        );
        let selector = spec.selector.clone().unwrap_or_default();
        let labels = pod_labels(r);
        ensure!(
            labels_match(&selector, &labels),
            "headless selector {selector:?} does not match the pod template's labels {labels:?}"
        );
        let sts_selector = sts_spec(&r.statefulset())
            .selector
            .match_labels
            .clone()
            .unwrap_or_default();
        ensure!(
            labels_match(&sts_selector, &labels),
            "StatefulSet selector does not match its pods"
        );
        ensure!(
            selector == sts_selector,
            "headless selector {selector:?} differs from the StatefulSet's {sts_selector:?}"
        );

        // The SRV records _peer._tcp.<headless> carry the Service port, and
        // siblings connect to that port on pod addresses: it must be the
        // container's port named peer.
        let container_port_named = |name: &str| {
            r.container()
                .ports
                .unwrap_or_default()
                .into_iter()
                .find(|p| p.name.as_deref() == Some(name))
                .map(|p| p.container_port)
                .with_context(|| format!("the container has no port named {name}"))
        };
        let container_port = container_port_named("peer")?;
        let client_port = container_port_named("http")?;
        ensure!(
            container_port != client_port,
            "the peer port must differ from the client port ({client_port})"
        );
        let port_name = r
            .env_value("TALLY_PEERS_PORT_NAME")
            .or_else(|| {
                r.config_json()
                    .get("peers_port_name")
                    .and_then(|v| v.as_str().map(str::to_owned))
            })
            .unwrap_or_else(|| "peer".to_owned());
        let port = spec
            .ports
            .as_ref()
            .and_then(|ports| ports.iter().find(|p| p.name.as_deref() == Some(port_name.as_str())))
            .with_context(|| format!("the headless Service has no port named {port_name:?} (the SRV name tally looks up)"))?;
        ensure!(
            port_name == "peer",
            "peers_port_name is {port_name:?}, expected peer"
        );
        ensure!(
            port.port == container_port,
            "headless port {} != container port {container_port}",
            port.port
        );
        ensure!(
            matches!(&port.target_port, Some(IntOrString::String(s)) if s == "peer")
                || port.target_port == Some(IntOrString::Int(container_port)),
            "headless targetPort {:?} is not the container's peer port",
            port.target_port
        );
        // The image's own ENV sets TALLY_LISTEN, which beats the config
        // file: the chart must set both listen addresses in the environment.
        let probe_port = r.int("containerPorts.probe") as i32;
        for (var, want) in [
            ("TALLY_LISTEN", client_port),
            ("TALLY_PEER_LISTEN", container_port),
            ("TALLY_PROBE_LISTEN", probe_port),
        ] {
            let listen = r.env_value(var);
            ensure!(
                listen
                    .as_deref()
                    .is_some_and(|l| l.ends_with(&format!(":{want}"))),
                "{var} {listen:?} is not on the container port {want}"
            );
        }

        // The client Service respects readiness and reaches the same pods.
        let client = r.client();
        let cspec = client.spec.as_ref().context("client Service has no spec")?;
        ensure!(
            cspec.publish_not_ready_addresses != Some(true),
            "the client Service must wait for readiness"
        );
        ensure!(
            labels_match(&cspec.selector.clone().unwrap_or_default(), &labels),
            "the client Service's selector does not match the pods"
        );
        // The helm test pod must not become an endpoint of either Service.
        let test_labels = r.test_pod().metadata.labels.unwrap_or_default();
        ensure!(
            !labels_match(&selector, &test_labels),
            "the headless Service selects the helm test pod"
        );
        Ok(())
    });
}

#[test]
fn pods_know_who_and_where_they_are() {
    for_each_set(|r| {
        let container = r.container();
        ensure!(
            container.command.is_none(),
            "command is set; the image's entrypoint must stay tally"
        );
        ensure!(
            container.args.as_deref() == Some(&["serve".to_owned()][..]),
            "args are {:?}, expected [serve]",
            container.args
        );
        let env = r.env();
        for (name, field) in [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
        ] {
            let var = env
                .iter()
                .find(|e| e.name == name)
                .with_context(|| format!("no {name} env"))?;
            let path = var
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str());
            ensure!(
                path == Some(field),
                "{name} comes from {path:?}, not the Downward API {field}"
            );
        }
        let domain = r.env_value("TALLY_CLUSTER_DOMAIN");
        ensure!(
            domain.as_deref() == Some(r.str("clusterDomain")),
            "TALLY_CLUSTER_DOMAIN is {domain:?}, clusterDomain is {}",
            r.str("clusterDomain")
        );
        for var in &env {
            ensure!(
                KNOWN_ENV.contains(&var.name.as_str()) || !var.name.starts_with("TALLY_"),
                "the chart sets {} which is no tally setting",
                var.name
            );
            ensure!(
                var.name != "TALLY_DNS_SERVER",
                "TALLY_DNS_SERVER is for tests only"
            );
        }

        // A client Service named "tally" would otherwise inject TALLY_PORT,
        // TALLY_SERVICE_HOST, ... into the pods: variables in tally's own
        // namespace that no one set on purpose.
        ensure!(
            r.pod_spec().enable_service_links == Some(false),
            "enableServiceLinks is not false: Service env vars (TALLY_PORT, ...) would leak into tally's settings"
        );

        // The config file and the data directory are mounted where the
        // environment says.
        let mounts = container.volume_mounts.clone().unwrap_or_default();
        let config_path = r.env_value("TALLY_CONFIG").context("no TALLY_CONFIG env")?;
        let config_mount = mounts
            .iter()
            .find(|m| m.mount_path == config_path)
            .with_context(|| format!("nothing is mounted at TALLY_CONFIG={config_path}"))?;
        ensure!(
            config_mount.read_only == Some(true),
            "the config mount is writable"
        );
        let spec = r.pod_spec();
        let volumes = spec.volumes.clone().unwrap_or_default();
        let config_volume = volumes
            .iter()
            .find(|v| v.name == config_mount.name)
            .context("config mount has no volume")?;
        let cm_name = config_volume
            .config_map
            .as_ref()
            .context("config volume is not a ConfigMap")?
            .name
            .clone();
        let cm = r
            .all::<ConfigMap>()
            .into_iter()
            .find(|c| c.metadata.name.as_deref() == Some(cm_name.as_str()))
            .with_context(|| format!("ConfigMap {cm_name} is not rendered"))?;
        let key = config_mount
            .sub_path
            .clone()
            .context("config is mounted without subPath")?;
        ensure!(
            cm.data.as_ref().is_some_and(|d| d.contains_key(&key)),
            "ConfigMap {cm_name} lacks {key}"
        );

        let data_dir = r
            .env_value("TALLY_DATA_DIR")
            .context("no TALLY_DATA_DIR env")?;
        let data_mount = mounts
            .iter()
            .find(|m| m.mount_path == data_dir)
            .with_context(|| format!("nothing mounted at {data_dir}"))?;
        ensure!(
            data_mount.read_only != Some(true),
            "the data volume is read-only"
        );
        let claims = sts_spec(&r.statefulset())
            .volume_claim_templates
            .clone()
            .unwrap_or_default();
        if r.bool("persistence.enabled") {
            let claim = claims
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(data_mount.name.as_str()))
                .context("persistence is on but the data mount is not a volumeClaimTemplate")?;
            let cspec = claim.spec.as_ref().context("claim without spec")?;
            let size = cspec
                .resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage"))
                .map(|q| q.0.clone());
            ensure!(
                size.as_deref() == Some(r.str("persistence.size")),
                "claim size {size:?}"
            );
            match r.str("persistence.storageClass") {
                "" => ensure!(
                    cspec.storage_class_name.is_none(),
                    "storageClassName set though empty in values"
                ),
                "-" => ensure!(
                    cspec.storage_class_name.as_deref() == Some(""),
                    "storageClass - must render \"\""
                ),
                class => ensure!(
                    cspec.storage_class_name.as_deref() == Some(class),
                    "storageClassName {:?}",
                    cspec.storage_class_name
                ),
            }
            ensure!(
                volumes.iter().all(|v| v.name != data_mount.name),
                "data is both a volume and a claim"
            );
        } else {
            ensure!(
                claims.is_empty(),
                "persistence is off but volumeClaimTemplates are rendered"
            );
            let volume = volumes
                .iter()
                .find(|v| v.name == data_mount.name)
                .context("no data volume")?;
            ensure!(
                volume.empty_dir.is_some(),
                "persistence is off but data is not an emptyDir"
            );
        }
        let tmp = mounts
            .iter()
            .find(|m| m.mount_path == "/tmp")
            .context("no /tmp mount (root fs is read-only)")?;
        let tmp_volume = volumes
            .iter()
            .find(|v| v.name == tmp.name)
            .context("no /tmp volume")?;
        ensure!(tmp_volume.empty_dir.is_some(), "/tmp is not an emptyDir");
        Ok(())
    });
}

// ---------------------------------------------------------------------------
// Probes
// ---------------------------------------------------------------------------

fn probe_path(probe: &Probe) -> Option<&str> {
    probe.http_get.as_ref().and_then(|h| h.path.as_deref())
}

#[test]
fn probes_use_routes_that_never_count_a_visit() {
    for_each_set(|r| {
        let container = r.container();
        let probes = [
            ("startupProbe", container.startup_probe.as_ref(), "/healthz"),
            (
                "livenessProbe",
                container.liveness_probe.as_ref(),
                "/healthz",
            ),
            (
                "readinessProbe",
                container.readiness_probe.as_ref(),
                "/readyz",
            ),
        ];
        for (name, probe, expected) in probes {
            let enabled = r.bool(&format!("{name}.enabled"));
            match probe {
                None => ensure!(!enabled, "{name} is enabled in values but not rendered"),
                Some(probe) => {
                    ensure!(enabled, "{name} is disabled in values but rendered");
                    let path = probe_path(probe)
                        .with_context(|| format!("{name} is not an httpGet probe"))?;
                    ensure!(path != "/", "{name} probes / which counts a visit");
                    ensure!(
                        PROBE_ROUTES.contains(&path),
                        "{name} probes {path}, not one of {PROBE_ROUTES:?}"
                    );
                    ensure!(
                        path == expected,
                        "{name} probes {path}, expected {expected}"
                    );
                    let port = &probe.http_get.as_ref().unwrap().port;
                    // The probe port: no flood of the client or the
                    // peer port can fail the probes.
                    ensure!(
                        *port == IntOrString::String("probe".into())
                            || *port == IntOrString::Int(r.int("containerPorts.probe") as i32),
                        "{name} port {port:?} is not the probe port"
                    );
                }
            }
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------
// Security
// ---------------------------------------------------------------------------

fn check_pod_security(
    what: &str,
    pod: Option<&PodSecurityContext>,
    c: Option<&SecurityContext>,
) -> Result<()> {
    let pod = pod.with_context(|| format!("{what}: no pod securityContext"))?;
    let c = c.with_context(|| format!("{what}: no container securityContext"))?;
    let non_root = c.run_as_non_root.or(pod.run_as_non_root);
    ensure!(
        non_root == Some(true),
        "{what}: runAsNonRoot is {non_root:?}"
    );
    let uid = c.run_as_user.or(pod.run_as_user);
    ensure!(
        uid == Some(UID),
        "{what}: runAsUser is {uid:?}, expected {UID}"
    );
    let gid = c.run_as_group.or(pod.run_as_group);
    ensure!(
        gid == Some(UID),
        "{what}: runAsGroup is {gid:?}, expected {UID}"
    );
    ensure!(
        pod.fs_group == Some(UID),
        "{what}: fsGroup is {:?}, expected {UID}",
        pod.fs_group
    );
    ensure!(
        c.read_only_root_filesystem == Some(true),
        "{what}: root filesystem is writable"
    );
    ensure!(
        c.allow_privilege_escalation == Some(false),
        "{what}: allowPrivilegeEscalation is not false"
    );
    ensure!(c.privileged != Some(true), "{what}: privileged");
    let drop = c
        .capabilities
        .as_ref()
        .and_then(|c| c.drop.clone())
        .unwrap_or_default();
    ensure!(
        drop == ["ALL"],
        "{what}: capabilities drop {drop:?}, expected [ALL]"
    );
    let add = c
        .capabilities
        .as_ref()
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    ensure!(add.is_empty(), "{what}: capabilities added {add:?}");
    let seccomp = c
        .seccomp_profile
        .as_ref()
        .or(pod.seccomp_profile.as_ref())
        .map(|s| s.type_.as_str());
    ensure!(
        seccomp == Some("RuntimeDefault"),
        "{what}: seccomp profile is {seccomp:?}"
    );
    Ok(())
}

#[test]
fn pods_are_hardened_by_default() {
    for_each_set(|r| {
        let spec = r.pod_spec();
        check_pod_security(
            "tally pod",
            spec.security_context.as_ref(),
            r.container().security_context.as_ref(),
        )?;
        ensure!(
            spec.automount_service_account_token == Some(false),
            "the pod mounts a service account token"
        );
        let test = r.test_pod();
        let tspec = test.spec.as_ref().context("test pod has no spec")?;
        check_pod_security(
            "helm test pod",
            tspec.security_context.as_ref(),
            tspec
                .containers
                .first()
                .and_then(|c| c.security_context.as_ref()),
        )?;
        ensure!(
            tspec.automount_service_account_token == Some(false),
            "the test pod mounts a token"
        );
        for sa in r.all::<ServiceAccount>() {
            ensure!(
                sa.automount_service_account_token == Some(false),
                "ServiceAccount automounts its token"
            );
        }
        let accounts = r.all::<ServiceAccount>();
        ensure!(
            accounts.len() == usize::from(r.bool("serviceAccount.create")),
            "serviceAccount.create not honoured"
        );
        if let Some(account) = accounts.first() {
            ensure!(
                spec.service_account_name == account.metadata.name,
                "the pods run as {:?}, not the chart's ServiceAccount {:?}",
                spec.service_account_name,
                account.metadata.name
            );
        }
        let resources = r.container().resources.context("no resources")?;
        let requests = resources.requests.unwrap_or_default();
        ensure!(
            requests.contains_key("cpu") && requests.contains_key("memory"),
            "requests {requests:?}"
        );
        let grace = r
            .pod_spec()
            .termination_grace_period_seconds
            .context("no terminationGracePeriodSeconds")?;
        let config = r.config_json();
        let tally_grace = config
            .get("shutdown_grace_s")
            .and_then(|v| v.as_i64())
            .context("no shutdown_grace_s")?;
        // tally's own default delay applies when the chart leaves it out.
        let delay_ms = config
            .get("shutdown_delay_ms")
            .and_then(|v| v.as_i64())
            .unwrap_or(2000);
        let needed = tally_grace + (delay_ms + 999) / 1000;
        ensure!(
            grace > needed,
            "terminationGracePeriodSeconds {grace} <= shutdown_delay_ms {delay_ms} ms + shutdown_grace_s {tally_grace}"
        );
        Ok(())
    });
}

#[test]
fn peer_token_lives_only_in_a_secret() {
    // A token given in values: it is in the Secret, and nowhere in clear text.
    let token = "chart-test-token-6f1d2c9a8b";
    let text = template("tally", &["--set", &format!("auth.token={token}")]).unwrap();
    assert!(
        !text.contains(token),
        "the peer token appears in clear text in the rendered manifests"
    );
    let docs = parse_documents(&text).unwrap();
    let r = Rendered {
        set: "auth.token".into(),
        release: "tally".into(),
        values: Value::Null,
        file: PathBuf::new(),
        docs,
    };
    let secret = r.one::<Secret>();
    let stored = secret
        .data
        .as_ref()
        .and_then(|d| d.get("token"))
        .map(|b| b.0.clone());
    assert_eq!(
        stored.as_deref(),
        Some(token.as_bytes()),
        "the Secret does not hold auth.token"
    );

    for_each_set(|r| {
        let env = r.env();
        let file_env = env.iter().find(|e| e.name == "TALLY_PEER_TOKEN_FILE");
        let secrets = r.all::<Secret>();
        // Every secret value, decoded, is absent from every ConfigMap and env value.
        for secret in &secrets {
            for (key, value) in secret.data.clone().unwrap_or_default() {
                let value = String::from_utf8_lossy(&value.0).into_owned();
                ensure!(
                    value.len() >= 16,
                    "Secret key {key} holds a short token ({} bytes)",
                    value.len()
                );
                for cm in r.all::<ConfigMap>() {
                    for (ckey, cvalue) in cm.data.unwrap_or_default() {
                        ensure!(
                            !cvalue.contains(&value),
                            "ConfigMap key {ckey} holds the peer token"
                        );
                    }
                }
                ensure!(
                    env.iter()
                        .all(|e| e.value.as_deref() != Some(value.as_str())),
                    "an env var holds the peer token in clear text"
                );
            }
        }
        for cm in r.all::<ConfigMap>() {
            for (ckey, cvalue) in cm.data.unwrap_or_default() {
                ensure!(
                    !cvalue.contains("\"peer_token\""),
                    "ConfigMap key {ckey} sets peer_token"
                );
            }
        }
        if !r.bool("auth.enabled") {
            ensure!(
                file_env.is_none() && secrets.is_empty(),
                "auth is off but a token is wired"
            );
            return Ok(());
        }
        // The token file is inside a read-only mount of the right Secret.
        let path = file_env
            .and_then(|e| e.value.clone())
            .context("auth is on but no TALLY_PEER_TOKEN_FILE")?;
        let mounts = r.container().volume_mounts.unwrap_or_default();
        let mount = mounts
            .iter()
            .find(|m| path.starts_with(&format!("{}/", m.mount_path)))
            .with_context(|| format!("nothing mounts the token file {path}"))?;
        ensure!(mount.read_only == Some(true), "the token mount is writable");
        let volumes = r.pod_spec().volumes.unwrap_or_default();
        let source = volumes
            .iter()
            .find(|v| v.name == mount.name)
            .and_then(|v| v.secret.clone())
            .context("the token mount is not a Secret volume")?;
        let file = &path[mount.mount_path.len() + 1..];
        let item = source
            .items
            .unwrap_or_default()
            .into_iter()
            .find(|i| i.path == file)
            .with_context(|| format!("the Secret volume has no item for {file}"))?;
        let existing = r.str("auth.existingSecret");
        if existing.is_empty() {
            let secret = secrets
                .first()
                .context("auth is on but no Secret is rendered")?;
            ensure!(
                secret.metadata.name == source.secret_name,
                "token volume names another Secret"
            );
            ensure!(
                secret
                    .data
                    .as_ref()
                    .is_some_and(|d| d.contains_key(&item.key)),
                "Secret lacks the key {}",
                item.key
            );
        } else {
            ensure!(
                secrets.is_empty(),
                "auth.existingSecret is set but a Secret is rendered too"
            );
            ensure!(
                source.secret_name.as_deref() == Some(existing),
                "token volume ignores auth.existingSecret"
            );
            ensure!(
                item.key == r.str("auth.existingSecretKey"),
                "token volume ignores auth.existingSecretKey"
            );
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------

fn dns_label(name: &str, first_letter: bool) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && (if first_letter {
            bytes[0].is_ascii_lowercase()
        } else {
            bytes[0] != b'-'
        })
        && bytes[bytes.len() - 1] != b'-'
}

fn dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(|part| dns_label(part, false))
}

fn label_value(value: &str) -> bool {
    let b = value.as_bytes();
    b.is_empty()
        || (b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c)))
}

fn label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    prefix.is_none_or(dns_subdomain) && !name.is_empty() && label_value(name)
}

fn check_labels(what: &str, labels: Option<&BTreeMap<String, String>>) -> Result<()> {
    for (k, v) in labels.into_iter().flatten() {
        ensure!(
            label_key(k),
            "{what}: label key {k:?} is not valid (name part at most 63 characters)"
        );
        ensure!(
            label_value(v),
            "{what}: label {k}={v:?} is not a valid label value (at most 63 characters)"
        );
    }
    Ok(())
}

#[test]
fn names_fit_kubernetes_limits() {
    for_each_set(|r| {
        for doc in &r.docs {
            let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("?");
            let meta = doc.get("metadata").context("object without metadata")?;
            let name = meta
                .get("name")
                .and_then(Value::as_str)
                .context("object without a name")?;
            ensure!(
                dns_subdomain(name),
                "{kind} name {name:?} is not a DNS subdomain"
            );
            let ns = meta.get("namespace").and_then(Value::as_str);
            ensure!(
                ns == Some(NAMESPACE),
                "{kind} {name} has namespace {ns:?}, not the release's"
            );
            let labels: Option<BTreeMap<String, String>> = meta
                .get("labels")
                .map(|l| serde_yaml::from_value(l.clone()))
                .transpose()?;
            check_labels(&format!("{kind} {name}"), labels.as_ref())?;
        }
        for service in r.all::<Service>() {
            let name = service.metadata.name.clone().unwrap_or_default();
            ensure!(
                dns_label(&name, true),
                "Service name {name:?} is not a DNS-1035 label of at most 63 characters"
            );
        }
        let sts = r.statefulset();
        let name = sts.metadata.name.clone().unwrap_or_default();
        // The controller labels each pod controller-revision-hash=<name>-<hash>
        // (11 more characters), a label value of at most 63 characters.
        ensure!(
            dns_label(&name, false) && name.len() <= 52,
            "StatefulSet name {name:?} is longer than 52 characters"
        );
        let last = format!("{name}-{}", r.int("replicaCount").max(1) - 1);
        ensure!(
            dns_label(&last, false),
            "pod host name {last:?} is not a DNS label"
        );
        let spec = sts_spec(&sts);
        check_labels(
            "pod template",
            spec.template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.as_ref()),
        )?;
        check_labels("StatefulSet selector", spec.selector.match_labels.as_ref())?;
        for claim in spec.volume_claim_templates.iter().flatten() {
            check_labels("volumeClaimTemplate", claim.metadata.labels.as_ref())?;
        }
        let test = r.test_pod().metadata.name.unwrap_or_default();
        ensure!(
            dns_label(&test, false),
            "test pod name {test:?} cannot be a host name"
        );
        // The chart's naming rule: <release>-tally, or <release> when it
        // contains "tally", cut to 52 characters.
        let full = if r.release.contains("tally") {
            r.release.clone()
        } else {
            format!("{}-tally", r.release)
        };
        let expected = full
            .chars()
            .take(52)
            .collect::<String>()
            .trim_end_matches('-')
            .to_owned();
        ensure!(
            name == expected,
            "StatefulSet is {name:?}, expected {expected:?}"
        );
        Ok(())
    });
    // The long-name value set must actually reach the limit it tests.
    assert!(
        renders()
            .iter()
            .any(|r| r.statefulset().metadata.name.unwrap_or_default().len() == 52),
        "no value set has a release name long enough to hit the 52-character cut"
    );
}

// ---------------------------------------------------------------------------
// Values reach the manifests
// ---------------------------------------------------------------------------

#[test]
fn statefulset_follows_the_values() {
    for_each_set(|r| {
        let sts = r.statefulset();
        let spec = sts_spec(&sts);
        ensure!(
            spec.replicas == Some(r.int("replicaCount") as i32),
            "replicas {:?}",
            spec.replicas
        );
        ensure!(
            spec.pod_management_policy.as_deref() == Some(r.str("podManagementPolicy")),
            "podManagementPolicy {:?}",
            spec.pod_management_policy
        );
        let strategy = spec.update_strategy.clone().context("no updateStrategy")?;
        ensure!(
            strategy.type_.as_deref() == Some(r.str("updateStrategy.type")),
            "updateStrategy {:?}",
            strategy.type_
        );
        match r.str("updateStrategy.type") {
            "OnDelete" => ensure!(
                strategy.rolling_update.is_none(),
                "OnDelete with rollingUpdate is refused by the API"
            ),
            _ => {
                let partition = strategy.rolling_update.and_then(|u| u.partition);
                ensure!(
                    partition == Some(r.int("updateStrategy.rollingUpdate.partition") as i32),
                    "partition {partition:?}"
                );
            }
        }
        let retention = spec.persistent_volume_claim_retention_policy.clone();
        if r.bool("persistence.enabled") {
            let retention = retention.context("no persistentVolumeClaimRetentionPolicy")?;
            ensure!(
                retention.when_deleted.as_deref()
                    == Some(r.str("persistentVolumeClaimRetentionPolicy.whenDeleted"))
                    && retention.when_scaled.as_deref()
                        == Some(r.str("persistentVolumeClaimRetentionPolicy.whenScaled")),
                "retention policy {retention:?}"
            );
        }
        let annotations = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.clone())
            .unwrap_or_default();
        let checksum = annotations
            .get("checksum/config")
            .context("no checksum/config annotation")?;
        ensure!(
            checksum.len() == 64,
            "checksum/config {checksum:?} is not a sha256"
        );
        let grace = r.pod_spec().termination_grace_period_seconds;
        ensure!(
            grace == Some(r.int("terminationGracePeriodSeconds")),
            "terminationGracePeriodSeconds {grace:?}"
        );
        let image = r.container().image.unwrap_or_default();
        let digest = r.str("image.digest");
        if digest.is_empty() {
            let tag = r
                .value("image.tag")
                .as_str()
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .unwrap_or_else(app_version);
            ensure!(
                image == format!("{}:{tag}", r.str("image.repository")),
                "image {image}"
            );
        } else {
            ensure!(
                image == format!("{}@{digest}", r.str("image.repository")),
                "image {image}"
            );
        }
        Ok(())
    });
}

#[test]
fn services_pdb_and_monitor_follow_the_values() {
    for_each_set(|r| {
        let client = r.client();
        let spec = client.spec.clone().context("client Service without spec")?;
        ensure!(
            spec.type_.as_deref() == Some(r.str("service.type")),
            "service type {:?}",
            spec.type_
        );
        let port = spec
            .ports
            .clone()
            .unwrap_or_default()
            .into_iter()
            .next()
            .context("client Service has no port")?;
        ensure!(
            i64::from(port.port) == r.int("service.port"),
            "client port {}",
            port.port
        );
        ensure!(
            port.target_port == Some(IntOrString::String("http".into())),
            "client targetPort {:?}",
            port.target_port
        );
        if let Some(node_port) = r.value("service.nodePort").as_i64() {
            ensure!(
                port.node_port == Some(node_port as i32),
                "nodePort {:?}",
                port.node_port
            );
        } else {
            ensure!(
                port.node_port.is_none(),
                "nodePort {:?} rendered though unset",
                port.node_port
            );
        }

        let pdbs = r.all::<PodDisruptionBudget>();
        ensure!(
            pdbs.len() == usize::from(r.bool("pdb.create")),
            "pdb.create not honoured"
        );
        if let Some(pdb) = pdbs.first() {
            let pspec = pdb.spec.clone().context("PDB without spec")?;
            let selector = pspec
                .selector
                .and_then(|s| s.match_labels)
                .unwrap_or_default();
            ensure!(
                labels_match(&selector, &pod_labels(r)),
                "PDB selector does not match the pods"
            );
            ensure!(
                pspec.min_available.is_some() != pspec.max_unavailable.is_some(),
                "PDB needs exactly one of minAvailable, maxUnavailable"
            );
        }

        let monitors = r.raw("monitoring.coreos.com/v1", "ServiceMonitor");
        ensure!(
            monitors.len() == usize::from(r.bool("metrics.serviceMonitor.enabled")),
            "serviceMonitor.enabled not honoured"
        );
        if let Some(monitor) = monitors.first() {
            let selector: BTreeMap<String, String> =
                serde_yaml::from_value(monitor["spec"]["selector"]["matchLabels"].clone())?;
            let scraped: Vec<Service> = r
                .all::<Service>()
                .into_iter()
                .filter(|s| {
                    labels_match(
                        &selector,
                        s.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
                    )
                })
                .collect();
            ensure!(
                scraped.len() == 1,
                "the ServiceMonitor selects {} Services, expected the headless one",
                scraped.len()
            );
            ensure!(
                scraped[0].metadata.name == r.headless().metadata.name,
                "the ServiceMonitor does not select the headless Service"
            );
            let endpoint = &monitor["spec"]["endpoints"][0];
            ensure!(
                endpoint["port"].as_str() == Some("http"),
                "ServiceMonitor port {:?}",
                endpoint["port"]
            );
            ensure!(
                endpoint["path"].as_str() == Some("/metrics"),
                "ServiceMonitor path {:?}",
                endpoint["path"]
            );
            let namespaces = &monitor["spec"]["namespaceSelector"]["matchNames"];
            ensure!(
                namespaces[0].as_str() == Some(NAMESPACE),
                "ServiceMonitor watches {namespaces:?}"
            );
        }

        let ingresses = r.all::<Ingress>();
        ensure!(
            ingresses.len() == usize::from(r.bool("ingress.enabled")),
            "ingress.enabled not honoured"
        );
        for ingress in ingresses {
            for rule in ingress.spec.and_then(|s| s.rules).unwrap_or_default() {
                for path in rule.http.map(|h| h.paths).unwrap_or_default() {
                    let backend = path
                        .backend
                        .service
                        .context("Ingress backend is not a Service")?;
                    ensure!(
                        Some(backend.name) == client.metadata.name,
                        "Ingress routes to another Service"
                    );
                }
            }
        }
        Ok(())
    });
}

fn port_is(ports: &[NetworkPolicyPort], port: i32, protocol: &str) -> bool {
    ports
        .iter()
        .any(|p| p.port == Some(IntOrString::Int(port)) && p.protocol.as_deref() == Some(protocol))
}

#[test]
fn network_policy_admits_peers_and_dns() {
    for_each_set(|r| {
        let policies = r.all::<NetworkPolicy>();
        ensure!(
            policies.len() == usize::from(r.bool("networkPolicy.enabled")),
            "networkPolicy.enabled not honoured"
        );
        let Some(policy) = policies.first() else {
            return Ok(());
        };
        let spec = policy.spec.clone().context("NetworkPolicy without spec")?;
        let labels = pod_labels(r);
        let selector = spec
            .pod_selector
            .clone()
            .and_then(|s| s.match_labels)
            .unwrap_or_default();
        ensure!(
            labels_match(&selector, &labels),
            "the NetworkPolicy does not select the tally pods"
        );
        let port = r.int("containerPorts.http") as i32;
        let peer_port = r.int("containerPorts.peer") as i32;
        let ingress = spec.ingress.clone().unwrap_or_default();
        let peer_in = ingress.iter().any(|rule| {
            port_is(rule.ports.as_deref().unwrap_or_default(), peer_port, "TCP")
                && rule.from.iter().flatten().any(|peer| {
                    peer.namespace_selector.is_none()
                        && peer
                            .pod_selector
                            .as_ref()
                            .and_then(|s| s.match_labels.as_ref())
                            .is_some_and(|m| labels_match(m, &labels))
                })
        });
        ensure!(
            peer_in,
            "no ingress rule admits peers (this release's pods) on port {peer_port}"
        );
        // Nobody else reaches the peer port: every rule naming it admits
        // only this release's pods.
        for rule in &ingress {
            let ports = rule.ports.as_deref().unwrap_or_default();
            if ports.is_empty() || port_is(ports, peer_port, "TCP") {
                let only_release = rule.from.as_ref().is_some_and(|from| {
                    !from.is_empty()
                        && from.iter().all(|peer| {
                            peer.namespace_selector.is_none()
                                && peer.ip_block.is_none()
                                && peer
                                    .pod_selector
                                    .as_ref()
                                    .and_then(|s| s.match_labels.as_ref())
                                    .is_some_and(|m| labels_match(m, &labels))
                        })
                });
                ensure!(
                    only_release,
                    "an ingress rule admits others than the release's pods on the peer port: {rule:?}"
                );
            }
        }
        let client_in = ingress.iter().find(|rule| {
            port_is(rule.ports.as_deref().unwrap_or_default(), port, "TCP")
                && rule.from.iter().flatten().all(|peer| {
                    !peer
                        .pod_selector
                        .as_ref()
                        .and_then(|s| s.match_labels.as_ref())
                        .is_some_and(|m| labels_match(m, &labels))
                })
        });
        let client_in = client_in.context("no ingress rule for clients")?;
        if r.bool("networkPolicy.allowExternal") {
            ensure!(
                client_in.from.is_none(),
                "allowExternal is true but clients are restricted"
            );
        } else {
            let from = client_in.from.clone().unwrap_or_default();
            ensure!(
                !from.is_empty(),
                "allowExternal is false but clients come from anywhere"
            );
            // The helm test pod carries the client label, so it gets through.
            let test_labels = r.test_pod().metadata.labels.unwrap_or_default();
            ensure!(
                from.iter().any(|p| p.namespace_selector.is_none()
                    && p.pod_selector
                        .as_ref()
                        .and_then(|s| s.match_labels.as_ref())
                        .is_some_and(|m| labels_match(m, &test_labels))),
                "the helm test pod is not admitted as a client"
            );
        }
        let egress = spec.egress.clone().unwrap_or_default();
        ensure!(
            egress.iter().any(|rule| {
                let ports = rule.ports.as_deref().unwrap_or_default();
                port_is(ports, 53, "UDP") && port_is(ports, 53, "TCP")
            }),
            "no egress rule for DNS on 53/UDP and 53/TCP"
        );
        ensure!(
            egress.iter().any(|rule| {
                port_is(rule.ports.as_deref().unwrap_or_default(), peer_port, "TCP")
                    && rule.to.iter().flatten().any(|peer| {
                        peer.pod_selector
                            .as_ref()
                            .and_then(|s| s.match_labels.as_ref())
                            .is_some_and(|m| labels_match(m, &labels))
                    })
            }),
            "no egress rule to peers on port {peer_port}"
        );
        let types = spec.policy_types.unwrap_or_default();
        ensure!(
            types.contains(&"Ingress".into()) && types.contains(&"Egress".into()),
            "policyTypes {types:?}"
        );
        Ok(())
    });
}

#[test]
fn config_change_rolls_the_pods() {
    let checksum = |extra: &[&str]| -> String {
        let docs = parse_documents(&template("tally", extra).unwrap()).unwrap();
        let sts = docs
            .iter()
            .find(|d| d["kind"].as_str() == Some("StatefulSet"))
            .expect("a StatefulSet");
        sts["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            .as_str()
            .expect("checksum/config")
            .to_owned()
    };
    let base = checksum(&[]);
    assert_eq!(
        base,
        checksum(&[]),
        "checksum/config changes between identical renders"
    );
    assert_ne!(
        base,
        checksum(&["--set", "config.timezone=Europe/Paris"]),
        "a config change keeps the same checksum/config"
    );
    assert_ne!(
        base,
        checksum(&["--set", "config.log_level=debug"]),
        "a log level change keeps the same checksum/config"
    );
}

fn app_version() -> String {
    let chart = std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap();
    let chart: Value = serde_yaml::from_str(&chart).unwrap();
    chart["appVersion"]
        .as_str()
        .expect("Chart.yaml has a string appVersion")
        .to_owned()
}

#[test]
fn chart_app_version_is_the_crate_version() {
    let cargo = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
    // The [package] table's version (the workspace root is the tally crate).
    let package = cargo
        .split("\n[package]")
        .nth(1)
        .expect("Cargo.toml has a [package] table");
    let version = package
        .lines()
        .take_while(|l| !l.starts_with('['))
        .find_map(|l| l.strip_prefix("version = "))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .expect("[package] has a version");
    assert_eq!(
        app_version(),
        version,
        "chart/Chart.yaml appVersion differs from the tally crate's version"
    );
}

#[test]
fn notes_give_the_commands_for_this_release() {
    for_each_set(|r| {
        let chart = chart_dir();
        let out = run_helm(&[
            "install",
            &r.release,
            chart.to_str().unwrap(),
            "--namespace",
            NAMESPACE,
            "--dry-run=client",
            "-f",
            r.file.to_str().unwrap(),
        ])?;
        let notes = out
            .split("NOTES:")
            .nth(1)
            .context("no NOTES in helm install --dry-run")?;
        let pod = r.statefulset().metadata.name.unwrap_or_default();
        let headless = r.headless().metadata.name.unwrap_or_default();
        let client = r.client().metadata.name.unwrap_or_default();
        // The second pod, as the old lab asked (the first when there is one).
        let other = if r.int("replicaCount") > 1 { 1 } else { 0 };
        let mut wanted = vec![
            format!("kubectl exec --namespace {NAMESPACE} {pod}-0 -- tally peers"),
            format!(
                "kubectl exec --namespace {NAMESPACE} {pod}-0 -- nslookup {pod}-{other}.{headless}"
            ),
            format!(
                "{pod}-{other}.{headless}.{NAMESPACE}.svc.{}",
                r.str("clusterDomain")
            ),
            format!(
                "_peer._tcp.{headless}.{NAMESPACE}.svc.{}",
                r.str("clusterDomain")
            ),
            "/visits/total".to_owned(),
        ];
        for i in 0..r.int("replicaCount") {
            wanted.push(format!(
                "kubectl exec --namespace {NAMESPACE} {pod}-{i} -- tally visits"
            ));
        }
        wanted.push(match r.str("service.type") {
            "NodePort" => format!("-o jsonpath=\"{{.spec.ports[0].nodePort}}\" service {client}"),
            "LoadBalancer" => format!("service {client} -o jsonpath=\"{{.status.loadBalancer"),
            _ => format!("kubectl port-forward --namespace {NAMESPACE} service/{client} "),
        });
        for line in wanted {
            ensure!(notes.contains(&line), "NOTES.txt lacks {line:?}:\n{notes}");
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------
// The real binary accepts what the chart renders
// ---------------------------------------------------------------------------

struct CheckConfig {
    code: Option<i32>,
    output: String,
}

/// Runs `tally check-config --config FILE` with the container's environment:
/// every literal `value` env var of the rendered container, POD_NAME and
/// POD_NAMESPACE as the Downward API would set them for pod 0, and the
/// chart's in-container paths (config file, data directory, token file)
/// moved to temporary files; nothing else from this process' environment.
fn check_config(
    r: &Rendered,
    config: &serde_json::Map<String, serde_json::Value>,
) -> Result<CheckConfig> {
    let dir = tempfile::tempdir()?;
    let config_file = dir.path().join("config.json");
    std::fs::write(&config_file, serde_json::to_string_pretty(config)?)?;
    let data_dir = dir.path().join("data");
    std::fs::create_dir(&data_dir)?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "chart-test-peer-token-0123456789")?;

    let pod = format!("{}-0", r.statefulset().metadata.name.unwrap_or_default());
    let mut cmd = Command::new(tally_bin());
    cmd.arg("check-config")
        .arg("--config")
        .arg(&config_file)
        .env_clear();
    for var in r.env() {
        let value = match (var.name.as_str(), var.value) {
            ("POD_NAME", _) => pod.clone(),
            ("POD_NAMESPACE", _) => NAMESPACE.to_owned(),
            ("TALLY_CONFIG", _) => config_file.display().to_string(),
            ("TALLY_DATA_DIR", _) => data_dir.display().to_string(),
            ("TALLY_PEER_TOKEN_FILE", _) => token_file.display().to_string(),
            (_, Some(value)) => value,
            (name, None) => bail!("env {name} has no literal value and no stand-in"),
        };
        cmd.env(&var.name, value);
    }
    let out = cmd.output().context("running tally check-config")?;
    Ok(CheckConfig {
        code: out.status.code(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}

#[test]
fn tally_check_config_accepts_what_the_chart_renders() {
    tally_bin();
    for_each_set(|r| {
        let config = r.config_json();
        let run = check_config(r, &config)?;
        ensure!(
            run.code == Some(0),
            "tally check-config exited {:?} on the rendered config and env:\n{}\nconfig.json: {}",
            run.code,
            run.output,
            serde_json::to_string(&config)?
        );
        // check-config prints the effective configuration: the values the
        // chart passed through the environment and the file are in it.
        let headless = r.headless().metadata.name.unwrap_or_default();
        let timezone = config
            .get("timezone")
            .and_then(|v| v.as_str())
            .unwrap_or("UTC")
            .to_owned();
        for expected in [headless.as_str(), r.str("clusterDomain"), timezone.as_str()] {
            ensure!(
                run.output.contains(expected),
                "check-config's output does not show {expected:?}:\n{}",
                run.output
            );
        }
        // tally does not refuse unknown TALLY_* variables (the environment is
        // shared), so acceptance alone proves nothing about the names: each
        // variable the chart sets must show up as the source of a setting.
        for var in r.env() {
            let name = var.name.as_str();
            if name == "TALLY_CONFIG" || !(name.starts_with("TALLY_") || name.starts_with("POD_")) {
                continue;
            }
            ensure!(
                run.output.contains(name),
                "tally check-config does not report {name} as the source of any setting: tally ignores it\n{}",
                run.output
            );
        }
        // Every key of the config file is a setting tally reports.
        for key in config.keys() {
            ensure!(
                run.output
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(key.as_str())),
                "tally check-config does not report the config key {key:?}:\n{}",
                run.output
            );
        }
        Ok(())
    });

    // Controls: the same run must fail when the file holds an unknown key or
    // a bad value, so the acceptance above means something.
    let r = &renders()[0];
    let mut unknown = r.config_json();
    unknown.insert("chart_test_unknown_key".into(), serde_json::json!(1));
    let run = check_config(r, &unknown).unwrap();
    assert_eq!(
        run.code,
        Some(64),
        "an unknown config key was not refused with exit 64:\n{}",
        run.output
    );
    assert!(
        run.output.contains("chart_test_unknown_key"),
        "the refusal does not name the key:\n{}",
        run.output
    );
    let mut bad = r.config_json();
    bad.insert("durability".into(), serde_json::json!("sometimes"));
    let run = check_config(r, &bad).unwrap();
    assert_eq!(
        run.code,
        Some(64),
        "durability=sometimes was not refused with exit 64:\n{}",
        run.output
    );
}

#[test]
fn helm_test_runs_tally_check_cluster_on_the_client_service() {
    for_each_set(|r| {
        let pod = r.test_pod();
        let spec = pod.spec.as_ref().context("test pod has no spec")?;
        let container = spec
            .containers
            .first()
            .context("test pod has no container")?;
        ensure!(
            container.image == r.container().image,
            "the helm test pod runs {:?}, not the tally image {:?}",
            container.image,
            r.container().image
        );
        let client = r.client();
        let name = client.metadata.name.clone().unwrap_or_default();
        let ns = r.statefulset().metadata.namespace.unwrap_or_default();
        let port = client
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .and_then(|p| p.first())
            .map(|p| p.port)
            .context("client Service has no port")?;
        let want = vec![
            "check-cluster".to_string(),
            format!("http://{name}.{ns}.svc.{}:{port}", r.str("clusterDomain")),
            "--members".into(),
            r.int("replicaCount").to_string(),
            "--wait-s".into(),
            r.int("tests.waitSeconds").to_string(),
        ];
        ensure!(
            container.command.is_none() && container.args.as_ref() == Some(&want),
            "helm test must run the image's tally with {want:?}, got command {:?} args {:?}",
            container.command,
            container.args
        );
        Ok(())
    });
}

// ---------------------------------------------------------------------------
// What adopters need: spread, extensions, a token stable under GitOps
// ---------------------------------------------------------------------------

fn rendered(set: &str, extra: &[&str]) -> Rendered {
    let docs = parse_documents(&template("tally", extra).unwrap()).unwrap();
    Rendered {
        set: set.into(),
        release: "tally".into(),
        values: Value::Null,
        file: PathBuf::new(),
        docs,
    }
}

#[test]
fn pods_spread_over_nodes_by_default_and_the_spread_is_overridable() {
    // Default: prefer one pod of the release per node.
    let r = rendered("default", &[]);
    let anti = r
        .pod_spec()
        .affinity
        .and_then(|a| a.pod_anti_affinity)
        .expect("a default podAntiAffinity");
    assert!(
        anti.required_during_scheduling_ignored_during_execution
            .is_none()
    );
    let preferred = anti
        .preferred_during_scheduling_ignored_during_execution
        .expect("preferred (soft) anti-affinity by default");
    assert_eq!(preferred.len(), 1);
    let term = &preferred[0].pod_affinity_term;
    assert_eq!(term.topology_key, "kubernetes.io/hostname");
    let selector = term
        .label_selector
        .as_ref()
        .and_then(|s| s.match_labels.clone())
        .unwrap_or_default();
    assert!(
        labels_match(&selector, &pod_labels(&r)),
        "{selector:?} does not select the release's pods"
    );

    // hard: one node per pod, required.
    let hard = rendered("hard", &["--set", "podAntiAffinityPreset=hard"]);
    let anti = hard.pod_spec().affinity.unwrap().pod_anti_affinity.unwrap();
    let required = anti
        .required_during_scheduling_ignored_during_execution
        .unwrap();
    assert_eq!(required[0].topology_key, "kubernetes.io/hostname");
    assert!(
        anti.preferred_during_scheduling_ignored_during_execution
            .is_none()
    );

    // Off, or replaced by the user's own affinity.
    let off = rendered("off", &["--set", "podAntiAffinityPreset="]);
    assert!(off.pod_spec().affinity.is_none());
    let own = rendered(
        "own",
        &[
            "--set",
            "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=disk",
            "--set",
            "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
        ],
    );
    let affinity = own.pod_spec().affinity.unwrap();
    assert!(affinity.node_affinity.is_some() && affinity.pod_anti_affinity.is_none());
}

#[test]
fn extra_volumes_env_sidecars_and_init_containers_reach_the_pod() {
    let file = chart_dir().join("ci/extras-sidecar-values.yaml");
    let r = rendered(
        "extras-sidecar-values.yaml",
        &["-f", file.to_str().unwrap()],
    );
    let spec = r.pod_spec();
    let names = |c: &[Container]| c.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&spec.containers), ["tally", "log-shipper"]);
    assert_eq!(
        names(spec.init_containers.as_deref().unwrap_or_default()),
        ["wait-for-ca"]
    );
    let tally = &spec.containers[0];
    assert!(
        tally
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.name == "ca-bundle" && m.mount_path == "/etc/ssl/corp")
    );
    let env_from = tally.env_from.as_ref().expect("envFrom");
    assert_eq!(
        env_from[0].config_map_ref.as_ref().map(|c| c.name.as_str()),
        Some("tally-extra-settings")
    );
    assert!(
        spec.volumes
            .as_ref()
            .unwrap()
            .iter()
            .any(|v| v.name == "ca-bundle" && v.config_map.is_some())
    );
    // The chart's own mounts and volumes are still there.
    for mount in ["data", "tmp", "config", "peer-token"] {
        assert!(
            tally
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.name == mount),
            "{mount} mount lost"
        );
    }
}

#[test]
fn an_existing_secret_makes_every_render_the_same() {
    let gitops = ["--set", "auth.existingSecret=tally-peer-token"];
    let first = template("tally", &gitops).unwrap();
    let second = template("tally", &gitops).unwrap();
    assert!(
        first == second,
        "two renders with auth.existingSecret differ"
    );
    let r = rendered("existingSecret", &gitops);
    assert!(r.all::<Secret>().is_empty(), "the chart made a Secret");
    let volume = r
        .pod_spec()
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "peer-token")
        .unwrap();
    assert_eq!(
        volume.secret.unwrap().secret_name.as_deref(),
        Some("tally-peer-token")
    );
    // Without it, every render makes a new token (lookup finds nothing
    // under helm template): what NOTES.txt warns about.
    let a = template("tally", &[]).unwrap();
    let b = template("tally", &[]).unwrap();
    assert!(a != b, "two renders of a generated token were equal");
}
