//! A real OpenSSH `sshd` on a loopback port, with throwaway host and client
//! keys, plus a preconfigured `ssh` client command.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tempfile::TempDir;

use super::tools::{self, require};

/// How long sshd gets to start answering with its `SSH-2.0-` banner.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How many ports are tried when another process steals the free port.
const BIND_ATTEMPTS: u32 = 5;

/// How [`Sshd::start_with`] sets sshd up.
#[derive(Debug, Clone, Default)]
pub struct SshdOptions {
    /// Also accept password authentication (`PasswordAuthentication yes`,
    /// keyboard-interactive off, no PAM: sshd checks `/etc/shadow` itself,
    /// which needs sshd to run as root).
    pub password_auth: bool,
    /// The only user allowed to log in [default: the one running the tests].
    pub user: Option<String>,
}

/// A running OpenSSH server that accepts a freshly generated ed25519 client
/// key (and, with [`SshdOptions::password_auth`], passwords), for one user.
/// Killed (and reaped) on drop.
#[derive(Debug)]
pub struct Sshd {
    /// Loopback port sshd listens on (127.0.0.1 only).
    pub port: u16,
    child: Child,
    user: String,
    ssh: PathBuf,
    client_key: PathBuf,
    host_public_key: String,
    log: PathBuf,
    // Last field: dropped after the process using it has been killed.
    dir: TempDir,
}

impl Sshd {
    /// Generates host and client keys in a fresh temp dir, writes an
    /// unprivileged config and starts `sshd -D -e` on a free 127.0.0.1 port.
    ///
    /// Returns once the port answers with an `SSH-2.0-` banner (at most ~10 s;
    /// the error then includes sshd's log). Retries on another port if the
    /// chosen one was taken in the meantime.
    pub fn start() -> anyhow::Result<Sshd> {
        Self::start_with(SshdOptions::default())
    }

