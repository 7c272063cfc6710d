//! Restart mode: how long after a relay restart until N live sessions, whose agents all
//! resume on their own, are active again.
//!
//! The release relay runs on fixed ports (agent endpoint, API, a public port range) with a
//! data dir that outlives it; N sessions are created through the API, one `ssh` service each
//! forwarding to the harness's target server, and N agent processes (one per session) join.
//! Then the relay is restarted on the same data dir, both ways a platform restarts it,
//! interleaved: graceful (SIGTERM: the relay tells its agents it is shutting down) and crash
//! (SIGKILL). For each restart the harness records, from spawning the new relay process, when
//! its API answers and when the first, half and all sessions are active again (polling
//! `/metrics` every `--poll`), then checks the session list, sends one byte through one
//! session's public port, and reads what the agents logged (their reconnect delays) and what
//! the relay counted (refused agent handshakes), so the table says what the time went to.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::http::{get_json, get_text};
use crate::porthole::{self, Banner, RelayAddrs};
use crate::procfs::{raise_nofile, Machine};
use crate::report::{fmt_num, render_table};
use crate::sources::SourceForwarders;
use crate::stats::median;
use crate::tunnel::{echo_probe, free_port, Proc, Role};

/// The agent's first reconnect delay before jitter (`INITIAL` in
/// agent-client/src/backoff.rs; the same in 7d12628 and f09cd55). Each delay is random in
/// [ceiling/2, ceiling]; the ceiling doubles per failed attempt.
pub const AGENT_BACKOFF_INITIAL: Duration = Duration::from_millis(250);
/// The agent's largest reconnect delay (`MAX` in agent-client/src/backoff.rs).
pub const AGENT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An agent forgets its past reconnect failures only when a link that stayed up this long
/// ends (`HEALTHY_AFTER` in agent-client/src/backoff.rs).
pub const AGENT_HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// The relay's per-source limit on pending agent handshakes (`MAX_PENDING_HANDSHAKES_PER_IP`
/// in relay/src/limits.rs, the same in both versions): a constant, no flag raises it.
pub const RELAY_PENDING_HANDSHAKES_PER_IP: usize = 64;

/// `--max-visitors` of the relay (its default; the mode holds one visitor at a time).
const MAX_VISITORS: usize = 16;
/// Spare public ports in the range beyond one per session.
const SPARE_PORTS: usize = 16;
/// Public ports are taken below this (the kernel's default ephemeral range starts at 32768),
/// so outgoing connections do not take them between restarts.
const PORTS_BELOW: usize = 32000;
/// Lowest public port.
const PORTS_FROM: usize = 20000;
/// Open files the relay needs per session: public listener, control link, two warm data
/// connections, and some to spare.
const FDS_PER_SESSION: u64 = 6;
/// Open files besides the sessions (listeners, store, logs, the harness's own).
const FD_MARGIN: u64 = 256;
/// One API call while polling.
const POLL_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The visitor check's connect and read timeout.
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the agents are checked for having exited while waiting.
const AGENT_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Set by SIGINT/SIGTERM: every wait stops, and the relay and agents are killed.
static STOP: AtomicBool = AtomicBool::new(false);

/// Flags of the restart mode.
#[derive(Clone, Debug, clap::Args)]
pub struct RestartArgs {
    /// Live sessions, one agent process each.
    #[arg(long, default_value_t = 200)]
    pub sessions: usize,
    /// Restarts of each kind (graceful SIGTERM, crash SIGKILL), interleaved.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// How long all sessions stay active before each restart. Agents forget past reconnect
    /// failures only when a link that stayed up 60 s ends, so with less a round starts from
    /// where the previous round's backoff left off.
    #[arg(long, default_value = "62s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Pause between polls of the relay's API.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub poll: Duration,
    /// Longest wait for each step (the relay to exit, all sessions to be active).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// The relay's `--max-pending-handshakes` (agent handshakes relay-wide; when full the
    /// oldest is dropped), raised so N agents resuming at once never evict each other.
    #[arg(long, default_value_t = 4096)]
    pub max_pending_handshakes: usize,
    /// Agents dial the relay directly, all from 127.0.0.1, instead of each through a
    /// forwarder from its own loopback address: the relay's limit of 64 pending agent
    /// handshakes per source address (not a setting) then applies to all N at once.
    #[arg(long)]
    pub shared_source: bool,
}

/// The mode's settings as recorded in the JSON.
#[derive(Clone, Debug, Serialize)]
pub struct RestartOptions {
    /// Live sessions (and agent processes).
    pub sessions: usize,
    /// Restarts of each kind.
    pub rounds: usize,
    /// Time all sessions stay active before each restart, ms.
    pub settle_ms: f64,
    /// Pause between API polls, ms.
    pub poll_ms: f64,
    /// Longest wait for each step, ms.
    pub timeout_ms: f64,
    /// The relay's `--max-pending-handshakes`.
    pub max_pending_handshakes: usize,
    /// `per-agent`: each agent through a forwarder from its own 127.1.x.y address;
    /// `shared`: every agent straight from 127.0.0.1.
    pub agent_sources: &'static str,
}

impl From<&RestartArgs> for RestartOptions {
    fn from(a: &RestartArgs) -> Self {
        Self {
            sessions: a.sessions,
            rounds: a.rounds,
            settle_ms: ms(a.settle),
            poll_ms: ms(a.poll),
            timeout_ms: ms(a.timeout),
            max_pending_handshakes: a.max_pending_handshakes,
            agent_sources: if a.shared_source {
                "shared"
            } else {
                "per-agent"
            },
        }
    }
}

/// How the relay is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartKind {
    /// SIGTERM: the relay tells its agents it is shutting down, then exits.
    Graceful,
    /// SIGKILL: the agents see their connections close.
    Crash,
}

impl RestartKind {
    /// `graceful` or `crash`.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartKind::Graceful => "graceful",
            RestartKind::Crash => "crash",
        }
    }
}

