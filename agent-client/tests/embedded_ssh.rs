//! The agent's embedded SSH server (`--embedded-ssh`) through a real relay, driven by the real
//! OpenSSH client: password and key logins with the instructions' one-time password and
//! `known_hosts` line (strict host key checking), exec with exit status and `TERM`, an
//! interactive shell in tmux (prompt, command, resize, job control), `scp` of 16 MiB both
//! ways, `ssh -L`, refusals, and revocation closing every session.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use common::agent::Agent;
use common::peers::tools::{require, run_with_timeout, Finished};
use common::peers::{sha256_file, write_random_file};
use common::relay::{Created, TestRelay};

/// 16 MiB for scp.
const SCP_BYTES: usize = 16 * 1024 * 1024;
const SSH_TIMEOUT: Duration = Duration::from_secs(60);
/// The user the tests log in as (the agent's `--ssh-user`).
const USER: &str = "dev";

/// What the instructions endpoint tells an allowed developer.
struct Login {
    host: String,
    port: u16,
    username: String,
    password: String,
    known_hosts: PathBuf,
    known_hosts_line: String,
}

/// A relay, a session with the embedded SSH server, and the login from its instructions.
struct Embedded {
    relay: TestRelay,
    created: Created,
    agent: Agent,
    login: Login,
    /// The agent's `--ssh-workdir`.
    workdir: tempfile::TempDir,
    dir: tempfile::TempDir,
}

impl Embedded {
    fn start(extra: &[String]) -> anyhow::Result<Self> {
        Self::start_on(TestRelay::start()?, extra)
    }

    fn start_on(relay: TestRelay, extra: &[String]) -> anyhow::Result<Self> {
        let created = relay.create(&["ssh"], None)?;
        let workdir = tempfile::tempdir()?;
        let dir = tempfile::tempdir()?;
        let mut args = vec![
            "--relay".to_owned(),
            relay.agent_addr(),
            "--pin-sha256".into(),
            relay.pin(),
            "--embedded-ssh".into(),
            "--ssh-user".into(),
            USER.into(),
            "--ssh-workdir".into(),
            workdir.path().display().to_string(),
            "--ssh-shell".into(),
            "/bin/bash".into(),
            "--ssh-env".into(),
            "BUILD_MARKER=from-the-build".into(),
        ];
        args.extend(extra.iter().cloned());
        let agent = Agent::spawn(&args, &created.token)?;
        agent.wait_registered()?;
        relay.wait_state(&created.id, "active", Duration::from_secs(10))?;
        let dev = relay.user_token("u-dev", "app-7", &["developer"])?;
        let answer = relay.instructions(&created.id, Some(&dev))?;
        ensure!(answer.status == 200, "instructions: {:?}", answer.body);
        let ssh = &answer.body["ssh"];
        let text = |k: &str| -> anyhow::Result<String> {
            Ok(ssh[k]
                .as_str()
                .with_context(|| format!("ssh.{k} in {ssh}"))?
                .to_owned())
        };
        let known_hosts_line = text("known_hosts")?;
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(&known_hosts, format!("{known_hosts_line}\n"))?;
        let login = Login {
            host: text("host")?,
            port: created.port("ssh"),
            username: text("username")?,
            password: text("password")?,
            known_hosts,
            known_hosts_line,
        };
        Ok(Self {
            relay,
            created,
            agent,
            login,
            workdir,
            dir,
        })
    }

    /// `ssh` with the common options: strict host key checking against exactly the
    /// instructions' `known_hosts` line, no config files, no agent.
    fn ssh_base(&self, program: &str, port_flag: &str) -> anyhow::Result<Command> {
        let path = require(program, "openssh-client")?;
        let mut cmd = Command::new(path);
        cmd.args(["-F", "none", port_flag, &self.login.port.to_string()])
            .args(["-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.login.known_hosts.display()
            ))
            .args([
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "UpdateHostKeys=no",
            ])
            .args(["-o", "IdentityAgent=none", "-o", "ConnectTimeout=10"])
            .args(["-o", "LogLevel=ERROR"]);
        Ok(cmd)
    }

