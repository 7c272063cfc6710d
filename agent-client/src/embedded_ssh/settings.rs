//! What the embedded SSH server is configured with: who may log in (one-time password,
//! authorized keys), its per-session host key, and the shell, directory and environment the
//! developer lands in.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use porthole_protocol::Secret;
use rand::distributions::{Alphanumeric, DistString};
use rand::rngs::OsRng;
use rand::RngCore;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::AuthorizedKeys;
use russh::keys::{PrivateKey, PublicKey};
use subtle::ConstantTimeEq;

/// Characters of the one-time password: 24 alphanumerics = 142 bits of entropy.
pub const PASSWORD_LEN: usize = 24;

/// Where a session starts when `/etc/passwd` names no shell.
const FALLBACK_SHELL: &str = "/bin/sh";
/// `PATH` when the environment has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Time from connecting to a finished login, unless `--ssh-login-timeout` says otherwise.
pub const DEFAULT_LOGIN_TIMEOUT: Duration = Duration::from_secs(120);
/// The shortest `--ssh-login-timeout`.
pub const MIN_LOGIN_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest `--ssh-login-timeout`.
pub const MAX_LOGIN_TIMEOUT: Duration = Duration::from_secs(600);

/// `timeout` when it is a login timeout the server takes (1 s to 10 min); else why not.
pub fn check_login_timeout(timeout: Duration) -> Result<Duration, String> {
    if timeout < MIN_LOGIN_TIMEOUT {
        return Err("at least 1s".into());
    }
    if timeout > MAX_LOGIN_TIMEOUT {
        return Err("at most 10m".into());
    }
    Ok(timeout)
}

/// Options from the command line (see `porthole-agent --help`).
#[derive(Clone, Debug)]
pub struct Options {
    /// User name accepted at login.
    pub username: String,
    /// OpenSSH `authorized_keys` file whose keys may log in.
    pub authorized_keys: Option<PathBuf>,
    /// Working directory of shells and commands [default: the agent's].
    pub workdir: Option<PathBuf>,
    /// Shell [default: the user's login shell].
    pub shell: Option<PathBuf>,
    /// Start from an empty environment instead of the agent's.
    pub env_clear: bool,
    /// Extra `NAME=VALUE` variables.
    pub env: Vec<(String, String)>,
    /// A connection that has not logged in this long after connecting is closed.
    pub login_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            username: String::new(),
            authorized_keys: None,
            workdir: None,
            shell: None,
            env_clear: false,
            env: Vec::new(),
            login_timeout: DEFAULT_LOGIN_TIMEOUT,
        }
    }
}

/// The embedded server's settings, resolved once per agent run (one session).
pub struct Settings {
    /// User name accepted at login.
    pub username: String,
    password: Secret,
    authorized_keys: Vec<PublicKey>,
    /// Host key, generated for this session.
    pub host_key: PrivateKey,
    /// Shell that runs sessions and commands.
    pub shell: PathBuf,
    /// Working directory of sessions, commands and relative SFTP paths.
    pub workdir: PathBuf,
    /// Environment every process starts with.
    pub env: Vec<(OsString, OsString)>,
    /// Time from connecting to a finished login.
    pub login_timeout: Duration,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("username", &self.username)
            .field("authorized_keys", &self.authorized_keys.len())
            .field("shell", &self.shell)
            .field("workdir", &self.workdir)
            .field("login_timeout", &self.login_timeout)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Generates the password and host key and reads the authorized keys.
    pub fn generate(options: &Options) -> Result<Self, String> {
        // Checked where the flag is read too; again here so no other caller can hand the
        // server (and `USER`/`LOGNAME` of its sessions) a name outside the rule.
        porthole_protocol::username::validate_username(&options.username)
            .map_err(|e| format!("embedded SSH user {:?} refused: {e}", options.username))?;
        let login_timeout = check_login_timeout(options.login_timeout).map_err(|e| {
            format!(
                "--ssh-login-timeout {}: {e}",
                humantime::format_duration(options.login_timeout)
            )
        })?;
        let authorized_keys = match &options.authorized_keys {
            Some(path) => read_authorized_keys(path)?,
            None => Vec::new(),
        };
        let workdir = match &options.workdir {
            Some(dir) => dir.clone(),
            None => std::env::current_dir()
                .map_err(|e| format!("cannot tell the agent's working directory: {e}"))?,
        };
        if !workdir.is_dir() {
            return Err(format!(
                "--ssh-workdir {}: not a directory",
                workdir.display()
            ));
        }
        let account = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten();
        let shell = options
            .shell
            .clone()
            .or_else(|| {
                account
                    .as_ref()
                    .map(|u| u.shell.clone())
                    .filter(|s| s.is_absolute())
            })
            .unwrap_or_else(|| PathBuf::from(FALLBACK_SHELL));
        let home = account.as_ref().map(|u| u.dir.clone());
        let env = environment(options, &shell, home.as_deref());
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        let host_key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
        Ok(Self {
            username: options.username.clone(),
            password: Secret::new(Alphanumeric.sample_string(&mut OsRng, PASSWORD_LEN)),
            authorized_keys,
            host_key,
            shell,
            workdir,
            env,
            login_timeout,
        })
    }

