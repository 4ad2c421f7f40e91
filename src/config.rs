//! Settings: one table ([`SETTINGS`]) drives the command-line flags, the
//! environment variables, the config-file keys, `--help`, `check-config` and
//! the table in docs/configuration.md, so the four cannot drift apart.
//!
//! Precedence is flags > environment (`TALLY_*`, plus `POD_NAME` and
//! `POD_NAMESPACE` from the Downward API) > JSON config file > defaults. Every
//! value remembers where it came from, so an error names the key *and* the
//! source, and `tally check-config` can show both. Nothing unreadable is
//! passed over: a value that is not UTF-8, a file over [`MAX_FILE_BYTES`],
//! a key given twice or a value of the wrong JSON type is an error, and
//! `TALLY_*` variables no setting reads are reported.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::tz::TimeZone;
use serde::de::{self, MapAccess, Visitor};

/// Exit code for bad configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: u8 = 64;

/// One setting: its config-file key, flag, environment variable and default.
#[derive(Debug)]
pub struct Setting {
    /// Key in the JSON config file; the flag is the same with `-` for `_`.
    pub key: &'static str,
    /// Environment variable that sets it.
    pub env: &'static str,
    /// Default, as text; empty means "not set".
    pub default: &'static str,
    /// The JSON type the config file must give it.
    pub kind: Kind,
    /// One line for `--help` and docs/configuration.md.
    pub help: &'static str,
}

/// A setting's JSON type in the config file. Flags and environment
/// variables are text either way; the file is typed, so that
/// `"max_connections": "10"` is a mistake found, not a guess made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Number,
}

impl Kind {
    fn expected(self) -> &'static str {
        match self {
            Kind::Text => "a JSON string",
            Kind::Number => "a JSON number (no quotes)",
        }
    }
}

macro_rules! settings {
    ($( $key:literal, $env:literal, $default:literal, $kind:ident, $help:literal; )*) => {
        /// Every setting tally understands, in `--help` order.
        pub const SETTINGS: &[Setting] = &[
            $( Setting { key: $key, env: $env, default: $default, kind: Kind::$kind, help: $help }, )*
        ];
    };
}

settings! {
    "listen", "TALLY_LISTEN", "0.0.0.0:8080", Text, "Address and port to serve clients on (every route but the peer routes)";
    "peer_listen", "TALLY_PEER_LISTEN", "0.0.0.0:8081", Text, "Address and port to serve siblings on (peer routes, /healthz, /readyz only)";
    "probe_listen", "TALLY_PROBE_LISTEN", "", Text, "Address and port of a listener for kubelet's probes only (/healthz, /readyz), with its own connection limit, so no flood of the other ports starves them (empty: none; the chart sets it)";
    "data_dir", "TALLY_DATA_DIR", "./data", Text, "Directory holding this pod's counter (its PersistentVolume)";
    "pod_name", "POD_NAME", "", Text, "This pod's name, <statefulset>-<ordinal> (default: the hostname)";
    "namespace", "POD_NAMESPACE", "default", Text, "Kubernetes namespace of the pod";
    "peers_service", "TALLY_PEERS_SERVICE", "", Text, "Headless Service whose DNS records list the siblings (empty: standalone)";
    "peers_port_name", "TALLY_PEERS_PORT_NAME", "peer", Text, "Named peer port of the headless Service, as in its SRV records";
    "cluster_domain", "TALLY_CLUSTER_DOMAIN", "cluster.local", Text, "Kubernetes cluster domain";
    "dns_server", "TALLY_DNS_SERVER", "", Text, "DNS server IP[:port] instead of /etc/resolv.conf's (for tests)";
    "dns_max_ttl_s", "TALLY_DNS_MAX_TTL_S", "5", Number, "Longest time a DNS answer is cached, in seconds";
    "timezone", "TALLY_TIMEZONE", "UTC", Text, "IANA time zone of the time shown on the page";
    "durability", "TALLY_DURABILITY", "group-commit", Text, "group-commit (fdatasync before each answer), periodic or none";
    "sync_interval_ms", "TALLY_SYNC_INTERVAL_MS", "1000", Number, "How often `periodic` durability syncs, in milliseconds";
    "commit_timeout_ms", "TALLY_COMMIT_TIMEOUT_MS", "2000", Number, "Longest a visit waits for its commit (then 503, never counted); a commit stuck longer fails readiness. Below request_timeout_ms";
    "peer_timeout_ms", "TALLY_PEER_TIMEOUT_MS", "300", Number, "Time limit for one sibling's answer, in milliseconds";
    "fanout_deadline_ms", "TALLY_FANOUT_DEADLINE_MS", "1000", Number, "Time limit for the whole fan-out to the siblings, in milliseconds";
    "refresh_interval_ms", "TALLY_REFRESH_INTERVAL_MS", "5000", Number, "Background refresh of the cluster view, in milliseconds (0: off)";
    "peer_token_file", "TALLY_PEER_TOKEN_FILE", "", Text, "File holding the shared token siblings must present (empty: no token)";
    "shutdown_delay_ms", "TALLY_SHUTDOWN_DELAY_MS", "2000", Number, "After SIGTERM, milliseconds of failing readiness while still serving, so the pod leaves the Service first";
    "shutdown_grace_s", "TALLY_SHUTDOWN_GRACE_S", "10", Number, "Seconds in-flight requests get to finish after SIGTERM";
    "max_connections", "TALLY_MAX_CONNECTIONS", "1024", Number, "Most client connections served at once";
    "request_timeout_ms", "TALLY_REQUEST_TIMEOUT_MS", "10000", Number, "Time limit for one request, in milliseconds";
    "header_read_timeout_ms", "TALLY_HEADER_READ_TIMEOUT_MS", "5000", Number, "Time limit for a client to send its request headers, in milliseconds";
    "log_format", "TALLY_LOG_FORMAT", "text", Text, "Log format: text or json";
    "log_level", "TALLY_LOG_LEVEL", "info", Text, "Log filter, e.g. info or tally=debug";
}

