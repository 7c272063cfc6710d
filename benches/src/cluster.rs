//! `porthole-bench cluster`: three relay nodes (127.0.0.1, .2, .3) of one cluster on a real
//! etcd (`etcd` on PATH: Debian's `etcd-server`), release binaries built with
//! `--features cluster`. Per round, measured in this order:
//!
//! - sessions created per second through one node, then through all three (round robin),
//!   8 client threads;
//! - DELETE through node 3 → the port refusing on all three addresses (p50/p99);
//! - bulk throughput (upload, download) through the node holding the agent and through
//!   another node (one relay hop);
//! - `kill -9` of the node holding the agent → a visitor through a surviving node gets an
//!   echo again (the node is started again afterwards for the next round).

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;
use serde_json::json;

use crate::bulk;
use crate::http::{delete, post_json};
use crate::porthole::{binary, parse_banner, RATE_BURST, RATE_PER_MINUTE};
use crate::stats::{gbit_per_sec, summarize, Percentiles};
use crate::target::Target;
use crate::tunnel::{echo_probe, free_port, Proc, Role};

/// What to measure, and how much.
#[derive(Clone, Debug, clap::Args)]
pub struct ClusterArgs {
    /// Rounds (each measures everything once).
    #[arg(long, default_value = "3")]
    pub rounds: usize,
    /// Sessions created per create measurement.
    #[arg(long, default_value = "300")]
    pub creates: usize,
    /// DELETEs timed per round.
    #[arg(long, default_value = "30")]
    pub deletes: usize,
    /// Seconds of each bulk transfer.
    #[arg(long, default_value = "3")]
    pub transfer_secs: u64,
    /// `--node-lease-ttl` of the nodes (failover takes about this long).
    #[arg(long, default_value = "3s")]
    pub lease_ttl: String,
}

/// One round's numbers.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterRound {
    /// Creates per second through node 1 only.
    pub creates_per_sec_one_node: f64,
    /// Creates per second through the three nodes, round robin.
    pub creates_per_sec_three_nodes: f64,
    /// DELETE sent (through node 3) → the port refusing on every node, microseconds (the
    /// DELETE is written to etcd before it is answered).
    pub delete_to_closed_everywhere: Percentiles,
    /// Upload through the owner, Gbit/s.
    pub upload_owner_gbps: f64,
    /// Upload through another node, Gbit/s.
    pub upload_other_gbps: f64,
    /// Download through the owner, Gbit/s.
    pub download_owner_gbps: f64,
    /// Download through another node, Gbit/s.
    pub download_other_gbps: f64,
    /// `kill -9` of the owner → an echo through a surviving node, milliseconds.
    pub failover_ms: f64,
}

/// The three nodes and the etcd under them.
struct Cluster {
    etcd: Proc,
    nodes: Vec<Option<Proc>>,
    apis: Vec<SocketAddr>,
    agents: Vec<String>,
    relay_bin: PathBuf,
    work: PathBuf,
    etcd_url: String,
    range: String,
    lease_ttl: String,
    admin: String,
    pin: String,
}

fn ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, u8::try_from(i + 1).unwrap_or(1))
}

