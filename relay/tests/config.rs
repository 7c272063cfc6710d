//! The configuration file: the annotated example documents every setting and loads with the
//! real loader; bad files fail naming the key; flags and environment override the file;
//! `check-config` and `--log-format json` in the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clap::Args;
use porthole_relay::config::file::load;
use porthole_relay::config::{parse_ephemeral_range, EPHEMERAL_RANGE_FILE};
use porthole_relay::RelayConfig;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/relay.example.toml")
}

fn relay_bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_porthole-relay"));
    cmd.env_remove("PORTHOLE_CONFIG").env_remove("RUST_LOG");
    cmd
}

/// Flags parsed the way the binary parses them (the environment of this process applies).
fn matches(args: &[&str]) -> clap::ArgMatches {
    let cmd = RelayConfig::augment_args(clap::Command::new("porthole-relay"));
    cmd.get_matches_from(std::iter::once("porthole-relay").chain(args.iter().copied()))
}

fn write(dir: &tempfile::TempDir, text: &str) -> Result<PathBuf> {
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Every setting's name, from the struct itself (so a new setting joins automatically).
fn setting_names() -> Result<BTreeSet<String>> {
    let defaults = serde_json::to_value(RelayConfig::default())?;
    Ok(defaults
        .as_object()
        .context("config is an object")?
        .keys()
        .cloned()
        .collect())
}

/// `key = value` lines of the example, set or commented out (`# key = value`), with the
/// comment block just above each.
fn documented_keys(text: &str) -> Vec<(String, bool, String)> {
    let mut out = Vec::new();
    let mut comment = String::new();
    for line in text.lines() {
        let commented = line.starts_with('#');
        let body = line.trim_start_matches('#').trim();
        let key = body
            .split_once('=')
            .map(|(k, _)| k.trim())
            .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        match key {
            Some(key) => out.push((key.to_owned(), !commented, comment.clone())),
            None if commented => {
                comment.push_str(body);
                comment.push('\n');
            }
            None => comment.clear(),
        }
    }
    out
}

#[test]
fn the_example_documents_every_setting_with_its_default() -> Result<()> {
    let text = std::fs::read_to_string(example())?;
    let documented = documented_keys(&text);
    let in_file: BTreeSet<String> = documented.iter().map(|(k, _, _)| k.clone()).collect();
    let settings = setting_names()?;
    let missing: Vec<_> = settings.difference(&in_file).collect();
    ensure!(
        missing.is_empty(),
        "deploy/relay.example.toml does not document {missing:?}"
    );
    let unknown: Vec<_> = in_file.difference(&settings).collect();
    ensure!(unknown.is_empty(), "not settings: {unknown:?}");
    let defaults = serde_json::to_value(RelayConfig::default())?;
    for (key, _, comment) in &documented {
        let shown = match &defaults[key.as_str()] {
            serde_json::Value::Null => String::from("Default"),
            value => format!("Default {}", toml::Value::try_from(value)?),
        };
        ensure!(
            comment.contains(&shown),
            "the comment above `{key}` should say `{shown}`:\n{comment}"
        );
    }
    Ok(())
}

#[test]
fn the_example_loads_with_the_values_it_shows() -> Result<()> {
    let config = load(&matches(&[]), Some(&example())).map_err(anyhow::Error::msg)?;
    config.validate().map_err(anyhow::Error::msg)?;
    let table: toml::Table = toml::from_str(&std::fs::read_to_string(example())?)?;
    let loaded = serde_json::to_value(&config)?;
    ensure!(table.len() >= 15, "most settings are set in the example");
    for (key, value) in &table {
        let want = serde_json::to_value(value)?;
        assert_eq!(loaded[key], want, "`{key}` in the example");
    }
    assert_eq!(config.data_dir, PathBuf::from("/var/lib/porthole"));
    assert_eq!(config.port_cooldown, Duration::from_secs(120));
    assert_eq!(config.shutdown_grace, Duration::from_secs(30));
    assert_eq!(config.port_range.to_string(), "20000-20999");
    assert_eq!(
        config.denied_roles,
        vec!["tester".to_owned(), "qa".to_owned()]
    );
    Ok(())
}

/// The commented-out settings are examples too: uncommented, they load and are valid.
#[test]
fn the_commented_examples_load_when_uncommented() -> Result<()> {
    let text = std::fs::read_to_string(example())?;
    let settings = setting_names()?;
    let uncommented: String = text
        .lines()
        .map(|line| {
            let body = line.trim_start_matches('#').trim_start();
            let is_setting = body
                .split_once('=')
                .is_some_and(|(k, _)| settings.contains(k.trim()));
            if is_setting {
                body
            } else {
                line
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut table: toml::Table = toml::from_str(&uncommented)?;
    ensure!(table.len() == settings.len(), "every setting once");
    let mut uncommented = uncommented;
    if !cfg!(feature = "cluster") {
        // A relay built without cluster support refuses etcd endpoints (a test of its own).
        table.remove("etcd_endpoints");
        uncommented = toml::to_string(&table)?;
    }
    let dir = tempfile::tempdir()?;
    let path = write(&dir, &uncommented)?;
    let config = load(&matches(&[]), Some(&path)).map_err(anyhow::Error::msg)?;
    config.validate().map_err(anyhow::Error::msg)?;
    let loaded = serde_json::to_value(&config)?;
    for (key, value) in &table {
        assert_eq!(loaded[key], serde_json::to_value(value)?, "`{key}`");
    }
    Ok(())
}

#[test]
fn bad_files_fail_naming_the_file_and_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [
        ("prot_range = \"20000-20999\"\n", "prot_range"),
        ("port_range = \"20999-20000\"\n", "port_range"),
        ("agent_listen = \"nonsense\"\n", "agent_listen"),
        ("join_ttl = \"soon\"\n", "join_ttl"),
        ("max_visitors = \"many\"\n", "max_visitors"),
        ("log_format = \"xml\"\n", "log_format"),
        // The bad element is lines away from the key.
        ("denied_roles = [\n  \"qa\",\n  5,\n]\n", "denied_roles"),
        ("port_range = \"1-2\"\nport_range = \"3-4\"\n", "port_range"),
    ];
    for (text, key) in cases {
        let path = write(&dir, text)?;
        let err = load(&matches(&[]), Some(&path))
            .err()
            .context(format!("`{text}` should fail"))?;
        ensure!(
            err.contains(key),
            "error for `{}` should name `{key}`: {err}",
            text.trim()
        );
        ensure!(
            err.contains("relay.toml"),
            "error should name the file: {err}"
        );
    }
    // Parsed, but invalid: validate() names the key.
    for (text, key) in [
        ("max_visitors = 0\n", "max_visitors"),
        ("heartbeat_interval = \"0s\"\n", "heartbeat_interval"),
        ("shutdown_grace = \"0s\"\n", "shutdown_grace"),
        ("denied_roles = [\"qa\", \"\"]\n", "denied_roles"),
        ("tls_cert = \"/etc/cert.pem\"\n", "tls_cert"),
    ] {
        let path = write(&dir, text)?;
        let config = load(&matches(&[]), Some(&path)).map_err(anyhow::Error::msg)?;
        let err = config.validate().err().unwrap_or_default();
        ensure!(err.starts_with(&format!("{key}: ")), "`{text}`: {err}");
    }
    let missing = load(&matches(&[]), Some(&dir.path().join("absent.toml")));
    ensure!(missing.is_err_and(|e| e.contains("absent.toml")));
    Ok(())
}

#[test]
fn flags_override_the_file_and_the_file_overrides_defaults() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = write(&dir, "port_range = \"21000-21099\"\nmax_visitors = 4\n")?;
    let from_file = load(&matches(&[]), Some(&path)).map_err(anyhow::Error::msg)?;
    assert_eq!(from_file.port_range.to_string(), "21000-21099");
    assert_eq!(from_file.max_visitors, 4);
    assert_eq!(
        from_file.join_ttl,
        RelayConfig::default().join_ttl,
        "unset keys keep defaults"
    );
    let flagged = load(&matches(&["--port-range", "22000-22099"]), Some(&path))
        .map_err(anyhow::Error::msg)?;
    assert_eq!(flagged.port_range.to_string(), "22000-22099");
    assert_eq!(
        flagged.max_visitors, 4,
        "keys without a flag keep the file's value"
    );
    // A flag equal to the default still wins over the file.
    let back =
        load(&matches(&["--max-visitors", "16"]), Some(&path)).map_err(anyhow::Error::msg)?;
    assert_eq!(back.max_visitors, 16);
    Ok(())
}

/// The certificate and key may come from different layers; the merged pair is what counts.
#[test]
fn the_tls_pair_may_come_from_file_and_flag() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = write(&dir, "tls_key = \"/etc/porthole/key.pem\"\n")?;
    let alone = load(&matches(&[]), Some(&path)).map_err(anyhow::Error::msg)?;
    ensure!(alone.validate().is_err_and(|e| e.starts_with("tls_key: ")));
    let both = load(
        &matches(&["--tls-cert", "/etc/porthole/cert.pem"]),
        Some(&path),
    )
    .map_err(anyhow::Error::msg)?;
    both.validate().map_err(anyhow::Error::msg)?;
    assert_eq!(both.tls_cert, Some(PathBuf::from("/etc/porthole/cert.pem")));
    assert_eq!(both.tls_key, Some(PathBuf::from("/etc/porthole/key.pem")));
    Ok(())
}

/// Starts the real relay with `configure`d flags and environment on loopback and a fresh data
/// dir; returns the banner's `public ports` line and everything it wrote to stderr.
fn run_relay(dir: &Path, configure: impl FnOnce(&mut Command)) -> Result<(String, String)> {
    let mut cmd = relay_bin();
    cmd.arg("--data-dir")
        .arg(dir.join("data"))
        .args([
            "--agent-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .args(["--public-bind", "127.0.0.1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    configure(&mut cmd);
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("public ports"));
    let _ = child.kill();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut stderr)?;
    let _ = child.wait();
    let line = line.with_context(|| format!("no `public ports` line; stderr:\n{stderr}"))?;
    Ok((line, stderr))
}

/// Runs the real binary with `--config` and an environment variable and reads the range it
/// announces.
#[test]
fn the_environment_overrides_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = write(&dir, "port_range = \"21000-21099\"\n")?;
    let (line, _) = run_relay(dir.path(), |cmd| {
        cmd.arg("--config")
            .arg(&path)
            .env("PORTHOLE_PORT_RANGE", "23100-23199");
    })?;
    ensure!(
        line.contains("23100-23199"),
        "the environment should win over the file: {line}"
    );
    Ok(())
}

