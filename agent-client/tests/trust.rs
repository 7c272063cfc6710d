//! How the agent decides it talks to the real relay, and what it keeps to itself, with the
//! real agent binary, real TLS and an in-process relay: a relay whose certificate
//! (`--tls-cert`/`--tls-key`) a private CA signed is trusted by an agent given that CA with
//! `--ca-cert` (the session becomes active and forwards) and refused, with the reason and
//! exit status 1, by an agent given another CA or checking another name (`--server-name`);
//! without `--ca-cert` or `--pin-sha256` the agent uses the system roots, which honour
//! `SSL_CERT_FILE` (a bundle holding the CA: accepted; the default bundle: unknown issuer,
//! refused); SIGTERM ends a live agent with exit status 0 and the relay sees its link end at
//! once; the join token never appears on an agent's command line (`PORTHOLE_TOKEN`, and a
//! `--token` given to `--detach` is moved off the background agent's), and an agent serving
//! embedded SSH cannot have its environment read by another process of its user, while the
//! token in it is spent once the session is registered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::agent::Agent;
use common::detached::Detached;
use common::fixture::Tunnel;
use common::launch::{command_as, is_root, Launch, Launched, NOBODY};
use common::raw::{self, join};
use common::relay::TestRelay;
use common::{echo, wait_for};
use porthole_protocol::{ErrorCode, Message};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A private certificate authority made for one test, its certificate in `ca.pem`.
struct TestCa {
    /// The CA certificate.
    cert: rcgen::Certificate,
    /// Its key.
    key: KeyPair,
    /// The CA certificate as a PEM file (what `--ca-cert` and bundles take).
    pem: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its certificate written to `dir/<file>`.
    fn new(name: &str, dir: &Path, file: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let pem = dir.join(file);
        std::fs::write(&pem, cert.pem())?;
        Ok(Self { cert, key, pem })
    }

    /// A server certificate for `names` (DNS names or IP addresses, as subject alternative
    /// names) signed by this CA: the chain (leaf, then CA) and the key written to
    /// `dir/relay-cert.pem` and `dir/relay-key.pem`; returns their paths.
    fn issue(&self, names: &[&str], dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "porthole relay (test)");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let leaf = params.signed_by(&key, &self.cert, &self.key)?;
        let (cert_path, key_path) = (dir.join("relay-cert.pem"), dir.join("relay-key.pem"));
        std::fs::write(&cert_path, format!("{}{}", leaf.pem(), self.cert.pem()))?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok((cert_path, key_path))
    }
}

/// A relay presenting a certificate for `localhost` and 127.0.0.1 (the address agents dial)
/// signed by a fresh private CA; the CA, and another CA that signed nothing the relay shows.
struct CaRelay {
    relay: TestRelay,
    ca: TestCa,
    other: TestCa,
    /// Holds the PEM files.
    dir: tempfile::TempDir,
}

impl CaRelay {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca = TestCa::new("Porthole Test CA", dir.path(), "ca.pem")?;
        let other = TestCa::new("Some Other CA", dir.path(), "other-ca.pem")?;
        let (cert, key) = ca.issue(&["localhost", "127.0.0.1"], dir.path())?;
        let relay = TestRelay::start_with(|c| {
            c.tls_cert = Some(cert);
            c.tls_key = Some(key);
        })?;
        ensure!(
            !relay.handle.info.self_signed,
            "the relay should present the configured certificate, not its own self-signed one"
        );
        Ok(Self {
            relay,
            ca,
            other,
            dir,
        })
    }

    /// `--relay ADDR --service ssh=127.0.0.1:ECHO` plus `trust` (the trust flags).
    fn args(&self, echo_port: u16, trust: &[&str]) -> Vec<String> {
        let mut args = vec![
            "--relay".to_owned(),
            self.relay.agent_addr(),
            "--service".into(),
            format!("ssh=127.0.0.1:{echo_port}"),
        ];
        args.extend(trust.iter().map(|a| (*a).to_owned()));
        args
    }
}

