//! The agent's settings: flags and `PORTHOLE_*` variables.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use porthole_protocol::{Secret, Service};

/// Settings of `porthole-agent run` (the default command).
/// Most warm connections `--warm-connections` may ask for (the relay holds at most 16 per
/// session, with room for a link that just ended).
pub const MAX_WARM: usize = 8;

#[derive(Clone, Debug, clap::Args)]
pub struct AgentConfig {
    /// The relay's agent endpoint, HOST:PORT; a relay cluster: several, comma-separated
    /// (tried in order, starting after one that failed), or a name with several addresses.
    #[arg(long, env = "PORTHOLE_RELAY", required = true)]
    pub relay: Option<String>,
    /// Join token from the relay's API (keep it out of build logs: prefer the variable).
    #[arg(long, env = "PORTHOLE_TOKEN", hide_env_values = true, required = true, value_parser = parse_secret)]
    pub token: Option<Secret>,
    /// A local service to expose, NAME=HOST:PORT (NAME is ssh or vnc), or ssh=embedded for
    /// the agent's own SSH server; repeat per service.
    #[arg(
        long = "service",
        env = "PORTHOLE_SERVICES",
        value_delimiter = ',',
        required_unless_present = "embedded_ssh"
    )]
    pub services: Vec<ServiceTarget>,
    /// Serve SSH from the agent itself (no sshd needed): same as --service ssh=embedded.
    #[arg(long, env = "PORTHOLE_EMBEDDED_SSH")]
    pub embedded_ssh: bool,
    /// Embedded SSH: also accept the public keys in this OpenSSH authorized_keys file.
    #[arg(long, env = "PORTHOLE_AUTHORIZED_KEYS")]
    pub authorized_keys: Option<PathBuf>,
    /// Embedded SSH: working directory of shells, commands and relative SFTP paths
    /// [default: the agent's].
    #[arg(long, env = "PORTHOLE_SSH_WORKDIR")]
    pub ssh_workdir: Option<PathBuf>,
    /// Embedded SSH: the shell [default: the user's login shell, else /bin/sh].
    #[arg(long, env = "PORTHOLE_SSH_SHELL")]
    pub ssh_shell: Option<PathBuf>,
    /// Embedded SSH: set NAME=VALUE in every session; repeat per variable.
    #[arg(long = "ssh-env", value_parser = parse_env_var)]
    pub ssh_env: Vec<(String, String)>,
    /// Embedded SSH: start sessions from an empty environment instead of the build's
    /// (the agent's own PORTHOLE_* variables are never passed on).
    #[arg(long, env = "PORTHOLE_SSH_ENV_CLEAR")]
    pub ssh_env_clear: bool,
    /// Embedded SSH: close a connection that has not logged in this long after connecting
    /// (at least 1s, at most 10m).
    #[arg(long, env = "PORTHOLE_SSH_LOGIN_TIMEOUT", default_value = "2m",
          value_parser = parse_login_timeout)]
    pub ssh_login_timeout: Duration,
    /// Trust relay certificates issued by the CA(s) in this PEM file.
    #[arg(long, env = "PORTHOLE_CA_CERT", conflicts_with = "pin_sha256")]
    pub ca_cert: Option<PathBuf>,
    /// Trust exactly the relay certificate with this SHA-256 fingerprint (printed by the relay).
    #[arg(long, env = "PORTHOLE_PIN_SHA256")]
    pub pin_sha256: Option<String>,
    /// Name to verify the relay certificate against [default: the host of --relay].
    #[arg(long, env = "PORTHOLE_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Where the agent writes its pid, for `porthole-agent finish` and `status` (created anew,
    /// mode 0600; a symbolic link or a live agent's pid file there stops the start; a stale
    /// one is replaced). Its control socket is this path plus `.sock`.
    #[arg(long, env = "PORTHOLE_PID_FILE", default_value_os_t = default_pid_file())]
    pub pid_file: PathBuf,
    /// SSH user name shown in the instructions [default: the user running the agent].
    #[arg(long, env = "PORTHOLE_SSH_USER")]
    pub ssh_user: Option<String>,
    /// File holding the SSH password shown to allowed users (a file, so it stays out of `ps`).
    #[arg(long, env = "PORTHOLE_SSH_PASSWORD_FILE")]
    pub ssh_password_file: Option<PathBuf>,
    /// VNC user name shown in the instructions [default: the SSH user].
    #[arg(long, env = "PORTHOLE_VNC_USER")]
    pub vnc_user: Option<String>,
    /// File holding the VNC password shown to allowed users.
    #[arg(long, env = "PORTHOLE_VNC_PASSWORD_FILE")]
    pub vnc_password_file: Option<PathBuf>,
    /// SSH host public key file(s) users verify the machine with; repeat per file
    /// [default: /etc/ssh/ssh_host_*_key.pub].
    #[arg(
        long = "ssh-host-key-file",
        env = "PORTHOLE_SSH_HOST_KEY_FILES",
        value_delimiter = ','
    )]
    pub ssh_host_key_files: Vec<PathBuf>,
    /// Data connections kept open and authenticated on the relay, so visitors are paired
    /// without waiting for a handshake (0 turns this off).
    #[arg(long, env = "PORTHOLE_WARM_CONNECTIONS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(0..=MAX_WARM as i64))]
    pub warm_connections: u16,
    /// A warm data connection idle this long is replaced by a fresh one (keep it below the
    /// idle timeout of any NAT or firewall between agent and relay).
    #[arg(long, env = "PORTHOLE_WARM_IDLE", default_value = "60s", value_parser = parse_warm_idle)]
    pub warm_idle: Duration,
    /// Deadline for connecting to the relay or a local service.
    #[arg(long, env = "PORTHOLE_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Run in the background once registered (a build step): print the instructions, write
    /// the pid file and return 0; exit non-zero with the reason if the agent cannot
    /// register within --connect-timeout (plus 5s). End it with `porthole-agent finish
    /// --wait`.
    #[arg(long, env = "PORTHOLE_DETACH")]
    pub detach: bool,
    /// With --detach: where the background agent's output goes (appended, mode 0600)
    /// [default: the pid file with .log instead of .pid].
    #[arg(long, env = "PORTHOLE_LOG_FILE")]
    pub log_file: Option<PathBuf>,
    /// Internal: this process is the background agent that --detach started.
    #[arg(long, hide = true)]
    pub detached_child: bool,
}