/// Environment variable naming the config file (the flag is `--config`).
pub const CONFIG_ENV: &str = "TALLY_CONFIG";

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag(String),
    Env(&'static str),
    File(PathBuf),
    Default,
    /// Derived at start-up (the hostname for `pod_name`).
    Derived(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(flag) => write!(f, "flag {flag}"),
            Source::Env(var) => write!(f, "environment variable {var}"),
            Source::File(path) => write!(f, "config file {}", path.display()),
            Source::Default => f.write_str("default"),
            Source::Derived(how) => f.write_str(how),
        }
    }
}

/// Longest config file read. A tally config file is a few hundred bytes;
/// the bound keeps `--config /dev/zero` (or a log file named by mistake)
/// from filling memory.
pub const MAX_FILE_BYTES: usize = 1 << 20;

/// What went wrong reading the settings. Every variant exits 64.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read config file {path}: {source} (set --config or TALLY_CONFIG to a readable JSON file)"
    )]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "config file {path} is larger than the {MAX_FILE_BYTES}-byte limit: a tally config file is a small JSON object; \
         check that --config or TALLY_CONFIG names it"
    )]
    FileTooLarge { path: PathBuf },
    #[error("config file {path} is not a JSON object: {reason}")]
    FileSyntax { path: PathBuf, reason: String },
    #[error("config file {path} is not UTF-8 (byte {offset}{within}): save it as UTF-8")]
    FileNotUtf8 {
        path: PathBuf,
        offset: usize,
        /// `, in the value of `key`` when the byte is inside one.
        within: String,
    },
    #[error("cannot read the value of `{key}` in config file {path}: {reason}")]
    FileValue {
        key: String,
        path: PathBuf,
        reason: String,
    },
    #[error("unknown key `{key}` in config file {path}; known keys: {known}")]
    UnknownKey {
        key: String,
        path: PathBuf,
        known: String,
    },
    #[error("key `{key}` appears more than once in config file {path}: keep one of them")]
    DuplicateKey { key: String, path: PathBuf },
    #[error(
        "`{key}` in config file {path} must be {expected}, not {found}: write it like {example}, \
         or remove the key to use the default"
    )]
    WrongType {
        key: &'static str,
        path: PathBuf,
        expected: &'static str,
        found: String,
        example: String,
    },
    #[error(
        "the value of `{key}` from {origin} is not UTF-8 (read with the bad bytes replaced: {lossy:?}): \
         settings are text; give it a UTF-8 value"
    )]
    NotUtf8 {
        key: &'static str,
        origin: Source,
        lossy: String,
    },
    #[error("invalid value {value:?} for `{key}` from {origin}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        origin: Source,
        reason: String,
    },
}

/// How durable an acknowledged visit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fdatasync before answering; concurrent visits share one sync.
    GroupCommit,
    /// Written before answering, synced every `sync_interval`: a power loss
    /// can lose up to one interval of acknowledged visits.
    Periodic,
    /// Written before answering, never synced by tally: a power loss can lose
    /// whatever the kernel had not yet written back.
    None,
}

impl Durability {
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::GroupCommit => "group-commit",
            Durability::Periodic => "periodic",
            Durability::None => "none",
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The effective, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address the client server binds.
    pub listen: SocketAddr,
    /// Address the peer server binds: siblings only, kept apart so client
    /// load cannot starve the peer routes or the probes (etcd's 2380).
    pub peer_listen: SocketAddr,
    /// Kubelet's probes only, when set.
    pub probe_listen: Option<SocketAddr>,
    /// Where the counter lives; one directory per PersistentVolume.
    pub data_dir: PathBuf,
    /// This pod's name (`<statefulset>-<ordinal>` in a StatefulSet).
    pub pod_name: String,
    /// Namespace, part of every DNS name we look up.
    pub namespace: String,
    /// Headless Service to discover siblings through; `None` = standalone.
    pub peers_service: Option<String>,
    /// SRV port name (`_<name>._tcp`).
    pub peers_port_name: String,
    /// Cluster DNS domain, e.g. `cluster.local`.
    pub cluster_domain: String,
    /// Nameserver override for tests; `None` reads `/etc/resolv.conf`.
    pub dns_server: Option<SocketAddr>,
    /// Cap on DNS caching, so stale membership cannot outlive one refresh.
    pub dns_max_ttl: Duration,
    /// Zone of the time shown on the page, with its IANA name.
    pub timezone: (String, TimeZone),
    /// How durable an acknowledged visit is.
    pub durability: Durability,
    /// Sync period for [`Durability::Periodic`].
    pub sync_interval: Duration,
    /// Longest a visit waits for its commit; a longer commit is stuck.
    pub commit_timeout: Duration,
    /// Time limit for one peer's answer.
    pub peer_timeout: Duration,
    /// Time limit for a whole fan-out.
    pub fanout_deadline: Duration,
    /// Background refresh period of the cluster view; `None` = off.
    pub refresh_interval: Option<Duration>,
    /// File with the shared peer token; `None` = peer route is open.
    pub peer_token_file: Option<PathBuf>,
    /// After SIGTERM, how long to keep serving with readiness failing.
    pub shutdown_delay: Duration,
    /// How long in-flight requests may run on after SIGTERM.
    pub shutdown_grace: Duration,
    /// Cap on concurrent client connections.
    pub max_connections: usize,
    /// Time limit for one request.
    pub request_timeout: Duration,
    /// Time limit for a client to send its headers (slowloris).
    pub header_read_timeout: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// `tracing` filter directive.
    pub log_level: String,
    /// Every setting's effective value and where it came from, for
    /// `check-config`.
    pub provenance: Vec<(&'static str, String, Source)>,
    /// `TALLY_*` variables in the environment that no setting reads (a
    /// misspelt setting, most likely): `serve` warns about each,
    /// `check-config` refuses them.
    pub unknown_env: Vec<String>,
}

/// The raw inputs as the operating system gives them: flags, the
/// environment and maybe a config file path, not yet known to be UTF-8.
pub struct Sources<'a> {
    /// `(key, value)` for each flag given on the command line.
    pub flags: &'a [(&'static str, OsString)],
    /// `--config` if given.
    pub config_flag: Option<OsString>,
    /// The whole environment (unknown `TALLY_*` names are looked for).
    pub env: &'a BTreeMap<OsString, OsString>,
}

