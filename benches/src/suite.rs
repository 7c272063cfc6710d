//! The measurement suite run against one ready candidate, and what it records.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use crate::bulk::{download, upload, Transfer};
use crate::latency::{connect_first_byte, ping_pong, ping_pong_loaded};
use crate::procfs::{cpu_seconds, rss_kib};
use crate::stats::{cpu_per_gb, gbit_per_sec, median, ratio, summarize, Percentiles};
use crate::tunnel::{echo_probe, Role, Tunnel};

/// How the suite runs; every step is bounded by `duration` or a count.
#[derive(Clone, Debug, Serialize)]
pub struct SuiteOptions {
    /// Length of each timed step.
    #[serde(with = "humantime_secs")]
    pub duration: Duration,
    /// Most sequential connections in the connect step.
    pub connects: usize,
    /// Idle visitor connections held for the memory step (0 skips it).
    pub idle_conns: usize,
    /// Bulk streams running during the loaded ping-pong.
    pub streams: usize,
    /// Runs of each bulk direction (the median is reported) and ping-pong connections
    /// (samples pooled).
    pub repeat: usize,
}

mod humantime_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// CPU time one process spent during a step.
#[derive(Clone, Debug, Serialize)]
pub struct ProcCpu {
    /// Which process.
    pub role: Role,
    /// User + system seconds.
    pub seconds: f64,
}

/// One bulk direction, over `repeat` runs.
#[derive(Clone, Debug, Serialize)]
pub struct BulkResult {
    /// Median throughput at the receiver over the runs.
    pub gbit_per_sec: f64,
    /// Throughput of each run.
    pub runs_gbit_per_sec: Vec<f64>,
    /// Bytes moved, all runs.
    pub bytes: u64,
    /// Seconds it took, all runs.
    pub seconds: f64,
    /// CPU time of each tunnel process during the transfers.
    pub cpu: Vec<ProcCpu>,
    /// CPU seconds of all tunnel processes per 10^9 bytes (none for direct loopback).
    pub cpu_s_per_gb: Option<f64>,
}

/// Sequential connect → first echoed byte.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectResult {
    /// Latency of each connection's first echoed byte.
    pub latency: Percentiles,
    /// Connections completed per second, one at a time.
    pub per_sec: f64,
}

/// RSS of one process, idle and with the idle connections open.
#[derive(Clone, Debug, Serialize)]
pub struct ProcMemory {
    /// Which process.
    pub role: Role,
    /// RSS with no visitor, KiB.
    pub idle_kib: u64,
    /// RSS with the idle connections open, KiB.
    pub loaded_kib: u64,
    /// (loaded - idle) / connections.
    pub kib_per_conn: f64,
}

/// The memory step.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryResult {
    /// Idle visitor connections held open.
    pub connections: usize,
    /// Per process.
    pub procs: Vec<ProcMemory>,
}

/// Ping-pong while bulk streams run.
#[derive(Clone, Debug, Serialize)]
pub struct LoadedResult {
    /// Bulk streams.
    pub streams: usize,
    /// Ping-pong latency under load.
    pub ping: Percentiles,
    /// Combined throughput of the streams.
    pub bulk_gbit_per_sec: f64,
    /// Loaded p99 / unloaded p99.
    pub p99_vs_unloaded: Option<f64>,
}

/// Everything measured for one candidate; a failed step leaves its field empty and says
/// why in `errors`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Measurements {
    /// Visitor → target.
    pub upload: Option<BulkResult>,
    /// Target → visitor.
    pub download: Option<BulkResult>,
    /// 64-byte ping-pong on an otherwise idle tunnel.
    pub ping: Option<Percentiles>,
    /// Connect → first echoed byte.
    pub connect: Option<ConnectResult>,
    /// RSS idle and with idle connections.
    pub memory: Option<MemoryResult>,
    /// Ping-pong under bulk load.
    pub loaded: Option<LoadedResult>,
    /// Steps that failed, and why.
    pub errors: Vec<String>,
}

fn cpu_now(pids: &[(Role, u32)]) -> anyhow::Result<Vec<(Role, f64)>> {
    pids.iter()
        .map(|&(role, pid)| Ok((role, cpu_seconds(pid)?)))
        .collect()
}

fn bulk(
    tunnel: &Tunnel,
    repeat: usize,
    run: impl Fn() -> anyhow::Result<Transfer>,
) -> anyhow::Result<BulkResult> {
    let pids = tunnel.pids();
    let before = cpu_now(&pids)?;
    let transfers = (0..repeat.max(1))
        .map(|_| run())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let after = cpu_now(&pids)?;
    let cpu: Vec<ProcCpu> = before
        .iter()
        .zip(&after)
        .map(|(&(role, b), &(_, a))| ProcCpu {
            role,
            seconds: a - b,
        })
        .collect();
    let total: f64 = cpu.iter().map(|c| c.seconds).sum();
    let bytes = transfers.iter().map(|t| t.bytes).sum();
    let runs: Vec<f64> = transfers
        .iter()
        .map(|t| gbit_per_sec(t.bytes, t.elapsed))
        .collect();
    Ok(BulkResult {
        gbit_per_sec: median(&runs),
        runs_gbit_per_sec: runs,
        bytes,
        seconds: transfers.iter().map(|t| t.elapsed.as_secs_f64()).sum(),
        cpu_s_per_gb: if pids.is_empty() {
            None
        } else {
            cpu_per_gb(total, bytes)
        },
        cpu,
    })
}

