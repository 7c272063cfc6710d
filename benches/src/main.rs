//! `porthole-bench`: parses flags, prepares the machine (open-file limit, release binaries),
//! runs every candidate, and writes the table, JSON and SVG; `porthole-bench restart`
//! measures relay restarts instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use porthole_bench::cluster::{self, ClusterArgs};
use porthole_bench::cluster_report;
use porthole_bench::procfs::{raise_nofile, Machine};
use porthole_bench::report::{self, Report};
use porthole_bench::restart::{self, RestartArgs, RestartReport, RestartSetup};
use porthole_bench::run::{run_all, RunOptions};
use porthole_bench::suite::SuiteOptions;
use porthole_bench::target::Target;

/// Descriptors the harness keeps for itself besides the idle connections.
const FD_MARGIN: u64 = 256;

/// Benchmarks Porthole against direct loopback and peer tunnels, all on loopback.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Another measurement instead of the candidates' suite.
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Length of each timed step (bulk each way, ping-pong, connects, loaded ping-pong).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Most sequential connections in the connect step.
    #[arg(long, default_value_t = 1000)]
    connects: usize,
    /// Idle visitor connections held for the memory step (0 skips it).
    #[arg(long, default_value_t = 1000)]
    idle_conns: usize,
    /// Bulk streams during the loaded ping-pong.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Runs of each bulk direction (median reported) and of ping-pong (samples pooled).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Also measure rathole (tcp, tls) and bore, installing them with `cargo install` into
    /// --peers-dir when missing.
    #[arg(long)]
    peers: bool,
    /// Only these candidates, comma-separated (direct, porthole-tls, porthole-tcp, rathole-tcp, rathole-tls,
    /// bore).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Write the results as JSON here.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Write a bar chart here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Where `porthole-relay` and `porthole-agent` are [default: beside this binary].
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    /// Do not run `cargo build` for the relay and agent first (`restart` with --bin-dir
    /// never builds).
    #[arg(long, global = true)]
    no_build: bool,
    /// `cargo install --root` for the peers [default: target/bench-peers].
    #[arg(long)]
    peers_dir: Option<PathBuf>,
    /// Scratch directory for configs and logs [default: target/bench-work].
    #[arg(long, global = true)]
    work_dir: Option<PathBuf>,
    /// Write --json even though the work tree has uncommitted changes (the revision is then
    /// recorded with `+dirty`). Without it a run that writes JSON refuses a dirty tree:
    /// published numbers come from a clean tree at the commit they name.
    #[arg(long, global = true)]
    allow_dirty: bool,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// How long after a relay restart (graceful SIGTERM and crash SIGKILL, interleaved) until
    /// N live sessions, whose agents all resume, are active again.
    Restart(RestartArgs),
    /// Cluster mode: creates per second through one node and three, DELETE → closed on every
    /// node, throughput through the owner and another node, failover after `kill -9` of the
    /// owner (release binaries built with `--features cluster`, and `etcd` on PATH).
    Cluster(ClusterArgs),
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Builds the relay and agent in the profile this binary was built with.
fn build_porthole(bin_dir: &Path) -> anyhow::Result<()> {
    let release = bin_dir.file_name().is_some_and(|n| n == "release");
    if !release {
        eprintln!("warning: not a release build; numbers from debug binaries mean little");
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root()).args([
        "build",
        "-p",
        "porthole-relay",
        "-p",
        "porthole-agent",
    ]);
    if release {
        cmd.arg("--release");
    }
    eprintln!("building the relay and agent: {cmd:?}");
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of porthole-relay and porthole-agent failed ({status})");
    }
    Ok(())
}

/// Lowers `wanted` idle connections to what the open-file limit allows, saying so.
fn fit_idle_conns(wanted: usize) -> usize {
    let limit = match raise_nofile() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("warning: {e:#}; keeping the current open-file limit");
            1024
        }
    };
    // The harness holds both ends of each idle connection (client and target server).
    let fits = usize::try_from(limit.saturating_sub(FD_MARGIN) / 2).unwrap_or(usize::MAX);
    if wanted > fits {
        eprintln!(
            "note: --idle-conns {wanted} needs about {} open files but the hard limit is \
             {limit}; measuring {fits} idle connections (raise `ulimit -Hn` for more)",
            wanted * 2 + FD_MARGIN as usize
        );
        return fits;
    }
    wanted
}

/// `git describe`-like revision of the workspace, `+dirty` when the work tree has changes.
fn revision(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head}+dirty")
    } else {
        head
    }
}

/// The command line as run, for the JSON.
fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!(
        "cargo run --release -p porthole-bench -- {}",
        args.join(" ")
    )
}

