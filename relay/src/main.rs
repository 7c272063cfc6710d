//! `porthole-relay`: parses flags and the config file, sets up logging and signals, runs
//! the relay. Subcommands: `mint-user-token`, `check-config`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use porthole_relay::config::file as config_file;
use porthole_relay::config::LogFormat;
use porthole_relay::user_token::{self, Roles};
use porthole_relay::{start, RelayConfig, RelayHandle, StartupInfo};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

/// Porthole relay: remote access to CI build machines through public TCP ports.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML file with any of the settings below (flags and PORTHOLE_* variables override it).
    #[arg(long, env = "PORTHOLE_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    relay: RelayConfig,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a user token (HS256 JWT) for the instructions endpoint, signed with the secret the
    /// relay uses. The token is alone on the last line.
    MintUserToken {
        /// User id (`sub`).
        #[arg(long)]
        sub: String,
        /// App id (`app_id`).
        #[arg(long)]
        app_id: String,
        /// Role (`role`); repeat for a list of roles.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// Lifetime (`exp` = now + TTL).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Data dir (the secret defaults to DATA_DIR/user-token.secret).
        #[arg(long, env = "PORTHOLE_DATA_DIR", default_value = "./porthole-data")]
        data_dir: PathBuf,
        /// The shared secret file.
        #[arg(long, env = "PORTHOLE_USER_TOKEN_SECRET_FILE")]
        user_token_secret_file: Option<PathBuf>,
    },
    /// Load and validate a config file (with PORTHOLE_* variables applied) without starting.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A plain line for operators (no backtrace), with the whole cause chain.
            eprintln!("porthole-relay: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Some(Command::MintUserToken {
            sub,
            app_id,
            roles,
            ttl,
            data_dir,
            user_token_secret_file,
        }) => {
            let path = user_token_secret_file.unwrap_or_else(|| data_dir.join("user-token.secret"));
            mint(&path, &sub, &app_id, roles, ttl)
        }
        Some(Command::CheckConfig { file }) => check_config(&file),
        None => {
            let config = load_valid(&matches, cli.config.as_deref())?;
            init_logs(config.log_format);
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(serve(config))
        }
    }
}

fn mint(
    path: &Path,
    sub: &str,
    app_id: &str,
    roles: Vec<String>,
    ttl: Duration,
) -> anyhow::Result<()> {
    let (secret, created) = user_token::load_or_create_secret(path)?;
    if created {
        eprintln!("created a new user token secret at {}", path.display());
    }
    let role = match <[String; 1]>::try_from(roles) {
        Ok([one]) => Roles::One(one),
        Err(many) => Roles::Many(many),
    };
    let token = user_token::mint(&secret, sub, app_id, role, ttl).map_err(anyhow::Error::msg)?;
    println!("{token}");
    Ok(())
}

/// Loads the settings (defaults < file < environment < `matches`) and validates them; an
/// invalid value is reported with the key and where it came from.
fn load_valid(matches: &ArgMatches, file: Option<&Path>) -> anyhow::Result<RelayConfig> {
    let config = config_file::load(matches, file).map_err(anyhow::Error::msg)?;
    if let Err(e) = config.check() {
        let from = config_file::origin(matches, e.key, file);
        anyhow::bail!("{from}: {e}");
    }
    Ok(config)
}

fn check_config(file: &Path) -> anyhow::Result<()> {
    // The environment applies as it would at start; no flags.
    let env_only = Cli::command().try_get_matches_from(["porthole-relay"])?;
    let config = load_valid(&env_only, Some(file))?;
    for warning in config.warnings() {
        println!("warning: {warning}");
    }
    println!("config OK: {}", file.display());
    Ok(())
}

fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into journald or a collector.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

async fn serve(config: RelayConfig) -> anyhow::Result<()> {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let grace = config.shutdown_grace;
    let port_range = config.port_range.to_string();
    let public_bind = config.public_bind.to_string();
    let handle = start(config)
        .await
        .context("porthole-relay could not start")?;
    print_banner(&handle.info, &port_range, &public_bind);
    wait_for_signals(&handle).await?;
    tracing::info!(grace = ?grace, "shutting down: agents told to reconnect, visitors draining");
    handle.shutdown(grace).await;
    tracing::info!("stopped");
    Ok(())
}

