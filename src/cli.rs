//! The command line: `tally [serve]`, `tally visits`, `tally peers`,
//! `tally forget`, `tally check-config`, `tally check-cluster`,
//! `tally nslookup`. Flags come from
//! the settings table in [`config`], so every setting has a flag, an
//! environment variable and a file key. Started as `nslookup` (the image's
//! link), the binary is [`nslookup`](crate::nslookup), busybox-style.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Arg, ArgMatches, Args, Command, FromArgMatches, Parser, Subcommand};

use crate::config::{
    self, CONFIG_ENV, Config, ConfigError, EXIT_CONFIG, LogFormat, SETTINGS, Sources,
};
use crate::identity::Identity;
use crate::peers::client::PeerClient;
use crate::serve::{self, StartError};
use crate::{check, discovery, exit, nslookup, peers, store};

/// Tally: a durable, cluster-wide visit counter for Kubernetes StatefulSets.
///
/// Settings are read from flags, then TALLY_* environment variables, then
/// the JSON config file (--config / TALLY_CONFIG), then defaults.
#[derive(Debug, Parser)]
#[command(name = "tally", version, max_term_width = 110)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    settings: SettingArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve HTTP and count visits (the default).
    Serve,
    /// Print the counter stored in a data directory (--data-dir).
    Visits,
    /// Show what this pod resolves: resolv.conf, the SRV answer, each member
    /// and whether it answers (the deeper view behind `nslookup`); exit 1
    /// when the lookup fails or a member does not answer.
    Peers,
    /// Start a new incarnation (count 0) on a data directory (--data-dir)
    /// that lost its visits.state: tally refuses to start such a directory
    /// from 0 on its own. The old incarnation's visits stay in the
    /// siblings' totals. Refused when visits.state is there.
    NewIncarnation,
    /// Validate the settings from every source and print the effective
    /// configuration; exit 0, or 64 naming the bad key and its source.
    CheckConfig,
    /// Look a name up through /etc/resolv.conf and print what BIND's
    /// nslookup prints: `tally nslookup [-type=A|AAAA|SRV|PTR] NAME [SERVER]`
    /// (also run as `nslookup`, the image's link to tally).
    #[command(disable_help_flag = true)]
    Nslookup {
        /// nslookup's own arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Retire a counter cluster-wide (an operator's act: a pod gone for
    /// good, an invented entry). Asks the pod on this machine's peer port
    /// (--peer-listen), with the peer token; the tombstone spreads to every
    /// pod and no relay can bring the counter back.
    Forget {
        /// The counter, as listed by /visits/total: POD/INCARNATION.
        counter: String,
    },
    /// Check a running release through its client Service (the chart's
    /// `helm test`): /healthz answers and /visits/total is complete with
    /// the expected members; retries until --wait-s, then exit 1.
    CheckCluster {
        /// The client Service, e.g. http://tally.default.svc.cluster.local:80
        url: String,
        /// Members the cluster view must have (the StatefulSet's replicas).
        #[arg(long)]
        members: Option<usize>,
        /// Seconds to keep retrying before failing.
        #[arg(long, default_value_t = 30)]
        wait_s: u64,
    },
}

/// Every setting as a global flag, built from [`SETTINGS`]. Values are
/// taken as the OS gives them, so one that is not UTF-8 reaches
/// [`Config::load`] and is refused there naming the flag (exit 64), rather
/// than by clap (exit 2).
#[derive(Debug, Default)]
struct SettingArgs {
    values: Vec<(&'static str, OsString)>,
    config: Option<OsString>,
}

impl FromArgMatches for SettingArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut args = SettingArgs::default();
        args.update_from_arg_matches(matches)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        for setting in SETTINGS {
            if let Some(value) = matches.get_one::<OsString>(setting.key) {
                self.values.push((setting.key, value.clone()));
            }
        }
        if let Some(path) = matches.get_one::<OsString>("config") {
            self.config = Some(path.clone());
        }
        Ok(())
    }
}