/// `TALLY_*` variables that are not settings: `TALLY_CONFIG` names the
/// file; the others are set around tally, by its scripts and tests
/// (`scripts/`, `integration/`), and `TALLY_URL`, which the chart's
/// NOTES.txt has users export. A developer's shell holds them when running
/// `tally check-config`, so they must not be refused.
const NOT_SETTINGS: &[&str] = &[
    CONFIG_ENV,
    "TALLY_APT_UPDATED",
    "TALLY_BIN",
    "TALLY_CHAOS_FEATURES",
    "TALLY_CONTAINER_ENGINE",
    "TALLY_EXPECT_VERSION",
    "TALLY_IMAGE_REPOSITORY",
    "TALLY_URL",
    "TALLY_WRITE_SEEDS",
];

/// The local StatefulSet simulator's variables (`integration/src/sim`).
const NOT_SETTING_PREFIX: &str = "TALLY_SIM_";

/// Kubernetes' service links: a Service named `tally` or `tally-*` in the
/// namespace gives every pod that does not set `enableServiceLinks: false`
/// (the chart does) `TALLY_SERVICE_HOST`, `TALLY_SERVICE_PORT[_<NAME>]`,
/// `TALLY_PORT` and `TALLY_PORT_<port>_<PROTO>[_PROTO|_PORT|_ADDR]`. They
/// are Kubernetes', not misspelt settings.
fn is_service_link(name: &str) -> bool {
    if name.ends_with("_SERVICE_HOST") || name.contains("_SERVICE_PORT") || name.ends_with("_PORT")
    {
        return true;
    }
    let mut parts = name.rsplit("_PORT_").next().unwrap_or_default().split('_');
    let port = parts.next().unwrap_or_default();
    let proto = parts.next().unwrap_or_default();
    let field = parts.next();
    name.contains("_PORT_")
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && matches!(proto, "TCP" | "UDP" | "SCTP")
        && matches!(field, None | Some("PROTO" | "PORT" | "ADDR"))
        && parts.next().is_none()
}

/// The `TALLY_*` names in `env` that no setting reads, sorted.
fn unknown_env<'a>(names: impl Iterator<Item = &'a OsString>) -> Vec<String> {
    names
        .map(|name| name.to_string_lossy())
        .filter(|name| name.starts_with("TALLY_"))
        .filter(|name| {
            !SETTINGS.iter().any(|s| s.env == name)
                && !NOT_SETTINGS.contains(&name.as_ref())
                && !name.starts_with(NOT_SETTING_PREFIX)
                && !is_service_link(name)
        })
        .map(|name| name.into_owned())
        .collect()
}

/// `value` as text, or an error naming the setting and where it came from.
fn utf8(
    key: &'static str,
    value: &OsStr,
    origin: impl FnOnce() -> Source,
) -> Result<String, ConfigError> {
    value
        .to_str()
        .map(str::to_string)
        .ok_or_else(|| ConfigError::NotUtf8 {
            key,
            origin: origin(),
            lossy: value.to_string_lossy().into_owned(),
        })
}