/// The first start: creating the sessions and the agents joining.
#[derive(Clone, Debug, Serialize)]
pub struct SetupResult {
    /// Creating N sessions through the API, one after another, ms.
    pub create_ms: f64,
    /// Starting N agent processes, ms.
    pub spawn_ms: f64,
    /// From the first agent's start to all N sessions active, ms.
    pub all_active_ms: f64,
}

/// What the agents logged during one restart (from their `reconnecting in` lines).
#[derive(Clone, Debug, Default, Serialize)]
pub struct AgentLogSummary {
    /// Agents that logged `resumed session`.
    pub resumed: usize,
    /// Agents by how many reconnect delays they slept (1: straight back after the first).
    pub attempts: BTreeMap<usize, usize>,
    /// The most delays one agent slept.
    pub attempts_max: usize,
    /// Total delay the slowest-sleeping agent slept, ms (the agent logs delays to 0.1 s).
    pub backoff_max_ms: f64,
    /// Median over agents of the total delay slept, ms.
    pub backoff_median_ms: f64,
    /// Why the agents reconnected, with how many times each was logged.
    pub errors: BTreeMap<String, usize>,
}

/// One restart.
#[derive(Clone, Debug, Serialize)]
pub struct RoundResult {
    /// 1-based, in the order run.
    pub round: usize,
    /// Graceful or crash.
    pub kind: RestartKind,
    /// From the signal to the old relay's exit, ms.
    pub stop_ms: f64,
    /// How the old relay exited.
    pub exit: String,
    /// From spawning the new relay to its API answering (`GET /metrics`), ms.
    pub api_ms: f64,
    /// From spawning the new relay to the first session active again, ms.
    pub first_active_ms: f64,
    /// ... to half the sessions active again, ms.
    pub half_active_ms: f64,
    /// ... to all sessions active again (the slowest session), ms.
    pub all_active_ms: f64,
    /// From the signal to all sessions active again (what visitors see), ms.
    pub outage_ms: f64,
    /// API polls that got no answer while waiting.
    pub poll_failures: u32,
    /// The session a visitor went through after the round.
    pub echo_session: String,
    /// How long that visitor's echo took, ms (None: it failed).
    pub echo_ms: Option<f64>,
    /// Why the echo failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub echo_error: Option<String>,
    /// Agent connections the new relay refused before registration, by reason (its
    /// `porthole_agent_handshake_failures_total`).
    pub handshake_failures: BTreeMap<String, f64>,
    /// Registrations the new relay counted, by kind.
    pub registrations: BTreeMap<String, f64>,
    /// What the agents logged.
    pub agents: AgentLogSummary,
}

/// Medians of one kind's rounds.
#[derive(Clone, Debug, Serialize)]
pub struct KindSummary {
    /// Graceful or crash.
    pub kind: RestartKind,
    /// Rounds of this kind.
    pub rounds: usize,
    /// Median stop time, ms.
    pub stop_ms: f64,
    /// Median time to the API answering, ms.
    pub api_ms: f64,
    /// Median time to the first session active, ms.
    pub first_active_ms: f64,
    /// Median time to half the sessions active, ms.
    pub half_active_ms: f64,
    /// Median time to all sessions active, ms.
    pub all_active_ms: f64,
    /// Slowest round's time to all sessions active, ms.
    pub all_active_max_ms: f64,
    /// Median outage (signal to all active), ms.
    pub outage_ms: f64,
    /// Median of the slowest agent's total backoff, ms.
    pub backoff_max_ms: f64,
    /// What the time went to.
    pub dominant: String,
}

/// What a restart run measured (filled as far as it got when it failed).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    /// The relay's command line (every restart uses the same).
    pub relay_args: Vec<String>,
    /// The first agent's command line (the others differ in the pid file; the join token is
    /// in `PORTHOLE_TOKEN`).
    pub agent_args: Vec<String>,
    /// Limits raised for the harness's single source address, and the ones that cannot be.
    pub limits: Vec<String>,
    /// The first start.
    pub setup: Option<SetupResult>,
    /// Every restart, in the order run.
    pub rounds: Vec<RoundResult>,
    /// Medians per kind.
    pub summary: Vec<KindSummary>,
    /// Why the run stopped early, or which checks failed.
    pub error: Option<String>,
}

/// The JSON document of a restart run.
#[derive(Debug, Serialize)]
pub struct RestartReport {
    /// Where it ran.
    pub machine: Machine,
    /// Git revision of the harness's workspace.
    pub revision: String,
    /// Where the relay and agent binaries came from.
    pub bin_dir: PathBuf,
    /// Git revision of the tree holding `bin_dir` (`unknown` outside a git work tree).
    pub binaries_revision: String,
    /// The command line.
    pub command: String,
    /// The mode's settings.
    pub options: RestartOptions,
    /// The agent's reconnect schedule (from its source) the numbers are read against.
    pub agent_backoff: BackoffFacts,
    /// What was measured.
    pub outcome: Outcome,
}

/// The agent's reconnect backoff, as its source defines it.
#[derive(Clone, Debug, Serialize)]
pub struct BackoffFacts {
    /// First ceiling, ms (the delay is random in [ceiling/2, ceiling]).
    pub initial_ms: f64,
    /// Largest delay, ms.
    pub max_ms: f64,
    /// A link must have stayed up this long for its end to reset the backoff, ms.
    pub healthy_after_ms: f64,
}

impl Default for BackoffFacts {
    fn default() -> Self {
        Self {
            initial_ms: ms(AGENT_BACKOFF_INITIAL),
            max_ms: ms(AGENT_BACKOFF_MAX),
            healthy_after_ms: ms(AGENT_HEALTHY_AFTER),
        }
    }
}

