//! The configuration file: the annotated example documents every setting and loads with the
//! real loader; bad files fail naming the key; flags and environment override the file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clap::Args;
use porthole_relay::config_file::load;
use porthole_relay::RelayConfig;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/relay.example.toml")
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

#[test]
fn the_example_documents_every_setting() -> Result<()> {
    let text = std::fs::read_to_string(example())?;
    let defaults = serde_json::to_value(RelayConfig::default())?;
    let keys = defaults.as_object().context("config is an object")?.keys();
    for key in keys {
        let documented = text.lines().any(|l| {
            let l = l.trim_start_matches('#').trim_start();
            l.strip_prefix(key.as_str())
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        });
        ensure!(
            documented,
            "deploy/relay.example.toml does not document `{key}`"
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
    ensure!(!table.is_empty());
    for (key, value) in &table {
        let want = serde_json::to_value(value)?;
        assert_eq!(loaded[key], want, "`{key}` in the example");
    }
    assert_eq!(config.data_dir, PathBuf::from("/var/lib/porthole"));
    assert_eq!(config.port_cooldown, Duration::from_secs(120));
    assert_eq!(
        config.denied_roles,
        vec!["tester".to_owned(), "qa".to_owned()]
    );
    Ok(())
}

#[test]
fn bad_files_fail_naming_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [
        ("prot_range = \"20000-20999\"\n", "prot_range"),
        ("port_range = \"20999-20000\"\n", "port_range"),
        ("agent_listen = \"nonsense\"\n", "agent_listen"),
        ("join_ttl = \"soon\"\n", "join_ttl"),
        ("max_visitors = \"many\"\n", "max_visitors"),
        ("log_format = \"xml\"\n", "log_format"),
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
    let path = write(&dir, "max_visitors = 0\n")?;
    let config = load(&matches(&[]), Some(&path)).map_err(anyhow::Error::msg)?;
    let err = config.validate().err().unwrap_or_default();
    ensure!(err.contains("max_visitors"), "{err}");
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
    Ok(())
}

/// Runs the real binary with `--config` and an environment variable and reads the range it
/// announces.
#[test]
fn the_environment_overrides_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = write(&dir, "port_range = \"21000-21099\"\n")?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_porthole-relay"))
        .arg("--config")
        .arg(&path)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "--agent-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--public-bind",
            "127.0.0.1",
        ])
        .env("PORTHOLE_PORT_RANGE", "23100-23199")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("public ports"));
    let _ = child.kill();
    let _ = child.wait();
    let line = line.context("no `public ports` line")?;
    ensure!(
        line.contains("23100-23199"),
        "the environment should win over the file: {line}"
    );
    Ok(())
}

#[test]
fn check_config_accepts_the_example_and_names_bad_keys() -> Result<()> {
    let ok = Command::new(env!("CARGO_BIN_EXE_porthole-relay"))
        .arg("check-config")
        .arg(example())
        .output()?;
    ensure!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    ensure!(String::from_utf8_lossy(&ok.stdout).contains("config OK"));
    let dir = tempfile::tempdir()?;
    let path = write(&dir, "denied_rolez = [\"qa\"]\n")?;
    let bad = Command::new(env!("CARGO_BIN_EXE_porthole-relay"))
        .arg("check-config")
        .arg(&path)
        .output()?;
    ensure!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    ensure!(
        err.contains("denied_rolez") && !err.contains("Stack backtrace"),
        "{err}"
    );
    Ok(())
}