impl Config {
    /// Resolve every setting from the sources, validate, and type it.
    pub fn load(sources: &Sources<'_>) -> Result<Config, ConfigError> {
        let flags = sources
            .flags
            .iter()
            .map(|(key, value)| {
                let text = utf8(key, value, || Source::Flag(format!("--{}", flag_name(key))))?;
                Ok((*key, text))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        // Every variable a setting reads is checked, even one a flag
        // overrides: a value that cannot be read is a mistake either way.
        let mut env = BTreeMap::new();
        for (key, var) in SETTINGS
            .iter()
            .map(|s| (s.key, s.env))
            .chain([("config", CONFIG_ENV)])
        {
            if let Some(value) = sources.env.get(OsStr::new(var)) {
                env.insert(var, utf8(key, value, || Source::Env(var))?);
            }
        }
        let config_path = match &sources.config_flag {
            Some(path) => Some(utf8("config", path, || Source::Flag("--config".into()))?),
            None => env.get(CONFIG_ENV).filter(|v| !v.is_empty()).cloned(),
        };
        let file = match config_path {
            Some(path) => Some(ConfigFile::read(Path::new(&path))?),
            None => None,
        };
        let mut config = Config::resolve(&flags, &|var| env.get(var).cloned(), file.as_ref())?;
        config.unknown_env = unknown_env(sources.env.keys());
        Ok(config)
    }

    /// Resolves every setting from flags, environment, an already parsed
    /// config file and the defaults, in that order; validates and types it.
    pub fn resolve(
        flags: &[(&'static str, String)],
        env: &dyn Fn(&str) -> Option<String>,
        file: Option<&ConfigFile>,
    ) -> Result<Config, ConfigError> {
        let mut raw = Raw::default();
        for setting in SETTINGS {
            let flag = flags.iter().rev().find(|(k, _)| *k == setting.key);
            let value = if let Some((_, v)) = flag {
                (
                    v.clone(),
                    Source::Flag(format!("--{}", flag_name(setting.key))),
                )
            } else if let Some(v) = env(setting.env) {
                (v, Source::Env(setting.env))
            } else if let Some(file) = file
                && let Some(v) = file.values.get(setting.key)
            {
                (v.clone(), Source::File(file.path.clone()))
            } else if setting.key == "pod_name" {
                (hostname(), Source::Derived("the hostname"))
            } else {
                (setting.default.to_string(), Source::Default)
            };
            raw.values.insert(setting.key, value);
        }
        raw.into_config()
    }
}

/// The flag for a key: `data_dir` → `data-dir`.
pub fn flag_name(key: &str) -> String {
    key.replace('_', "-")
}

/// A config file's settings as text, before validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    /// Where the file is; errors and `check-config` name it.
    pub path: PathBuf,
    /// Setting key → value (numbers as JSON spells them).
    pub values: BTreeMap<String, String>,
}

impl ConfigFile {
    /// Reads (at most [`MAX_FILE_BYTES`]) and parses the file at `path`.
    pub fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
        let io = |source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .map_err(io)?
            .take(MAX_FILE_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() > MAX_FILE_BYTES {
            return Err(ConfigError::FileTooLarge {
                path: path.to_path_buf(),
            });
        }
        ConfigFile::parse(path, &bytes)
    }

    /// Parses a config file's bytes: a JSON object of known keys, each once,
    /// each with its setting's JSON type. `path` only names the file in
    /// errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<ConfigFile, ConfigError> {
        if let Err(bad) = std::str::from_utf8(bytes) {
            // Parse up to the bad byte to learn whose value holds it.
            let offset = bad.valid_up_to();
            let within = match parse_entries(&bytes[..offset]) {
                Err((Some(At::Value(key)), _)) => format!(", in the value of `{key}`"),
                _ => String::new(),
            };
            return Err(ConfigError::FileNotUtf8 {
                path: path.to_path_buf(),
                offset,
                within,
            });
        }
        let entries = parse_entries(bytes).map_err(|(at, reason)| match at {
            Some(At::Value(key)) => ConfigError::FileValue {
                key,
                path: path.to_path_buf(),
                reason,
            },
            _ => ConfigError::FileSyntax {
                path: path.to_path_buf(),
                reason,
            },
        })?;
        let mut values = BTreeMap::new();
        for (key, value) in entries {
            let Some(setting) = SETTINGS.iter().find(|s| s.key == key) else {
                return Err(ConfigError::UnknownKey {
                    key,
                    path: path.to_path_buf(),
                    known: SETTINGS
                        .iter()
                        .map(|s| s.key)
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            if values.contains_key(&key) {
                // serde_json keeps the last one silently; which one the
                // author meant is not ours to guess.
                return Err(ConfigError::DuplicateKey {
                    key,
                    path: path.to_path_buf(),
                });
            }
            let text = match (setting.kind, value) {
                (Kind::Text, serde_json::Value::String(s)) => s,
                (Kind::Number, serde_json::Value::Number(n)) => n.to_string(),
                (kind, other) => {
                    let example = match kind {
                        Kind::Text => format!("\"{}\": \"{}\"", setting.key, setting.default),
                        Kind::Number => format!("\"{}\": {}", setting.key, setting.default),
                    };
                    return Err(ConfigError::WrongType {
                        key: setting.key,
                        path: path.to_path_buf(),
                        expected: kind.expected(),
                        found: json_type(&other),
                        example,
                    });
                }
            };
            values.insert(key, text);
        }
        Ok(ConfigFile {
            path: path.to_path_buf(),
            values,
        })
    }
}

/// How a wrong value looks, for the error: its type and the value.
fn json_type(value: &serde_json::Value) -> String {
    let kind = match value {
        serde_json::Value::Null => return "null".into(),
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    };
    let shown = value.to_string();
    let mut short: String = shown.chars().take(40).collect();
    if short.len() < shown.len() {
        short.push('…');
    }
    format!("{kind} ({short})")
}

/// Where in the object a parse stopped, so an error can name the key.
#[derive(Debug)]
enum At {
    /// Reading a key (after the one named, if any).
    Key,
    /// Reading this key's value.
    Value(String),
}

/// The file's top-level `(key, value)` pairs in order, duplicates kept
/// (a `serde_json::Map` would keep only the last). On failure, where it
/// stopped and why.
fn parse_entries(bytes: &[u8]) -> Result<Entries, (Option<At>, String)> {
    let mut at = None;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let entries = de::Deserializer::deserialize_any(&mut de, EntryVisitor { at: &mut at })
        .and_then(|entries| de.end().map(|()| entries))
        .map_err(|e| e.to_string());
    entries.map_err(|reason| (at, reason))
}

/// A file's `(key, value)` pairs, in order.
type Entries = Vec<(String, serde_json::Value)>;

/// Collects an object's entries, recording in `at` what it reads.
struct EntryVisitor<'a> {
    at: &'a mut Option<At>,
}

impl<'de> Visitor<'de> for EntryVisitor<'_> {
    type Value = Entries;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object like {\"timezone\": \"UTC\"}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        loop {
            *self.at = Some(At::Key);
            let Some(key) = map.next_key::<String>()? else {
                break;
            };
            *self.at = Some(At::Value(key.clone()));
            let value = map.next_value::<serde_json::Value>()?;
            entries.push((key, value));
        }
        *self.at = None;
        Ok(entries)
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[derive(Default)]
struct Raw {
    values: BTreeMap<&'static str, (String, Source)>,
}

impl Raw {
    /// Parse one value with `parse`; a failure names the key and the source.
    fn get<T>(
        &self,
        key: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let (value, source) = &self.values[key];
        parse(value.trim()).map_err(|reason| ConfigError::Invalid {
            key,
            value: value.clone(),
            origin: source.clone(),
            reason,
        })
    }

    fn millis(&self, key: &'static str, min: u64) -> Result<Duration, ConfigError> {
        self.get(key, |v| number(v, min).map(Duration::from_millis))
    }

    fn into_config(self) -> Result<Config, ConfigError> {
        let optional = |v: &str| (!v.is_empty()).then(|| v.to_string());
        let config = Config {
            listen: self.get("listen", |v| {
                v.parse()
                    .map_err(|_| "expected IP:PORT, e.g. 0.0.0.0:8080".to_string())
            })?,
            peer_listen: self.get("peer_listen", |v| {
                v.parse()
                    .map_err(|_| "expected IP:PORT, e.g. 0.0.0.0:8081".to_string())
            })?,
            probe_listen: self.get("probe_listen", |v| {
                optional(v)
                    .map(|v| v.parse())
                    .transpose()
                    .map_err(|_| "expected IP:PORT, e.g. 0.0.0.0:8082, or empty".to_string())
            })?,
            data_dir: self.get("data_dir", |v| {
                optional(v)
                    .map(PathBuf::from)
                    .ok_or_else(|| "must not be empty".to_string())
            })?,
            pod_name: self.get("pod_name", |v| dns_label(v).map(str::to_string))?,
            namespace: self.get("namespace", |v| dns_label(v).map(str::to_string))?,
            peers_service: self.get("peers_service", |v| {
                if v.is_empty() {
                    Ok(None)
                } else {
                    dns_label(v).map(|v| Some(v.to_string()))
                }
            })?,
            peers_port_name: self.get("peers_port_name", |v| dns_label(v).map(str::to_string))?,
            cluster_domain: self.get("cluster_domain", |v| {
                let v = v.trim_end_matches('.');
                if !v.is_empty() && v.split('.').all(|l| dns_label(l).is_ok()) {
                    Ok(v.to_string())
                } else {
                    Err("expected a DNS domain like cluster.local".to_string())
                }
            })?,
            dns_server: self.get("dns_server", |v| {
                if v.is_empty() {
                    return Ok(None);
                }
                v.parse::<SocketAddr>()
                    .or_else(|_| {
                        v.parse::<std::net::IpAddr>()
                            .map(|ip| SocketAddr::new(ip, 53))
                    })
                    .map(Some)
                    .map_err(|_| "expected IP or IP:PORT, e.g. 10.96.0.10:53".to_string())
            })?,
            dns_max_ttl: self.get("dns_max_ttl_s", |v| number(v, 0).map(Duration::from_secs))?,
            timezone: self.get("timezone", |v| {
                TimeZone::get(v).map(|tz| (v.to_string(), tz)).map_err(|_| {
                    "not an IANA time zone name; use e.g. UTC, Europe/Paris or America/New_York"
                        .to_string()
                })
            })?,
            durability: self.get("durability", |v| match v {
                "group-commit" => Ok(Durability::GroupCommit),
                "periodic" => Ok(Durability::Periodic),
                "none" => Ok(Durability::None),
                _ => Err("expected group-commit, periodic or none".to_string()),
            })?,
            sync_interval: self.millis("sync_interval_ms", 1)?,
            commit_timeout: self.millis("commit_timeout_ms", 1)?,
            peer_timeout: self.millis("peer_timeout_ms", 1)?,
            fanout_deadline: self.millis("fanout_deadline_ms", 1)?,
            refresh_interval: {
                let every = self.millis("refresh_interval_ms", 0)?;
                (!every.is_zero()).then_some(every)
            },
            peer_token_file: self.get("peer_token_file", |v| Ok(optional(v).map(PathBuf::from)))?,
            shutdown_delay: self.millis("shutdown_delay_ms", 0)?,
            shutdown_grace: self.get("shutdown_grace_s", |v| {
                number(v, 0).map(Duration::from_secs)
            })?,
            max_connections: self.get("max_connections", |v| number(v, 1).map(|n| n as usize))?,
            request_timeout: self.millis("request_timeout_ms", 1)?,
            header_read_timeout: self.millis("header_read_timeout_ms", 1)?,
            log_format: self.get("log_format", |v| match v {
                "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                _ => Err("expected text or json".to_string()),
            })?,
            log_level: self.get("log_level", |v| {
                log_filter(v)
                    .map(|_| v.to_string())
                    .map_err(|e| format!("not a log filter ({e}); use e.g. info or tally=debug"))
            })?,
            provenance: SETTINGS
                .iter()
                .map(|s| {
                    let (value, source) = &self.values[s.key];
                    (s.key, value.clone(), source.clone())
                })
                .collect(),
            unknown_env: Vec::new(),
        };
        if let Some(error) = self.same_port(&config) {
            return Err(error);
        }
        if config.commit_timeout >= config.request_timeout {
            // The visit must get its 503 before the request's own timeout
            // (408) could answer for a visit that is then committed. Blame
            // the setting the user gave: a default is not their mistake.
            let commit = &self.values["commit_timeout_ms"];
            let request = &self.values["request_timeout_ms"];
            let (key, (value, origin), reason) = if commit.1 == Source::Default {
                (
                    "request_timeout_ms",
                    request,
                    format!(
                        "must be above commit_timeout_ms ({} ms): raise it or lower commit_timeout_ms",
                        config.commit_timeout.as_millis()
                    ),
                )
            } else {
                (
                    "commit_timeout_ms",
                    commit,
                    format!(
                        "must be below request_timeout_ms ({} ms): lower it or raise request_timeout_ms",
                        config.request_timeout.as_millis()
                    ),
                )
            };
            return Err(ConfigError::Invalid {
                key,
                value: value.clone(),
                origin: origin.clone(),
                reason,
            });
        }
        Ok(config)
    }
}

impl Raw {
    /// Two of `listen`, `peer_listen` and `probe_listen` on one port: the
    /// second bind would fail at start, after `check-config` said all was
    /// well. Port 0 asks the kernel for a free port, so two of them never
    /// collide. An unspecified address (`0.0.0.0`, `[::]`, which on Linux
    /// also takes IPv4) holds the port on every address.
    fn same_port(&self, config: &Config) -> Option<ConfigError> {
        let listeners = [
            ("listen", Some(config.listen)),
            ("peer_listen", Some(config.peer_listen)),
            ("probe_listen", config.probe_listen),
        ];
        let clash = |a: SocketAddr, b: SocketAddr| {
            a.port() != 0
                && a.port() == b.port()
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        };
        let (first, second) = listeners.iter().enumerate().find_map(|(i, (k, a))| {
            listeners[i + 1..]
                .iter()
                .find_map(|(l, b)| clash((*a)?, (*b)?).then_some((*k, *l)))
        })?;
        // Blame the one the user set; both given, the later one.
        let (key, other_key) = if self.values[second].1 == Source::Default {
            (first, second)
        } else {
            (second, first)
        };
        let (value, origin) = &self.values[key];
        let (other_value, other_origin) = &self.values[other_key];
        Some(ConfigError::Invalid {
            key,
            value: value.clone(),
            origin: origin.clone(),
            reason: format!(
                "takes the same port as `{other_key}` ({other_value} from {other_origin}): the client, \
                 peer and probe servers need a port each; give one of them another port"
            ),
        })
    }
}

/// The `log_level` filter. Field values match as plain strings, not regular
/// expressions: the config fuzzer found filters whose regex took 44 s to
/// compile and reject, and a log filter needs no regex to name a pod.
pub fn log_filter(
    spec: &str,
) -> Result<tracing_subscriber::EnvFilter, tracing_subscriber::filter::ParseError> {
    tracing_subscriber::EnvFilter::builder()
        .with_regex(false)
        .parse(spec)
}

fn number(v: &str, min: u64) -> Result<u64, String> {
    let n: u64 = v
        .parse()
        .map_err(|_| format!("expected a whole number ≥ {min}"))?;
    if n < min {
        return Err(format!("must be at least {min}"));
    }
    Ok(n)
}

/// An RFC 1123 label, as Kubernetes names pods, namespaces and services.
fn dns_label(v: &str) -> Result<&str, String> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if ok {
        Ok(v)
    } else {
        Err("expected a DNS label: 1-63 lowercase letters, digits or '-', not starting or ending with '-'".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(
        flags: &[(&'static str, &str)],
        env: &[(&str, &str)],
        file: Option<&str>,
    ) -> Result<Config, ConfigError> {
        let flags: Vec<(&'static str, OsString)> =
            flags.iter().map(|(k, v)| (*k, OsString::from(v))).collect();
        let env: Vec<(OsString, OsString)> = env
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect();
        load_os(&flags, &env, file.map(str::as_bytes))
    }

    fn load_os(
        flags: &[(&'static str, OsString)],
        env: &[(OsString, OsString)],
        file: Option<&[u8]>,
    ) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let config_flag = file.map(|bytes| {
            let path = dir.path().join("config.json");
            std::fs::write(&path, bytes).unwrap();
            path.into_os_string()
        });
        let env: BTreeMap<OsString, OsString> = env.iter().cloned().collect();
        Config::load(&Sources {
            flags,
            config_flag,
            env: &env,
        })
    }

    /// `bytes` as an `OsString`: on Unix any bytes are a valid one.
    fn os(bytes: &[u8]) -> OsString {
        use std::os::unix::ffi::OsStringExt;
        OsString::from_vec(bytes.to_vec())
    }

    #[test]
    fn a_value_that_is_not_utf8_is_refused_naming_the_setting_and_source() {
        let pod = (OsString::from("POD_NAME"), OsString::from("tally-0"));
        let env = [pod.clone(), (os(b"TALLY_DATA_DIR"), os(b"/data/\xff"))];
        let msg = load_os(&[], &env, None).unwrap_err().to_string();
        assert!(
            msg.contains("`data_dir`") && msg.contains("TALLY_DATA_DIR") && msg.contains("UTF-8"),
            "{msg}"
        );
        let msg = load_os(
            &[("listen", os(b"127.0.0.1:\xff"))],
            std::slice::from_ref(&pod),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("`listen`") && msg.contains("flag --listen"),
            "{msg}"
        );
        // Overridden by a flag or not, the variable is unreadable.
        let env = [pod.clone(), (os(b"TALLY_LISTEN"), os(b"\xc3"))];
        let err = load_os(&[("listen", "127.0.0.1:1".into())], &env, None).unwrap_err();
        assert!(err.to_string().contains("TALLY_LISTEN"), "{err}");
        let env = [(os(b"POD_NAME"), os(b"tally-\x80"))];
        let msg = load_os(&[], &env, None).unwrap_err().to_string();
        assert!(
            msg.contains("`pod_name`") && msg.contains("POD_NAME"),
            "{msg}"
        );

        let msg = load_os(
            &[],
            &[pod],
            Some(b"{\"listen\": \"127.0.0.1:80\",\n \"data_dir\": \"/d\xff\"}"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("config.json") && msg.contains("`data_dir`") && msg.contains("UTF-8"),
            "{msg}"
        );
    }

    #[test]
    fn a_lone_surrogate_in_the_file_is_refused_naming_the_key() {
        let err = load(
            &[],
            &[("POD_NAME", "a-0")],
            Some(r#"{"timezone": "\ud800"}"#),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::FileValue { .. }), "{msg}");
        assert!(
            msg.contains("`timezone`") && msg.contains("config.json"),
            "{msg}"
        );
    }

    #[test]
    fn the_config_file_read_is_bounded() {
        let big = format!("{{\"timezone\": \"UTC\"{}}}", " ".repeat(MAX_FILE_BYTES));
        let msg = load(&[], &[("POD_NAME", "a-0")], Some(&big))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("config.json") && msg.contains("1048576-byte limit"),
            "{msg}"
        );
        // Exactly at the limit is still read.
        let fits = format!(
            "{{\"timezone\": \"UTC\"}}{}",
            " ".repeat(MAX_FILE_BYTES - 19)
        );
        assert_eq!(fits.len(), MAX_FILE_BYTES);
        load(&[], &[("POD_NAME", "a-0")], Some(&fits)).unwrap();
    }

    #[test]
    fn duplicate_keys_and_wrong_types_are_refused_naming_key_and_file() {
        let pod = [("POD_NAME", "a-0")];
        let msg = load(
            &[],
            &pod,
            Some(r#"{"timezone":"UTC","timezone":"Asia/Tokyo"}"#),
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("`timezone`")
                && msg.contains("more than once")
                && msg.contains("config.json"),
            "{msg}"
        );
        for (text, key) in [
            (r#"{"max_connections": "10"}"#, "max_connections"),
            (r#"{"timezone": 1}"#, "timezone"),
            (r#"{"peer_timeout_ms": true}"#, "peer_timeout_ms"),
            (r#"{"listen": null}"#, "listen"),
        ] {
            let err = load(&[], &pod, Some(text)).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, ConfigError::WrongType { .. }),
                "{text}: {msg}"
            );
            assert!(
                msg.contains(&format!("`{key}`")) && msg.contains("config.json"),
                "{msg}"
            );
        }
        let c = load(
            &[],
            &pod,
            Some(r#"{"max_connections": 10, "timezone": "UTC"}"#),
        )
        .unwrap();
        assert_eq!(c.max_connections, 10);
    }

    #[test]
    fn listen_and_peer_listen_on_one_port_are_refused_naming_both() {
        let pod = [("POD_NAME", "a-0")];
        for (listen, peer) in [
            ("127.0.0.1:9000", "127.0.0.1:9000"),
            ("0.0.0.0:9000", "127.0.0.1:9000"),
            ("[::]:9000", "127.0.0.1:9000"),
        ] {
            let msg = load(&[("listen", listen), ("peer_listen", peer)], &pod, None)
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains("`peer_listen`") && msg.contains("`listen`"),
                "{msg}"
            );
            assert!(
                msg.contains("--peer-listen") && msg.contains("--listen"),
                "{msg}"
            );
        }
        let msg = load(&[("listen", "0.0.0.0:8081")], &pod, None)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("`listen`") && msg.contains("`peer_listen` (0.0.0.0:8081 from default)"),
            "{msg}"
        );
        // Port 0 is a fresh port each; other addresses or ports are apart.
        load(
            &[("listen", "127.0.0.1:0"), ("peer_listen", "127.0.0.1:0")],
            &pod,
            None,
        )
        .unwrap();
        load(
            &[
                ("listen", "127.0.0.1:9000"),
                ("peer_listen", "127.0.0.2:9000"),
            ],
            &pod,
            None,
        )
        .unwrap();
    }

    #[test]
    fn unknown_tally_variables_are_listed_and_known_ones_are_not() {
        let env = [
            ("POD_NAME", "a-0"),
            ("TALLY_LISTN", "127.0.0.1:1"),
            ("TALLY_TIMEZONE", "UTC"),
            ("TALLY_BIN", "/bin/tally"),
            ("TALLY_SIM_HOME", "/tmp"),
            ("TALLY_SERVICE_HOST", "10.0.0.1"),
            ("TALLY_SERVICE_PORT_HTTP", "80"),
            ("TALLY_PORT", "tcp://10.0.0.1:80"),
            ("TALLY_PORT_80_TCP_ADDR", "10.0.0.1"),
            ("TALLY_PORT_80_TCP", "tcp://10.0.0.1:80"),
            ("TALLY_PORT_80_HTTP", "no"),
            ("HOME", "/root"),
        ];
        let c = load(&[], &env, None).unwrap();
        assert_eq!(c.unknown_env, ["TALLY_LISTN", "TALLY_PORT_80_HTTP"]);
    }

    #[test]
    fn log_filter_field_values_are_plain_strings_not_regexes() {
        assert!(log_filter("tally[visit{pod=tally-0}]=debug").is_ok());
        // As a regex this needs a Unicode class table and a DFA (the kind of
        // filter the fuzzer found slow); as a plain string it is just text.
        let pattern = format!("tally[s{{f={}}}]=debug", r"\w".repeat(60));
        assert!(log_filter(&pattern).is_ok(), "{pattern}");
        assert!(log_filter("tally=loud").is_err());
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c = load(&[], &[("POD_NAME", "tally-0")], None).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.peer_listen.to_string(), "0.0.0.0:8081");
        assert_eq!(c.peers_port_name, "peer");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.peers_service, None);
        assert_eq!(c.durability, Durability::GroupCommit);
        assert_eq!(c.peer_timeout, Duration::from_millis(300));
        assert_eq!(c.refresh_interval, Some(Duration::from_secs(5)));
        assert_eq!(c.timezone.0, "UTC");
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let file = r#"{"listen":"127.0.0.1:3","timezone":"Europe/Paris","peer_timeout_ms":50,"namespace":"from-file"}"#;
        let env = [
            ("POD_NAME", "tally-0"),
            ("TALLY_LISTEN", "127.0.0.1:2"),
            ("TALLY_TIMEZONE", "Asia/Tokyo"),
        ];
        let c = load(&[("listen", "127.0.0.1:1")], &env, Some(file)).unwrap();
        assert_eq!(c.listen.port(), 1, "flag wins");
        assert_eq!(c.timezone.0, "Asia/Tokyo", "env beats file");
        assert_eq!(
            c.peer_timeout,
            Duration::from_millis(50),
            "file beats default"
        );
        assert_eq!(c.namespace, "from-file");
        let source = |key| {
            c.provenance
                .iter()
                .find(|(k, _, _)| *k == key)
                .unwrap()
                .2
                .clone()
        };
        assert_eq!(source("listen"), Source::Flag("--listen".into()));
        assert_eq!(source("timezone"), Source::Env("TALLY_TIMEZONE"));
        assert!(matches!(source("peer_timeout_ms"), Source::File(_)));
        assert_eq!(source("durability"), Source::Default);
    }

    #[test]
    fn unknown_file_key_is_named() {
        let err = load(&[], &[("POD_NAME", "a-0")], Some(r#"{"listne":"x"}"#)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("`listne`") && msg.contains("config.json"),
            "{msg}"
        );
    }

    /// Flags, env, file, then the key and source the error must name.
    type Case<'a> = (
        &'a [(&'static str, &'a str)],
        &'a [(&'a str, &'a str)],
        Option<&'a str>,
        &'a str,
        &'a str,
    );

    #[test]
    fn bad_values_name_key_and_source() {
        let cases: &[Case<'_>] = &[
            (
                &[],
                &[("TALLY_PEER_TIMEOUT_MS", "soon")],
                None,
                "peer_timeout_ms",
                "TALLY_PEER_TIMEOUT_MS",
            ),
            (&[("listen", "nowhere")], &[], None, "listen", "--listen"),
            (
                &[],
                &[],
                Some(r#"{"timezone":"Mars/Olympus"}"#),
                "timezone",
                "config file",
            ),
            (
                &[],
                &[],
                Some(r#"{"durability":"maybe"}"#),
                "durability",
                "config file",
            ),
            (
                &[],
                &[("POD_NAMESPACE", "Bad_NS")],
                None,
                "namespace",
                "POD_NAMESPACE",
            ),
            (
                &[],
                &[("TALLY_MAX_CONNECTIONS", "0")],
                None,
                "max_connections",
                "TALLY_MAX_CONNECTIONS",
            ),
            (
                &[],
                &[("TALLY_COMMIT_TIMEOUT_MS", "10000")],
                None,
                "commit_timeout_ms",
                "TALLY_COMMIT_TIMEOUT_MS",
            ),
            (
                &[],
                &[("TALLY_REQUEST_TIMEOUT_MS", "2")],
                None,
                "request_timeout_ms",
                "TALLY_REQUEST_TIMEOUT_MS",
            ),
            (
                &[],
                &[("TALLY_LOG_FORMAT", "xml")],
                None,
                "log_format",
                "TALLY_LOG_FORMAT",
            ),
        ];
        for (flags, env, file, key, source) in cases {
            let mut env = env.to_vec();
            env.push(("POD_NAME", "tally-0"));
            let msg = load(flags, &env, *file).unwrap_err().to_string();
            assert!(msg.contains(&format!("`{key}`")), "{msg}");
            assert!(msg.contains(source), "{msg}");
        }
    }

    #[test]
    fn readme_table_lists_every_setting_with_its_default() {
        let readme = include_str!("../docs/configuration.md");
        for s in SETTINGS {
            let start = format!("| `{}` | `--{}` | `{}` | ", s.key, flag_name(s.key), s.env);
            let row = readme
                .lines()
                .find(|l| l.starts_with(&start))
                .unwrap_or_else(|| panic!("docs/configuration.md has no row starting {start}"));
            if !s.default.is_empty() {
                assert!(
                    row.contains(&format!("| `{}` |", s.default)),
                    "docs/configuration.md default for {}: {row}",
                    s.key
                );
            }
        }
    }

    #[test]
    fn file_must_be_an_object_of_scalars() {
        for text in ["[1]", "not json", "{\"listen\": \"127.0.0.1:1\"} {}"] {
            let err = load(&[], &[("POD_NAME", "a-0")], Some(text)).unwrap_err();
            assert!(
                matches!(err, ConfigError::FileSyntax { .. }),
                "{text}: {err}"
            );
        }
        let err = load(&[], &[("POD_NAME", "a-0")], Some("{\"listen\": [1]}")).unwrap_err();
        assert!(matches!(err, ConfigError::WrongType { .. }), "{err}");
    }

    #[test]
    fn dns_server_accepts_ip_or_ip_port() {
        let c = load(&[("dns_server", "127.0.0.9")], &[("POD_NAME", "a-0")], None).unwrap();
        assert_eq!(c.dns_server.unwrap().to_string(), "127.0.0.9:53");
        let c = load(
            &[("dns_server", "127.0.0.9:5353")],
            &[("POD_NAME", "a-0")],
            None,
        )
        .unwrap();
        assert_eq!(c.dns_server.unwrap().port(), 5353);
    }
}