    /// Like [`Sshd::start`], with `options`.
    pub fn start_with(options: SshdOptions) -> anyhow::Result<Sshd> {
        let sshd = require("sshd", "openssh-server")?;
        let keygen = require("ssh-keygen", "openssh-client")?;
        let ssh = require("ssh", "openssh-client")?;
        let user = match options.user {
            Some(user) => user,
            None => tools::current_user()?,
        };
        if options.password_auth && !tools::is_root()? {
            bail!("sshd checks passwords against /etc/shadow only when it runs as root: run the tests as root");
        }
        if tools::is_root()? {
            ensure_privsep_dir()?;
            reject_locked_account(&user)?;
        }
        let dir = tempfile::Builder::new()
            .prefix("porthole-sshd-")
            .tempdir()
            .context("creating sshd temp dir")?;
        let host_key = dir.path().join("host_ed25519");
        let client_key = dir.path().join("client_ed25519");
        generate_key(&keygen, &host_key)?;
        generate_key(&keygen, &client_key)?;
        let host_public_key = read(&host_key.with_extension("pub"))?.trim().to_owned();
        let authorized_keys = dir.path().join("authorized_keys");
        fs::write(&authorized_keys, read(&client_key.with_extension("pub"))?)
            .context("writing authorized_keys")?;

        let config = dir.path().join("sshd_config");
        let q = |p: &Path| format!("\"{}\"", p.display());
        let text = format!(
            "ListenAddress 127.0.0.1\n\
             HostKey {host_key}\n\
             PidFile {pid}\n\
             AuthorizedKeysFile {authorized_keys}\n\
             AllowUsers {user}\n\
             StrictModes no\n\
             UsePAM no\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication {password}\n\
             KbdInteractiveAuthentication no\n\
             PermitEmptyPasswords no\n\
             PermitRootLogin prohibit-password\n\
             PrintMotd no\n\
             LogLevel VERBOSE\n",
            host_key = q(&host_key),
            pid = q(&dir.path().join("sshd.pid")),
            authorized_keys = q(&authorized_keys),
            password = if options.password_auth { "yes" } else { "no" },
        );
        fs::write(&config, text).context("writing sshd_config")?;

        let log = dir.path().join("sshd.log");
        for attempt in 1..=BIND_ATTEMPTS {
            let port = tools::free_port()?;
            let log_file = File::create(&log).context("creating sshd log file")?;
            // sshd re-executes itself, which requires an absolute path (`require` gives one).
            let mut child = Command::new(&sshd)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .arg("-p")
                .arg(port.to_string())
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().context("cloning sshd log file")?)
                .stderr(log_file)
                .spawn()
                .with_context(|| format!("starting {}", sshd.display()))?;
            match tools::wait_for_banner(&mut child, port, b"SSH-2.0-", START_TIMEOUT) {
                Ok(()) => {
                    return Ok(Sshd {
                        port,
                        child,
                        user,
                        ssh,
                        client_key,
                        host_public_key,
                        log,
                        dir,
                    })
                }
                Err(e) => {
                    tools::terminate(&mut child, Duration::from_secs(2));
                    let output = read(&log).unwrap_or_default();
                    if attempt < BIND_ATTEMPTS && output.contains("Address already in use") {
                        continue;
                    }
                    bail!("sshd did not start: {e:#}\n--- sshd log ---\n{output}");
                }
            }
        }
        bail!("sshd could not bind a free port in {BIND_ATTEMPTS} attempts")
    }

    /// The user the client logs in as: the one running the tests (`id -un`).
    pub fn user(&self) -> String {
        self.user.clone()
    }

    /// Private key (ed25519, no passphrase) that sshd accepts.
    pub fn client_key(&self) -> &Path {
        &self.client_key
    }

    /// sshd's public host key, one line as in the `.pub` file
    /// (`ssh-ed25519 AAAA... comment`).
    pub fn host_public_key(&self) -> String {
        self.host_public_key.clone()
    }

    /// The `.pub` file holding [`Sshd::host_public_key`] (for the agent's
    /// `--ssh-host-key-file`).
    pub fn host_public_key_file(&self) -> PathBuf {
        self.dir.path().join("host_ed25519.pub")
    }

    /// Scratch directory owned by this server (keys, config, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything sshd has logged so far (it runs with `LogLevel VERBOSE`);
    /// attach this to assertion messages.
    pub fn log(&self) -> String {
        read(&self.log).unwrap_or_else(|e| format!("<{e:#}>"))
    }

    /// An `ssh` command that logs in to this server through `host:port` (sshd
    /// itself, or a relay in front of it) with the client key and strict host
    /// key checking against a known_hosts file trusting exactly
    /// `[host]:port` → this server's host key. Append the remote command.
    ///
    /// If the known_hosts file cannot be written (it lives in the temp dir,
    /// so that is unlikely) the problem is printed to stderr and ssh will
    /// fail with "Host key verification failed"; use [`Sshd::try_ssh`] to get
    /// the error instead.
    pub fn ssh(&self, host: &str, port: u16) -> Command {
        match self.try_ssh(host, port) {
            Ok(cmd) => cmd,
            Err(e) => {
                eprintln!("peers::sshd: {e:#}");
                self.ssh_command(host, port, &self.dir.path().join("known_hosts-unwritable"))
            }
        }
    }

    /// Like [`Sshd::ssh`], but reports a failure to write known_hosts.
    pub fn try_ssh(&self, host: &str, port: u16) -> anyhow::Result<Command> {
        let safe_host: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let known_hosts = self
            .dir
            .path()
            .join(format!("known_hosts-{safe_host}-{port}"));
        let pattern = if port == 22 {
            host.to_owned()
        } else {
            format!("[{host}]:{port}")
        };
        fs::write(
            &known_hosts,
            format!("{pattern} {}\n", self.host_public_key),
        )
        .with_context(|| format!("writing {}", known_hosts.display()))?;
        Ok(self.ssh_command(host, port, &known_hosts))
    }

    /// Shorthand for `self.ssh("127.0.0.1", self.port)`: straight to sshd.
    pub fn ssh_direct(&self) -> Command {
        self.ssh("127.0.0.1", self.port)
    }

    fn ssh_command(&self, host: &str, port: u16, known_hosts: &Path) -> Command {
        let mut cmd = Command::new(&self.ssh);
        // `-F none`: ignore ~/.ssh/config and /etc/ssh/ssh_config.
        cmd.args(["-F", "none", "-p", &port.to_string(), "-i"])
            .arg(&self.client_key)
            .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
            .args(["-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .args([
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "UpdateHostKeys=no",
            ])
            .args(["-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5"])
            .args(["-o", "LogLevel=ERROR"])
            .arg(format!("{}@{host}", self.user));
        cmd
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        tools::terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// sshd running as root refuses to start without its privilege separation
/// directory, which containers often lack (it is normally made by systemd).
fn ensure_privsep_dir() -> anyhow::Result<()> {
    let dir = Path::new("/run/sshd");
    fs::create_dir_all(dir).context("creating /run/sshd (sshd's privilege separation dir)")?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .context("setting /run/sshd to mode 0755")
}

/// With `UsePAM no`, sshd running as root refuses accounts whose shadow
/// password starts with `!` ("account is locked"), even for key auth. Say so
/// up front instead of failing later with a bare "Permission denied".
fn reject_locked_account(user: &str) -> anyhow::Result<()> {
    let shadow = fs::read_to_string("/etc/shadow").unwrap_or_default();
    let prefix = format!("{user}:!");
    if shadow.lines().any(|line| line.starts_with(&prefix)) {
        bail!(
            "sshd (UsePAM no) refuses user {user}: its password is locked ('!' in /etc/shadow); \
             unlock it for key-only login with `usermod -p '*' {user}`"
        );
    }
    Ok(())
}

fn generate_key(keygen: &Path, path: &Path) -> anyhow::Result<()> {
    let done = tools::run_with_timeout(
        Command::new(keygen)
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "porthole-test", "-f"])
            .arg(path),
        Duration::from_secs(30),
    )?;
    if !done.status.success() {
        bail!(
            "ssh-keygen for {} failed ({}): {}",
            path.display(),
            done.status,
            done.stderr
        );
    }
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// A Linux account that logs in with a password, for tests of password
/// authentication through the relay.
#[derive(Debug, Clone)]
pub struct PasswordUser {
    /// Login name.
    pub name: String,
    /// Its password (random, set once per test process).
    pub password: String,
}

