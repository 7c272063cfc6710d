//! A real etcd server (Debian's `etcd-server`) on loopback ports, with its own data dir,
//! killed when dropped. One member, or one member of a cluster of several
//! ([`EtcdCluster`]).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::tools::{free_port, require};

/// One etcd member.
pub struct Etcd {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`, for clients.
    pub client_url: String,
    /// Its arguments, to start it again after [`Etcd::stop`].
    args: Vec<String>,
    /// Data dir and log.
    dir: tempfile::TempDir,
    /// The binary.
    bin: PathBuf,
}

impl Etcd {
    /// A single-member etcd, running and healthy.
    pub fn start() -> anyhow::Result<Self> {
        let mut cluster = EtcdCluster::start(1)?;
        Ok(cluster.members.remove(0))
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the member answers `/health` with `"health":"true"` (a cluster: once a
    /// leader is elected).
    pub fn wait_healthy(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("etcd exited ({status}): {}", self.log());
                }
            }
            let healthy = http
                .get(format!("{}/health", self.client_url))
                .send()
                .and_then(|r| r.text())
                .is_ok_and(|t| t.contains("\"health\":\"true\""));
            if healthy {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd at {} not healthy in time: {}",
                    self.client_url,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `kill -9`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()?;
        self.wait_healthy(Duration::from_secs(30))
    }

    /// The end of its log, for failure messages.
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Several etcd members forming one cluster.
pub struct EtcdCluster {
    /// The members, healthy after [`EtcdCluster::start`].
    pub members: Vec<Etcd>,
}

impl EtcdCluster {
    /// `n` members on loopback, started and healthy.
    pub fn start(n: usize) -> anyhow::Result<Self> {
        let bin = require("etcd", "etcd-server")?;
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let token = format!("porthole-test-{}", rand::random::<u32>());
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let dir = tempfile::tempdir()?;
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let args = vec![
                format!("--name=m{i}"),
                format!("--data-dir={}", dir.path().join("data").display()),
                format!("--listen-client-urls={client_url}"),
                format!("--advertise-client-urls={client_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster={}", initial.join(",")),
                format!("--initial-cluster-token={token}"),
                "--initial-cluster-state=new".into(),
                // Quick elections on loopback; small history so compaction is cheap.
                "--heartbeat-interval=50".into(),
                "--election-timeout=500".into(),
                "--log-level=warn".into(),
            ];
            let mut member = Etcd {
                child: None,
                client_url,
                args,
                dir,
                bin: bin.clone(),
            };
            member.spawn()?;
            members.push(member);
        }
        for member in &mut members {
            member.wait_healthy(Duration::from_secs(30))?;
        }
        Ok(Self { members })
    }

    /// Every member's client URL, comma-separated (the relay's `--etcd-endpoints`).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client_url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }
}
