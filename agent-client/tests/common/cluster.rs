//! Relay nodes of one cluster as real processes on a real etcd: node `i` listens on
//! `127.0.0.{i+1}` (one loopback address per node stands in for one host), all nodes share
//! one public port range and the shared files of the first node's data dir.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use super::relay_process::{RelayProcess, RelaySetup};

/// The files every node of a cluster shares.
pub const SHARED_FILES: [&str; 4] = ["admin.token", "user-token.secret", "cluster.secret", "tls"];

/// Lease TTL for test nodes (short, so a killed node's lease expires soon).
pub const LEASE_TTL: &str = "3s";

/// Setups for `n` nodes: node `i` on 127.0.0.{i+1}, one shared port range.
pub fn setups(n: usize) -> anyhow::Result<Vec<RelaySetup>> {
    let first = RelaySetup::new()?;
    let mut all = vec![first];
    for i in 1..n {
        let mut s = RelaySetup::new()?;
        s.range = all[0].range.clone();
        s.ip = std::net::Ipv4Addr::new(127, 0, 0, u8::try_from(i + 1)?);
        all.push(s);
    }
    Ok(all)
}

/// Cluster flags for node `name` of `setup` on `etcd` (comma-separated endpoints); its
/// peer link on a free port of its address.
pub fn flags(setup: &RelaySetup, etcd: &str, name: &str, extra: &[&str]) -> Vec<String> {
    let peer = format!(
        "{}:{}",
        setup.ip,
        super::relay_process::free_port().unwrap_or(1)
    );
    let mut flags: Vec<String> = [
        "--etcd-endpoints",
        etcd,
        "--node-name",
        name,
        "--node-lease-ttl",
        LEASE_TTL,
        "--peer-listen",
        &peer,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    flags.extend(extra.iter().map(|s| (*s).to_owned()));
    flags
}

/// Copies the shared files from `from` (a started node's data dir) into `to`.
pub fn copy_shared(from: &Path, to: &Path) -> anyhow::Result<()> {
    for name in SHARED_FILES {
        let status = Command::new("cp")
            .arg("-a")
            .arg(from.join(name))
            .arg(to)
            .status()
            .with_context(|| format!("copying {name}"))?;
        anyhow::ensure!(status.success(), "cp {name} failed");
    }
    Ok(())
}

/// Starts `setups` as nodes `n1`, `n2`, ... of the cluster on `etcd`: the first creates the
/// shared files, the others get copies. Each node logs to `node-<i>.log` in its data dir.
pub fn start_nodes(
    setups: &[RelaySetup],
    etcd: &str,
    extra: &[&str],
) -> anyhow::Result<Vec<RelayProcess>> {
    let mut nodes = Vec::new();
    for (i, setup) in setups.iter().enumerate() {
        if i > 0 {
            copy_shared(setups[0].data.path(), setup.data.path())?;
        }
        nodes.push(start_node(setup, etcd, i, extra)?);
    }
    Ok(nodes)
}

/// Starts node `i` (named `n{i+1}`).
pub fn start_node(
    setup: &RelaySetup,
    etcd: &str,
    i: usize,
    extra: &[&str],
) -> anyhow::Result<RelayProcess> {
    let name = format!("n{}", i + 1);
    let flags = flags(setup, etcd, &name, extra);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let log = setup.data.path().join(format!("node-{}.log", i + 1));
    setup.start_logged(&flags, Some(&log)).with_context(|| {
        format!(
            "node {name}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    })
}

/// Runs the relay binary with `args` (expected to fail at start) and returns its exit
/// status and everything it wrote.
pub fn run_expecting_failure(
    setup: &RelaySetup,
    args: &[String],
) -> anyhow::Result<(std::process::ExitStatus, String)> {
    let mut child = Command::new(super::relay_process::binary()?)
        .arg("--data-dir")
        .arg(setup.data.path())
        .args([
            "--agent-listen",
            &format!("{}:{}", setup.ip, setup.agent_port),
        ])
        .args(["--api-listen", &format!("{}:{}", setup.ip, setup.api_port)])
        .args([
            "--public-host",
            "127.0.0.1",
            "--public-bind",
            &setup.ip.to_string(),
        ])
        .args(["--port-range", &setup.range])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("the relay was expected to stop at start, but still runs after 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status, text))
}