/// `log_format = "json"` in a file named by PORTHOLE_CONFIG: log lines are JSON objects.
#[test]
fn json_logs_from_the_config_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = write(
        &dir,
        "log_format = \"json\"\nport_range = \"21200-21299\"\n",
    )?;
    let (line, stderr) = run_relay(dir.path(), |cmd| {
        cmd.env("PORTHOLE_CONFIG", &path);
    })?;
    ensure!(
        line.contains("21200-21299"),
        "PORTHOLE_CONFIG applied: {line}"
    );
    // A fresh data dir: the self-signed certificate is generated and logged at info.
    let first = stderr.lines().next().context("no log line")?;
    let record: serde_json::Value =
        serde_json::from_str(first).with_context(|| format!("not JSON: {first}"))?;
    assert_eq!(record["level"], "INFO", "{first}");
    ensure!(
        record["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("self-signed")),
        "{first}"
    );
    // The default stays human text.
    let text_dir = tempfile::tempdir()?;
    let (_, stderr) = run_relay(text_dir.path(), |_| {})?;
    let first = stderr.lines().next().context("no log line")?;
    ensure!(
        serde_json::from_str::<serde_json::Value>(first).is_err() && first.contains("INFO"),
        "{first}"
    );
    Ok(())
}

fn check_config(file: &Path, configure: impl FnOnce(&mut Command)) -> Result<Output> {
    let mut cmd = relay_bin();
    cmd.arg("check-config").arg(file);
    configure(&mut cmd);
    Ok(cmd.output()?)
}