impl Args for SettingArgs {
    fn augment_args(mut cmd: Command) -> Command {
        cmd = cmd.arg(
            Arg::new("config")
                .long("config")
                .global(true)
                .value_name("FILE")
                .value_parser(clap::value_parser!(OsString))
                .help(format!("JSON config file [env: {CONFIG_ENV}]")),
        );
        for s in SETTINGS {
            let default = if s.default.is_empty() {
                String::new()
            } else {
                format!(" [default: {}]", s.default)
            };
            cmd = cmd.arg(
                Arg::new(s.key)
                    .long(config::flag_name(s.key))
                    .global(true)
                    .value_name("VALUE")
                    .value_parser(clap::value_parser!(OsString))
                    .help(format!("{} [env: {}]{default}", s.help, s.env)),
            );
        }
        cmd
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let mut argv = std::env::args_os();
    let program = argv.next().unwrap_or_default();
    if std::path::Path::new(&program).file_name() == Some("nslookup".as_ref()) {
        let args: Vec<String> = argv.map(|a| a.to_string_lossy().into_owned()).collect();
        return nslookup::main(&args);
    }
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    // A debugging tool must work whatever the settings say.
    if let Some(Cmd::Nslookup { args }) = &cli.command {
        return nslookup::main(args);
    }
    // Neither does the helm test hook need any: it only talks HTTP.
    if let Some(Cmd::CheckCluster {
        url,
        members,
        wait_s,
    }) = &cli.command
    {
        return check_cluster(url, *members, *wait_s);
    }
    let env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    let config = match Config::load(&Sources {
        flags: &cli.settings.values,
        config_flag: cli.settings.config.clone(),
        env: &env,
    }) {
        Ok(config) => config,
        Err(error) => return config_error(&error),
    };
    match cli.command.unwrap_or(Cmd::Serve) {
        Cmd::Serve => serve(config),
        Cmd::Visits => visits(&config),
        Cmd::Peers => runtime().block_on(peers_command(&config)),
        Cmd::CheckConfig => check_config(&config),
        Cmd::NewIncarnation => new_incarnation(&config),
        Cmd::Nslookup { .. } | Cmd::CheckCluster { .. } => {
            unreachable!("handled before the settings are loaded")
        }
        Cmd::Forget { counter } => runtime().block_on(forget(&config, &counter)),
    }
}

/// The command line, with the exit codes after `--help`. A usage mistake
/// (an unknown flag, a missing value) is a configuration error: exit 64
/// like every other, not clap's 2.
fn parse_args() -> Result<Cli, ExitCode> {
    let width = exit::CODES
        .iter()
        .map(|(code, _)| code.to_string().len())
        .max()
        .unwrap_or(0);
    let codes: String = exit::CODES
        .iter()
        .map(|(code, meaning)| format!("  {code:>width$}  {meaning}\n"))
        .collect();
    let command = <Cli as clap::CommandFactory>::command()
        .after_help(format!("Exit codes (docs/exit-codes.md):\n{codes}"));
    let parsed = command
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches));
    parsed.map_err(|error| {
        let _ = error.print();
        if error.use_stderr() {
            ExitCode::from(EXIT_CONFIG)
        } else {
            // --help, --version: asked for, printed, done.
            ExitCode::SUCCESS
        }
    })
}

