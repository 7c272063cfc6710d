//! What the agent tells the relay so allowed users can log in: user names, passwords (read
//! from files, never flags, so they stay out of `ps`), and the machine's SSH host keys; or,
//! with the embedded SSH server, its one-time password and per-session host key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use porthole_protocol::username::validate_username;
use porthole_protocol::{Credential, Secret, Service};

use crate::config::{AgentConfig, Target};
use crate::embedded_ssh::{self, EmbeddedSsh};

/// Where OpenSSH keeps host public keys.
const DEFAULT_HOST_KEY_DIR: &str = "/etc/ssh";

/// What [`gather`] finds: credentials, SSH host keys, and the embedded SSH server.
pub type Gathered = (Vec<Credential>, Vec<String>, Option<Arc<EmbeddedSsh>>);

/// Credentials and host keys for the services this agent exposes.
pub fn gather(
    config: &AgentConfig,
    services: &BTreeMap<Service, Target>,
) -> Result<Gathered, String> {
    let mut credentials = Vec::new();
    let mut host_keys = Vec::new();
    let mut embedded = None;
    let ssh_user = match &config.ssh_user {
        Some(name) => checked_user("--ssh-user", name)?,
        None => checked_user(
            "the user running the agent (the default of --ssh-user)",
            &current_user()?,
        )?,
    };
    if services.get(&Service::Ssh) == Some(&Target::EmbeddedSsh) {
        if config.ssh_password_file.is_some() || !config.ssh_host_key_files.is_empty() {
            return Err(
                "the embedded SSH server makes its own password and host key: drop \
                 --ssh-password-file and --ssh-host-key-file"
                    .into(),
            );
        }
        let settings = embedded_ssh::Settings::generate(&embedded_ssh::Options {
            username: ssh_user.clone(),
            authorized_keys: config.authorized_keys.clone(),
            workdir: config.ssh_workdir.clone(),
            shell: config.ssh_shell.clone(),
            env_clear: config.ssh_env_clear,
            env: config.ssh_env.clone(),
            login_timeout: config.ssh_login_timeout,
        })?;
        credentials.push(Credential {
            service: Service::Ssh,
            username: ssh_user.clone(),
            password: Some(settings.password().clone()),
        });
        host_keys.push(settings.host_key_line()?);
        embedded = Some(Arc::new(EmbeddedSsh::new(settings)));
    } else if config.authorized_keys.is_some() {
        return Err("--authorized-keys is for the embedded SSH server (--embedded-ssh)".into());
    } else if services.contains_key(&Service::Ssh) {
        let password = config
            .ssh_password_file
            .as_deref()
            .map(read_password)
            .transpose()?;
        credentials.push(Credential {
            service: Service::Ssh,
            username: ssh_user.clone(),
            password,
        });
        host_keys = read_host_keys(&config.ssh_host_key_files)?;
    }
    if services.contains_key(&Service::Vnc) {
        let password = config
            .vnc_password_file
            .as_deref()
            .map(read_password)
            .transpose()?;
        let username = match &config.vnc_user {
            Some(name) => checked_user("--vnc-user", name)?,
            None => ssh_user,
        };
        credentials.push(Credential {
            service: Service::Vnc,
            username,
            password,
        });
    }
    Ok((credentials, host_keys, embedded))
}

/// `name` when it passes the user name rule (it ends up in the `ssh` command users paste
/// into a shell); else an error naming `source` and the rule.
fn checked_user(source: &str, name: &str) -> Result<String, String> {
    validate_username(name)
        .map(|()| name.to_owned())
        .map_err(|e| format!("{source} `{}` refused: {e}", printable(name)))
}

/// `name` with control characters escaped (`\n`, `\u{1b}`), so printing it cannot forge
/// build log lines or drive a terminal.
fn printable(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The name of the user running the agent.
fn current_user() -> Result<String, String> {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok())
        .ok_or_else(|| "cannot tell which user runs the agent: pass --ssh-user".into())
}

/// A password file's first line.
fn read_password(path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read password file {}: {e}", path.display()))?;
    let password = text.lines().next().unwrap_or("").to_owned();
    if password.is_empty() {
        return Err(format!("password file {} is empty", path.display()));
    }
    Ok(Secret::new(password))
}

/// The given host key files, or every `/etc/ssh/ssh_host_*_key.pub` (none found is not an
/// error: users then get no `known_hosts` line).
fn read_host_keys(files: &[PathBuf]) -> Result<Vec<String>, String> {
    let read = |p: &Path| -> Result<String, String> {
        let text = std::fs::read_to_string(p)
            .map_err(|e| format!("cannot read SSH host key {}: {e}", p.display()))?;
        let line = text.lines().next().unwrap_or("").trim().to_owned();
        if line.split_whitespace().count() < 2 {
            return Err(format!("{} is not an OpenSSH public key file", p.display()));
        }
        Ok(line)
    };
    if !files.is_empty() {
        return files.iter().map(|p| read(p)).collect();
    }
    let Ok(entries) = std::fs::read_dir(DEFAULT_HOST_KEY_DIR) else {
        tracing::warn!(
            "no {DEFAULT_HOST_KEY_DIR}: users get no known_hosts line (pass --ssh-host-key-file)"
        );
        return Ok(Vec::new());
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ssh_host_") && n.ends_with("_key.pub"))
        })
        .collect();
    paths.sort();
    Ok(paths.iter().filter_map(|p| read(p).ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_are_checked_against_the_rule() {
        assert_eq!(
            checked_user("--ssh-user", "runner"),
            Ok("runner".to_owned())
        );
        let err = checked_user("--ssh-user", "$(touch /tmp/x)dev")
            .err()
            .unwrap_or_default();
        assert!(
            err.starts_with("--ssh-user `$(touch /tmp/x)dev` refused:")
                && err.contains("POSIX-portable"),
            "{err}"
        );
        // Control characters are shown escaped, so a name cannot forge build log lines.
        let err = checked_user("--vnc-user", "a\nb\u{1b}[2J")
            .err()
            .unwrap_or_default();
        assert!(
            err.contains("`a\\nb\\u{1b}[2J`") && !err.contains(['\n', '\u{1b}']),
            "{err}"
        );
        let err = checked_user("--ssh-user", "a\"b'c")
            .err()
            .unwrap_or_default();
        assert!(err.contains("`a\"b'c`"), "{err}");
    }
}