#[test]
fn check_config_accepts_the_example_and_names_bad_keys() -> Result<()> {
    let ok = check_config(&example(), |_| {})?;
    ensure!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    ensure!(String::from_utf8_lossy(&ok.stdout).contains("config OK"));
    let dir = tempfile::tempdir()?;
    for (text, key) in [
        ("denied_rolez = [\"qa\"]\n", "denied_rolez"),
        ("port_range = \"20999-20000\"\n", "port_range"),
        ("max_visitors = 0\n", "max_visitors"),
    ] {
        let path = write(&dir, text)?;
        let bad = check_config(&path, |_| {})?;
        ensure!(!bad.status.success(), "`{text}` passed");
        let err = String::from_utf8_lossy(&bad.stderr);
        ensure!(
            err.contains(key) && err.contains("relay.toml") && !err.contains("backtrace"),
            "{err}"
        );
        ensure!(!String::from_utf8_lossy(&bad.stdout).contains("config OK"));
    }
    Ok(())
}

/// check-config applies the environment as a start would, and says where a bad value came
/// from.
#[test]
fn check_config_applies_the_environment() -> Result<()> {
    let bad = check_config(&example(), |cmd| {
        cmd.env("PORTHOLE_MAX_VISITORS", "0");
    })?;
    ensure!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    ensure!(
        err.contains("max_visitors") && err.contains("PORTHOLE_MAX_VISITORS"),
        "{err}"
    );
    Ok(())
}

/// A port range inside the kernel's ephemeral range passes, with a warning that says why.
#[test]
fn check_config_warns_about_the_ephemeral_range() -> Result<()> {
    let Some((lo, hi)) = std::fs::read_to_string(EPHEMERAL_RANGE_FILE)
        .ok()
        .and_then(|t| parse_ephemeral_range(&t))
    else {
        eprintln!("no {EPHEMERAL_RANGE_FILE} here: nothing to overlap");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let path = write(&dir, &format!("port_range = \"{lo}-{hi}\"\n"))?;
    let out = check_config(&path, |_| {})?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "a warning is not an error: {stdout}");
    ensure!(
        stdout.contains("warning: port_range")
            && stdout.contains("ephemeral")
            && stdout.contains("outgoing connections")
            && stdout.contains("config OK"),
        "{stdout}"
    );
    let example_overlaps = lo <= 20999 && 20000 <= hi;
    if !example_overlaps {
        let quiet = check_config(&example(), |_| {})?;
        ensure!(!String::from_utf8_lossy(&quiet.stdout).contains("warning"));
    }
    Ok(())
}
