//! The limits and refusals the README promises for the embedded SSH server (`--embedded-ssh`),
//! each shown end to end through a real relay with the real OpenSSH client:
//!
//! - a wrong password (or user) is answered after a constant 1 s, and six failures end the
//!   connection (the sixth attempt still counts: a right password then logs in);
//! - a connection must log in within `--ssh-login-timeout` (2 minutes by default);
//! - `SendEnv` variables reach the session, and `--ssh-env-clear` leaves the build's
//!   environment out;
//! - a command killed by a signal is reported with `exit-signal`;
//! - `ssh -R`, X11 and agent forwarding are refused while the connection keeps working;
//! - at most 10 sessions (OpenSSH multiplexing) and 256 `ssh -L` channels per connection;
//! - revocation hangs up every session: SIGHUP, then SIGKILL 2 s later for processes that
//!   ignore SIGHUP, on pipes and on a terminal.
//!
//! Times are only ever bounded from below: a slow machine makes every wait longer, never a
//! test fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context as _};
use common::peers::tools::{free_port, kill_and_wait, require, run_with_timeout, Finished};
use common::relay::{Created, TestRelay};

/// The user the tests log in as (the agent's `--ssh-user`).
const USER: &str = "dev";
/// Deadline of one `ssh` run.
const SSH_TIMEOUT: Duration = Duration::from_secs(60);
/// Generous deadline for something that should happen within a few seconds.
const EVENTUALLY: Duration = Duration::from_secs(30);
/// The server's delay before refusing a login is 1 s; a refusal must take at least this.
const MIN_REFUSAL: f64 = 0.9;
/// Failed logins per connection (OpenSSH's default `MaxAuthTries`).
const MAX_AUTH_TRIES: usize = 6;
/// Session channels per connection.
const MAX_SESSIONS: usize = 10;
/// `ssh -L` channels per connection.
const MAX_FORWARDS: usize = 256;
/// The `--ssh-login-timeout` of the login timeout test.
const LOGIN_TIMEOUT_SECS: f64 = 2.0;
/// Time between SIGHUP and SIGKILL at revocation.
const HANGUP_GRACE_SECS: f64 = 2.0;
/// How much of the hang-up grace a HUP-ignoring process must be seen living through (the
/// rest is slack for a busy machine).
const MIN_SURVIVAL_SECS: f64 = 1.0;
/// `PATH` of a session started from an empty environment.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

// ---------------------------------------------------------------------------------------
// The agent, with an environment of the test's choosing
// ---------------------------------------------------------------------------------------