/// A `Launch` of the agent that trusts the system roots only: no trust flag or variable of
/// the agent's own, `SSL_CERT_DIR` removed, `SSL_CERT_FILE` set to `bundle` or (None)
/// removed too, so the platform's default bundle applies.
fn system_roots_agent(args: &[String], token: &str, bundle: Option<&Path>) -> Launch {
    let launch = Launch::new(args)
        .env("PORTHOLE_TOKEN", token)
        .env_remove("PORTHOLE_CA_CERT")
        .env_remove("PORTHOLE_PIN_SHA256")
        .env_remove("PORTHOLE_SERVER_NAME")
        .env_remove("SSL_CERT_DIR");
    match bundle {
        Some(bundle) => launch.env("SSL_CERT_FILE", bundle),
        None => launch.env_remove("SSL_CERT_FILE"),
    }
}

/// Checks that an agent that could not verify the relay exited with status 1 and said why
/// (`cannot verify the relay`, and `expected`, compared without case, spaces or `_`).
fn refused_with(status: ExitStatus, output: &str, expected: &str) -> anyhow::Result<()> {
    ensure!(
        status.code() == Some(1),
        "an agent that cannot verify the relay must exit with status 1, got {status}; \
         output:\n{output}"
    );
    ensure!(
        output.contains("porthole-agent: error:") && output.contains("cannot verify the relay"),
        "the agent must say it cannot verify the relay; output:\n{output}"
    );
    let squash = |s: &str| {
        s.chars()
            .filter(|c| !c.is_whitespace() && *c != '_')
            .collect::<String>()
            .to_lowercase()
    };
    ensure!(
        squash(output).contains(&squash(expected)),
        "the agent's reason should name `{expected}`; output:\n{output}"
    );
    ensure!(
        !output.contains("remote access session"),
        "a refused relay must not register the agent; output:\n{output}"
    );
    Ok(())
}

/// README: "`--ca-cert FILE`: trust relay certificates from this CA", "`--tls-cert FILE`,
/// `--tls-key FILE`: PEM certificate chain and key", "Exit status: ... 1 on a fatal error
/// (... wrong pin ...), with the reason on stderr". The relay presents a certificate a
/// private CA signed; an agent given that CA joins and forwards, one given another CA is
/// refused and the session stays pending.
#[test]
fn an_agent_given_the_relays_ca_connects_and_one_given_another_ca_is_refused() -> anyhow::Result<()>
{
    let ca_relay = CaRelay::start()?;
    let relay = &ca_relay.relay;
    let echo_port = echo::start()?;

    let good = relay.create(&["ssh"], None)?;
    let ca_pem = ca_relay.ca.pem.display().to_string();
    let agent = Agent::spawn(
        &ca_relay.args(echo_port, &["--ca-cert", &ca_pem]),
        &good.token,
    )?;
    agent
        .wait_registered()
        .context("an agent given the relay's CA with --ca-cert must register")?;
    relay.wait_state(&good.id, "active", Duration::from_secs(20))?;
    let port = good.port("ssh");
    ensure!(
        echo::roundtrip(port, b"through the CA-verified relay")?
            == b"through the CA-verified relay",
        "the session must forward"
    );
    // Several visitors at once: data connections (warm and dialed) verify the CA too.
    for i in 0..4 {
        let msg = format!("visitor {i}");
        ensure!(echo::roundtrip(port, msg.as_bytes())? == msg.as_bytes());
    }

    let bad = relay.create(&["ssh"], None)?;
    let other_pem = ca_relay.other.pem.display().to_string();
    let mut refused = Agent::spawn(
        &ca_relay.args(echo_port, &["--ca-cert", &other_pem]),
        &bad.token,
    )?;
    let status = refused.wait_exit(Duration::from_secs(30))?;
    refused_with(status, &refused.output(), "UnknownIssuer")?;
    ensure!(
        relay.state(&bad.id)? == "pending",
        "the refused agent must not have joined: {}",
        relay.get(&bad.id)?
    );
    Ok(())
}

