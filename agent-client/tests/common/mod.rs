//! Shared harness for the end-to-end tests: an in-process relay ([`relay`]), the real agent
//! binary ([`agent`]; detached as a build step: [`detached`]), a TCP proxy that can cut the agent's link ([`proxy`]), a TCP echo
//! service ([`echo`]), a fake agent speaking the protocol ([`raw`]), real OpenSSH / TigerVNC peers ([`peers`]),
//! relay nodes of one cluster on a real etcd ([`cluster`]),
//! and headless Chromium over the DevTools protocol ([`browser`]); `/metrics` scrapes ([`scrape`])
//! and test secrets ([`secrets`]).
//! Most tests start with [`fixture::Tunnel`]: a session whose agent registered and forwards
//! to an echo service.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod agent;
pub mod browser;
pub mod cluster;
pub mod detached;
pub mod echo;
pub mod fixture;
pub mod launch;
pub mod peers;
pub mod proxy;
pub mod raw;
pub mod relay;
pub mod relay_process;
pub mod scrape;
pub mod secrets;

use std::time::{Duration, Instant};

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The time in an RFC 3339 field (`ts` of an audit line, `deadline` of a session view).
pub fn time_of(value: &serde_json::Value, field: &str) -> anyhow::Result<std::time::SystemTime> {
    use anyhow::Context as _;
    let text = value[field]
        .as_str()
        .with_context(|| format!("no `{field}` in {value}"))?;
    humantime::parse_rfc3339(text).with_context(|| format!("`{field}` = {text}"))
}

/// Whether a TCP connection to 127.0.0.1:`port` is refused (nothing listens).
pub fn port_refuses(port: u16) -> bool {
    matches!(
        std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// `/proc/PID/...` of `pid`, or of this process for `None`.
fn proc_path(pid: Option<u32>, what: &str) -> String {
    match pid {
        Some(pid) => format!("/proc/{pid}/{what}"),
        None => format!("/proc/self/{what}"),
    }
}

/// Open file descriptors of `pid` (`None`: this process, where the in-process relay runs).
pub fn open_fds(pid: Option<u32>) -> anyhow::Result<usize> {
    let dir = proc_path(pid, "fd");
    Ok(std::fs::read_dir(&dir)
        .map_err(|e| anyhow::anyhow!("reading {dir}: {e}"))?
        .count())
}

/// The open file descriptors of `pid` counted by kind (`socket`, `pipe`, `anon_inode:[eventpoll]`,
/// files by path), for failure messages.
pub fn fd_summary(pid: Option<u32>) -> String {
    let dir = proc_path(pid, "fd");
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let target = std::fs::read_link(entry.path())
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| "?".into());
        let kind = match target.split_once(":[") {
            Some((kind @ ("socket" | "pipe"), _)) => kind.to_owned(),
            _ => target,
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waits until `pid` (`None`: this process) has at most `baseline` open file descriptors;
/// returns the count then. On timeout the error lists what is still open.
pub fn wait_fds_back(
    what: &str,
    pid: Option<u32>,
    baseline: usize,
    timeout: Duration,
) -> anyhow::Result<usize> {
    let mut last = 0;
    let got = wait_for(
        &format!("{what}: open fds back to {baseline}"),
        timeout,
        || {
            last = open_fds(pid).ok()?;
            (last <= baseline).then_some(last)
        },
    );
    got.map_err(|e| anyhow::anyhow!("{e}: still {last} open ({})", fd_summary(pid)))
}

/// Resident memory of `pid` (`None`: this process) in KiB, `VmRSS` of `/proc/PID/status`.
pub fn vm_rss_kib(pid: Option<u32>) -> anyhow::Result<u64> {
    let path = proc_path(pid, "status");
    let status = std::fs::read_to_string(&path)?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in {path}"))
}

/// The soft and hard `RLIMIT_NOFILE` of `pid` (`None`: this process), from
/// `/proc/PID/limits` (`unlimited` reads as `u64::MAX`).
pub fn nofile_limits(pid: Option<u32>) -> anyhow::Result<(u64, u64)> {
    let path = proc_path(pid, "limits");
    let limits = std::fs::read_to_string(&path)?;
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .ok_or_else(|| anyhow::anyhow!("no `Max open files` in {path}"))?;
    let mut values = line.split_whitespace().map(|v| match v {
        "unlimited" => Some(u64::MAX),
        v => v.parse().ok(),
    });
    match (values.next().flatten(), values.next().flatten()) {
        (Some(soft), Some(hard)) => Ok((soft, hard)),
        _ => anyhow::bail!("cannot read the open-files limits in {path}: {line}"),
    }
}

/// Raises the soft `RLIMIT_NOFILE` of `pid` (`None`: this process) to at least `needed`
/// (at most the hard limit) with `prlimit(1)`: the workspace's `nix` lacks the `resource`
/// feature and the crates deny `unsafe`. Returns the soft limit in force afterwards, which
/// the caller compares with what it needs.
pub fn raise_nofile(pid: Option<u32>, needed: u64) -> anyhow::Result<u64> {
    let (soft, hard) = nofile_limits(pid)?;
    if soft >= needed || hard <= soft {
        return Ok(soft);
    }
    let target = needed.min(hard);
    let hard_text = if hard == u64::MAX {
        "unlimited".to_owned()
    } else {
        hard.to_string()
    };
    let pid = pid.unwrap_or_else(std::process::id);
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={target}:{hard_text}"))
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("prlimit could not raise the open-files limit of {pid}: {status:?}");
    }
    Ok(nofile_limits(Some(pid))?.0)
}