    /// The one-time password (for the relay's instructions only).
    pub fn password(&self) -> &Secret {
        &self.password
    }

    /// The host key as an OpenSSH public key line (`ssh-ed25519 AAAA...`).
    pub fn host_key_line(&self) -> Result<String, String> {
        self.host_key
            .public_key()
            .to_openssh()
            .map_err(|e| format!("cannot encode the SSH host key: {e}"))
    }

    /// Whether public key authentication is offered.
    pub fn accepts_keys(&self) -> bool {
        !self.authorized_keys.is_empty()
    }

    /// `user` with `password`, compared in constant time.
    pub fn password_matches(&self, user: &str, password: &str) -> bool {
        let expected = self.password.expose().as_bytes();
        let ok_password: bool = expected.ct_eq(password.as_bytes()).into();
        ok_password && user == self.username
    }

    /// `user` with a key from the authorized keys file (comments are not compared).
    pub fn key_matches(&self, user: &str, key: &PublicKey) -> bool {
        user == self.username
            && self
                .authorized_keys
                .iter()
                .any(|k| k.key_data() == key.key_data())
    }
}

/// Every key of an OpenSSH `authorized_keys` file. Lines with options (`from=`, `command=`,
/// ...) are refused: the embedded server cannot honour them and silently ignoring a
/// restriction would widen access.
fn read_authorized_keys(path: &Path) -> Result<Vec<PublicKey>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --authorized-keys {}: {e}", path.display()))?;
    let mut keys = Vec::new();
    for (n, entry) in AuthorizedKeys::new(&text).enumerate() {
        let entry = entry.map_err(|e| {
            format!(
                "--authorized-keys {}: entry {}: not an OpenSSH public key: {e}",
                path.display(),
                n + 1
            )
        })?;
        if !entry.config_opts().is_empty() {
            return Err(format!(
                "--authorized-keys {}: entry {} has options ({}); the embedded SSH server \
                 does not support key options",
                path.display(),
                n + 1,
                entry.config_opts().as_str()
            ));
        }
        keys.push(entry.public_key().clone());
    }
    if keys.is_empty() {
        return Err(format!(
            "--authorized-keys {}: no keys in the file",
            path.display()
        ));
    }
    Ok(keys)
}