    /// `sshpass -e PROGRAM ...` logging in with `password` only.
    fn password_command(
        &self,
        program: &str,
        port_flag: &str,
        password: &str,
    ) -> anyhow::Result<Command> {
        let sshpass = require("sshpass", "sshpass")?;
        let inner = self.ssh_base(program, port_flag)?;
        let mut cmd = Command::new(sshpass);
        cmd.env("SSHPASS", password)
            .arg("-e")
            .arg(inner.get_program());
        cmd.args(inner.get_args());
        cmd.args(["-o", "PreferredAuthentications=password"]).args([
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "NumberOfPasswordPrompts=1",
        ]);
        Ok(cmd)
    }

    /// `ssh USER@HOST` with the instructions' password (append the remote command).
    fn ssh(&self) -> anyhow::Result<Command> {
        self.ssh_with_password(&self.login.password)
    }

    fn ssh_with_password(&self, password: &str) -> anyhow::Result<Command> {
        let mut cmd = self.password_command("ssh", "-p", password)?;
        cmd.arg(self.target());
        Ok(cmd)
    }

    /// `ssh -i KEY USER@HOST`, public key only.
    fn ssh_with_key(&self, key: &Path) -> anyhow::Result<Command> {
        let mut cmd = self.ssh_base("ssh", "-p")?;
        cmd.args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
            .args(["-o", "PreferredAuthentications=publickey"])
            .arg("-i")
            .arg(key)
            .arg(self.target());
        Ok(cmd)
    }

    fn target(&self) -> String {
        format!("{}@{}", self.login.username, self.login.host)
    }
}

fn ensure_ok(out: &Finished, what: &str, agent: &Agent) -> anyhow::Result<()> {
    ensure!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}\nagent:\n{}",
        out.status,
        out.stdout_text(),
        out.stderr,
        agent.output()
    );
    Ok(())
}

/// A fresh ed25519 key pair from `ssh-keygen`; returns the private key's path.
fn keygen(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let keygen = require("ssh-keygen", "openssh-client")?;
    let path = dir.join(name);
    let out = run_with_timeout(
        Command::new(keygen)
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&path),
        Duration::from_secs(30),
    )?;
    ensure!(out.status.success(), "ssh-keygen: {}", out.stderr);
    Ok(path)
}

#[test]
fn password_login_runs_commands_with_exit_status_term_and_the_build_environment(
) -> anyhow::Result<()> {
    let s = Embedded::start(&[])?;
    let login = &s.login;
    assert_eq!(login.username, USER);
    ensure!(
        login.password.len() >= 22,
        "a one-time password of at least 128 bits: {}",
        login.password
    );
    let prefix = format!("[{}]:{} ssh-ed25519 ", login.host, login.port);
    ensure!(
        login.known_hosts_line.starts_with(&prefix),
        "known_hosts line for the session's ed25519 host key: {}",
        login.known_hosts_line
    );

    // A pty: TERM from the client, and the exit status comes back.
    let mut cmd = s.ssh()?;
    cmd.env("TERM", "vt220")
        .arg("-tt")
        .arg("echo term=$TERM; exit 3");
    let out = run_with_timeout(&mut cmd, SSH_TIMEOUT)?;
    ensure!(
        out.status.code() == Some(3),
        "exit status 3 expected, got {} (stderr: {})\nagent:\n{}",
        out.status,
        out.stderr,
        s.agent.output()
    );
    ensure!(
        out.stdout_text().contains("term=vt220"),
        "TERM reaches the session: {:?}",
        out.stdout_text()
    );

    // No pty: stdout and stderr apart, the working directory and environment of the build,
    // never the agent's own settings (its token).
    let out = run_with_timeout(
        s.ssh()?.arg(
            "pwd; echo marker=$BUILD_MARKER; echo token=${PORTHOLE_TOKEN:-none}; \
             echo user=$USER; echo oops >&2; exit 0",
        ),
        SSH_TIMEOUT,
    )?;
    ensure_ok(&out, "ssh exec", &s.agent)?;
    let workdir = std::fs::canonicalize(s.workdir.path())?;
    assert_eq!(
        out.stdout_text(),
        format!(
            "{}\nmarker=from-the-build\ntoken=none\nuser={USER}\n",
            workdir.display()
        )
    );
    assert_eq!(out.stderr.trim(), "oops");

    // stdin reaches the command; its end closes the command's input.
    let out =
        common::peers::tools::run_with_input(s.ssh()?.arg("wc -c"), &[b'x'; 100_000], SSH_TIMEOUT)?;
    ensure_ok(&out, "ssh wc -c", &s.agent)?;
    assert_eq!(out.stdout_text().trim(), "100000");

    // The build log never holds the password.
    let output = s.agent.output();
    ensure!(
        !output.contains(&login.password),
        "agent output must not hold the password:\n{output}"
    );
    Ok(())
}