/// Where the binaries are and where logs go.
#[derive(Clone, Debug)]
pub struct RestartSetup {
    /// Directory holding `porthole-relay` and `porthole-agent`.
    pub bin_dir: PathBuf,
    /// Logs (relay per start, agent per session); emptied first.
    pub work: PathBuf,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Makes SIGINT and SIGTERM stop the run (the relay and agents are then killed) instead of
/// ending the harness with its children left running.
pub fn stop_on_signals() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal runtime")?;
    let (mut term, mut int) = rt
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })
        .context("installing the SIGINT/SIGTERM handlers")?;
    std::thread::Builder::new()
        .name("bench-signals".into())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            });
            STOP.store(true, Ordering::SeqCst);
        })
        .context("starting the signal thread")?;
    Ok(())
}

fn check_stop() -> anyhow::Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted (SIGINT/SIGTERM)");
    }
    Ok(())
}

/// Sleeps `d` in short steps, stopping early when interrupted.
fn pause(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    loop {
        check_stop()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// The relay, the agents and their source forwarders; the processes are killed when dropped
/// (agents first), on success, error or interruption alike, then the forwarders stop.
#[derive(Debug, Default)]
struct Fleet {
    agents: Vec<Proc>,
    relay: Option<Proc>,
    forwarders: Option<SourceForwarders>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.agents.clear();
        self.relay = None;
        self.forwarders = None;
    }
}

impl Fleet {
    fn relay(&mut self) -> anyhow::Result<&mut Proc> {
        self.relay.as_mut().context("no relay running")
    }

    /// Fails with the log when the relay has exited.
    fn check_relay(&mut self) -> anyhow::Result<()> {
        let relay = self.relay()?;
        if let Some(status) = relay.child.try_wait()? {
            bail!(
                "the relay exited ({status}); end of {}:\n{}",
                relay.log.display(),
                log_tail(&relay.log)
            );
        }
        Ok(())
    }

    /// Fails with its log when an agent has exited.
    fn check_agents(&mut self) -> anyhow::Result<()> {
        for (i, a) in self.agents.iter_mut().enumerate() {
            if let Some(status) = a.child.try_wait()? {
                bail!(
                    "agent {i} exited ({status}); end of {}:\n{}",
                    a.log.display(),
                    log_tail(&a.log)
                );
            }
        }
        Ok(())
    }
}

/// The last lines of a log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// `len` consecutive loopback ports that can be bound now, below the ephemeral range.
fn free_port_range(len: usize) -> anyhow::Result<(u16, u16)> {
    let span = PORTS_BELOW
        .checked_sub(PORTS_FROM + len)
        .filter(|s| *s > 0)
        .context("too many sessions for the public port range")?;
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as usize);
    for attempt in 0..64 {
        let lo = PORTS_FROM + (seed / 1000 + attempt * (len + 1)) % span;
        let free = (lo..lo + len)
            .all(|p| u16::try_from(p).is_ok_and(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()));
        if free {
            let lo = u16::try_from(lo)?;
            let hi = u16::try_from(lo as usize + len - 1)?;
            return Ok((lo, hi));
        }
    }
    bail!("no {len} consecutive free ports between {PORTS_FROM} and {PORTS_BELOW}")
}

/// Value of every series of metric `name` in a Prometheus text exposition, by its labels.
fn metric_series(text: &str, name: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
            let Some((labels, value)) = r.split_once('}') else {
                continue;
            };
            (labels.to_owned(), value)
        } else if rest.starts_with(' ') {
            (String::new(), rest)
        } else {
            continue; // a longer name with this prefix
        };
        if let Ok(v) = value.trim().parse::<f64>() {
            out.insert(labels, v);
        }
    }
    out
}

/// One label's value, from `a="x",b="y"`.
fn label_value(labels: &str, key: &str) -> String {
    labels
        .split(',')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix("=\""))
        .map_or_else(|| labels.to_owned(), |v| v.trim_end_matches('"').to_owned())
}

/// Sessions that are active and have their agent's control link, per `/metrics`.
fn ready_sessions(text: &str) -> usize {
    let active = metric_series(text, "porthole_sessions")
        .into_iter()
        .find(|(l, _)| label_value(l, "state") == "active")
        .map_or(0.0, |(_, v)| v);
    let linked = metric_series(text, "porthole_agents_connected")
        .into_values()
        .next()
        .unwrap_or(0.0);
    active.min(linked).max(0.0) as usize
}

/// A counter family by one label (e.g. handshake failures by reason).
fn counters_by(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    metric_series(text, name)
        .into_iter()
        .map(|(l, v)| (label_value(&l, label), v))
        .collect()
}

/// What one agent logged since the restart.
#[derive(Debug, Default, PartialEq)]
struct AgentLog {
    /// Each reconnect delay, ms.
    delays_ms: Vec<f64>,
    /// Why it reconnected, per delay.
    errors: Vec<String>,
    /// It logged `resumed session`.
    resumed: bool,
}

/// Reads `porthole-agent: <error>; reconnecting in 0.2s` and `resumed session` lines.
fn parse_agent_log(text: &str) -> AgentLog {
    const MARK: &str = "; reconnecting in ";
    let mut log = AgentLog::default();
    for line in text.lines() {
        if let Some(i) = line.find(MARK) {
            let secs = line[i + MARK.len()..]
                .trim()
                .trim_end_matches('s')
                .parse::<f64>()
                .unwrap_or(f64::NAN);
            log.delays_ms.push(secs * 1000.0);
            let error = line[..i].trim_start_matches("porthole-agent: ");
            log.errors.push(error.chars().take(160).collect());
        } else if line.contains("resumed session") {
            log.resumed = true;
        }
    }
    log
}

