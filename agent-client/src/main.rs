//! `porthole-agent`: parses flags, sets up logging and signals, runs the agent.
//!
//! `porthole-agent [run] --relay HOST:PORT --token T --service ssh=127.0.0.1:22` serves the
//! session; `porthole-agent finish` (or SIGUSR1 to the agent) tells the relay the build
//! finished, which starts the grace period.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Parser, Subcommand};
use nix::sys::signal::Signal;
use porthole_agent::pidfile::{signal_agent, PidFile};
use porthole_agent::{run, AgentConfig, AgentEvent, Outcome};
use porthole_protocol::{Credential, Service};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

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
    /// Tell the running agent that the build finished (sends it SIGUSR1, after checking
    /// that the pid file names a porthole-agent).
    Finish {
        /// The running agent's pid file.
        #[arg(long, env = "PORTHOLE_PID_FILE", default_value_os_t = porthole_agent::config::default_pid_file())]
        pid_file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Some(Command::Finish { pid_file }) => finish(&pid_file),
        Some(Command::Run(config)) => serve(*config),
        None => serve(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("porthole-agent: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn finish(pid_file: &Path) -> Result<(), String> {
    let pid = signal_agent(pid_file, Signal::SIGUSR1)?;
    println!("porthole-agent: told the agent (pid {pid}) that the build finished; the grace period starts");
    Ok(())
}

fn serve(config: AgentConfig) -> Result<(), String> {
    let resolved = config.resolve()?;
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
    let outcome = runtime.block_on(async {
        let (finish_tx, finish_rx) = tokio::sync::watch::channel(false);
        let cancel = CancellationToken::new();
        let mut usr1 = signal(SignalKind::user_defined1()).map_err(|e| e.to_string())?;
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let stop = cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = usr1.recv() => { let _ = finish_tx.send(true); }
                    _ = term.recv() => { stop.cancel(); break; }
                    _ = tokio::signal::ctrl_c() => { stop.cancel(); break; }
                }
            }
        });
        let reporter = move |e: &AgentEvent| print_event(e, &logins);
        run(resolved, Box::new(reporter), finish_rx, cancel)
            .await
            .map_err(|e| e.to_string())
    });
    drop(pid_file);
    match outcome? {
        Outcome::Revoked(reason) => println!("porthole-agent: session ended: {reason}"),
        Outcome::Shutdown => println!("porthole-agent: stopped"),
    }
    Ok(())
}

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Prints events for the build log. Never prints a token or password: build logs are read
/// by many, including users who may not get remote access.
fn print_event(event: &AgentEvent, logins: &[Credential]) {
    let login = |service: Service| logins.iter().find(|c| c.service == service);
    match event {
        AgentEvent::Registered {
            session_id,
            endpoints,
            deadline,
            resumed,
        } => {
            if *resumed {
                println!("porthole-agent: resumed session {session_id}");
                return;
            }
            println!(
                "porthole-agent: remote access session {session_id} is open until {}",
                time(*deadline)
            );
            println!("Remote access instructions (passwords are on the remote access instructions page):");
            for e in endpoints {
                let user = login(e.service)
                    .map(|c| c.username.as_str())
                    .unwrap_or("<user>");
                let has_password = login(e.service).is_some_and(|c| c.password.is_some());
                let password = if has_password {
                    "password: on the instructions page"
                } else {
                    "key authentication"
                };
                match e.service {
                    Service::Ssh => println!(
                        "  ssh  {}:{}  ssh -p {} {user}@{}  ({password})",
                        e.host, e.port, e.port, e.host
                    ),
                    Service::Vnc => println!(
                        "  vnc  {}:{}  VNC viewer, user {user}  ({password})",
                        e.host, e.port
                    ),
                }
            }
        }
        AgentEvent::Deadline { deadline } => {
            println!(
                "porthole-agent: build finished; remote access ends at {}",
                time(*deadline)
            )
        }
        AgentEvent::Reconnecting { error, retry_in_ms } => {
            println!(
                "porthole-agent: {error}; reconnecting in {:.1}s",
                *retry_in_ms as f64 / 1000.0
            )
        }
        AgentEvent::Revoked { .. } => {}
    }
}