#[test]
fn wrong_password_and_unknown_key_are_refused_authorized_key_logs_in() -> anyhow::Result<()> {
    let keys = tempfile::tempdir()?;
    let good = keygen(keys.path(), "good")?;
    let unknown = keygen(keys.path(), "unknown")?;
    let authorized = keys.path().join("authorized_keys");
    std::fs::copy(good.with_extension("pub"), &authorized)?;
    let s = Embedded::start(&["--authorized-keys".into(), authorized.display().to_string()])?;

    let out = run_with_timeout(s.ssh_with_key(&good)?.arg("echo key-ok"), SSH_TIMEOUT)?;
    ensure_ok(&out, "ssh with the authorized key", &s.agent)?;
    assert_eq!(out.stdout_text(), "key-ok\n");

    let out = run_with_timeout(s.ssh_with_key(&unknown)?.arg("echo nope"), SSH_TIMEOUT)?;
    ensure!(
        !out.status.success() && out.stdout_text().is_empty(),
        "an unknown key must be refused: {} {:?}",
        out.status,
        out.stdout_text()
    );
    ensure!(
        out.stderr.contains("Permission denied"),
        "refusal says permission denied: {}",
        out.stderr
    );

    let wrong = format!("{}x", s.login.password);
    let out = run_with_timeout(s.ssh_with_password(&wrong)?.arg("echo nope"), SSH_TIMEOUT)?;
    ensure!(
        !out.status.success() && out.stdout_text().is_empty(),
        "a wrong password must be refused: {} {:?}",
        out.status,
        out.stdout_text()
    );

    // The right password for another user name is refused too.
    let mut other = s.password_command("ssh", "-p", &s.login.password)?;
    other.arg(format!("root@{}", s.login.host)).arg("echo nope");
    let out = run_with_timeout(&mut other, SSH_TIMEOUT)?;
    ensure!(
        !out.status.success() && out.stdout_text().is_empty(),
        "another user name must be refused: {} {:?}",
        out.status,
        out.stdout_text()
    );

    // The password still works after the refusals.
    let out = run_with_timeout(s.ssh()?.arg("echo still-ok"), SSH_TIMEOUT)?;
    ensure_ok(&out, "ssh with the password", &s.agent)?;
    assert_eq!(out.stdout_text(), "still-ok\n");
    Ok(())
}