fn summarize_agents(logs: &[AgentLog]) -> AgentLogSummary {
    let mut s = AgentLogSummary::default();
    let mut totals = Vec::with_capacity(logs.len());
    for log in logs {
        s.resumed += usize::from(log.resumed);
        *s.attempts.entry(log.delays_ms.len()).or_default() += 1;
        s.attempts_max = s.attempts_max.max(log.delays_ms.len());
        let total: f64 = log.delays_ms.iter().filter(|d| d.is_finite()).sum();
        s.backoff_max_ms = s.backoff_max_ms.max(total);
        totals.push(total);
        for e in &log.errors {
            *s.errors.entry(e.clone()).or_default() += 1;
        }
    }
    s.backoff_median_ms = median(&totals);
    s
}

/// Log sizes now, so a round reads only what was written after.
fn log_offsets(agents: &[Proc]) -> Vec<u64> {
    agents
        .iter()
        .map(|a| std::fs::metadata(&a.log).map_or(0, |m| m.len()))
        .collect()
}

fn read_from(path: &Path, offset: u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let mut bytes = Vec::new();
    if std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset)).is_err()
        || f.read_to_end(&mut bytes).is_err()
    {
        return String::new();
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// When the API answered and the sessions came back, relative to `since`.
#[derive(Debug, Default)]
struct Progress {
    api: Option<Duration>,
    first: Option<Duration>,
    half: Option<Duration>,
    all: Option<Duration>,
    poll_failures: u32,
}

/// Polls `/metrics` every `poll` until all `n` sessions are active with their agents
/// linked; fails when `timeout` passes, the relay exits or an agent exits.
fn watch_active(
    fleet: &mut Fleet,
    api: SocketAddr,
    n: usize,
    since: Instant,
    args: &RestartArgs,
    what: &str,
) -> anyhow::Result<Progress> {
    let mut p = Progress::default();
    let mut ready = 0;
    let mut last_failure = String::from("none");
    let mut agents_checked = Instant::now();
    loop {
        check_stop()?;
        let polled = Instant::now();
        match get_text(api, "/metrics", POLL_CALL_TIMEOUT) {
            Ok((200, text)) => {
                let at = since.elapsed();
                p.api.get_or_insert(at);
                ready = ready_sessions(&text);
                if ready >= 1 {
                    p.first.get_or_insert(at);
                }
                if ready >= n.div_ceil(2) {
                    p.half.get_or_insert(at);
                }
                if ready >= n {
                    p.all = Some(at);
                    return Ok(p);
                }
            }
            Ok((status, _)) => {
                p.poll_failures += 1;
                last_failure = format!("HTTP {status}");
            }
            Err(e) => {
                p.poll_failures += 1;
                last_failure = format!("{e:#}");
            }
        }
        fleet
            .check_relay()
            .with_context(|| format!("{what}: waiting for {n} sessions to be active"))?;
        if agents_checked.elapsed() >= AGENT_CHECK_EVERY {
            fleet.check_agents().with_context(|| what.to_owned())?;
            agents_checked = Instant::now();
        }
        if since.elapsed() > args.timeout {
            let relay_log = fleet
                .relay
                .as_ref()
                .map(|r| (r.log.display().to_string(), log_tail(&r.log)))
                .unwrap_or_default();
            bail!(
                "{what}: only {ready} of {n} sessions active after {:?} (API answered: {}; \
                 last failed poll: {last_failure}); end of {}:\n{}",
                args.timeout,
                p.api.map_or("never".to_owned(), |d| format!("after {d:?}")),
                relay_log.0,
                relay_log.1
            );
        }
        std::thread::sleep(args.poll.saturating_sub(polled.elapsed()));
    }
}

/// Fails unless the API lists every one of `ids` as `active`.
fn verify_listed_active(api: SocketAddr, admin: &str, ids: &[String]) -> anyhow::Result<()> {
    let (status, v) = get_json(api, "/v1/sessions", Some(admin), Duration::from_secs(10))
        .context("listing the sessions")?;
    if status != 200 {
        bail!("listing the sessions answered {status}: {v}");
    }
    let states: BTreeMap<&str, &str> = v["sessions"]
        .as_array()
        .context("no sessions array in the list")?
        .iter()
        .filter_map(|s| Some((s["session_id"].as_str()?, s["state"].as_str()?)))
        .collect();
    let wrong: Vec<String> = ids
        .iter()
        .filter(|id| states.get(id.as_str()) != Some(&"active"))
        .map(|id| format!("{id}: {}", states.get(id.as_str()).unwrap_or(&"missing")))
        .collect();
    if !wrong.is_empty() {
        bail!(
            "{} of {} sessions are not listed active: {}",
            wrong.len(),
            ids.len(),
            wrong
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// A visitor through `addr`: the SSH identification line and the echo mode byte, then one
/// more byte, both echoed by the target server behind the agent.
fn echo_check(addr: SocketAddr) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut s = echo_probe(addr, ECHO_TIMEOUT)
        .with_context(|| format!("no echo of the mode byte through {addr}"))?;
    s.set_read_timeout(Some(ECHO_TIMEOUT))?;
    s.write_all(b"r")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .with_context(|| format!("no echo of a byte through {addr}"))?;
    if b != *b"r" {
        bail!("echo through {addr} answered {:#04x} instead of `r`", b[0]);
    }
    Ok(start.elapsed())
}

/// Everything a round needs that stays the same across rounds.
struct Rig<'a> {
    args: &'a RestartArgs,
    setup: &'a RestartSetup,
    relay_cmd: &'a dyn Fn() -> Command,
    api: SocketAddr,
    admin: String,
    ids: Vec<String>,
    ports: Vec<u16>,
}

/// Starts the relay (generation `gen`: its log is `relay-<gen>.log`).
fn spawn_relay(rig: &Rig<'_>, gen: usize) -> anyhow::Result<Proc> {
    Proc::spawn(
        Role::Server,
        (rig.relay_cmd)(),
        &rig.setup.work.join(format!("relay-{gen}.log")),
    )
}

/// Stops the relay `kind`'s way, starts a new one on the same data dir and ports, and
/// measures until every session is active again and a visitor gets through.
fn restart_round(
    fleet: &mut Fleet,
    rig: &Rig<'_>,
    round: usize,
    kind: RestartKind,
) -> anyhow::Result<RoundResult> {
    let what = format!("round {round} ({})", kind.as_str());
    fleet.check_relay().context(what.clone())?;
    fleet.check_agents().context(what.clone())?;
    let offsets = log_offsets(&fleet.agents);
    let old = fleet.relay()?;
    let signalled = Instant::now();
    match kind {
        RestartKind::Graceful => {
            let pid = i32::try_from(old.pid())?;
            kill(Pid::from_raw(pid), Signal::SIGTERM).context("sending SIGTERM to the relay")?;
        }
        RestartKind::Crash => old.child.kill().context("sending SIGKILL to the relay")?,
    }
    let status = loop {
        check_stop()?;
        if let Some(status) = old.child.try_wait()? {
            break status;
        }
        if signalled.elapsed() > rig.args.timeout {
            bail!(
                "{what}: the relay did not exit within {:?} of the signal; end of {}:\n{}",
                rig.args.timeout,
                old.log.display(),
                log_tail(&old.log)
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let stop = signalled.elapsed();
    fleet.relay = None;
    let spawned = Instant::now();
    fleet.relay = Some(spawn_relay(rig, round)?);
    let p = watch_active(fleet, rig.api, rig.ids.len(), spawned, rig.args, &what)?;
    let all = p.all.unwrap_or_default();
    let outage = spawned.duration_since(signalled) + all;
    verify_listed_active(rig.api, &rig.admin, &rig.ids).context(what.clone())?;
    let pick = (round - 1) % rig.ids.len();
    let visitor = SocketAddr::from(([127, 0, 0, 1], rig.ports[pick]));
    let echo = echo_check(visitor);
    let (_, metrics) = get_text(rig.api, "/metrics", Duration::from_secs(10))
        .with_context(|| format!("{what}: reading /metrics"))?;
    let logs: Vec<AgentLog> = fleet
        .agents
        .iter()
        .zip(&offsets)
        .map(|(a, off)| parse_agent_log(&read_from(&a.log, *off)))
        .collect();
    Ok(RoundResult {
        round,
        kind,
        stop_ms: ms(stop),
        exit: status.to_string(),
        api_ms: ms(p.api.unwrap_or_default()),
        first_active_ms: ms(p.first.unwrap_or_default()),
        half_active_ms: ms(p.half.unwrap_or_default()),
        all_active_ms: ms(all),
        outage_ms: ms(outage),
        poll_failures: p.poll_failures,
        echo_session: rig.ids[pick].clone(),
        echo_ms: echo.as_ref().ok().map(|d| ms(*d)),
        echo_error: echo.err().map(|e| format!("{e:#}")),
        handshake_failures: counters_by(
            &metrics,
            "porthole_agent_handshake_failures_total",
            "reason",
        ),
        registrations: counters_by(&metrics, "porthole_agent_registrations_total", "kind"),
        agents: summarize_agents(&logs),
    })
}

/// Runs the whole mode; never fails, the outcome says how far it got.
pub fn run(args: &RestartArgs, setup: &RestartSetup, target: SocketAddr) -> Outcome {
    let mut out = Outcome::default();
    if let Err(e) = measure(args, setup, target, &mut out) {
        out.error = Some(format!("{e:#}"));
    }
    out.summary = summarize(args.sessions, &out.rounds);
    let failed_echoes: Vec<String> = out
        .rounds
        .iter()
        .filter_map(|r| {
            let e = r.echo_error.as_ref()?;
            Some(format!("round {} ({}): {e}", r.round, r.kind.as_str()))
        })
        .collect();
    if !failed_echoes.is_empty() && out.error.is_none() {
        out.error = Some(format!(
            "a visitor did not get through after a restart: {}",
            failed_echoes.join("; ")
        ));
    }
    out
}

fn measure(
    args: &RestartArgs,
    setup: &RestartSetup,
    target: SocketAddr,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let n = args.sessions;
    if n == 0 {
        bail!("--sessions must be at least 1");
    }
    let relay_bin = porthole::binary(&setup.bin_dir, "porthole-relay")?;
    let agent_bin = porthole::binary(&setup.bin_dir, "porthole-agent")?;
    let nofile = raise_nofile().context("raising the open-file limit")?;
    let needed = n as u64 * FDS_PER_SESSION + FD_MARGIN;
    if nofile < needed {
        bail!(
            "the open-file hard limit is {nofile}, below the ~{needed} the relay needs for {n} \
             sessions (public port, control link and two warm data connections each): raise \
             `ulimit -Hn` or lower --sessions"
        );
    }
    // The forwarders hold both ends of each agent connection and a listener per agent.
    let harness_needs = if args.shared_source {
        FD_MARGIN
    } else {
        n as u64 * (FDS_PER_SESSION + 1) + FD_MARGIN
    };
    if nofile < harness_needs {
        bail!(
            "the open-file hard limit is {nofile}, below the ~{harness_needs} the source \
             forwarders need for {n} agents: raise `ulimit -Hn`, lower --sessions or use \
             --shared-source"
        );
    }
    let _ = std::fs::remove_dir_all(&setup.work);
    std::fs::create_dir_all(setup.work.join("agents"))
        .with_context(|| format!("creating {}", setup.work.display()))?;
    // Data dir and pid files (with the agents' control sockets beside them: short paths) in a
    // temporary directory, removed at the end; logs stay in the work dir.
    let tmp = tempfile::Builder::new()
        .prefix("porthole-restart-")
        .tempdir()
        .context("creating a temporary directory")?;
    let data = tmp.path().join("data");
    let pids = tmp.path().join("agents");
    std::fs::create_dir_all(&pids)?;
    let (lo, hi) = free_port_range(n + SPARE_PORTS)?;
    let addrs = RelayAddrs {
        agent: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        api: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        data: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        port_range: format!("{lo}-{hi}"),
    };
    let pending = args.max_pending_handshakes.to_string();
    let relay_cmd = || {
        let mut cmd = porthole::relay_command(&relay_bin, &data, &addrs, MAX_VISITORS, "tls");
        cmd.args(["--max-pending-handshakes", &pending]);
        cmd
    };
    out.relay_args = args_of(&relay_cmd());
    out.limits = vec![
        format!(
            "--max-pending-handshakes {pending} (relay-wide pending agent handshakes; default \
             1024, the oldest is dropped when full)"
        ),
        format!(
            "--visitor-rate-burst {} --visitor-rate-per-minute {} (per-source visitor rate, \
             for the visitor check)",
            porthole::RATE_BURST,
            porthole::RATE_PER_MINUTE
        ),
        if args.shared_source {
            format!(
                "not raisable, and in force (--shared-source): {RELAY_PENDING_HANDSHAKES_PER_IP} \
                 pending agent handshakes per source address (a constant in \
                 relay/src/limits.rs); every agent dials from 127.0.0.1, connections past it are \
                 closed and counted as refused handshakes `per_ip_limit`"
            )
        } else {
            format!(
                "not raisable: {RELAY_PENDING_HANDSHAKES_PER_IP} pending agent handshakes per \
                 source address (a constant in relay/src/limits.rs); kept out of the way by \
                 giving each agent its own source address (a forwarder in the harness dials the \
                 relay from 127.1.x.y), as agents on separate machines have"
            )
        },
    ];
    let mut fleet = Fleet::default();
    let result = drive(
        args, setup, target, out, &mut fleet, &relay_cmd, &agent_bin, &pids,
    );
    drop(fleet);
    drop(tmp);
    result
}

fn args_of(cmd: &Command) -> Vec<String> {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn drive(
    args: &RestartArgs,
    setup: &RestartSetup,
    target: SocketAddr,
    out: &mut Outcome,
    fleet: &mut Fleet,
    relay_cmd: &dyn Fn() -> Command,
    agent_bin: &Path,
    pids: &Path,
) -> anyhow::Result<()> {
    let n = args.sessions;
    eprintln!("== restart: starting the relay");
    let mut relay = Proc::spawn(Role::Server, relay_cmd(), &setup.work.join("relay-0.log"))?;
    let text = relay
        .wait_log(&["agent endpoint", "HTTP API", "SHA-256", "admin token"])
        .context("porthole-relay did not start")?;
    fleet.relay = Some(relay);
    let banner: Banner = porthole::parse_banner(&text)?;
    if !args.shared_source {
        let endpoint: SocketAddr = banner
            .agent
            .parse()
            .with_context(|| format!("agent endpoint `{}`", banner.agent))?;
        fleet.forwarders = Some(SourceForwarders::start(n, endpoint)?);
    }
    let admin = std::fs::read_to_string(&banner.admin_token_path)
        .with_context(|| format!("reading {}", banner.admin_token_path.display()))?
        .trim()
        .to_owned();
    eprintln!("== restart: creating {n} sessions");
    let started = Instant::now();
    let mut created = Vec::with_capacity(n);
    for i in 0..n {
        check_stop()?;
        created.push(
            porthole::create_session(banner.api, &admin)
                .with_context(|| format!("creating session {} of {n}", i + 1))?,
        );
    }
    let create = started.elapsed();
    eprintln!("== restart: starting {n} agents");
    let started = Instant::now();
    for (i, c) in created.iter().enumerate() {
        check_stop()?;
        let mut dial = banner.clone();
        if let Some(fw) = &fleet.forwarders {
            dial.agent = fw.listen[i].to_string();
        }
        let cmd = porthole::agent_command(
            agent_bin,
            &dial,
            target,
            &pids.join(format!("{i}.pid")),
            &c.join_token,
        );
        if i == 0 {
            out.agent_args = args_of(&cmd);
        }
        let log = setup.work.join("agents").join(format!("{i}.log"));
        fleet.agents.push(Proc::spawn(Role::Client, cmd, &log)?);
    }
    let spawn = started.elapsed();
    watch_active(fleet, banner.api, n, started, args, "first start")?;
    let joined = started.elapsed();
    let ids: Vec<String> = created.iter().map(|c| c.session_id.clone()).collect();
    verify_listed_active(banner.api, &admin, &ids).context("first start")?;
    out.setup = Some(SetupResult {
        create_ms: ms(create),
        spawn_ms: ms(spawn),
        all_active_ms: ms(joined),
    });
    eprintln!(
        "== restart: {n} sessions active {:.0} ms after the first agent started",
        ms(joined)
    );
    if args.settle < AGENT_HEALTHY_AFTER {
        eprintln!(
            "warning: --settle {:?} is below the agents' {:?}: their backoff does not reset \
             between rounds, so later rounds start from a later (longer) backoff step",
            args.settle, AGENT_HEALTHY_AFTER
        );
    }
    let rig = Rig {
        args,
        setup,
        relay_cmd,
        api: banner.api,
        admin,
        ports: created.iter().map(|c| c.port).collect(),
        ids,
    };
    let kinds = [RestartKind::Graceful, RestartKind::Crash];
    let total = args.rounds * kinds.len();
    for i in 0..total {
        let round = i + 1;
        let kind = kinds[i % kinds.len()];
        eprintln!(
            "== restart: round {round}/{total} ({}) after {:?} with all sessions active",
            kind.as_str(),
            args.settle
        );
        pause(args.settle)?;
        let r = restart_round(fleet, &rig, round, kind)?;
        eprintln!(
            "   API {:.0} ms, all {n} active {:.0} ms after the new relay started (outage {:.0} ms); \
             slowest agent slept {:.0} ms in backoff; echo {}",
            r.api_ms,
            r.all_active_ms,
            r.outage_ms,
            r.agents.backoff_max_ms,
            r.echo_ms
                .map_or_else(|| "FAILED".to_owned(), |m| format!("{m:.1} ms"))
        );
        out.rounds.push(r);
    }
    Ok(())
}

/// When the last of `n` agents makes its first dial after losing its link, expected: the
/// largest of `n` delays drawn uniformly from [INITIAL/2, INITIAL], ms.
fn first_dial_floor_ms(n: usize) -> f64 {
    let half = ms(AGENT_BACKOFF_INITIAL) / 2.0;
    let n = n as f64;
    half + half * n / (n + 1.0)
}

/// The medians of one kind that [`dominant`] reads.
#[derive(Clone, Debug)]
struct KindMedians {
    /// Signal to all active.
    outage_ms: f64,
    /// The slowest agent's logged delays.
    backoff_ms: f64,
    /// The most delays one agent slept, over the kind's rounds.
    attempts_max: usize,
    /// Spawn to the API answering.
    api_ms: f64,
    /// Signal to the old relay's exit.
    stop_ms: f64,
    /// Agent handshakes the new relay refused (median over rounds).
    refused: f64,
    /// Why, over all rounds.
    refused_reasons: String,
}

/// Names what the restart time went to, for `n` sessions.
fn dominant(n: usize, m: &KindMedians) -> String {
    if m.outage_ms <= 0.0 {
        return "nothing measured".to_owned();
    }
    let floor = first_dial_floor_ms(n);
    let explained = floor.max(m.backoff_ms).min(m.outage_ms);
    let share = 100.0 * explained / m.outage_ms;
    let initial = ms(AGENT_BACKOFF_INITIAL);
    let retries = if m.attempts_max > 1 && m.refused > 0.0 {
        format!(
            "; some agents slept up to {} delays: the new relay refused ~{:.0} agent handshakes \
             per restart ({}) and those agents backed off again",
            m.attempts_max, m.refused, m.refused_reasons
        )
    } else if m.attempts_max > 1 {
        format!(
            "; some agents slept up to {} delays (they dialled before the new relay took them \
             and backed off again)",
            m.attempts_max
        )
    } else {
        "; every agent got back on its first dial".to_owned()
    };
    let relay = format!(
        "the old relay exited {:.0} ms after the signal, the new one's API answered {:.0} ms \
         after its spawn",
        m.stop_ms, m.api_ms
    );
    if share >= 50.0 {
        format!(
            "dominated by the agents' reconnect backoff: each agent waits a random {:.0}-{:.0} \
             ms after losing its link (the shutdown notice too) before dialling, so the last of \
             {n} first dials is expected {floor:.0} ms after the loss: ~{share:.0} % of the \
             {:.0} ms outage (slowest agent's logged delays: {:.0} ms, in 0.1 s steps){retries}; \
             {relay}",
            initial / 2.0,
            initial,
            m.outage_ms,
            m.backoff_ms,
        )
    } else {
        format!(
            "dominated by the relay: the agents' backoff explains ~{explained:.0} ms \
             (~{share:.0} %) of the {:.0} ms outage{retries}; {relay}; the rest is the new relay \
             taking the {n} agents back (TLS handshakes, resumes, their store writes)",
            m.outage_ms,
        )
    }
}

fn summarize(sessions: usize, rounds: &[RoundResult]) -> Vec<KindSummary> {
    [RestartKind::Graceful, RestartKind::Crash]
        .into_iter()
        .filter_map(|kind| {
            let of: Vec<&RoundResult> = rounds.iter().filter(|r| r.kind == kind).collect();
            if of.is_empty() {
                return None;
            }
            let med =
                |f: fn(&RoundResult) -> f64| median(&of.iter().map(|r| f(r)).collect::<Vec<_>>());
            let m = KindMedians {
                outage_ms: med(|r| r.outage_ms),
                backoff_ms: med(|r| r.agents.backoff_max_ms),
                attempts_max: of.iter().map(|r| r.agents.attempts_max).max().unwrap_or(0),
                api_ms: med(|r| r.api_ms),
                stop_ms: med(|r| r.stop_ms),
                refused: med(|r| r.handshake_failures.values().sum()),
                refused_reasons: {
                    let mut all = BTreeMap::new();
                    for r in &of {
                        for (k, v) in &r.handshake_failures {
                            *all.entry(k.clone()).or_insert(0.0) += v;
                        }
                    }
                    fmt_counts(&all)
                },
            };
            Some(KindSummary {
                kind,
                rounds: of.len(),
                stop_ms: m.stop_ms,
                api_ms: m.api_ms,
                first_active_ms: med(|r| r.first_active_ms),
                half_active_ms: med(|r| r.half_active_ms),
                all_active_ms: med(|r| r.all_active_ms),
                all_active_max_ms: of.iter().map(|r| r.all_active_ms).fold(0.0, f64::max),
                outage_ms: m.outage_ms,
                backoff_max_ms: m.backoff_ms,
                dominant: dominant(sessions, &m),
            })
        })
        .collect()
}

/// The non-zero counters as `reason count, ...`, or `0`.
fn fmt_counts(m: &BTreeMap<String, f64>) -> String {
    let parts: Vec<String> = m
        .iter()
        .filter(|(_, v)| **v > 0.0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    if parts.is_empty() {
        "0".to_owned()
    } else {
        parts.join(", ")
    }
}

/// The plain-text report: one row per round, medians per kind, then what dominates.
pub fn table(out: &Outcome, options: &RestartOptions) -> String {
    let header: Vec<String> = [
        "round",
        "kind",
        "stop (ms)",
        "API up (ms)",
        "first active (ms)",
        "half active (ms)",
        "all active (ms)",
        "outage (ms)",
        "slowest agent backoff (ms)",
        "max attempts",
        "refused handshakes",
        "echo (ms)",
    ]
    .map(str::to_owned)
    .to_vec();
    let mut rows: Vec<Vec<String>> = out
        .rounds
        .iter()
        .map(|r| {
            vec![
                r.round.to_string(),
                r.kind.as_str().to_owned(),
                fmt_num(r.stop_ms),
                fmt_num(r.api_ms),
                fmt_num(r.first_active_ms),
                fmt_num(r.half_active_ms),
                fmt_num(r.all_active_ms),
                fmt_num(r.outage_ms),
                fmt_num(r.agents.backoff_max_ms),
                r.agents.attempts_max.to_string(),
                fmt_counts(&r.handshake_failures),
                r.echo_ms.map_or_else(|| "FAILED".to_owned(), fmt_num),
            ]
        })
        .collect();
    for s in &out.summary {
        rows.push(vec![
            "median".to_owned(),
            s.kind.as_str().to_owned(),
            fmt_num(s.stop_ms),
            fmt_num(s.api_ms),
            fmt_num(s.first_active_ms),
            fmt_num(s.half_active_ms),
            fmt_num(s.all_active_ms),
            fmt_num(s.outage_ms),
            fmt_num(s.backoff_max_ms),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    let mut text = format!(
        "relay restart with {} live sessions (one agent process each, {} source addresses), \
         {} rounds of each kind, \
         {:.0} s settled before each; times from spawning the new relay, outage from the signal\n",
        options.sessions,
        options.agent_sources,
        options.rounds,
        options.settle_ms / 1000.0
    );
    if let Some(s) = &out.setup {
        text.push_str(&format!(
            "first start: {} sessions created in {:.0} ms, agents started in {:.0} ms, all \
             active {:.0} ms after the first agent started\n",
            options.sessions, s.create_ms, s.spawn_ms, s.all_active_ms
        ));
    }
    text.push_str(&render_table(&header, &rows));
    for s in &out.summary {
        text.push_str(&format!("{}: {}\n", s.kind.as_str(), s.dominant));
    }
    text.push_str(&format!(
        "agent backoff (agent-client/src/backoff.rs): first delay random in [{:.0}, {:.0}] ms \
         after a link is lost, also after the relay's shutdown notice; the ceiling doubles per \
         failed dial up to {:.0} s; reset only when a link that stayed up {:.0} s ends\n",
        ms(AGENT_BACKOFF_INITIAL) / 2.0,
        ms(AGENT_BACKOFF_INITIAL),
        AGENT_BACKOFF_MAX.as_secs_f64(),
        AGENT_HEALTHY_AFTER.as_secs_f64()
    ));
    for r in &out.rounds {
        let errors: Vec<String> = r
            .agents
            .errors
            .iter()
            .map(|(e, c)| format!("{c}× {e}"))
            .collect();
        text.push_str(&format!(
            "round {} ({}): agents by delays slept {:?}; {} logged `resumed`; why: {}\n",
            r.round,
            r.kind.as_str(),
            r.agents.attempts,
            r.agents.resumed,
            errors.join(" | ")
        ));
    }
    text.push_str("limits: ");
    text.push_str(&out.limits.join("; "));
    text.push('\n');
    if let Some(e) = &out.error {
        text.push_str(&format!("FAILED: {e}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "# HELP porthole_sessions Sessions by state\n\
        porthole_sessions{state=\"active\"} 198\n\
        porthole_sessions{state=\"disconnected\"} 2\n\
        porthole_agents_connected 199\n\
        porthole_agent_handshake_failures_total{reason=\"per_ip_limit\"} 3\n\
        porthole_agent_registrations_total{kind=\"resume\"} 198\n";

    #[test]
    fn ready_sessions_need_a_state_and_a_link() {
        assert_eq!(ready_sessions(METRICS), 198);
        let fewer_links = METRICS.replace(
            "porthole_agents_connected 199",
            "porthole_agents_connected 5",
        );
        assert_eq!(ready_sessions(&fewer_links), 5);
        assert_eq!(ready_sessions(""), 0);
    }

    #[test]
    fn counters_are_keyed_by_their_label() {
        let f = counters_by(METRICS, "porthole_agent_handshake_failures_total", "reason");
        assert_eq!(f.get("per_ip_limit"), Some(&3.0));
        let r = counters_by(METRICS, "porthole_agent_registrations_total", "kind");
        assert_eq!(r.get("resume"), Some(&198.0));
        // A name that only starts like another is not mixed in.
        assert!(metric_series(METRICS, "porthole_session").is_empty());
    }

    #[test]
    fn agent_logs_give_delays_and_reasons() {
        let text = "porthole-agent: relay is shutting down; reconnecting in 0.2s\n\
            porthole-agent: cannot connect: Connection refused; reconnecting in 0.4s\n\
            porthole-agent: resumed session s-1\n";
        let log = parse_agent_log(text);
        assert_eq!(log.delays_ms.len(), 2);
        assert!((log.delays_ms[0] - 200.0).abs() < 1e-9 && (log.delays_ms[1] - 400.0).abs() < 1e-9);
        assert_eq!(log.errors[0], "relay is shutting down");
        assert!(log.resumed);
        let s = summarize_agents(&[log, parse_agent_log("")]);
        assert_eq!(s.attempts_max, 2);
        assert!((s.backoff_max_ms - 600.0).abs() < 1e-9);
        assert_eq!(s.attempts.get(&0), Some(&1));
        assert_eq!(s.resumed, 1);
    }

    #[test]
    fn the_larger_share_is_named() {
        let m = KindMedians {
            outage_ms: 300.0,
            backoff_ms: 200.0,
            attempts_max: 1,
            api_ms: 20.0,
            stop_ms: 5.0,
            refused: 0.0,
            refused_reasons: String::new(),
        };
        assert!(dominant(200, &m).starts_with("dominated by the agents' reconnect backoff"));
        let slow = KindMedians {
            outage_ms: 2000.0,
            ..m.clone()
        };
        assert!(dominant(200, &slow).starts_with("dominated by the relay"));
        assert!((first_dial_floor_ms(1) - 187.5).abs() < 1e-9);
        assert!(first_dial_floor_ms(200) > 249.0);
    }
}