/// README: "`--server-name NAME`: name checked in the certificate (default: host of the
/// first `--relay`)"; `RelayTrust::CaFile` verifies "with host name checks". The CA is the
/// right one, but the certificate names `localhost` and 127.0.0.1 only: checking the name
/// `relay.elsewhere.example` refuses it, checking `localhost` (while dialing 127.0.0.1)
/// accepts it.
#[test]
fn a_ca_signed_certificate_must_also_name_the_relay() -> anyhow::Result<()> {
    let ca_relay = CaRelay::start()?;
    let relay = &ca_relay.relay;
    let echo_port = echo::start()?;
    let ca_pem = ca_relay.ca.pem.display().to_string();

    let wrong = relay.create(&["ssh"], None)?;
    let mut agent = Agent::spawn(
        &ca_relay.args(
            echo_port,
            &[
                "--ca-cert",
                &ca_pem,
                "--server-name",
                "relay.elsewhere.example",
            ],
        ),
        &wrong.token,
    )?;
    let status = agent.wait_exit(Duration::from_secs(30))?;
    refused_with(status, &agent.output(), "not valid for name")?;

    let right = relay.create(&["ssh"], None)?;
    let agent = Agent::spawn(
        &ca_relay.args(
            echo_port,
            &["--ca-cert", &ca_pem, "--server-name", "localhost"],
        ),
        &right.token,
    )?;
    agent
        .wait_registered()
        .context("the certificate names `localhost`: --server-name localhost must be accepted")?;
    ensure!(echo::roundtrip(right.port("ssh"), b"by name")? == b"by name");
    Ok(())
}

/// README: "Without `--pin-sha256` or `--ca-cert` the agent verifies the relay against the
/// system's root certificates. There is no way to skip verification." The system roots are
/// read with `rustls-native-certs`, which takes `SSL_CERT_FILE` when it is set: a bundle
/// holding the test CA (next to another CA) makes the relay trusted; with the platform's
/// default bundle, which does not hold it, the relay is refused as of an unknown issuer.
#[test]
fn without_trust_flags_the_system_roots_decide_and_ssl_cert_file_is_honoured() -> anyhow::Result<()>
{
    let ca_relay = CaRelay::start()?;
    let relay = &ca_relay.relay;
    let echo_port = echo::start()?;
    let bundle = ca_relay.dir.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        format!(
            "{}{}",
            std::fs::read_to_string(&ca_relay.other.pem)?,
            std::fs::read_to_string(&ca_relay.ca.pem)?
        ),
    )?;
    let args = ca_relay.args(echo_port, &[]);

    let trusted = relay.create(&["ssh"], None)?;
    let agent: Launched = system_roots_agent(&args, &trusted.token, Some(&bundle)).start()?;
    agent
        .wait_registered()
        .context("SSL_CERT_FILE names a bundle with the relay's CA: the agent must register")?;
    relay.wait_state(&trusted.id, "active", Duration::from_secs(20))?;
    ensure!(echo::roundtrip(trusted.port("ssh"), b"system roots")? == b"system roots");

    let untrusted = relay.create(&["ssh"], None)?;
    let mut agent = system_roots_agent(&args, &untrusted.token, None).start()?;
    let status = agent.wait_exit(Duration::from_secs(30))?;
    let output = agent.output();
    ensure!(
        !output.contains("no system root certificates"),
        "this machine has no system root certificates (install the `ca-certificates` \
         package); agent output:\n{output}"
    );
    refused_with(status, &output, "UnknownIssuer")?;
    ensure!(relay.state(&untrusted.id)? == "pending");
    Ok(())
}