/// Name of the account [`password_user`] creates.
pub const PASSWORD_USER: &str = "porthole-e2e";

/// The account `porthole-e2e`, created if absent (`useradd --create-home
/// --shell /bin/sh`), with a fresh random password set by `chpasswd`, once per
/// test process. Needs root: otherwise an error says so (tests fail, never skip).
///
/// Two test processes running at once would each set their own password; the
/// test binaries of one `cargo test` run one after another, so that does not
/// happen there.
pub fn password_user() -> anyhow::Result<PasswordUser> {
    static USER: std::sync::OnceLock<Result<PasswordUser, String>> = std::sync::OnceLock::new();
    USER.get_or_init(|| create_password_user().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// `sshpass -e ssh ... USER@HOST` (append the remote command): password
/// authentication only (no keys, no agent), strict host key checking against
/// exactly `known_hosts`, OpenSSH config files ignored. The password goes in
/// the `SSHPASS` variable, never in argv.
pub fn password_ssh(
    host: &str,
    port: u16,
    user: &str,
    password: &str,
    known_hosts: &Path,
) -> anyhow::Result<Command> {
    let sshpass = require("sshpass", "sshpass")?;
    let ssh = require("ssh", "openssh-client")?;
    let mut cmd = Command::new(sshpass);
    cmd.env("SSHPASS", password)
        .arg("-e")
        .arg(ssh)
        .args(["-F", "none", "-p", &port.to_string()])
        .args(["-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "UpdateHostKeys=no",
        ])
        .args(["-o", "PreferredAuthentications=password"])
        .args(["-o", "PubkeyAuthentication=no", "-o", "IdentityAgent=none"])
        .args(["-o", "NumberOfPasswordPrompts=1", "-o", "ConnectTimeout=10"])
        .args(["-o", "LogLevel=ERROR"])
        .arg(format!("{user}@{host}"));
    Ok(cmd)
}

fn create_password_user() -> anyhow::Result<PasswordUser> {
    if !tools::is_root()? {
        bail!(
            "this test needs root to create the Linux user {PASSWORD_USER} (useradd, chpasswd) \
             that sshd authenticates with a password: run it as root"
        );
    }
    let exists = Command::new("id")
        .args(["-u", PASSWORD_USER])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running `id`")?
        .success();
    if !exists {
        let useradd = require("useradd", "passwd")?;
        let done = tools::run_with_timeout(
            Command::new(useradd).args(["--create-home", "--shell", "/bin/sh", PASSWORD_USER]),
            Duration::from_secs(30),
        )?;
        // Another process may have created it meanwhile (exit 9: already exists).
        if !done.status.success() && done.status.code() != Some(9) {
            bail!(
                "useradd {PASSWORD_USER} failed ({}): {}",
                done.status,
                done.stderr
            );
        }
    }
    let password: String = {
        use rand::Rng as _;
        const CHARS: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
        let mut rng = rand::thread_rng();
        (0..24)
            .map(|_| char::from(CHARS[rng.gen_range(0..CHARS.len())]))
            .collect()
    };
    let chpasswd = require("chpasswd", "passwd")?;
    // The password goes on stdin, never in argv.
    let done = tools::run_with_input(
        &mut Command::new(chpasswd),
        format!("{PASSWORD_USER}:{password}\n").as_bytes(),
        Duration::from_secs(30),
    )?;
    if !done.status.success() {
        bail!(
            "chpasswd for {PASSWORD_USER} failed ({}): {}",
            done.status,
            done.stderr
        );
    }
    Ok(PasswordUser {
        name: PASSWORD_USER.to_owned(),
        password,
    })
}