#[test]
fn scp_moves_16_mib_each_way_with_matching_sha256() -> anyhow::Result<()> {
    let s = Embedded::start(&[])?;
    let local = tempfile::tempdir()?;

    // Upload into the build's working directory (relative path).
    let src = local.path().join("artifact.bin");
    let want_up = write_random_file(&src, SCP_BYTES)?;
    let mut up = s.password_command("scp", "-P", &s.login.password)?;
    up.arg(&src).arg(format!("{}:uploaded.bin", s.target()));
    let out = run_with_timeout(&mut up, SSH_TIMEOUT)?;
    ensure_ok(&out, "scp upload", &s.agent)?;
    assert_eq!(
        sha256_file(s.workdir.path().join("uploaded.bin"))?,
        want_up,
        "uploaded file differs"
    );

    // Download from an absolute path on the build machine.
    let remote = s.workdir.path().join("build-output.bin");
    let want_down = write_random_file(&remote, SCP_BYTES)?;
    let dst = local.path().join("downloaded.bin");
    let mut down = s.password_command("scp", "-P", &s.login.password)?;
    down.arg(format!("{}:{}", s.target(), remote.display()))
        .arg(&dst);
    let out = run_with_timeout(&mut down, SSH_TIMEOUT)?;
    ensure_ok(&out, "scp download", &s.agent)?;
    assert_eq!(sha256_file(&dst)?, want_down, "downloaded file differs");

    // sftp with commands on stdin (`-b` would force BatchMode, which disables passwords):
    // list, make a directory, rename, remove.
    // A directory larger than one listing batch is listed whole.
    let many = s.workdir.path().join("many");
    std::fs::create_dir(&many)?;
    for i in 0..300 {
        std::fs::write(many.join(format!("entry-{i:03}")), b"x")?;
    }
    let mut sftp = s.password_command("sftp", "-P", &s.login.password)?;
    sftp.arg(s.target());
    let out = common::peers::tools::run_with_input(
        &mut sftp,
        b"ls\nmkdir made\nrename uploaded.bin made/moved.bin\nls made\nrm build-output.bin\nls -1 many\n",
        SSH_TIMEOUT,
    )?;
    ensure_ok(&out, "sftp batch", &s.agent)?;
    ensure!(
        out.stdout_text().contains("build-output.bin") && out.stdout_text().contains("moved.bin"),
        "sftp listing: {}",
        out.stdout_text()
    );
    let listed = (0..300)
        .filter(|i| out.stdout_text().contains(&format!("entry-{i:03}")))
        .count();
    assert_eq!(
        listed, 300,
        "every entry of a 300-entry directory is listed"
    );
    ensure!(s.workdir.path().join("made/moved.bin").is_file());
    ensure!(!s.workdir.path().join("build-output.bin").exists());
    Ok(())
}