impl Cluster {
    fn start(bin_dir: &Path, work: &Path, lease_ttl: &str) -> anyhow::Result<Self> {
        let relay_bin = binary(bin_dir, "porthole-relay")?;
        let _ = std::fs::remove_dir_all(work);
        std::fs::create_dir_all(work)?;
        let (client, peer) = (free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{client}");
        let mut cmd = Command::new("etcd");
        cmd.arg(format!("--data-dir={}", work.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=default=http://127.0.0.1:{peer}"))
            .arg("--log-level=warn");
        let mut etcd = Proc::spawn(Role::Server, cmd, &work.join("etcd.log"))
            .context("starting etcd (Debian package etcd-server)")?;
        crate::tunnel::wait_listening(&mut etcd, SocketAddr::from(([127, 0, 0, 1], client)))?;
        // 2000 ports below the ephemeral range: room for a round's 300 + 300 sessions while
        // the previous ones cool down.
        let lo = 22000 + (std::process::id() % 4) as u16 * 2500;
        let mut cluster = Self {
            etcd,
            nodes: vec![None, None, None],
            apis: Vec::new(),
            agents: Vec::new(),
            relay_bin,
            work: work.to_owned(),
            etcd_url,
            range: format!("{lo}-{}", lo + 1999),
            lease_ttl: lease_ttl.to_owned(),
            admin: String::new(),
            pin: String::new(),
        };
        for i in 0..3 {
            let (api, agent) = (free_port()?, free_port()?);
            cluster.apis.push(SocketAddr::from((ip(i), api)));
            cluster.agents.push(format!("{}:{agent}", ip(i)));
        }
        for i in 0..3 {
            if i > 0 {
                std::fs::create_dir_all(work.join(format!("n{}", i + 1)))?;
                for f in ["admin.token", "user-token.secret", "cluster.secret", "tls"] {
                    let status = Command::new("cp")
                        .arg("-a")
                        .arg(work.join("n1").join(f))
                        .arg(work.join(format!("n{}", i + 1)))
                        .status()?;
                    if !status.success() {
                        bail!("copying {f}");
                    }
                }
            }
            cluster.start_node(i)?;
        }
        Ok(cluster)
    }

    fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let data = self.work.join(format!("n{}", i + 1));
        std::fs::create_dir_all(&data)?;
        let mut cmd = Command::new(&self.relay_bin);
        cmd.arg("--data-dir")
            .arg(&data)
            .args(["--agent-listen", &self.agents[i]])
            .args(["--api-listen", &self.apis[i].to_string()])
            .args([
                "--public-host",
                "127.0.0.1",
                "--public-bind",
                &ip(i).to_string(),
            ])
            .args(["--port-range", &self.range, "--port-cooldown", "0s"])
            .args(["--max-visitors", "64", "--audit-log", "-"])
            // One source address probes in a tight loop: a throttled probe would time the
            // rate limiter, not the failover.
            .args(["--visitor-rate-burst", RATE_BURST])
            .args(["--visitor-rate-per-minute", RATE_PER_MINUTE])
            .args(["--etcd-endpoints", &self.etcd_url])
            .args(["--node-name", &format!("n{}", i + 1)])
            .args(["--node-lease-ttl", &self.lease_ttl])
            .args(["--peer-listen", &format!("{}:{}", ip(i), free_port()?)])
            .env("RUST_LOG", "warn");
        let mut node = Proc::spawn(
            Role::Server,
            cmd,
            &self.work.join(format!("n{}.log", i + 1)),
        )?;
        let text = node
            .wait_log(&["agent endpoint", "HTTP API", "SHA-256", "admin token"])
            .with_context(|| format!("node n{} did not start", i + 1))?;
        let banner = parse_banner(&text)?;
        if self.admin.is_empty() {
            self.admin = std::fs::read_to_string(&banner.admin_token_path)?
                .trim()
                .to_owned();
            self.pin = banner.fingerprint;
        }
        self.nodes[i] = Some(node);
        Ok(())
    }

    fn create(&self, node: usize) -> anyhow::Result<(String, String, u16)> {
        let body = json!({"build_id": "bench", "app_id": "bench", "services": ["ssh"]});
        let (status, v) = post_json(self.apis[node], "/v1/sessions", &self.admin, &body)?;
        if status != 201 && status != 200 {
            bail!("create through node {}: {status} {v}", node + 1);
        }
        let port = v["endpoints"][0]["port"].as_u64().context("port")? as u16;
        Ok((
            v["session_id"].as_str().context("id")?.to_owned(),
            v["join_token"].as_str().context("token")?.to_owned(),
            port,
        ))
    }

    fn delete(&self, node: usize, id: &str) -> anyhow::Result<()> {
        let status = delete(self.apis[node], &format!("/v1/sessions/{id}"), &self.admin)?;
        if status != 200 {
            bail!("DELETE through node {}: {status}", node + 1);
        }
        Ok(())
    }
}

/// Creates per second: `total` sessions from 8 threads through `nodes` round robin; every
/// session is deleted afterwards (not timed).
fn creates_per_sec(c: &Cluster, nodes: &[usize], total: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    let ids = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let mut handles = Vec::new();
        for t in 0..8 {
            let (ids, c) = (&ids, c);
            handles.push(scope.spawn(move || -> anyhow::Result<()> {
                let mut i = t;
                while i < total {
                    let (id, _, _) = c.create(nodes[i % nodes.len()])?;
                    ids.lock().map_err(|_| anyhow::anyhow!("lock"))?.push(id);
                    i += 8;
                }
                Ok(())
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a create thread panicked"))??;
        }
        Ok(())
    })?;
    let rate = total as f64 / start.elapsed().as_secs_f64();
    for id in ids.into_inner().map_err(|_| anyhow::anyhow!("lock"))? {
        c.delete(0, &id)?;
    }
    Ok(rate)
}

fn refuses(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Polls `check` every millisecond for up to 20 s.
fn until(what: &str, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// DELETE sent through node 3 → every node refuses the port.
fn delete_to_closed(c: &Cluster, count: usize) -> anyhow::Result<Percentiles> {
    let mut samples = Vec::new();
    for _ in 0..count {
        let (id, _, port) = c.create(0)?;
        for i in 0..3 {
            let addr = SocketAddr::from((ip(i), port));
            until("the port to open everywhere", || !refuses(addr))?;
        }
        let start = Instant::now();
        c.delete(2, &id)?;
        for i in 0..3 {
            let addr = SocketAddr::from((ip(i), port));
            until("the port to close everywhere", || refuses(addr))?;
        }
        samples.push(start.elapsed());
    }
    Ok(summarize(&mut samples))
}

/// One round; the agent joins node 2 (listed first), then nodes 3 and 1.
fn round(
    c: &mut Cluster,
    args: &ClusterArgs,
    bin_dir: &Path,
    target: &Target,
) -> anyhow::Result<ClusterRound> {
    let one = creates_per_sec(c, &[0], args.creates)?;
    let three = creates_per_sec(c, &[0, 1, 2], args.creates)?;
    let deletes = delete_to_closed(c, args.deletes)?;
    let (id, token, port) = c.create(0)?;
    let relays = format!("{},{},{}", c.agents[1], c.agents[2], c.agents[0]);
    let mut agent_cmd = Command::new(binary(bin_dir, "porthole-agent")?);
    agent_cmd
        .args(["--relay", &relays, "--pin-sha256", &c.pin])
        .args(["--service", &format!("ssh={}", target.addr)])
        .args(["--ssh-user", "bench"])
        .arg("--pid-file")
        .arg(c.work.join("agent.pid"))
        .env("PORTHOLE_TOKEN", &token);
    let mut agent = Proc::spawn(Role::Client, agent_cmd, &c.work.join("agent.log"))?;
    agent.wait_log(&["remote access session"])?;
    let owner = SocketAddr::from((ip(1), port));
    let other = SocketAddr::from((ip(0), port));
    for addr in [owner, other] {
        echo_probe(addr, Duration::from_secs(10))?;
    }
    let secs = Duration::from_secs(args.transfer_secs);
    let gbps = |t: bulk::Transfer| gbit_per_sec(t.bytes, t.elapsed);
    let upload_owner_gbps = gbps(bulk::upload(owner, secs)?);
    let upload_other_gbps = gbps(bulk::upload(other, secs)?);
    let download_owner_gbps = gbps(bulk::download(owner, secs)?);
    let download_other_gbps = gbps(bulk::download(other, secs)?);
    // kill -9 of the owner (node 2); a visitor through node 3 gets an echo again.
    let killed = Instant::now();
    c.nodes[1] = None;
    let survivor = SocketAddr::from((ip(2), port));
    until("an echo through a surviving node", || {
        echo_probe(survivor, Duration::from_millis(500)).is_ok()
    })?;
    let failover_ms = killed.elapsed().as_secs_f64() * 1e3;
    drop(agent);
    c.delete(0, &id)?;
    c.start_node(1)?;
    Ok(ClusterRound {
        creates_per_sec_one_node: one,
        creates_per_sec_three_nodes: three,
        delete_to_closed_everywhere: deletes,
        upload_owner_gbps,
        upload_other_gbps,
        download_owner_gbps,
        download_other_gbps,
        failover_ms,
    })
}

/// Runs every round on one cluster.
pub fn run(args: &ClusterArgs, bin_dir: &Path, work: &Path) -> anyhow::Result<Vec<ClusterRound>> {
    let target = Target::start()?;
    let mut cluster = Cluster::start(bin_dir, work, &args.lease_ttl)?;
    let mut rounds = Vec::new();
    for r in 0..args.rounds {
        let got = round(&mut cluster, args, bin_dir, &target)
            .with_context(|| format!("round {}", r + 1))?;
        eprintln!("round {}: {got:?}", r + 1);
        rounds.push(got);
    }
    drop(cluster.etcd);
    Ok(rounds)
}