/// README: "Exit status: 0 when the session ended (revoked, deadline) or on SIGTERM". A live
/// session's agent gets SIGTERM: it exits 0 and closes its link, so the relay marks the
/// session `disconnected` long before it could have noticed a silent link (heartbeats every
/// 30 s here: a dead link takes 90 s to notice).
#[test]
fn sigterm_ends_a_live_agent_with_status_zero_and_the_relay_sees_the_link_end() -> anyhow::Result<()>
{
    let relay = TestRelay::start_with(|c| c.heartbeat_interval = Duration::from_secs(30))?;
    let Tunnel {
        session, mut agent, ..
    } = Tunnel::start(&relay)?;
    relay.wait_state(&session.id, "active", Duration::from_secs(20))?;
    ensure!(echo::roundtrip(session.port("ssh"), b"before")? == b"before");

    let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.pid())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let status = agent.wait_exit(Duration::from_secs(30))?;
    ensure!(
        status.code() == Some(0),
        "SIGTERM must end the agent with exit status 0, got {status}; output:\n{}",
        agent.output()
    );
    ensure!(
        agent.output().contains("porthole-agent: stopped"),
        "the agent should say it stopped; output:\n{}",
        agent.output()
    );
    relay
        .wait_state(&session.id, "disconnected", Duration::from_secs(20))
        .context("the relay must see the agent's link end when the agent stops")?;
    Ok(())
}

/// README: the agent "joins with the join token (from the environment, so it stays out of
/// `ps` and build logs)". The running agent's `/proc/PID/cmdline` — what `ps` shows — does
/// not hold the token, while its environment does (the test gave it there).
#[test]
fn the_join_token_from_the_environment_is_not_on_the_agents_command_line() -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let tunnel = Tunnel::start(&relay)?;
    let pid = tunnel.agent.pid();
    let token = &tunnel.session.token;
    let cmdline =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline"))?).replace('\0', " ");
    ensure!(
        cmdline.contains("--relay") && cmdline.contains("--service"),
        "/proc/{pid}/cmdline is not the agent's: {cmdline}"
    );
    ensure!(
        !cmdline.contains(token.as_str()),
        "the join token is on the agent's command line: {cmdline}"
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    ensure!(
        String::from_utf8_lossy(&environ).contains(&format!("PORTHOLE_TOKEN={token}")),
        "the test should have given the token in PORTHOLE_TOKEN"
    );
    Ok(())
}

/// `docs/ci.md`: "a `--token` given anyway is moved to the background agent's environment,
/// never its command line". `--detach --token REAL` with a decoy in `PORTHOLE_TOKEN`: the
/// background agent registers (so the real token reached it, in its environment) and its
/// command line holds no token.
#[test]
fn a_token_flag_given_to_detach_is_kept_off_the_background_agents_command_line(
) -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let echo_port = echo::start()?;
    let session = relay.create(&["ssh"], None)?;
    let decoy = "phj_decoy_not_a_token";
    let agent = Detached::start(
        &relay.agent_addr(),
        &relay.pin(),
        decoy,
        &[format!("ssh=127.0.0.1:{echo_port}")],
        &["--token", &session.token],
    )?;
    ensure!(
        agent.started.status.success(),
        "--detach --token must register:\n{}",
        agent.output()
    );
    relay.wait_state(&session.id, "active", Duration::from_secs(20))?;
    let pid = agent.pid()?;
    let cmdline =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline"))?).replace('\0', " ");
    ensure!(
        cmdline.contains("--detached-child"),
        "pid {pid} is not the background agent: {cmdline}"
    );
    ensure!(
        !cmdline.contains(&session.token),
        "the join token is on the background agent's command line: {cmdline}"
    );
    ensure!(
        !cmdline.contains("--token"),
        "the --token flag reached the background agent's command line: {cmdline}"
    );
    ensure!(echo::roundtrip(session.port("ssh"), b"detached")? == b"detached");
    Ok(())
}

