//! Settings that cannot be read, against the real binary (issue 23, item
//! 5): values that are not UTF-8 from any source, an unbounded config
//! file, duplicate keys and wrong types, unknown `TALLY_*` variables, one
//! port for both servers; and the exit codes of a store that cannot start.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tally_integration::harness::{Tally, TallyOptions, tally_bin, workspace_root};

/// Any bytes as an environment value or argument (Unix allows them).
fn os(bytes: &[u8]) -> OsString {
    OsString::from_vec(bytes.to_vec())
}

/// `tally ARGS` with only `env` (plus a pod name and a data directory in
/// `dir`), run to its exit, which must come within 20 s: a process that
/// wrongly starts serving is killed and fails the test.
fn tally(dir: &Path, args: &[OsString], env: &[(OsString, OsString)]) -> Output {
    let mut cmd = Command::new(tally_bin());
    cmd.env_clear()
        .env("POD_NAME", "tally-0")
        .env("TALLY_DATA_DIR", dir.join("data"))
        .env("TALLY_LISTEN", "127.0.0.1:0")
        .env("TALLY_PEER_LISTEN", "127.0.0.1:0")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args);
    exit_within(cmd, Duration::from_secs(20))
}

fn exit_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tally");
    // Read both pipes on threads so a chatty child cannot block on them.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tally {:?} did not exit within {limit:?}: stderr {}",
                cmd.get_args().collect::<Vec<_>>(),
                String::from_utf8_lossy(&err.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}

/// Asserts the exit code and that stderr names every one of `words`.
fn assert_refused(out: &Output, code: i32, words: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    for word in words {
        assert!(stderr.contains(word), "{word:?} not in: {stderr}");
    }
}

#[test]
fn a_setting_that_is_not_utf8_exits_64_naming_it_whatever_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let check = args(&["check-config"]);
    for (var, value, key) in [
        ("TALLY_DATA_DIR", &b"/data/\xff"[..], "`data_dir`"),
        ("TALLY_LISTEN", b"127.0.0.1:80\xc3", "`listen`"),
        ("POD_NAME", b"tally-\x800", "`pod_name`"),
        ("TALLY_CONFIG", b"/etc/tally/\xfe.json", "`config`"),
    ] {
        let out = tally(dir.path(), &check, &[(var.into(), os(value))]);
        assert_refused(&out, 64, &[key, var, "not UTF-8"]);
    }
    // serve refuses it the same way, before opening anything.
    let out = tally(dir.path(), &[], &[("TALLY_DATA_DIR".into(), os(b"/d\xff"))]);
    assert_refused(&out, 64, &["`data_dir`", "TALLY_DATA_DIR"]);
    assert!(!dir.path().join("data").exists());

    let flag = [os(b"check-config"), os(b"--data-dir"), os(b"/data/\xff")];
    let out = tally(dir.path(), &flag, &[]);
    assert_refused(&out, 64, &["`data_dir`", "flag --data-dir", "not UTF-8"]);

    let path = dir.path().join("config.json");
    std::fs::write(
        &path,
        b"{\"timezone\": \"UTC\",\n \"data_dir\": \"/d\xff\"}",
    )
    .unwrap();
    let out = tally(
        dir.path(),
        &check,
        &[("TALLY_CONFIG".into(), path.clone().into())],
    );
    let file = path.display().to_string();
    assert_refused(&out, 64, &[&file, "`data_dir`", "not UTF-8"]);
}

#[test]
fn a_usage_mistake_exits_64_and_help_lists_the_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let out = tally(dir.path(), &args(&["check-config", "--listn", "x"]), &[]);
    assert_refused(&out, 64, &["--listn"]);
    let out = tally(dir.path(), &args(&["--help"]), &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    for code in ["64", "65", "73", "74", "75"] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{code} "))),
            "exit code {code} not in --help: {help}"
        );
    }
}

