//! `porthole-agent`: parses flags, sets up logging and signals, runs the agent.
//!
//! `porthole-agent [run] --relay HOST:PORT --token T --service ssh=127.0.0.1:22` serves the
//! session (`--detach`: in the background once registered); `porthole-agent finish` (or
//! SIGUSR1 to the agent) tells the relay the build finished, which starts the grace period
//! (`--wait`: and waits for the session to end); `porthole-agent status` shows the running
//! agent's session. Exit codes: [`porthole_agent::exit`].

mod commands;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use porthole_agent::detach;
use porthole_agent::events::SharedReporter;
use porthole_agent::local::server::{Handles, Server};
use porthole_agent::local::{socket::LocalSocket, socket_path};
use porthole_agent::pidfile::PidFile;
use porthole_agent::status::StatusCell;
use porthole_agent::{print, run_with, AgentConfig, AgentEvent, Controls, Outcome};
use porthole_protocol::Credential;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// How long `wait` clients get to read the final status when the agent exits.
const FLUSH: Duration = Duration::from_secs(2);

/// Porthole agent: gives a CI build machine's SSH/VNC a public port on a Porthole relay.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: AgentConfig,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the session (the default).
    Run(Box<AgentConfig>),
    /// Tell the running agent that the build finished (through its control socket; an
    /// agent without one gets SIGUSR1, after checking that the pid file names a
    /// porthole-agent). Exit 3 when no agent is running.
    Finish {
        /// The running agent's pid file (its control socket is this path plus `.sock`).
        #[arg(long, env = "PORTHOLE_PID_FILE", default_value_os_t = porthole_agent::config::default_pid_file())]
        pid_file: PathBuf,
        /// Then wait until the session ends (grace period over, hard cap, revoked),
        /// printing the deadline and each change of it; exit 0 then.
        #[arg(long)]
        wait: bool,
        /// Opt-in: if no user connected during the whole session and none connects within
        /// this duration after the build finished, end the session now instead of at the
        /// end of the grace period.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        wait_if_nobody_connected: Option<Duration>,
    },
    /// Show the running agent's session: state, deadline, visitors connected now. Exit 0
    /// while the session lives, 3 when no agent is running, 4 when the session ended.
    Status {
        /// The running agent's pid file (its control socket is this path plus `.sock`).
        #[arg(long, env = "PORTHOLE_PID_FILE", default_value_os_t = porthole_agent::config::default_pid_file())]
        pid_file: PathBuf,
        /// Print the agent's status as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // No colour codes in log files (`--detach`) and CI logs that are not terminals.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Some(Command::Finish {
            pid_file,
            wait,
            wait_if_nobody_connected,
        }) => commands::finish(&pid_file, wait, wait_if_nobody_connected),
        Some(Command::Status { pid_file, json }) => commands::status(&pid_file, json),
        Some(Command::Run(config)) => serve(*config).map_err(commands::Failure::error),
        None => serve(cli.run).map_err(commands::Failure::error),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("porthole-agent: error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

fn serve(config: AgentConfig) -> Result<(), String> {
    let resolved = config.resolve()?;
    if config.detach && !config.detached_child {
        return start_detached(&config, &resolved);
    }
    if config.detached_child {
        detach::become_session_leader();
        println!(
            "porthole-agent: running in the background (pid {})",
            std::process::id()
        );
    }
    if resolved.embedded_ssh.is_some() {
        // Shells of the embedded SSH server run as this user: keep them out of this
        // process's memory and /proc/PID/environ (its resume secret; the join token there is
        // spent once the session is registered). Root can still read them.
        if let Err(e) = nix::sys::prctl::set_dumpable(false) {
            tracing::warn!(error = %e, "cannot make the agent non-dumpable");
        }
    }
    let logins: Vec<Credential> = resolved.credentials.clone();
    let runtime =
        tokio::runtime::Runtime::new().map_err(|e| format!("cannot start the runtime: {e}"))?;
    // Removed when it goes out of scope, if it still holds this process's pid.
    let pid_file = PidFile::create(&config.pid_file)?;
    // Likewise the control socket next to it (owned by the server).
    let (socket, listener) = LocalSocket::bind(&socket_path(&config.pid_file))?;
    let outcome = runtime.block_on(async {
        let (finish_tx, finished) = tokio::sync::watch::channel(false);
        let (end_tx, end) = tokio::sync::watch::channel(false);
        let status = StatusCell::new(std::process::id());
        let reporter = SharedReporter(Arc::new(move |e: &AgentEvent| {
            for line in print::event(e, &logins) {
                println!("{line}");
            }
        }));
        let server = Server::start(
            socket,
            listener,
            Handles {
                status: status.clone(),
                finished: finish_tx.clone(),
                end: end_tx,
                reporter: reporter.clone(),
            },
        )?;
        let cancel = CancellationToken::new();
        let mut usr1 = signal(SignalKind::user_defined1()).map_err(|e| e.to_string())?;
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let stop = cancel.clone();
        let finish_status = status.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = usr1.recv() => {
                        finish_status.update(|s| s.finish_requested = true);
                        finish_tx.send_replace(true);
                    }
                    _ = term.recv() => { stop.cancel(); break; }
                    _ = tokio::signal::ctrl_c() => { stop.cancel(); break; }
                }
            }
        });
        let controls = Controls {
            finished,
            end,
            status,
        };
        let outcome = run_with(resolved, Box::new(reporter), controls, cancel)
            .await
            .map_err(|e| e.to_string());
        // The status is final now: let `finish --wait` clients read it.
        server.shutdown(FLUSH).await;
        outcome
    });
    drop(pid_file);
    match outcome? {
        Outcome::Revoked(reason) => println!("porthole-agent: session ended: {reason}"),
        Outcome::Shutdown => println!("porthole-agent: stopped"),
    }
    Ok(())
}

/// `--detach`: starts the background agent and prints what the build log needs.
fn start_detached(config: &AgentConfig, resolved: &porthole_agent::Resolved) -> Result<(), String> {
    let log = config
        .log_file
        .clone()
        .unwrap_or_else(|| detach::default_log_file(&config.pid_file));
    let started = detach::launch(
        &config.pid_file,
        &log,
        resolved.connect_timeout,
        &resolved.token,
    )?;
    let status = &started.status;
    let session_id = status.session_id.as_deref().unwrap_or("?");
    let deadline = status.deadline().unwrap_or_else(std::time::SystemTime::now);
    for line in print::instructions(
        session_id,
        &status.endpoints,
        deadline,
        &resolved.credentials,
    ) {
        println!("{line}");
    }
    println!(
        "porthole-agent: running in the background (pid {}); log: {}; pid file: {}",
        started.pid,
        started.log.display(),
        config.pid_file.display()
    );
    println!(
        "porthole-agent: when the build is done, run `porthole-agent finish --wait` (in a step \
         that always runs)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use porthole_agent::exit;

    #[test]
    fn exit_codes_stay_apart() {
        let codes = [
            exit::OK,
            exit::ERROR,
            exit::USAGE,
            exit::NO_AGENT,
            exit::SESSION_ENDED,
        ];
        let unique: std::collections::BTreeSet<u8> = codes.into_iter().collect();
        assert_eq!(unique.len(), codes.len());
    }
}