/// Pooled ping-pong samples of `repeat` connections.
fn pings(addr: SocketAddr, d: Duration, repeat: usize) -> anyhow::Result<Percentiles> {
    let mut all = Vec::new();
    for _ in 0..repeat.max(1) {
        all.extend(ping_pong(addr, d)?);
    }
    Ok(summarize(&mut all))
}

fn memory(tunnel: &Tunnel, conns: usize) -> anyhow::Result<MemoryResult> {
    let pids = tunnel.pids();
    let idle: Vec<u64> = pids
        .iter()
        .map(|&(_, p)| rss_kib(p))
        .collect::<Result<_, _>>()?;
    let mut held: Vec<TcpStream> = Vec::with_capacity(conns);
    for i in 0..conns {
        let s = echo_probe(tunnel.visitor, Duration::from_secs(10))
            .with_context(|| format!("idle connection {} of {conns}", i + 1))?;
        held.push(s);
    }
    // Let the tunnel settle (buffers released, tasks parked) before reading RSS.
    std::thread::sleep(Duration::from_secs(1));
    let loaded: Vec<u64> = pids
        .iter()
        .map(|&(_, p)| rss_kib(p))
        .collect::<Result<_, _>>()?;
    drop(held);
    std::thread::sleep(Duration::from_secs(1));
    let procs = pids
        .iter()
        .zip(idle.iter().zip(&loaded))
        .map(|(&(role, _), (&i, &l))| ProcMemory {
            role,
            idle_kib: i,
            loaded_kib: l,
            kib_per_conn: (l as f64 - i as f64) / conns.max(1) as f64,
        })
        .collect();
    Ok(MemoryResult {
        connections: conns,
        procs,
    })
}

/// Records a step's result or its error; returns false when the tunnel died.
fn record<T>(
    tunnel: &mut Tunnel,
    errors: &mut Vec<String>,
    step: &str,
    result: anyhow::Result<T>,
) -> (Option<T>, bool) {
    let value = match result {
        Ok(v) => Some(v),
        Err(e) => {
            errors.push(format!("{step}: {e:#}"));
            None
        }
    };
    match tunnel.check_alive() {
        Ok(()) => (value, true),
        Err(e) => {
            errors.push(format!("after {step}: {e:#}"));
            (value, false)
        }
    }
}

/// Runs every step against `tunnel`, logging progress to stderr.
pub fn run(name: &str, tunnel: &mut Tunnel, opts: &SuiteOptions) -> Measurements {
    let mut m = Measurements::default();
    let d = opts.duration;
    let addr = tunnel.visitor;
    let step = |s: &str| eprintln!("  [{name}] {s}");
    macro_rules! attempt {
        ($label:expr, $field:expr, $value:expr) => {{
            step($label);
            let (v, alive) = record(tunnel, &mut m.errors, $label, $value);
            $field = v;
            if !alive {
                return m;
            }
        }};
    }
    if !tunnel.procs.is_empty() && opts.idle_conns > 0 {
        attempt!("memory", m.memory, memory(tunnel, opts.idle_conns));
    }
    let r = opts.repeat;
    attempt!("upload", m.upload, bulk(tunnel, r, || upload(addr, d)));
    attempt!(
        "download",
        m.download,
        bulk(tunnel, r, || download(addr, d))
    );
    attempt!("ping-pong", m.ping, pings(addr, d, r));
    let connect = connect_first_byte(addr, d, opts.connects).map(|(mut s, wall)| {
        let n = s.len();
        ConnectResult {
            latency: summarize(&mut s),
            per_sec: n as f64 / wall.as_secs_f64().max(1e-9),
        }
    });
    attempt!("connect", m.connect, connect);
    let unloaded_p99 = m.ping.map(|p| p.p99_us);
    let loaded = ping_pong_loaded(addr, d, opts.streams).map(|mut l| {
        let ping = summarize(&mut l.pings);
        LoadedResult {
            streams: opts.streams,
            ping,
            bulk_gbit_per_sec: gbit_per_sec(l.bulk_bytes, l.elapsed),
            p99_vs_unloaded: ratio(Some(ping.p99_us), unloaded_p99),
        }
    });
    attempt!("ping-pong under load", m.loaded, loaded);
    m
}
