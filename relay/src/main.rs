//! `porthole-relay`: parses flags, sets up logging and signals, runs the relay.

use std::time::Duration;

use anyhow::Context;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use porthole_relay::user_token::{self, Roles};
use porthole_relay::{start, RelayConfig, StartupInfo};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

/// Porthole relay: remote access to CI build machines through public TCP ports.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: RelayConfig,
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
}

/// How long shutdown waits for connections to close.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::MintUserToken {
        sub,
        app_id,
        roles,
        ttl,
        data_dir,
        user_token_secret_file,
    }) = cli.command
    {
        let path = user_token_secret_file.unwrap_or_else(|| data_dir.join("user-token.secret"));
        let (secret, created) = user_token::load_or_create_secret(&path)?;
        if created {
            eprintln!("created a new user token secret at {}", path.display());
        }
        let role = if roles.len() == 1 {
            Roles::One(roles[0].clone())
        } else {
            Roles::Many(roles)
        };
        let token =
            user_token::mint(&secret, &sub, &app_id, role, ttl).map_err(anyhow::Error::msg)?;
        println!("{token}");
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let port_range = cli.config.port_range;
    let public_bind = cli.config.public_bind;
    let handle = start(cli.config)
        .await
        .context("porthole-relay could not start")?;
    print_banner(
        &handle.info,
        &port_range.to_string(),
        &public_bind.to_string(),
    );
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
    handle.shutdown(SHUTDOWN_WAIT).await;
    Ok(())
}

fn print_banner(info: &StartupInfo, port_range: &str, public_bind: &str) {
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
    println!(
        "porthole-relay {version} is running
  agent endpoint  {agent} (TLS 1.3)
  HTTP API        http://{api}
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
  2. On the build machine, with the join_token from the answer:
       porthole-agent --relay {host}:{agent_port} {trust} \\
         --token <join_token> --service ssh=127.0.0.1:22
  3. Users get the remote access instructions (command, password, known_hosts line) with a
     user token the CI backend mints (try: porthole-relay mint-user-token --sub u1 --app-id app-1 --role developer):
       curl -s -H \"Authorization: Bearer <user token>\" http://{api}/v1/sessions/<session_id>/instructions
     and connect:
       ssh -p <port> <user>@{host}",
        version = env!("CARGO_PKG_VERSION"),
        agent = info.agent_addr,
        api = info.api_addr,
        cert = info.cert_path.display(),
        fp = info.fingerprint,
        user_secret = info.user_token_secret_path.display(),
        audit = info.audit_log_path.display(),
    );
}