/// `cat /proc/PID/environ` run as `user` (None: as this process's user).
fn read_environ_as(
    user: Option<(u32, u32)>,
    pid: u32,
) -> anyhow::Result<common::peers::tools::Finished> {
    common::peers::tools::run_with_timeout(
        command_as(user, "cat").arg(format!("/proc/{pid}/environ")),
        Duration::from_secs(20),
    )
}

/// README (embedded SSH): "the agent also makes itself non-dumpable, so a non-root user's
/// shell cannot read its memory or `/proc/PID/environ`, and the join token there is spent
/// once the session is registered". Two agents of one unprivileged user (`nobody` when the
/// tests run as root): a process of that user reads the environment of the one forwarding
/// to a local sshd (so the check can see it) but not of the one serving embedded SSH; and
/// the join token in that environment no longer joins anything.
#[test]
fn an_embedded_ssh_agents_environment_is_unreadable_to_its_user_and_its_token_is_spent(
) -> anyhow::Result<()> {
    let relay = TestRelay::start()?;
    let echo_port = echo::start()?;
    let user = is_root().then_some(NOBODY);
    let start = |token: &str, service: &[&str]| -> anyhow::Result<Launched> {
        let mut args = vec!["--relay".to_owned(), relay.agent_addr()];
        args.extend(["--pin-sha256".to_owned(), relay.pin()]);
        args.extend(service.iter().map(|s| (*s).to_owned()));
        let mut launch = Launch::new(&args).env("PORTHOLE_TOKEN", token);
        if let Some((uid, gid)) = user {
            launch = launch.user(uid, gid);
        }
        let agent = launch.start()?;
        agent.wait_registered()?;
        Ok(agent)
    };

    let dialed = relay.create(&["ssh"], None)?;
    let service = format!("ssh=127.0.0.1:{echo_port}");
    let plain = start(&dialed.token, &["--service", &service])?;
    let read = read_environ_as(user, plain.pid())?;
    ensure!(
        read.status.success() && read.stdout_text().contains("PORTHOLE_TOKEN="),
        "a process of the agent's user ({user:?}) should read the environment of an agent \
         without embedded SSH (else this test proves nothing): {} {}",
        read.status,
        read.stderr
    );

    let embedded = relay.create(&["ssh"], None)?;
    let agent = start(&embedded.token, &["--embedded-ssh"])?;
    let read = read_environ_as(user, agent.pid())?;
    ensure!(
        !read.status.success(),
        "a process of the agent's user read /proc/{}/environ of the embedded-SSH agent \
         ({} bytes, the join token {}in them)",
        agent.pid(),
        read.stdout.len(),
        if read.stdout_text().contains(&embedded.token) {
            ""
        } else {
            "not "
        }
    );
    ensure!(
        !read.stdout_text().contains(&embedded.token),
        "the join token leaked through /proc/PID/environ"
    );

    // The token is spent: once the agent's first frame confirmed its registration, a
    // `hello` with it is refused as used (before that, as busy: the agent holds the link).
    let addr = relay.agent_addr();
    let pin = relay.pin();
    let answer = wait_for(
        "an answer to a hello with the registered agent's token other than session_busy",
        Duration::from_secs(30),
        || {
            let (_, answer) = relay
                .rt
                .block_on(raw::hello(&addr, &pin, join(&embedded.token)))
                .ok()?;
            let busy = matches!(
                answer,
                Message::Error {
                    code: ErrorCode::SessionBusy,
                    ..
                }
            );
            (!busy).then_some(answer)
        },
    )?;
    ensure!(
        matches!(
            answer,
            Message::Error {
                code: ErrorCode::TokenUsed,
                ..
            }
        ),
        "the join token in the agent's environment must be spent once it registered: {answer:?}"
    );
    ensure!(
        relay.state(&embedded.id)? == "active",
        "the intruder's hello must not disturb the session"
    );
    drop(agent);
    drop(plain);
    Ok(())
}