/// The build's environment (without the agent's own `PORTHOLE_*` settings, which hold its
/// token), or an empty one, plus the login variables and `--ssh-env`.
fn environment(options: &Options, shell: &Path, home: Option<&Path>) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = if options.env_clear {
        Vec::new()
    } else {
        std::env::vars_os()
            .filter(|(k, _)| !k.to_string_lossy().starts_with("PORTHOLE_"))
            .collect()
    };
    let mut set = |key: &str, value: OsString| {
        env.retain(|(k, _)| k != key);
        env.push((key.into(), value));
    };
    set("USER", options.username.clone().into());
    set("LOGNAME", options.username.clone().into());
    set("SHELL", shell.as_os_str().to_owned());
    if let Some(home) = home {
        set("HOME", home.as_os_str().to_owned());
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    for (k, v) in &options.env {
        env.retain(|(name, _)| name.as_os_str() != k.as_str());
        env.push((k.into(), v.into()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_long_random_and_compared_exactly() -> Result<(), String> {
        let options = Options {
            username: "dev".into(),
            ..Options::default()
        };
        let a = Settings::generate(&options)?;
        let b = Settings::generate(&options)?;
        assert_eq!(a.password().expose().len(), PASSWORD_LEN);
        assert_ne!(a.password().expose(), b.password().expose());
        let pw = a.password().expose().to_owned();
        assert!(a.password_matches("dev", &pw));
        assert!(!a.password_matches("root", &pw));
        assert!(!a.password_matches("dev", &pw[..PASSWORD_LEN - 1]));
        assert!(!a.password_matches("dev", b.password().expose()));
        assert!(a.host_key_line()?.starts_with("ssh-ed25519 "));
        assert_ne!(a.host_key_line()?, b.host_key_line()?);
        Ok(())
    }

    #[test]
    fn user_names_outside_the_rule_are_refused() {
        for bad in ["$(touch /tmp/x)dev", "a b", "-oProxyCommand=nc", ""] {
            let options = Options {
                username: bad.into(),
                ..Options::default()
            };
            let err = Settings::generate(&options).err().unwrap_or_default();
            assert!(err.contains("POSIX-portable"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn login_timeouts_run_from_one_second_to_ten_minutes() {
        assert!(check_login_timeout(Duration::from_millis(999)).is_err());
        assert!(check_login_timeout(MIN_LOGIN_TIMEOUT).is_ok());
        assert!(check_login_timeout(DEFAULT_LOGIN_TIMEOUT).is_ok());
        assert!(check_login_timeout(MAX_LOGIN_TIMEOUT).is_ok());
        assert!(check_login_timeout(MAX_LOGIN_TIMEOUT + Duration::from_secs(1)).is_err());
        assert_eq!(Options::default().login_timeout, DEFAULT_LOGIN_TIMEOUT);
        let options = Options {
            username: "dev".into(),
            login_timeout: Duration::ZERO,
            ..Options::default()
        };
        let err = Settings::generate(&options).err().unwrap_or_default();
        assert!(err.contains("--ssh-login-timeout 0s: at least 1s"), "{err}");
    }

    #[test]
    fn environment_drops_the_agent_settings_and_applies_overrides() {
        let options = Options {
            username: "dev".into(),
            env: vec![("BUILD_ID".into(), "42".into())],
            ..Options::default()
        };
        let env = environment(
            &options,
            Path::new("/bin/bash"),
            Some(Path::new("/home/dev")),
        );
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert!(env
            .iter()
            .all(|(k, _)| !k.to_string_lossy().starts_with("PORTHOLE_")));
        assert_eq!(get("BUILD_ID"), Some("42".into()));
        assert_eq!(get("USER"), Some("dev".into()));
        assert_eq!(get("SHELL"), Some("/bin/bash".into()));
        assert!(get("PATH").is_some());
    }

    #[test]
    fn authorized_keys_with_options_are_refused() -> Result<(), std::io::Error> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("keys");
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB3oHMRjVNlzWRvWnQ7T1Y0rXJLXXpcJyF8LRhXNgB0X dev@ci";
        std::fs::write(&path, format!("# comment\n\n{key}\n"))?;
        let keys = read_authorized_keys(&path).map_err(std::io::Error::other)?;
        assert_eq!(keys.len(), 1);
        std::fs::write(&path, format!("from=\"10.0.0.0/8\" {key}\n"))?;
        let err = read_authorized_keys(&path).err().unwrap_or_default();
        assert!(err.contains("options"), "{err}");
        std::fs::write(&path, "not a key\n")?;
        assert!(read_authorized_keys(&path).is_err());
        std::fs::write(&path, "# nothing\n")?;
        assert!(read_authorized_keys(&path).is_err());
        Ok(())
    }
}