/// The real agent binary. Unlike `common::agent::Agent` it takes extra environment
/// variables (the "build's environment" the `--ssh-env-clear` test needs), and it never
/// passes on an `ssh-agent` socket or X display of the machine running the tests, so the
/// forwarding refusals are seen in the session.
struct BuildAgent {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl BuildAgent {
    fn spawn(args: &[String], token: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("agent.log");
        let out = File::create(&log)?;
        let mut cmd = Command::new(common::agent::binary());
        cmd.args(args)
            .arg("--pid-file")
            .arg(dir.path().join("agent.pid"))
            .env("PORTHOLE_TOKEN", token)
            .env(
                "RUST_LOG",
                std::env::var("AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("DISPLAY")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("starting porthole-agent")?;
        Ok(Self {
            child,
            log,
            _dir: dir,
        })
    }

    /// Everything the agent printed so far.
    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many printed lines contain `needle`.
    fn lines_with(&self, needle: &str) -> usize {
        self.output().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until at least `count` printed lines contain `needle`.
    fn wait_lines(&self, needle: &str, count: usize, timeout: Duration) -> anyhow::Result<()> {
        common::wait_for(
            &format!("{count} agent line(s) with `{needle}`"),
            timeout,
            || (self.lines_with(needle) >= count).then_some(()),
        )
        .with_context(|| format!("agent output:\n{}", self.output()))
    }
}

impl Drop for BuildAgent {
    fn drop(&mut self) {
        kill_and_wait(&mut self.child);
    }
}

// ---------------------------------------------------------------------------------------
// A session served by the embedded SSH server, and the OpenSSH commands that reach it
// ---------------------------------------------------------------------------------------

/// What the instructions endpoint tells an allowed developer.
struct Login {
    host: String,
    port: u16,
    username: String,
    password: String,
    known_hosts: PathBuf,
}

/// A relay, a session whose agent serves SSH itself, and the login from its instructions.
struct Embedded {
    agent: BuildAgent,
    relay: TestRelay,
    created: Created,
    login: Login,
    /// The agent's `--ssh-workdir`: where session commands leave their files.
    workdir: tempfile::TempDir,
    /// The client's side: `known_hosts`, askpass programs, control sockets.
    dir: tempfile::TempDir,
}

impl Embedded {
    fn start(extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(extra, &[])
    }

    /// Like [`Embedded::start`], with `env` in the agent's (the build's) environment.
    fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let relay = TestRelay::start()?;
        let created = relay.create(&["ssh"], None)?;
        let workdir = tempfile::tempdir()?;
        let dir = tempfile::tempdir()?;
        let mut args: Vec<String> = vec![
            "--relay".into(),
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
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let agent = BuildAgent::spawn(&args, &created.token, env)?;
        relay
            .wait_state(&created.id, "active", EVENTUALLY)
            .with_context(|| format!("agent output:\n{}", agent.output()))?;
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
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(&known_hosts, format!("{}\n", text("known_hosts")?))?;
        let login = Login {
            host: text("host")?,
            port: created.port("ssh"),
            username: text("username")?,
            password: text("password")?,
            known_hosts,
        };
        ensure!(
            login.username == USER,
            "instructions name {}",
            login.username
        );
        Ok(Self {
            agent,
            relay,
            created,
            login,
            workdir,
            dir,
        })
    }

    fn target(&self) -> String {
        format!("{}@{}", self.login.username, self.login.host)
    }

    /// `ssh` checking the host key strictly against the instructions' `known_hosts` line,
    /// with no config file, no key and no agent (append options, target and command).
    /// (`IdentityAgent=none` would keep `ssh -A` from forwarding an agent; without
    /// `SSH_AUTH_SOCK` there is none to use.)
    fn ssh_base(&self) -> anyhow::Result<Command> {
        let mut cmd = Command::new(require("ssh", "openssh-client")?);
        cmd.env_remove("SSH_AUTH_SOCK")
            .args(["-F", "none", "-p", &self.login.port.to_string()])
            .args(["-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.login.known_hosts.display()
            ))
            .args(["-o", "GlobalKnownHostsFile=/dev/null"])
            .args(["-o", "UpdateHostKeys=no", "-o", "ConnectTimeout=10"])
            .args(["-o", "IdentitiesOnly=yes"])
            .args(["-o", "PubkeyAuthentication=no"])
            .args(["-o", "PreferredAuthentications=password"]);
        Ok(cmd)
    }

    /// `sshpass -e ssh OPTIONS...` logging in with the instructions' password; append
    /// options, then [`Embedded::target`] and the command.
    fn ssh(&self) -> anyhow::Result<Command> {
        let inner = self.ssh_base()?;
        let mut cmd = Command::new(require("sshpass", "sshpass")?);
        cmd.env("SSHPASS", &self.login.password)
            .arg("-e")
            .arg(inner.get_program())
            .args(inner.get_args())
            .args(["-o", "NumberOfPasswordPrompts=1"]);
        Ok(cmd)
    }

    /// `ssh` whose password prompts, up to `prompts` of them, are answered by the program
    /// `askpass`.
    fn ssh_askpass(&self, askpass: &Path, prompts: u32) -> anyhow::Result<Command> {
        let mut cmd = self.ssh_base()?;
        cmd.env("SSH_ASKPASS", askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .arg("-o")
            .arg(format!("NumberOfPasswordPrompts={prompts}"));
        Ok(cmd)
    }

    /// Runs `ssh ... TARGET command` with the password and expects it to succeed.
    fn run_ok(&self, options: &[&str], command: &str) -> anyhow::Result<Finished> {
        let out = run_with_timeout(
            self.ssh()?.args(options).arg(self.target()).arg(command),
            SSH_TIMEOUT,
        )?;
        ensure!(
            out.status.success(),
            "ssh {options:?} {command:?} failed ({}):\nstdout: {}\nstderr: {}\nagent:\n{}",
            out.status,
            out.stdout_text(),
            out.stderr,
            self.agent.output()
        );
        Ok(out)
    }

    /// A path in the client's directory.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Writes an executable `#!/bin/sh` script.
fn script(path: &Path, body: &str) -> anyhow::Result<PathBuf> {
    std::fs::write(path, format!("#!/bin/sh\n{body}"))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(path.to_owned())
}

/// An askpass program that appends the time of each call to `calls` (one line per prompt,
/// `date +%s.%N`) and answers the n-th prompt with `answers[n]` (the last answer once past
/// the end).
fn counting_askpass(path: &Path, calls: &Path, answers: &[&str]) -> anyhow::Result<PathBuf> {
    let mut cases = String::new();
    for (i, answer) in answers.iter().enumerate() {
        cases.push_str(&format!(
            "  {}) printf '%s\\n' {} ;;\n",
            i + 1,
            shell_quote(answer)
        ));
    }
    let last = answers.last().copied().unwrap_or_default();
    cases.push_str(&format!("  *) printf '%s\\n' {} ;;\n", shell_quote(last)));
    let calls = shell_quote(&calls.display().to_string());
    script(
        path,
        &format!("date +%s.%N >> {calls}\nn=$(wc -l < {calls})\ncase $n in\n{cases}esac\n"),
    )
}

/// The times in a file of `date +%s.%N` lines (seconds since the epoch).
fn times(path: &Path) -> anyhow::Result<Vec<f64>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            l.trim()
                .parse::<f64>()
                .with_context(|| format!("a time in {}: {l:?}", path.display()))
        })
        .collect()
}

/// Now, in seconds since the epoch (the clock `date +%s.%N` reads).
fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Waits for `child` to exit; kills it after `timeout` (an error).
fn wait_child(
    child: &mut Child,
    what: &str,
    timeout: Duration,
) -> anyhow::Result<std::process::ExitStatus> {
    let status = common::wait_for(what, timeout, || child.try_wait().ok().flatten());
    if status.is_err() {
        kill_and_wait(child);
    }
    status
}

/// A process some session started, known by pid and start time, so a recycled pid is never
/// taken for it.
#[derive(Clone, Debug)]
struct Process {
    pid: i32,
    start: String,
}

impl Process {
    /// The process whose pid a session command wrote to `pid_file`, if it runs.
    fn from_pid_file(pid_file: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(pid_file).ok()?;
        // Only a complete line: the command may be writing it.
        let pid: i32 = text.strip_suffix('\n')?.trim().parse().ok()?;
        let (_, start) = Self::stat(pid)?;
        Some(Self { pid, start })
    }

    /// State and start time from `/proc/PID/stat` (fields after the command name).
    fn stat(pid: i32) -> Option<(String, String)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        Some(((*fields.first()?).to_owned(), (*fields.get(19)?).to_owned()))
    }

    /// Whether it still runs (a zombie waiting to be reaped does not).
    fn alive(&self) -> bool {
        matches!(Self::stat(self.pid), Some((state, start)) if start == self.start && state != "Z")
    }
}

/// Kills, when dropped, whatever of `processes` still runs: a failed test leaves nothing
/// behind.
#[derive(Default)]
struct Reaper(Vec<Process>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for p in self.0.iter().filter(|p| p.alive()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Kills and reaps the children when dropped.
#[derive(Default)]
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            kill_and_wait(child);
        }
    }
}

// ---------------------------------------------------------------------------------------
// 1, 2: the refusal delay and MaxAuthTries
// ---------------------------------------------------------------------------------------

/// README: "Wrong passwords and unknown keys are refused after a constant 1 s; six failures
/// close the connection". The askpass program notes the time of each prompt: between two
/// prompts lies one refusal, which must take at least 0.9 s — for a wrong password and for
/// the right password with another user name alike. Asked for up to 10 passwords, the
/// client is prompted exactly 6 times and then disconnected, the last refusal taking its
/// second too. The sixth attempt is a real one: five wrong passwords and then the right one
/// log in.
#[test]
fn wrong_logins_take_a_second_each_and_six_failures_disconnect() -> anyhow::Result<()> {
    let s = Embedded::start(&[])?;

    // Six wrong passwords out of ten allowed by the client.
    let calls = s.path("wrong.calls");
    let askpass = counting_askpass(&s.path("wrong.sh"), &calls, &["wrong-password"])?;
    let out = run_with_timeout(
        s.ssh_askpass(&askpass, 10)?
            .arg(s.target())
            .arg("echo logged-in"),
        SSH_TIMEOUT,
    )?;
    let ended = now();
    let prompts = times(&calls)?;
    let context = || {
        format!(
            "ssh {}\nstdout: {}\nstderr: {}\nprompts at {prompts:?}\nagent:\n{}",
            out.status,
            out.stdout_text(),
            out.stderr,
            s.agent.output()
        )
    };
    ensure!(
        !out.status.success() && !out.stdout_text().contains("logged-in"),
        "six wrong passwords must not log in: {}",
        context()
    );
    ensure!(
        prompts.len() == MAX_AUTH_TRIES,
        "exactly {MAX_AUTH_TRIES} password prompts before the disconnect, got {}: {}",
        prompts.len(),
        context()
    );
    ensure!(
        !out.stderr.contains("Permission denied (password"),
        "after the sixth failure the server offers no method again: {}",
        context()
    );
    ensure!(
        out.stderr.contains("Connection closed"),
        "the server closes the connection after the sixth failure: {}",
        context()
    );
    s.agent.wait_lines(
        "closing a connection: too many authentication failures",
        1,
        EVENTUALLY,
    )?;
    for (i, pair) in prompts.windows(2).enumerate() {
        let took = pair[1] - pair[0];
        ensure!(
            took >= MIN_REFUSAL,
            "refusal {} took {took:.3} s, less than {MIN_REFUSAL} s: {}",
            i + 1,
            context()
        );
    }
    // The last refusal (the disconnect) is delayed like the others.
    let last = ended - prompts[prompts.len() - 1];
    ensure!(
        last >= MIN_REFUSAL,
        "the sixth refusal took {last:.3} s, less than {MIN_REFUSAL} s: {}",
        context()
    );

    // The right password with a user name the server does not take: the same delay.
    let calls = s.path("user.calls");
    let askpass = counting_askpass(&s.path("user.sh"), &calls, &[s.login.password.as_str()])?;
    let out = run_with_timeout(
        s.ssh_askpass(&askpass, 2)?
            .arg(format!("root@{}", s.login.host))
            .arg("echo logged-in"),
        SSH_TIMEOUT,
    )?;
    let prompts = times(&calls)?;
    ensure!(
        !out.status.success() && prompts.len() == 2,
        "another user name is refused twice: {} {:?} {}",
        out.status,
        prompts,
        out.stderr
    );
    let took = prompts[1] - prompts[0];
    ensure!(
        took >= MIN_REFUSAL,
        "refusing another user name took {took:.3} s, less than {MIN_REFUSAL} s"
    );

    // Five wrong passwords, then the right one: the sixth attempt still counts.
    let calls = s.path("sixth.calls");
    let mut answers = vec!["wrong-password"; MAX_AUTH_TRIES - 1];
    answers.push(s.login.password.as_str());
    let askpass = counting_askpass(&s.path("sixth.sh"), &calls, &answers)?;
    let out = run_with_timeout(
        s.ssh_askpass(&askpass, 10)?
            .arg(s.target())
            .arg("echo logged-in"),
        SSH_TIMEOUT,
    )?;
    let prompts = times(&calls)?;
    ensure!(
        out.status.success()
            && out.stdout_text() == "logged-in\n"
            && prompts.len() == MAX_AUTH_TRIES,
        "the right password at the sixth prompt logs in: {} {:?} {} prompts\nstderr: {}\n\
         agent:\n{}",
        out.status,
        out.stdout_text(),
        prompts.len(),
        out.stderr,
        s.agent.output()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 3: the login timeout
// ---------------------------------------------------------------------------------------

/// README: "a connection must log in within 2 minutes" (`--ssh-login-timeout`, here 2 s).
/// A client that sends its identification line and nothing more is cut, and so is OpenSSH
/// waiting at the password prompt: the right password given after the timeout no longer
/// logs in. Neither is cut before the timeout.
#[test]
fn a_connection_that_does_not_log_in_within_the_login_timeout_is_closed() -> anyhow::Result<()> {
    let s = Embedded::start(&["--ssh-login-timeout", "2s"])?;

    // A client that sends its identification line (the relay passes on only what starts
    // like SSH), reads the server's, and then says nothing.
    let started = Instant::now();
    let mut conn = TcpStream::connect((s.login.host.as_str(), s.login.port))?;
    conn.write_all(b"SSH-2.0-PortholeTest_silent\r\n")?;
    conn.set_read_timeout(Some(EVENTUALLY))?;
    let mut greeting = Vec::new();
    let mut buf = [0u8; 256];
    let cut = loop {
        match conn.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => greeting.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break Err(e)
            }
            // A reset is a cut too.
            Err(_) => break Ok(()),
        }
    };
    let lasted = started.elapsed().as_secs_f64();
    ensure!(
        cut.is_ok(),
        "a silent connection is still open after {EVENTUALLY:?}\nagent:\n{}",
        s.agent.output()
    );
    ensure!(
        greeting.starts_with(b"SSH-2.0-"),
        "the server greeted first: {:?} (cut after {lasted:.3} s)\nagent:\n{}",
        String::from_utf8_lossy(&greeting),
        s.agent.output()
    );
    ensure!(
        lasted >= LOGIN_TIMEOUT_SECS - 0.1,
        "a silent connection was cut after {lasted:.3} s, before the {LOGIN_TIMEOUT_SECS} s \
         login timeout\nagent:\n{}",
        s.agent.output()
    );
    s.agent
        .wait_lines("closing a connection: no login in time", 1, EVENTUALLY)?;

    // OpenSSH at the password prompt: the askpass program waits on a FIFO for the answer.
    let fifo = s.path("answer.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let prompted = s.path("prompted");
    let timeout_program = require("timeout", "coreutils")?;
    let askpass = script(
        &s.path("waiting-askpass.sh"),
        &format!(
            "date +%s.%N > {}\nexec {} 120 cat {}\n",
            shell_quote(&prompted.display().to_string()),
            shell_quote(&timeout_program.display().to_string()),
            shell_quote(&fifo.display().to_string())
        ),
    )?;
    let started = Instant::now();
    let mut ssh = s
        .ssh_askpass(&askpass, 1)?
        .arg(s.target())
        .arg("echo logged-in")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let result = (|| -> anyhow::Result<()> {
        common::wait_for("the password prompt", EVENTUALLY, || {
            prompted.exists().then_some(())
        })?;
        s.agent
            .wait_lines("closing a connection: no login in time", 2, EVENTUALLY)?;
        let lasted = started.elapsed().as_secs_f64();
        ensure!(
            lasted >= LOGIN_TIMEOUT_SECS - 0.1,
            "the connection was closed {lasted:.3} s after ssh started, before the \
             {LOGIN_TIMEOUT_SECS} s login timeout"
        );
        // Now the right password.
        let mut answer = common::wait_for("the askpass program to read", EVENTUALLY, || {
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                .open(&fifo)
                .ok()
        })?;
        answer.write_all(format!("{}\n", s.login.password).as_bytes())?;
        drop(answer);
        let status = wait_child(&mut ssh, "ssh to give up", EVENTUALLY)?;
        ensure!(!status.success(), "ssh logged in after the login timeout");
        Ok(())
    })();
    if result.is_err() {
        kill_and_wait(&mut ssh);
    }
    let out = ssh.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    result.with_context(|| {
        format!(
            "ssh stdout: {stdout}\nssh stderr: {stderr}\nagent:\n{}",
            s.agent.output()
        )
    })?;
    ensure!(
        !stdout.contains("logged-in"),
        "nothing runs after the login timeout: {stdout}"
    );
    // The server's disconnect message is read after the password is sent, unless the
    // connection was cut before it went out.
    ensure!(
        [
            "no login in time",
            "Connection closed",
            "Connection reset",
            "Broken pipe"
        ]
        .iter()
        .any(|m| stderr.contains(m)),
        "ssh reports the closed connection: {stderr}"
    );
    Ok(())
}

/// `--ssh-login-timeout` takes durations from 1 s to 10 min and says so otherwise.
#[test]
fn login_timeouts_outside_one_second_to_ten_minutes_are_refused() -> anyhow::Result<()> {
    for (value, expected) in [
        ("500ms", "at least 1s"),
        ("0s", "at least 1s"),
        ("11m", "at most 10m"),
        ("soon", "--ssh-login-timeout"),
    ] {
        let out = run_with_timeout(
            Command::new(common::agent::binary())
                .args(["--relay", "127.0.0.1:9", "--pin-sha256"])
                .arg("00".repeat(32))
                .args(["--embedded-ssh", "--ssh-login-timeout", value])
                .env("PORTHOLE_TOKEN", "t"),
            Duration::from_secs(20),
        )?;
        ensure!(
            !out.status.success() && out.stderr.contains(expected),
            "--ssh-login-timeout {value}: expected an error containing {expected:?}, got {} {}",
            out.status,
            out.stderr
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 4: SendEnv and --ssh-env-clear
// ---------------------------------------------------------------------------------------

/// Prints every variable's name, one per line, then the values the tests look at.
const SHOW_ENV: &str = "env | cut -d= -f1 | sed 's/^/name=/'; \
    echo \"sent=${PH_SENT-unset} unlisted=${PH_UNLISTED-unset} long=${PH_TOO_LONG+set} \
    build=${PH_BUILD_VAR-unset} user=$USER logname=$LOGNAME shell=$SHELL home=${HOME-unset} \
    path=$PATH\"";

/// README: the session has "the build's environment ... plus ... the client's `env`
/// requests (`SendEnv`). `--ssh-env-clear` starts from an empty environment instead." A
/// variable named by `SendEnv` arrives (also alongside a terminal), one not named does not,
/// and one with a value past the server's 4096-byte limit is refused without disturbing the
/// session. A variable of the agent's environment reaches the session; with
/// `--ssh-env-clear` it does not, and only the login variables, `PATH` and the client's
/// variables are there.
#[test]
fn send_env_passes_variables_and_env_clear_leaves_out_the_build_environment() -> anyhow::Result<()>
{
    let build = [("PH_BUILD_VAR", "from-the-build")];
    let too_long = "x".repeat(5000);
    let send = |s: &Embedded, tty: bool| -> anyhow::Result<String> {
        let mut cmd = s.ssh()?;
        cmd.env("PH_SENT", "sent-by-the-client")
            .env("PH_UNLISTED", "not-named-by-sendenv")
            .env("PH_TOO_LONG", &too_long)
            .args(["-o", "SendEnv=PH_SENT", "-o", "SendEnv=PH_TOO_LONG"]);
        cmd.arg("-v");
        if tty {
            cmd.arg("-tt");
        }
        cmd.arg(s.target()).arg(SHOW_ENV);
        let out = run_with_timeout(&mut cmd, SSH_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "ssh with SendEnv (tty: {tty}) failed ({}): {}\nstderr: {}\nagent:\n{}",
            out.status,
            out.stdout_text(),
            out.stderr,
            s.agent.output()
        );
        // The client sent both named variables (the server refuses the long one), and only
        // those.
        let sent = |name: &str| out.stderr.contains(&format!("setting env {name} = "));
        ensure!(
            sent("PH_SENT") && sent("PH_TOO_LONG") && !sent("PH_UNLISTED"),
            "ssh -v shows the env requests: {}",
            out.stderr
        );
        Ok(out.stdout_text().replace('\r', ""))
    };
    let summary = |out: &str| -> String {
        out.lines()
            .find(|l| l.starts_with("sent="))
            .unwrap_or_default()
            .to_owned()
    };

    // The build's environment.
    let s = Embedded::start_with_env(&[], &build)?;
    for tty in [false, true] {
        let out = send(&s, tty)?;
        let line = summary(&out);
        ensure!(
            line.starts_with(
                "sent=sent-by-the-client unlisted=unset long= build=from-the-build user=dev \
                 logname=dev shell=/bin/bash"
            ),
            "SendEnv and the build's environment (tty: {tty}): {out}"
        );
    }
    drop(s);

    // --ssh-env-clear: nothing of the build's environment.
    let s = Embedded::start_with_env(
        &["--ssh-env-clear", "--ssh-env", "PH_SET_BY_FLAG=kept"],
        &build,
    )?;
    let out = send(&s, false)?;
    let line = summary(&out);
    ensure!(
        line.starts_with(
            "sent=sent-by-the-client unlisted=unset long= build=unset user=dev logname=dev \
             shell=/bin/bash home=/"
        ) && line.ends_with(&format!("path={DEFAULT_PATH}")),
        "--ssh-env-clear keeps the login variables and SendEnv, not the build's: {out}"
    );
    // Only these: the login variables, PATH, --ssh-env, the client's, and what bash adds.
    let allowed = [
        "USER",
        "LOGNAME",
        "HOME",
        "SHELL",
        "PATH",
        "PH_SET_BY_FLAG",
        "PH_SENT",
        "PWD",
        "SHLVL",
        "_",
    ];
    let names: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("name="))
        .collect();
    ensure!(
        names.contains(&"PH_SET_BY_FLAG") && names.contains(&"HOME"),
        "--ssh-env and HOME are set: {names:?}"
    );
    let extra: Vec<&&str> = names.iter().filter(|n| !allowed.contains(n)).collect();
    ensure!(
        extra.is_empty(),
        "with --ssh-env-clear the session has only the login variables, got also {extra:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 5: exit-signal
// ---------------------------------------------------------------------------------------

/// README: "exit status or signal passed back". A command that kills itself with SIGTERM
/// (and one with SIGKILL on a terminal) ends with an `exit-signal` request, no
/// `exit-status`; OpenSSH's client has no exit status to pass on then and exits 255 after
/// the output. A command that exits normally gets `exit-status`, for contrast.
#[test]
fn a_command_killed_by_a_signal_is_reported_with_exit_signal() -> anyhow::Result<()> {
    let s = Embedded::start(&[])?;
    let requests = |stderr: &str| -> Vec<String> {
        stderr
            .lines()
            .filter_map(|l| l.split_once(" rtype ").map(|(_, r)| r))
            .filter_map(|r| r.split_whitespace().next())
            .filter(|r| r.starts_with("exit-"))
            .map(str::to_owned)
            .collect()
    };
    for (tty, command) in [
        (false, "echo before; kill -TERM $$; echo after"),
        (true, "echo before; kill -KILL $$; echo after"),
    ] {
        let mut cmd = s.ssh()?;
        cmd.arg("-v");
        if tty {
            cmd.arg("-tt");
        }
        let out = run_with_timeout(cmd.arg(s.target()).arg(command), SSH_TIMEOUT)?;
        let stdout = out.stdout_text().replace('\r', "");
        ensure!(
            stdout == "before\n" && out.status.code() == Some(255),
            "{command:?} (tty: {tty}): the output before the signal, then ssh exits 255; \
             got {} {stdout:?}\nstderr: {}",
            out.status,
            out.stderr
        );
        ensure!(
            requests(&out.stderr) == ["exit-signal"],
            "{command:?} (tty: {tty}): exactly one exit-signal request, got {:?}\nstderr: {}",
            requests(&out.stderr),
            out.stderr
        );
    }
    let out = run_with_timeout(
        s.ssh()?.arg("-v").arg(s.target()).arg("exit 7"),
        SSH_TIMEOUT,
    )?;
    ensure!(
        out.status.code() == Some(7) && requests(&out.stderr) == ["exit-status"],
        "a normal exit is exit-status: {} {:?}",
        out.status,
        requests(&out.stderr)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 6: what is not offered
// ---------------------------------------------------------------------------------------

/// README: "Not offered: `ssh -R`, agent and X11 forwarding." Each is asked for by OpenSSH
/// (`-v` shows the request), refused, and the command still runs on the same connection:
/// `-R` gets "remote port forwarding failed", `-Y` (with a display and fake authentication
/// data) gets "X11 forwarding request failed" and no `DISPLAY`, `-A` with a running
/// `ssh-agent` gets no `SSH_AUTH_SOCK` in the session.
#[test]
fn remote_x11_and_agent_forwarding_are_refused_while_the_connection_works() -> anyhow::Result<()> {
    let s = Embedded::start(&[])?;

    // ssh -R
    let out = s.run_ok(&["-v", "-R", "127.0.0.1:0:127.0.0.1:9"], "echo still-works")?;
    ensure!(
        out.stdout_text() == "still-works\n"
            && out.stderr.contains("remote port forwarding failed"),
        "ssh -R is refused, the command runs: {:?}\nstderr: {}",
        out.stdout_text(),
        out.stderr
    );

    // ssh -Y: a display the client would forward (it does not have to exist: without xauth
    // data the client sends fake authentication data).
    let out = run_with_timeout(
        s.ssh()?
            .env("DISPLAY", "127.0.0.1:77")
            .args(["-v", "-Y", "-o", "XAuthLocation=/nonexistent/xauth"])
            .arg(s.target())
            .arg("echo display=${DISPLAY-unset}"),
        SSH_TIMEOUT,
    )?;
    ensure!(
        out.status.success()
            && out.stdout_text() == "display=unset\n"
            && out.stderr.contains("Requesting X11 forwarding")
            && out.stderr.contains("X11 forwarding request failed"),
        "ssh -Y is refused, the command runs: {} {:?}\nstderr: {}",
        out.status,
        out.stdout_text(),
        out.stderr
    );

    // ssh -A with a running ssh-agent.
    let sock = s.path("agent.sock");
    let mut agent = Children::default();
    agent.0.push(
        Command::new(require("ssh-agent", "openssh-client")?)
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    common::wait_for("ssh-agent's socket", EVENTUALLY, || {
        sock.exists().then_some(())
    })?;
    let out = run_with_timeout(
        s.ssh()?
            .env("SSH_AUTH_SOCK", &sock)
            .arg("-v")
            .arg("-A")
            .arg("-o")
            .arg(format!("ForwardAgent={}", sock.display()))
            .arg(s.target())
            .arg("echo sock=${SSH_AUTH_SOCK-unset}"),
        SSH_TIMEOUT,
    )?;
    ensure!(
        out.status.success()
            && out.stdout_text() == "sock=unset\n"
            && out
                .stderr
                .contains("Requesting authentication agent forwarding"),
        "ssh -A is refused, the command runs: {} {:?}\nstderr: {}",
        out.status,
        out.stdout_text(),
        out.stderr
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 7: the per-connection caps
// ---------------------------------------------------------------------------------------

/// README: "At most 10 shells/commands ... per connection." One OpenSSH master connection
/// (`ControlMaster`) carries 10 long-running commands; the 11th session is refused by the
/// server; once one of the 10 ends, a new one opens.
#[test]
fn a_connection_holds_at_most_ten_sessions() -> anyhow::Result<()> {
    let s = Embedded::start(&[])?;
    let control = s.path("control.sock");
    // Through the master only: if the master cannot open a session, OpenSSH falls back to a
    // connection of its own, which must not prompt for a password.
    let control_opts = |cmd: &mut Command| {
        cmd.arg("-S")
            .arg(&control)
            .args(["-o", "ControlMaster=no", "-o", "BatchMode=yes"]);
    };
    let mut children = Children::default();
    let master_log = s.path("master.log");
    let mut master = s.ssh()?;
    master
        .arg("-M")
        .arg("-S")
        .arg(&control)
        .args(["-o", "ControlPersist=no", "-N"])
        .arg(s.target())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&master_log)?);
    children.0.push(master.spawn()?);
    common::wait_for("the control master", EVENTUALLY, || {
        let mut check = s.ssh_base().ok()?;
        control_opts(&mut check);
        check.args(["-O", "check"]).arg(s.target());
        let out = run_with_timeout(&mut check, SSH_TIMEOUT).ok()?;
        out.status.success().then_some(())
    })
    .with_context(|| {
        format!(
            "master: {}\nagent:\n{}",
            std::fs::read_to_string(&master_log).unwrap_or_default(),
            s.agent.output()
        )
    })?;

    let mut reaper = Reaper::default();
    let pid_file = |i: usize| s.workdir.path().join(format!("session-{i}.pid"));
    for i in 1..=MAX_SESSIONS {
        let mut cmd = s.ssh_base()?;
        control_opts(&mut cmd);
        cmd.arg(s.target())
            .arg(format!("echo $$ > session-{i}.pid; exec sleep 300"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        children.0.push(cmd.spawn()?);
    }
    for i in 1..=MAX_SESSIONS {
        let p = common::wait_for(&format!("session {i}'s command"), EVENTUALLY, || {
            Process::from_pid_file(&pid_file(i))
        })
        .with_context(|| format!("agent:\n{}", s.agent.output()))?;
        reaper.0.push(p);
    }

    let eleventh = || -> anyhow::Result<Finished> {
        let mut cmd = s.ssh_base()?;
        control_opts(&mut cmd);
        cmd.arg(s.target()).arg("echo eleventh");
        run_with_timeout(&mut cmd, SSH_TIMEOUT)
    };
    let out = eleventh()?;
    ensure!(
        !out.status.success() && !out.stdout_text().contains("eleventh"),
        "an 11th session on the connection must be refused: {} {:?}\nstderr: {}",
        out.status,
        out.stdout_text(),
        out.stderr
    );
    let master_said = std::fs::read_to_string(&master_log).unwrap_or_default();
    ensure!(
        out.stderr.contains("Session open refused by peer")
            && master_said.contains("open failed: resource shortage"),
        "the server refused the 11th session channel: ssh: {}\nmaster: {master_said}",
        out.stderr
    );

    // One ends: room for another.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(reaper.0[0].pid),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let mut last = String::new();
    common::wait_for("a session after one of ten ended", EVENTUALLY, || {
        let out = eleventh().ok()?;
        last = format!("{} {:?} {}", out.status, out.stdout_text(), out.stderr);
        (out.status.success() && out.stdout_text() == "eleventh\n").then_some(())
    })
    .with_context(|| format!("last try: {last}\nagent:\n{}", s.agent.output()))?;
    Ok(())
}

/// A TCP echo service on loopback that counts the connections it accepted.
fn echo_service() -> anyhow::Result<(u16, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok((port, accepted))
}

/// Connects to the `ssh -L` port and checks one round trip through the tunnel; `None` when
/// the tunnel closes the connection instead (its channel was refused).
fn forwarded(port: u16, n: usize) -> anyhow::Result<Option<TcpStream>> {
    let mut conn = TcpStream::connect(("127.0.0.1", port))?;
    conn.set_read_timeout(Some(EVENTUALLY))?;
    let msg = format!("ping {n}\n");
    if conn.write_all(msg.as_bytes()).is_err() {
        return Ok(None);
    }
    let mut got = vec![0u8; msg.len()];
    match conn.read_exact(&mut got) {
        Ok(()) => {
            ensure!(got == msg.as_bytes(), "echo {n}: {got:?}");
            Ok(Some(conn))
        }
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
        Err(e) => Err(e).with_context(|| format!("forwarded connection {n}")),
    }
}

/// README: "At most ... 256 forwards per connection." 256 connections through one `ssh -L`
/// are open at once, each echoing; the 257th channel is refused by the server (OpenSSH
/// closes that local connection and says "open failed"; the service never sees it); once
/// one closes, a new one goes through.
#[test]
fn a_connection_holds_at_most_256_forwards() -> anyhow::Result<()> {
    let s = Embedded::start(&[])?;
    let (echo_port, accepted) = echo_service()?;
    let local_port = free_port()?;
    let ssh_log = s.path("ssh-L.log");
    let mut children = Children::default();
    let mut ssh = s.ssh()?;
    ssh.args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("127.0.0.1:{local_port}:127.0.0.1:{echo_port}"))
        .arg(s.target())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&ssh_log)?);
    children.0.push(ssh.spawn()?);
    let context = || {
        format!(
            "ssh: {}\nagent:\n{}",
            std::fs::read_to_string(&ssh_log).unwrap_or_default(),
            s.agent.output()
        )
    };

    let mut open = Vec::new();
    let first = common::wait_for("ssh -L to listen", EVENTUALLY, || {
        forwarded(local_port, 0).ok().flatten()
    })
    .with_context(context)?;
    open.push(first);
    for n in 1..MAX_FORWARDS {
        let conn = forwarded(local_port, n)?.with_context(|| {
            format!("forward {} of {MAX_FORWARDS} refused: {}", n + 1, context())
        })?;
        open.push(conn);
    }
    ensure!(accepted.load(Ordering::SeqCst) == MAX_FORWARDS);

    let refused = forwarded(local_port, MAX_FORWARDS)?;
    ensure!(
        refused.is_none(),
        "forward {} must be refused: {}",
        MAX_FORWARDS + 1,
        context()
    );
    common::wait_for("ssh to report the refusal", EVENTUALLY, || {
        std::fs::read_to_string(&ssh_log)
            .ok()
            .filter(|l| l.contains("open failed: resource shortage"))
    })
    .with_context(context)?;
    ensure!(
        accepted.load(Ordering::SeqCst) == MAX_FORWARDS,
        "a refused forward never reaches the service"
    );

    // One closes: room for another.
    drop(open.pop());
    common::wait_for("a forward after one of 256 closed", EVENTUALLY, || {
        forwarded(local_port, MAX_FORWARDS + 1).ok().flatten()
    })
    .with_context(context)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 8: revocation hangs up, then kills
// ---------------------------------------------------------------------------------------

/// A session command for the revocation test, leaving its files in `dir` (relative to the
/// working directory): `sleeper.pid`, a process that ignores SIGHUP and sleeps
/// (`exec sleep 300`); `beater.pid` and `beat`, one that ignores SIGHUP and writes the time
/// to `beat` every 50 ms; `hup.at`, the time the command's shell got SIGHUP (it then exits,
/// as a shell does).
fn hangup_command(dir: &str) -> String {
    format!(
        "mkdir -p {dir} && cd {dir} || exit 1
trap 'date +%s.%N > hup.new; mv -f hup.new hup.at; exit 0' HUP
sh -c 'trap \"\" HUP; echo $$ > sleeper.pid; exec sleep 300' &
sh -c 'trap \"\" HUP; echo $$ > beater.pid; i=0
  while [ $i -lt 3000 ]; do date +%s.%N > beat.new; mv -f beat.new beat; sleep 0.05; i=$((i+1)); done' &
wait"
    )
}

/// README: "each session's process group gets SIGHUP (shells pass it on to their jobs), then
/// SIGKILL after 2 s". At `DELETE` of the session, a command (on pipes, and on a terminal)
/// whose shell exits at SIGHUP leaves two jobs that ignore SIGHUP: both are gone afterwards,
/// and the one writing the time kept doing so for at least 1 s after the SIGHUP (the server
/// waits 2 s).
#[test]
fn revocation_sends_sighup_then_sigkill_to_processes_that_ignore_it() -> anyhow::Result<()> {
    let s = Embedded::start(&[])?;
    let mut clients = Children::default();
    let mut reaper = Reaper::default();
    let shapes = [("pipes", false), ("terminal", true)];
    for (dir, tty) in shapes {
        let mut cmd = s.ssh()?;
        if tty {
            cmd.arg("-tt");
        }
        cmd.arg(s.target())
            .arg(hangup_command(dir))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        clients.0.push(cmd.spawn()?);
    }
    let mut watched = Vec::new();
    for (dir, _) in shapes {
        let dir = s.workdir.path().join(dir);
        let (sleeper, beater) = common::wait_for(
            &format!("the jobs in {}", dir.display()),
            EVENTUALLY,
            || {
                Some((
                    Process::from_pid_file(&dir.join("sleeper.pid"))?,
                    Process::from_pid_file(&dir.join("beater.pid"))?,
                ))
                .filter(|_| dir.join("beat").exists())
            },
        )
        .with_context(|| format!("agent:\n{}", s.agent.output()))?;
        reaper.0.extend([sleeper.clone(), beater.clone()]);
        watched.push((dir, sleeper, beater));
    }

    s.relay.delete(&s.created.id)?;

    for (dir, sleeper, beater) in &watched {
        let context = || format!("{}\nagent:\n{}", dir.display(), s.agent.output());
        let hup = common::wait_for("the shell's SIGHUP", EVENTUALLY, || {
            times(&dir.join("hup.at")).ok()?.first().copied()
        })
        .with_context(context)?;
        common::wait_for(
            "the jobs that ignore SIGHUP to be killed",
            EVENTUALLY,
            || (!sleeper.alive() && !beater.alive()).then_some(()),
        )
        .with_context(context)?;
        let last_beat = times(&dir.join("beat"))?
            .first()
            .copied()
            .context("a beat")?;
        let survived = last_beat - hup;
        ensure!(
            survived >= MIN_SURVIVAL_SECS,
            "{}: a job that ignores SIGHUP was last seen {survived:.3} s after the SIGHUP; \
             SIGKILL must wait {HANGUP_GRACE_SECS} s",
            dir.display()
        );
    }
    for child in &mut clients.0 {
        let status = wait_child(child, "ssh to end at revocation", EVENTUALLY)?;
        ensure!(!status.success(), "the session was cut: {status}");
    }
    Ok(())
}