/// Serves until SIGTERM or SIGINT; SIGHUP reloads the TLS certificate and key, SIGUSR2
/// reopens the audit log (rotation).
async fn wait_for_signals(handle: &RelayHandle) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = hup.recv() => match handle.reload_tls() {
                Ok(fingerprint) => tracing::info!(%fingerprint, "SIGHUP: new agent connections get the reloaded certificate"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: certificate reload failed; keeping the current one"),
            },
            _ = usr2.recv() => match handle.relay.audit.reopen() {
                Ok(()) => tracing::info!("SIGUSR2: audit log reopened"),
                Err(e) => tracing::error!(error = %e, "SIGUSR2: cannot reopen the audit log; still writing the old file"),
            },
        }
    }
}

/// Prints what an operator needs next. A closed stdout must not stop the relay, so write
/// errors are ignored.
fn print_banner(info: &StartupInfo, port_range: &str, public_bind: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", banner(info, port_range, public_bind));
    let _ = out.flush();
}

fn banner(info: &StartupInfo, port_range: &str, public_bind: &str) -> String {
    let host = &info.public_host;
    let agent_port = info.agent_addr.port();
    let cert_note = match (info.self_signed, info.cert_generated) {
        (true, true) => " (self-signed, generated now)",
        (true, false) => " (self-signed)",
        (false, _) => "",
    };
    let trust = if info.self_signed {
        format!("--pin-sha256 {}", info.fingerprint)
    } else {
        String::from("(trusted through system roots; or --ca-cert FILE)")
    };
    let token_note = if info.admin_token_created {
        " (created now, mode 0600)"
    } else {
        ""
    };
    let token = info.admin_token_path.display();
    let api = info.api_addr;
    let metrics = info.metrics_addr.unwrap_or(api);
    let web = info.web_addr.unwrap_or(api);
    let web_note = if info.web_addr.is_some() {
        " (page and instructions only)"
    } else {
        ""
    };
    format!(
        "porthole-relay {version} is running
  agent endpoint  {agent} (TLS 1.3){data_port}
  HTTP API        http://{api}
  metrics         http://{metrics}/metrics (also /healthz, /readyz)
  access page     http://{web}/access/<session_id>#token=<user token>{web_note}
  public ports    {public_bind} ports {port_range}, announced as {host}
  TLS certificate {cert}{cert_note}
  SHA-256         {fp}
  admin token     {token}{token_note}
  user tokens     HS256, secret shared with the CI backend: {user_secret}
  audit log       {audit}

Next steps:
  1. Create a session (the CI backend does this through the API):
       curl -s -H \"Authorization: Bearer $(cat {token})\" \\
         -d '{{\"build_id\":\"build-1\",\"app_id\":\"app-1\",\"services\":[\"ssh\"]}}' \\
         http://{api}/v1/sessions
  2. On the build machine, with the join_token from the answer (in the environment, so it
     stays out of `ps` and shell history):
       PORTHOLE_TOKEN=<join_token> porthole-agent --relay {host}:{agent_port} {trust} \\
         --service ssh=127.0.0.1:22
  3. Users get the remote access instructions (command, password, known_hosts line) with a
     user token the CI backend mints (try: porthole-relay mint-user-token --sub u1 --app-id app-1 --role developer):
       curl -s -H \"Authorization: Bearer <user token>\" http://{api}/v1/sessions/<session_id>/instructions
     and connect:
       ssh -p <port> <user>@{host}",
        version = env!("CARGO_PKG_VERSION"),
        agent = info.agent_addr,
        cert = info.cert_path.display(),
                fp = info.fingerprint,
        data_port = info
            .data_addr
            .map(|a| format!("\n  data port       {a} (plain TCP, data plane tcp: private networks only)"))
            .unwrap_or_default(),
        user_secret = info.user_token_secret_path.display(),
        audit = info.audit_log_path.display(),
    )
}