async fn forget(config: &Config, counter: &str) -> ExitCode {
    let Some((pod, incarnation)) = counter
        .split_once('/')
        .filter(|(p, i)| peers::wire::valid_name(p, i))
    else {
        eprintln!(
            "tally: {counter:?} is not POD/INCARNATION (copy both from a row of /visits/total, e.g. tally-2/3f9c…)"
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let token = match serve::read_token(config) {
        Ok(token) => token,
        Err(error) => {
            eprintln!("tally: configuration error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The pod on this machine: its peer port, on loopback when it listens
    // on every address.
    let mut addr = config.peer_listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let key = crate::merge::Key {
        pod: pod.to_string(),
        incarnation: incarnation.to_string(),
    };
    let client = PeerClient::new(token.as_deref(), Duration::from_secs(2));
    // Retiring hands the tombstone to every sibling: allow for it.
    let limit = config.fanout_deadline + Duration::from_secs(5);
    match client.forget(addr, &key, limit).await {
        Ok(answer) => {
            println!("retired {key} on every pod reachable from {addr}: {answer}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("tally: cannot retire {key} through {addr}: {error}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(error: &ConfigError) -> ExitCode {
    eprintln!("tally: configuration error: {error}");
    ExitCode::from(EXIT_CONFIG)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
}

fn init_logging(config: &Config) {
    // The setting was checked by `log_filter` when the config loaded.
    let filter = crate::config::log_filter(&config.log_level).unwrap_or_default();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_writer(std::io::stdout);
    match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn serve(config: Config) -> ExitCode {
    init_logging(&config);
    // Named once the log can say it: a misspelt setting is otherwise
    // ignored without a trace. `check-config` refuses them instead.
    for variable in &config.unknown_env {
        tracing::warn!(
            %variable,
            "the environment variable {variable} is no tally setting and is ignored: is it misspelt? \
             `tally --help` lists the settings' variables"
        );
    }
    match runtime().block_on(serve::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => start_error(&error),
    }
}

fn start_error(error: &StartError) -> ExitCode {
    tracing::error!(%error, "cannot start");
    eprintln!("tally: cannot start: {error}");
    ExitCode::from(exit::of_start(error))
}

fn check_config(config: &Config) -> ExitCode {
    if let Err(error) = Identity::from_config(config)
        .map_err(StartError::from)
        .and_then(|_| serve::read_token(config))
    {
        eprintln!("tally: configuration error: {error}");
        return ExitCode::from(EXIT_CONFIG);
    }
    if !config.unknown_env.is_empty() {
        eprintln!(
            "tally: configuration error: no tally setting reads the environment variable(s) {}: \
             rename a misspelt one or unset it (`tally --help` lists the settings' variables)",
            config.unknown_env.join(", ")
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let width = SETTINGS.iter().map(|s| s.key.len()).max().unwrap_or(0);
    println!("{:width$}  {:30}  SOURCE", "KEY", "VALUE");
    for (key, value, source) in &config.provenance {
        let shown = if value.is_empty() { "(unset)" } else { value };
        println!("{key:width$}  {shown:30}  {source}");
    }
    println!("configuration ok");
    ExitCode::SUCCESS
}

fn check_cluster(url: &str, members: Option<usize>, wait_s: u64) -> ExitCode {
    let base = match check::base_url(url) {
        Ok(base) => base,
        Err(error) => {
            eprintln!("tally: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if runtime().block_on(check::run(&base, members, Duration::from_secs(wait_s))) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn new_incarnation(config: &Config) -> ExitCode {
    let identity = match Identity::from_config(config) {
        Ok(identity) => identity,
        Err(error) => {
            eprintln!("tally: configuration error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match store::start_new_incarnation(&config.data_dir, &identity.pod) {
        Ok(state) => {
            println!(
                "started incarnation {} of {} in {} at count 0; start tally on it again",
                state.incarnation,
                identity.pod,
                config.data_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("tally: {error}");
            ExitCode::from(exit::of_store(&error))
        }
    }
}

fn visits(config: &Config) -> ExitCode {
    let dir = &config.data_dir;
    let state = match store::inspect(dir) {
        Ok(Some(state)) => state,
        Ok(None) => {
            eprintln!(
                "tally: {} holds no {} yet: no visit has been counted on this volume (check --data-dir)",
                dir.display(),
                store::STATE_FILE
            );
            return ExitCode::FAILURE;
        }
        Err(error) => {
            eprintln!("tally: {error}");
            return ExitCode::from(exit::of_store(&error));
        }
    };
    println!("data directory  {}", dir.display());
    println!("pod             {}", state.pod);
    println!("incarnation     {}", state.incarnation);
    println!("created         {}", unix_time(state.created_unix));
    println!("count           {}", state.count);
    match peers::load_peers(dir).map(|stored| stored.counter()) {
        Ok(counter) => {
            let others: Vec<_> = counter
                .entries()
                .filter(|e| e.incarnation != state.incarnation)
                .collect();
            println!("known others    {}", others.len());
            if !others.is_empty() {
                println!(
                    "  {:24} {:34} {:>10}  LAST SEEN",
                    "POD", "INCARNATION", "COUNT"
                );
                for e in &others {
                    println!(
                        "  {:24} {:34} {:>10}  {}",
                        e.pod,
                        e.incarnation,
                        e.count,
                        unix_time(e.seen_unix)
                    );
                }
            }
            for r in counter.retired() {
                println!(
                    "retired         {}/{} ({} visits)",
                    r.pod, r.incarnation, r.count
                );
            }
            let total = others
                .iter()
                .try_fold(state.count, |sum, e| sum.checked_add(e.count));
            match total {
                Some(total) => println!("total known     {total}"),
                None if state.count == u64::MAX => println!(
                    "total known     more than 2^64: {} holds the largest count there is (restore it, or `tally new-incarnation`)",
                    store::STATE_FILE
                ),
                None => println!(
                    "total known     more than 2^64: the counts in {} cannot be summed with this pod's (a corrupt or forged file?)",
                    store::PEERS_FILE
                ),
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("tally: {error}");
            ExitCode::from(exit::of_peers(&error))
        }
    }
}

fn unix_time(secs: u64) -> String {
    if secs == 0 {
        return "unknown".into();
    }
    jiff::Timestamp::from_second(secs as i64)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| secs.to_string())
}

async fn peers_command(config: &Config) -> ExitCode {
    let identity = match Identity::from_config(config) {
        Ok(identity) => identity,
        Err(error) => {
            eprintln!("tally: configuration error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if identity.member.is_none() {
        eprintln!(
            "tally: TALLY_PEERS_SERVICE is empty, so this pod runs standalone and has no siblings to look up; \
             set it to the StatefulSet's headless Service"
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let (discovery, token) = match serve::discovery(config, &identity)
        .and_then(|d| Ok((d.expect("member is set"), serve::read_token(config)?)))
    {
        Ok(found) => found,
        Err(error) => {
            eprintln!("tally: {error}");
            return ExitCode::FAILURE;
        }
    };
    let info = discovery.info();
    let member = discovery.member();
    match config.dns_server {
        Some(server) => println!("resolver     {server} (TALLY_DNS_SERVER override)"),
        None => println!("resolver     {}", discovery::RESOLV_CONF),
    }
    println!(
        "nameservers  {}",
        info.nameservers
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("search       {}", info.search.join(" "));
    println!("ndots        {}", info.ndots);
    println!("this pod     {} (ordinal {})", identity.pod, member.ordinal);
    let name = member.srv_name();
    println!("query        SRV {name}");
    let peers = match discovery.lookup(&name).await {
        Ok(peers) => peers,
        Err(failure) => {
            eprintln!("tally: {failure}");
            return ExitCode::FAILURE;
        }
    };
    println!("answer       {} member(s)", peers.len());
    let client = PeerClient::new(token.as_deref(), config.peer_timeout);
    let checks = peers.iter().map(|peer| {
        let client = client.clone();
        async move {
            let started = Instant::now();
            let result = client
                .fetch(peer.addr, config.peer_timeout.max(Duration::from_secs(1)))
                .await;
            (peer, result, started.elapsed())
        }
    });
    println!(
        "  {:20} {:21} {:>10}  {:8}  TARGET",
        "POD", "ADDRESS", "COUNT", "ANSWERS"
    );
    let mut unreachable = 0;
    for (peer, result, took) in futures::future::join_all(checks).await {
        let me = if peer.pod == identity.pod {
            " (this pod)"
        } else {
            ""
        };
        match result {
            Ok(state) => {
                let count = state
                    .entries
                    .iter()
                    .find(|e| e.pod == state.pod && e.incarnation == state.incarnation)
                    .map_or(0, |e| e.count);
                // CoreDNS names endpoints `a-b-c-d.<svc>` when the pod's
                // subdomain (the StatefulSet's serviceName) is not <svc>.
                let mismatch = if state.pod == peer.pod {
                    String::new()
                } else {
                    format!(
                        " (answers as {}: the SRV target is not its pod name; is the StatefulSet's serviceName {}?)",
                        state.pod, member.headless
                    )
                };
                println!(
                    "  {:20} {:21} {:>10}  {:8}  {}{me}{mismatch}",
                    state.pod,
                    peer.addr.to_string(),
                    count,
                    format!("{:.1}ms", took.as_secs_f64() * 1000.0),
                    peer.target
                );
            }
            Err(error) => {
                unreachable += 1;
                println!(
                    "  {:20} {:21} {:>10}  {:8}  {}{me}: {error}",
                    peer.pod,
                    peer.addr.to_string(),
                    "-",
                    "no",
                    peer.target
                );
            }
        }
    }
    if unreachable > 0 {
        // Non-zero so the command works as a probe or a script check.
        println!("{unreachable} member(s) did not answer");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