/// `porthole-bench restart`: the binaries from --bin-dir (built here only without it), the
/// table to stdout, the JSON with --json; fails when the run did not complete.
fn run_restart(cli: &Cli, args: &RestartArgs, root: &Path, exe_dir: PathBuf) -> anyhow::Result<()> {
    let bin_dir = match &cli.bin_dir {
        Some(dir) => dir.clone(),
        None => {
            if !cli.no_build {
                build_porthole(&exe_dir)?;
            }
            exe_dir
        }
    };
    restart::stop_on_signals()?;
    let machine = Machine::detect();
    let setup = RestartSetup {
        bin_dir: bin_dir.clone(),
        work: cli
            .work_dir
            .clone()
            .unwrap_or_else(|| root.join("target/bench-work"))
            .join("restart"),
    };
    eprintln!(
        "== restart: binaries from {} ({}); logs in {}",
        bin_dir.display(),
        revision(&bin_dir),
        setup.work.display()
    );
    let target = Target::start()?;
    let outcome = restart::run(args, &setup, target.addr);
    let options = restart::RestartOptions::from(args);
    println!("{}", restart::table(&outcome, &options));
    let error = outcome.error.clone();
    let report = RestartReport {
        machine,
        revision: revision(root),
        binaries_revision: revision(&bin_dir),
        bin_dir,
        command: command_line(),
        options,
        agent_backoff: restart::BackoffFacts::default(),
        outcome,
    };
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    match error {
        Some(e) => bail!("restart measurement failed: {e}"),
        None => Ok(()),
    }
}

/// `porthole-bench cluster`: the binaries from --bin-dir (the exe's directory without it,
/// never built here: they need `--features cluster`), rounds to stderr, the JSON with --json
/// (else to stdout), then the markdown table to stdout.
fn run_cluster(cli: &Cli, args: &ClusterArgs, root: &Path, exe_dir: PathBuf) -> anyhow::Result<()> {
    let bin_dir = cli.bin_dir.clone().unwrap_or(exe_dir);
    let work = cli
        .work_dir
        .clone()
        .unwrap_or_else(|| root.join("target/bench-work"))
        .join("cluster");
    eprintln!(
        "== cluster: binaries from {} ({}); logs in {}",
        bin_dir.display(),
        revision(&bin_dir),
        work.display()
    );
    let rounds = cluster::run(args, &bin_dir, &work)?;
    let report = serde_json::json!({
        "machine": Machine::detect(),
        "revision": revision(root),
        "binaries_revision": revision(&bin_dir),
        "command": command_line(),
        "rounds": rounds,
    });
    let text = serde_json::to_string_pretty(&report)?;
    match &cli.json {
        Some(path) => std::fs::write(path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?,
        None => println!("{text}"),
    }
    print!("{}", cluster_report::markdown(&rounds));
    Ok(())
}

/// A run that writes JSON (numbers to publish) needs a clean tree, unless told otherwise.
fn require_clean(cli: &Cli, root: &Path) -> anyhow::Result<()> {
    let revision = revision(root);
    if cli.json.is_some() && revision.ends_with("+dirty") && !cli.allow_dirty {
        bail!(
            "the work tree has uncommitted changes ({revision}): published numbers come from \
             a clean tree at the commit they name; commit or stash them, or pass \
             --allow-dirty (the JSON then records {revision})"
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    require_clean(&cli, &root)?;
    let exe_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .context("locating this binary's directory")?;
    if let Some(Mode::Restart(args)) = &cli.mode {
        return run_restart(&cli, args, &root, exe_dir);
    }
    if let Some(Mode::Cluster(args)) = &cli.mode {
        return run_cluster(&cli, args, &root, exe_dir);
    }
    let bin_dir = cli.bin_dir.clone().unwrap_or(exe_dir);
    if !cli.no_build {
        build_porthole(&bin_dir)?;
    }
    let machine = Machine::detect();
    let opts = RunOptions {
        suite: SuiteOptions {
            duration: cli.duration,
            connects: cli.connects,
            idle_conns: fit_idle_conns(cli.idle_conns),
            streams: cli.streams,
            repeat: cli.repeat,
        },
        peers: cli.peers,
        bin_dir,
        peers_dir: cli
            .peers_dir
            .clone()
            .unwrap_or_else(|| root.join("target/bench-peers")),
        work_dir: cli
            .work_dir
            .clone()
            .unwrap_or_else(|| root.join("target/bench-work")),
        only: cli.only.clone(),
    };
    let target = Target::start()?;
    let candidates = run_all(&opts, target.addr);
    let ratios = report::ratios(&candidates);
    println!("{}", report::results_table(&candidates));
    println!("{}", report::ratio_table(&candidates, &ratios));
    for c in candidates.iter().filter(|c| !c.available) {
        println!(
            "{}: unavailable: {}",
            c.name,
            c.reason.as_deref().unwrap_or("?")
        );
    }
    for c in &candidates {
        for e in &c.results.errors {
            println!("{}: step failed: {e}", c.name);
        }
    }
    if let Some(path) = &cli.svg {
        std::fs::write(path, porthole_bench::svg::render(&candidates, &machine))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let report = Report {
        machine,
        revision: revision(&root),
        command: command_line(),
        options: opts.suite,
        peers: if cli.peers {
            porthole_bench::peers::PINNED.to_vec()
        } else {
            Vec::new()
        },
        candidates,
        ratios,
    };
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
