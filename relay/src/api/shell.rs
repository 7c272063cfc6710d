//! Shell-safe commands for the instructions. The user name comes from the agent and the
//! host from the configuration; whatever they hold, the command a developer pastes runs
//! `ssh` with exactly the intended arguments and nothing else.

/// `ssh -p PORT [USER@]HOST`, every word that is not made only of safe characters in POSIX
/// single quotes, and `--` before a destination that starts with `-` (so it cannot be read
/// as an option such as `-oProxyCommand=...`).
pub fn ssh_command(user: Option<&str>, host: &str, port: u16) -> String {
    let destination = match user {
        Some(user) => format!("{user}@{host}"),
        None => host.to_owned(),
    };
    let end_of_options = if destination.starts_with('-') {
        "-- "
    } else {
        ""
    };
    format!("ssh -p {port} {end_of_options}{}", quote(&destination))
}

/// `word` as one POSIX shell word: unchanged when it is non-empty, made only of
/// `[A-Za-z0-9@%+=:,./_-]` and does not start with `-`; otherwise in single quotes, each
/// `'` written as `'\''`. (A NUL cannot be carried by any shell word; user names are
/// validated where they enter.)
pub fn quote(word: &str) -> String {
    let safe = !word.is_empty()
        && !word.starts_with('-')
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./_-".contains(&b));
    if safe {
        return word.to_owned();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Runs the command's arguments through a real POSIX shell (`set -- ARGS`), with `ssh`
    /// replaced by printing each argument NUL-terminated; returns the arguments.
    fn shell_args(command: &str, dir: &std::path::Path) -> Vec<String> {
        let args = command
            .strip_prefix("ssh ")
            .unwrap_or_else(|| unreachable!("not an ssh command: {command}"));
        let script = format!("set -- {args}\nprintf '%s\\0' \"$@\"");
        let out = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| unreachable!("running sh: {e}"));
        assert!(out.status.success(), "sh failed on {script:?}: {out:?}");
        String::from_utf8(out.stdout)
            .unwrap_or_else(|e| unreachable!("{e}"))
            .split_terminator('\0')
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn hostile_user_names_stay_one_argument_and_run_nothing() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        let marker = dir.path().join("marker");
        let m = marker.display().to_string();
        let users = [
            format!("$(touch {m})dev"),
            format!("`touch {m}`dev"),
            format!("dev;touch {m}"),
            format!("dev && touch {m}"),
            format!("dev|touch {m}"),
            format!("dev\ntouch {m}"),
            format!("'; touch {m}; '"),
            format!("\"$(touch {m})\""),
            format!("dev'\"'\"'{m}"),
            "a user".to_owned(),
            "-oProxyCommand=nc".to_owned(),
            format!("-oProxyCommand=touch {m}"),
            "-".to_owned(),
            "dévé".to_owned(),
            "用户".to_owned(),
            "dev\\".to_owned(),
            "dev*".to_owned(),
            "~root".to_owned(),
            "$HOME".to_owned(),
            "dev#comment".to_owned(),
            "vagrant".to_owned(),
            String::new(),
        ];
        for user in &users {
            for host in ["relay.example.com", "-host", "h st", "h'$(x)"] {
                let command = ssh_command(Some(user), host, 2222);
                let destination = format!("{user}@{host}");
                let mut want = vec!["-p".to_owned(), "2222".to_owned()];
                if destination.starts_with('-') {
                    want.push("--".to_owned());
                }
                want.push(destination);
                assert_eq!(shell_args(&command, dir.path()), want, "{command}");
                assert!(!marker.exists(), "{command} ran code");
            }
        }
    }

    #[test]
    fn plain_commands_stay_plain() {
        assert_eq!(
            ssh_command(Some("vagrant"), "relay.example.com", 20417),
            "ssh -p 20417 vagrant@relay.example.com"
        );
        assert_eq!(
            ssh_command(None, "203.0.113.7", 22),
            "ssh -p 22 203.0.113.7"
        );
        assert_eq!(ssh_command(Some("a b"), "h", 1), "ssh -p 1 'a b@h'");
        assert_eq!(
            ssh_command(Some("-oProxyCommand=nc"), "h", 1),
            "ssh -p 1 -- '-oProxyCommand=nc@h'"
        );
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn a_host_alone_is_quoted_too() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| unreachable!("{e}"));
        for host in ["-oProxyCommand=nc", "h;id", "relay.example.com"] {
            let command = ssh_command(None, host, 22);
            let mut want = vec!["-p".to_owned(), "22".to_owned()];
            if host.starts_with('-') {
                want.push("--".to_owned());
            }
            want.push(host.to_owned());
            assert_eq!(shell_args(&command, dir.path()), want, "{command}");
        }
    }
}