#[test]
fn dev_zero_as_config_file_is_refused_at_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    // Under a 1 GiB address-space limit, so a read without a bound fails
    // this test by running out of memory instead of taking the machine's.
    let mut cmd = Command::new("sh");
    cmd.env_clear()
        .env("POD_NAME", "tally-0")
        .env("TALLY_DATA_DIR", dir.path())
        .args([
            "-c",
            "ulimit -v 1048576 && exec \"$0\" check-config --config /dev/zero",
        ])
        .arg(tally_bin());
    let started = Instant::now();
    let out = exit_within(cmd, Duration::from_secs(20));
    assert_refused(&out, 64, &["/dev/zero", "1048576-byte limit"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn duplicate_keys_and_wrong_types_in_the_file_exit_64_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let file = path.display().to_string();
    let env = [("TALLY_CONFIG".into(), path.clone().into_os_string())];
    let check = args(&["check-config"]);
    for (text, words) in [
        (
            r#"{"max_connections": 10, "max_connections": 20}"#,
            &["`max_connections`", "more than once"][..],
        ),
        (
            r#"{"max_connections": "10"}"#,
            &["`max_connections`", "a JSON number", "a string (\"10\")"],
        ),
        (r#"{"timezone": 3}"#, &["`timezone`", "a JSON string"]),
        (r#"{"data_dir": ["/data"]}"#, &["`data_dir`", "an array"]),
    ] {
        std::fs::write(&path, text).unwrap();
        let out = tally(dir.path(), &check, &env);
        let mut words = words.to_vec();
        words.push(&file);
        assert_refused(&out, 64, &words);
    }
    std::fs::write(&path, r#"{"max_connections": 10}"#).unwrap();
    let out = tally(dir.path(), &check, &env);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_tally_variable_is_a_warning_at_start_and_an_error_in_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let options = TallyOptions::new(dir.path()).env("TALLY_LISTN", "127.0.0.1:9");
    let tally_serve = Tally::start(&options).unwrap();
    let logs = tally_serve.logs();
    let warning = logs
        .iter()
        .find(|l| l.contains("TALLY_LISTN"))
        .unwrap_or_else(|| panic!("no line names TALLY_LISTN: {logs:#?}"));
    assert!(warning.contains("\"WARN\""), "{warning}");
    drop(tally_serve);

    let out = tally(
        dir.path(),
        &args(&["check-config"]),
        &[("TALLY_LISTN".into(), "127.0.0.1:9".into())],
    );
    assert_refused(&out, 64, &["TALLY_LISTN"]);
}

/// Every `TALLY_*` name the chart, the scripts and the tests use is either
/// a setting or known not to be one: set all at once, `check-config`
/// passes. A new helper variable must be added to config.rs's list.
#[test]
fn every_tally_variable_the_repository_uses_is_known() {
    let dir = tempfile::tempdir().unwrap();
    let help = tally(dir.path(), &args(&["--help"]), &[]);
    // Whitespace made one space: clap wraps `[env: NAME]` across lines.
    let help = String::from_utf8_lossy(&help.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let root = workspace_root();
    // This file and config.rs (the list itself) name unknown variables on
    // purpose, in their tests.
    let skip = [
        root.join("integration/tests/settings.rs"),
        root.join("src/config.rs"),
    ];
    let mut names = std::collections::BTreeSet::new();
    for top in [
        "chart",
        "integration",
        "scripts",
        "src",
        "examples",
        "docs",
        "tests",
        "benches",
        "Dockerfile",
        "README.md",
    ] {
        collect_names(&root.join(top), &skip, &mut names);
    }
    let others: Vec<(OsString, OsString)> = names
        .iter()
        .filter(|name| !help.contains(&format!("[env: {name}]")))
        .map(|name| (name.into(), "1".into()))
        .collect();
    assert!(
        others.iter().any(|(k, _)| k == "TALLY_BIN"),
        "the scan found the test helpers' variables: {names:?}"
    );
    let out = tally(dir.path(), &args(&["check-config"]), &others);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{others:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `TALLY_[A-Z0-9_]+` names in the files under `path` (but `skip`).
fn collect_names(path: &Path, skip: &[PathBuf], names: &mut std::collections::BTreeSet<String>) {
    if skip.iter().any(|s| s == path)
        || path
            .file_name()
            .is_some_and(|n| n == "target" || n == ".git")
    {
        return;
    }
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for entry in entries {
            collect_names(&entry, skip, names);
        }
        return;
    }
    let Ok(bytes) = std::fs::read(path) else {
        return;
    };
    let text = String::from_utf8_lossy(&bytes);
    for (at, _) in text.match_indices("TALLY_") {
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        // `TALLY_*` in prose, `TALLY_SIM_` as a prefix: not names.
        if !name.ends_with('_') {
            names.insert(name);
        }
    }
}

#[test]
fn listen_and_peer_listen_on_one_port_exit_64_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let out = tally(
        dir.path(),
        &args(&[
            "check-config",
            "--listen",
            "127.0.0.1:18080",
            "--peer-listen",
            "127.0.0.1:18080",
        ]),
        &[],
    );
    assert_refused(
        &out,
        64,
        &["`listen`", "`peer_listen`", "--peer-listen", "--listen"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_cannot_start_exits_with_its_own_code() {
    // Corrupt: not tally's format at all.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let state = dir.path().join("data/visits.state");
    std::fs::write(&state, b"count=12\n").unwrap();
    let out = tally(dir.path(), &[], &[]);
    assert_refused(&out, 65, &[&state.display().to_string(), "corrupt"]);
    let out = tally(dir.path(), &args(&["visits"]), &[]);
    assert_refused(&out, 65, &["corrupt"]);

    // Unreadable: visits.state is a directory.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data/visits.state")).unwrap();
    let out = tally(dir.path(), &[], &[]);
    assert_refused(&out, 74, &["cannot read", "visits.state"]);

    // Cannot create: the data directory would be on a read-only volume.
    let volume = ReadOnlyTmpfs::mount();
    let data = volume.0.path().join("data");
    let out = tally(volume.0.path(), &[], &[]);
    assert_refused(&out, 73, &["cannot create", &data.display().to_string()]);
    // Or its lock file cannot be created.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data/tally.lock")).unwrap();
    let out = tally(dir.path(), &[], &[]);
    assert_refused(&out, 73, &["cannot lock", "tally.lock"]);

    // Locked by another process: a temporary failure.
    let dir = tempfile::tempdir().unwrap();
    let first = Tally::start(&TallyOptions::new(&dir.path().join("data"))).unwrap();
    let out = tally(dir.path(), &[], &[("POD_NAME".into(), "tally-1".into())]);
    assert_refused(
        &out,
        75,
        &[
            "in use by another tally process",
            &format!("pid {}", first.pid()),
        ],
    );
}

/// An empty tmpfs mounted read-only for one test, unmounted in `Drop`.
struct ReadOnlyTmpfs(tempfile::TempDir);

impl ReadOnlyTmpfs {
    fn mount() -> ReadOnlyTmpfs {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this test mounts a read-only tmpfs: run it as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mount tmpfs on {} failed",
            dir.path().display()
        );
        ReadOnlyTmpfs(dir)
    }
}

impl Drop for ReadOnlyTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}