fn parse_warm_idle(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e}"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("`{s}`: at least 1s"));
    }
    Ok(d)
}

fn parse_login_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e}"))?;
    crate::embedded_ssh::settings::check_login_timeout(d).map_err(|e| format!("`{s}`: {e}"))
}

fn parse_env_var(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected NAME=VALUE"))?;
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("`{name}` is not a variable name"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

fn parse_secret(s: &str) -> Result<Secret, String> {
    let s = s.trim();
    if s.is_empty() || s.len() > porthole_protocol::limits::MAX_SECRET_LEN {
        return Err("a join token is a non-empty string from the relay's API".into());
    }
    Ok(Secret::new(s))
}

/// Default pid file: `$XDG_RUNTIME_DIR/porthole-agent.pid` (when it is an absolute path),
/// else in the temp dir.
pub fn default_pid_file() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute())
        .unwrap_or_else(std::env::temp_dir)
        .join("porthole-agent.pid")
}

/// `NAME=HOST:PORT` or `ssh=embedded`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceTarget {
    /// The service.
    pub service: Service,
    /// What serves it.
    pub target: Target,
}

/// What serves a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A local server the agent dials, HOST:PORT.
    Dial(String),
    /// The agent's embedded SSH server.
    EmbeddedSsh,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dial(addr) => f.write_str(addr),
            Self::EmbeddedSsh => f.write_str("embedded"),
        }
    }
}

impl FromStr for ServiceTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, target) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: expected NAME=HOST:PORT, e.g. ssh=127.0.0.1:22"))?;
        let service: Service = name.parse()?;
        if target == "embedded" {
            if service != Service::Ssh {
                return Err(format!("`{s}`: only ssh can be embedded"));
            }
            return Ok(Self {
                service,
                target: Target::EmbeddedSsh,
            });
        }
        let port_ok = target
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !port_ok {
            return Err(format!("`{s}`: `{target}` is not HOST:PORT"));
        }
        Ok(Self {
            service,
            target: Target::Dial(target.to_owned()),
        })
    }
}