#[test]
fn local_forwarding_reaches_a_service_on_the_build_machine() -> anyhow::Result<()> {
    let s = Embedded::start(&[])?;
    let echo = TcpListener::bind("127.0.0.1:0")?;
    let echo_port = echo.local_addr()?.port();
    std::thread::spawn(move || {
        for conn in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let local_port = common::peers::tools::free_port()?;
    let mut ssh = s.ssh()?;
    ssh.args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("127.0.0.1:{local_port}:127.0.0.1:{echo_port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = ssh.spawn()?;
    let result = (|| -> anyhow::Result<()> {
        let mut conn = common::wait_for("ssh -L to listen", Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", local_port)).ok()
        })?;
        conn.set_read_timeout(Some(Duration::from_secs(20)))?;
        for round in 0..3 {
            let msg = format!("hello through ssh -L, round {round}\n");
            conn.write_all(msg.as_bytes())?;
            let mut got = vec![0u8; msg.len()];
            conn.read_exact(&mut got)?;
            assert_eq!(String::from_utf8_lossy(&got), msg);
        }
        Ok(())
    })();
    let _ = child.kill();
    let out = child.wait_with_output()?;
    result.with_context(|| {
        format!(
            "ssh stderr: {}\nagent:\n{}",
            String::from_utf8_lossy(&out.stderr),
            s.agent.output()
        )
    })
}

/// A tmux server of its own, driven with send-keys and read with capture-pane.
struct Tmux {
    socket: String,
    program: PathBuf,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = run_with_timeout(
            Command::new(&self.program)
                .args(["-L", &self.socket])
                .args(args),
            Duration::from_secs(20),
        )?;
        ensure!(out.status.success(), "tmux {args:?}: {}", out.stderr);
        Ok(out.stdout_text())
    }

    fn screen(&self) -> anyhow::Result<String> {
        self.run(&["capture-pane", "-p", "-t", "ph"])
    }

    fn keys(&self, keys: &str) -> anyhow::Result<()> {
        self.run(&["send-keys", "-t", "ph", "-l", keys])?;
        self.run(&["send-keys", "-t", "ph", "Enter"]).map(|_| ())
    }

    fn wait_screen(&self, what: &str, check: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        let mut last = String::new();
        let found = common::wait_for(what, Duration::from_secs(20), || {
            last = self.screen().unwrap_or_default();
            check(&last).then(|| last.clone())
        });
        found.with_context(|| format!("screen:\n{last}"))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new(&self.program)
            .args(["-L", &self.socket, "kill-server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn interactive_shell_in_tmux_shows_a_prompt_runs_commands_follows_resizes_and_has_job_control(
) -> anyhow::Result<()> {
    let s = Embedded::start(&[])?;
    let tmux = Tmux {
        socket: format!("porthole-{}", std::process::id()),
        program: require("tmux", "tmux")?,
    };
    // The ssh command line, password in the environment of a script tmux runs.
    let ssh = s.ssh()?;
    let mut line = format!("exec {}", shell_quote(&ssh.get_program().to_string_lossy()));
    for arg in ssh.get_args() {
        line.push(' ');
        line.push_str(&shell_quote(&arg.to_string_lossy()));
    }
    line.push_str(" -tt");
    let script = s.dir.path().join("connect.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexport SSHPASS={}\nexport TERM=xterm\n{line}\n",
            shell_quote(&s.login.password)
        ),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "ph",
        "-x",
        "80",
        "-y",
        "24",
        &script.display().to_string(),
    ])?;
    let result = (|| -> anyhow::Result<()> {
        // Something arrives (the login shell's prompt), then a prompt we know.
        tmux.wait_screen("a login shell", |screen| !screen.trim().is_empty())?;
        tmux.keys("PS1='ph-prompt> '")?;
        tmux.wait_screen("the prompt", |screen| screen.contains("ph-prompt> "))?;
        tmux.keys("echo answer=$((6*7)) tty=$(tty | cut -c1-8)")?;
        tmux.wait_screen("a command's output", |screen| {
            screen.contains("answer=42 tty=/dev/pts")
        })?;
        tmux.keys("stty size")?;
        tmux.wait_screen("the first size", |screen| screen.contains("\n24 80"))?;
        tmux.run(&["resize-window", "-t", "ph", "-x", "120", "-y", "40"])?;
        tmux.keys("clear; stty size")?;
        tmux.wait_screen("the new size", |screen| screen.contains("40 120"))?;
        // Job control: a background job, listed, brought back and interrupted.
        tmux.keys("clear; sleep 300 &")?;
        tmux.keys("jobs")?;
        tmux.wait_screen("a background job", |screen| {
            screen.contains("Running") && screen.contains("sleep 300")
        })?;
        tmux.keys("fg")?;
        tmux.run(&["send-keys", "-t", "ph", "C-c"])?;
        tmux.keys("clear; echo after-interrupt; jobs; echo jobs-listed")?;
        tmux.wait_screen("the shell back after ^C", |screen| {
            screen.contains("after-interrupt\njobs-listed")
        })?;
        tmux.keys("exit 0")?;
        common::wait_for("ssh to end with the shell", Duration::from_secs(20), || {
            tmux.run(&["has-session", "-t", "ph"])
                .is_err()
                .then_some(())
        })?;
        Ok(())
    })();
    result.with_context(|| format!("agent:\n{}", s.agent.output()))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[test]
fn revocation_closes_every_session_and_its_processes() -> anyhow::Result<()> {
    let mut s = Embedded::start(&[])?;
    // A marker only this test's processes carry.
    let marker = 4000 + std::process::id() % 1000;
    let mut child = s
        .ssh()?
        .arg("-tt")
        .arg(format!("sleep {marker}1 & sleep {marker}2; echo never"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let running = |pattern: &str| -> bool {
        Command::new("pgrep")
            .args(["-f", pattern])
            .stdout(Stdio::null())
            .status()
            .map(|st| st.success())
            .unwrap_or(false)
    };
    let started = common::wait_for("the session's processes", Duration::from_secs(30), || {
        (running(&format!("sleep {marker}1")) && running(&format!("sleep {marker}2"))).then_some(())
    });
    if let Err(e) = started {
        let _ = child.kill();
        let out = child.wait_with_output()?;
        bail!(
            "{e:#}\nssh stderr: {}\nagent:\n{}",
            String::from_utf8_lossy(&out.stderr),
            s.agent.output()
        );
    }
    s.relay.delete(&s.created.id)?;
    let status = common::wait_for("ssh to end at revocation", Duration::from_secs(20), || {
        child.try_wait().ok().flatten()
    })?;
    ensure!(!status.success(), "the session was cut: {status}");
    common::wait_for(
        "the session's processes to end",
        Duration::from_secs(20),
        || {
            (!running(&format!("sleep {marker}1")) && !running(&format!("sleep {marker}2")))
                .then_some(())
        },
    )?;
    let exit = s.agent.wait_exit(Duration::from_secs(20))?;
    ensure!(exit.success(), "agent exits 0 at revocation: {exit}");
    Ok(())
}

#[test]
fn embedded_ssh_works_over_the_tcp_data_plane() -> anyhow::Result<()> {
    let relay = TestRelay::start_with(|c| {
        c.data_plane = porthole_protocol::DataPlane::Tcp;
        c.data_listen = "127.0.0.1:0".parse().unwrap_or(c.data_listen);
    })?;
    let s = Embedded::start_on(relay, &[])?;
    let out = run_with_timeout(s.ssh()?.arg("echo over-tcp; exit 7"), SSH_TIMEOUT)?;
    ensure!(
        out.status.code() == Some(7) && out.stdout_text() == "over-tcp\n",
        "exec over the tcp data plane: {} {:?} {}\nagent:\n{}",
        out.status,
        out.stdout_text(),
        out.stderr,
        s.agent.output()
    );
    Ok(())
}

#[test]
fn bad_embedded_settings_fail_with_clear_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let with_options = dir.path().join("authorized_keys");
    std::fs::write(
        &with_options,
        "command=\"true\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB3oHMRjVNlzWRvWnQ7T1Y0rXJLXXpcJyF8LRhXNgB0X x\n",
    )?;
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--embedded-ssh".into(),
                "--authorized-keys".into(),
                with_options.display().to_string(),
            ],
            "options",
        ),
        (
            vec![
                "--embedded-ssh".into(),
                "--service".into(),
                "ssh=127.0.0.1:22".into(),
            ],
            "pick one SSH server",
        ),
        (
            vec!["--service".into(), "vnc=embedded".into()],
            "only ssh can be embedded",
        ),
        (
            vec![
                "--embedded-ssh".into(),
                "--ssh-workdir".into(),
                "/nonexistent/dir".into(),
            ],
            "not a directory",
        ),
        (
            vec![
                "--service".into(),
                "ssh=127.0.0.1:22".into(),
                "--authorized-keys".into(),
                with_options.display().to_string(),
            ],
            "--embedded-ssh",
        ),
    ];
    for (args, expected) in cases {
        let out = run_with_timeout(
            Command::new(common::agent::binary())
                .args(["--relay", "127.0.0.1:9", "--pin-sha256"])
                .arg("00".repeat(32))
                .args(&args)
                .env("PORTHOLE_TOKEN", "t"),
            Duration::from_secs(20),
        )?;
        ensure!(
            !out.status.success() && out.stderr.contains(expected),
            "{args:?}: expected an error containing {expected:?}, got {} {}",
            out.status,
            out.stderr
        );
    }
    Ok(())
}

/// Flow control both ways at once: 20 MiB through `cat` while the client does not read the
/// output for 3 s. The client stops granting window, `cat` blocks on its output and stops
/// reading its input; the agent must keep reading the channel meanwhile (russh's session loop
/// would otherwise block and never see the window the client grants when it reads again).
#[test]
fn input_keeps_flowing_while_the_client_reads_output_late() -> anyhow::Result<()> {
    use std::io::Read as _;
    let s = Embedded::start(&[])?;
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("input.bin");
    let want = write_random_file(&src, 20 * 1024 * 1024)?;
    let mut child = s
        .ssh()?
        .arg("cat")
        .stdin(std::fs::File::open(&src)?)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut out = child.stdout.take().context("ssh stdout")?;
    std::thread::sleep(Duration::from_secs(3));
    let reader = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let mut got = Vec::new();
        out.read_to_end(&mut got)?;
        Ok(got)
    });
    let finished = common::wait_for("ssh cat to finish", Duration::from_secs(60), || {
        child.try_wait().ok().flatten()
    });
    if finished.is_err() {
        let _ = child.kill();
    }
    let status = finished.with_context(|| format!("agent:\n{}", s.agent.output()))?;
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    ensure!(status.success(), "ssh cat: {status}");
    let digest = {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(&got))
    };
    assert_eq!(got.len(), 20 * 1024 * 1024);
    assert_eq!(digest, want, "cat's output differs from its input");
    Ok(())
}
