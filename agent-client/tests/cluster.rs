//! Cluster mode on a real etcd (Debian's `etcd-server`): relay nodes on 127.0.0.1,
//! 127.0.0.2 and 127.0.0.3 share sessions, ports and files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::cluster::{flags, run_expecting_failure, setups, start_nodes};
use common::fixture::Tunnel;
use common::peers::etcd::Etcd;
use common::peers::sshd::Sshd;
use common::peers::tools::{run_with_input, run_with_timeout};
use common::wait_for;
use serde_json::json;

#[test]
fn nodes_must_share_files_and_have_their_own_names() -> anyhow::Result<()> {
    let etcd = Etcd::start()?;
    let s = setups(3)?;
    let _first = start_nodes(&s[..1], &etcd.client_url, &[])?;

    // Node 2 with a data dir of its own: its admin token (and the rest) differ.
    let (status, out) = run_expecting_failure(&s[1], &flags(&s[1], &etcd.client_url, "n2", &[]))?;
    ensure!(
        !status.success(),
        "a node with other files must not start: {out}"
    );
    ensure!(
        out.contains("differs from the cluster's") && out.contains("cluster.secret"),
        "the refusal names the file: {out}"
    );

    // Node 3 with the shared files but node 1's name: refused once the wait for an
    // earlier run's lease is over.
    common::cluster::copy_shared(s[0].data.path(), s[2].data.path())?;
    let (status, out) = run_expecting_failure(&s[2], &flags(&s[2], &etcd.client_url, "n1", &[]))?;
    ensure!(
        !status.success(),
        "a second node named n1 must not start: {out}"
    );
    ensure!(out.contains("in use by a live node"), "{out}");

    // With its own name it joins.
    common::cluster::start_node(&s[2], &etcd.client_url, 2, &[])
        .context("node 3 with the shared files and its own name")?;
    Ok(())
}

#[test]
fn an_unreachable_etcd_stops_the_start_with_a_clear_error() -> anyhow::Result<()> {
    let s = setups(1)?;
    let (_hold, port) = common::relay_process::refusing_port()?;
    let etcd = format!("http://127.0.0.1:{port}");
    let (status, out) = run_expecting_failure(&s[0], &flags(&s[0], &etcd, "n1", &[]))?;
    ensure!(!status.success());
    ensure!(out.contains("cannot reach etcd at"), "{out}");
    Ok(())
}

#[test]
fn sessions_created_concurrently_on_three_nodes_never_share_a_port() -> anyhow::Result<()> {
    let etcd = Etcd::start()?;
    let mut s = setups(3)?;
    // 200 sessions in a range of 400 ports: nodes often pick the same free port at once.
    let base = 30000 + (rand::random::<u16>() % 60) * 400;
    for setup in &mut s {
        setup.range = format!("{base}-{}", base + 399);
    }
    let nodes = start_nodes(&s, &etcd.client_url, &[])?;
    let http = s[0].http()?;
    let ports = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for t in 0..12 {
            let (http, nodes, ports) = (&http, &nodes, &ports);
            scope.spawn(move || {
                for i in 0..200 / 12 + usize::from(t < 200 % 12) {
                    let node = &nodes[(t + i) % 3];
                    let answer = http
                        .post(format!("{}/v1/sessions", node.api))
                        .json(&json!({"build_id": "b", "app_id": "a", "services": ["ssh"]}))
                        .send()
                        .and_then(|r| r.error_for_status())
                        .and_then(|r| r.json::<serde_json::Value>())
                        .map(|v| v["endpoints"][0]["port"].as_u64().unwrap_or(0))
                        .map_err(|e| format!("create through {}: {e}", node.api));
                    ports.lock().unwrap().push(answer);
                }
            });
        }
    });
    let ports = ports
        .into_inner()
        .unwrap()
        .into_iter()
        .collect::<Result<Vec<u64>, String>>()
        .map_err(anyhow::Error::msg)?;
    ensure!(ports.len() == 200, "{} sessions created", ports.len());
    let distinct: HashSet<_> = ports.iter().collect();
    ensure!(distinct.len() == 200, "a port was given twice: {ports:?}");
    // Every node knows every session, with the same ports.
    for (i, node) in nodes.iter().enumerate() {
        let listed = wait_for(
            &format!("node {} to list the 200 sessions", i + 1),
            Duration::from_secs(20),
            || {
                let v: serde_json::Value = http
                    .get(format!("{}/v1/sessions", node.api))
                    .send()
                    .ok()?
                    .json()
                    .ok()?;
                let all = v["sessions"].as_array()?.clone();
                (all.len() == 200).then_some(all)
            },
        )?;
        let theirs: HashSet<u64> = listed
            .iter()
            .filter_map(|v| v["endpoints"][0]["port"].as_u64())
            .collect();
        ensure!(
            theirs == distinct.iter().map(|p| **p).collect(),
            "node {} lists other ports",
            i + 1
        );
    }
    Ok(())
}

/// Whether `ip:port` refuses connections.
fn refuses(ip: std::net::Ipv4Addr, port: u16) -> bool {
    matches!(
        std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(2)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

#[test]
fn every_node_serves_every_session_and_a_delete_anywhere_closes_it_everywhere() -> anyhow::Result<()>
{
    let sshd = Sshd::start()?;
    let etcd = Etcd::start()?;
    let s = setups(3)?;
    let nodes = start_nodes(&s, &etcd.client_url, &["--revoked-retention", "2s"])?;
    let ips: Vec<_> = s.iter().map(|setup| setup.ip).collect();
    // Created through node 1, the agent dials node 2.
    let tunnel = Tunnel::builder()
        .forward("ssh", sshd.port)
        .via(&format!("{}:{}", ips[1], s[1].agent_port))
        .start_process(&s[0], &nodes[0])?;
    let (id, port) = (tunnel.session.id.clone(), tunnel.session.port("ssh"));
    let http = s[0].http()?;
    for (i, node) in nodes.iter().enumerate() {
        let seen = wait_for(
            &format!("node {} to show the session active", i + 1),
            Duration::from_secs(10),
            || {
                node.session(&http, &id)
                    .ok()
                    .filter(|v| v["state"] == "active")
            },
        )?;
        ensure!(
            seen["endpoints"][0]["port"] == port,
            "node {}: {seen}",
            i + 1
        );
        // Every node binds the session's port on its own address.
        ensure!(
            !refuses(ips[i], port),
            "node {} does not listen on {port}",
            i + 1
        );
    }
    // The owner (node 2, holding the agent's link) forwards SSH.
    let ok = run_with_timeout(
        sshd.ssh(&ips[1].to_string(), port)
            .arg("echo through the owner"),
        Duration::from_secs(30),
    )?;
    ensure!(ok.status.success(), "ssh through the owner: {}", ok.stderr);
    ensure!(
        ok.stdout_text() == "through the owner\n",
        "{:?}",
        ok.stdout_text()
    );

    // A live ssh through node 1 (not the owner), then DELETE through node 3: every node
    // closes the port, the live ssh is cut, the agent hears it and exits 0.
    let mut live = sshd
        .ssh(&ips[0].to_string(), port)
        .arg("sleep 120")
        .spawn()?;
    wait_for("the live ssh to log in", Duration::from_secs(30), || {
        let metrics = reqwest::blocking::get(format!("{}/metrics", nodes[0].api))
            .ok()?
            .text()
            .ok()?;
        metrics
            .lines()
            .any(|l| l.starts_with("porthole_visitor_connections_active") && !l.ends_with(" 0"))
            .then_some(())
    })?;
    let deleted = std::time::Instant::now();
    http.delete(format!("{}/v1/sessions/{id}", nodes[2].api))
        .send()?
        .error_for_status()?;
    let mut closed_after = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        wait_for(
            &format!("node {}'s port {port} to close", i + 1),
            Duration::from_secs(10),
            || refuses(*ip, port).then_some(()),
        )?;
        closed_after.push(deleted.elapsed());
    }
    eprintln!("DELETE through node 3 -> port closed on nodes 1, 2, 3 after {closed_after:?}");
    let cut = wait_for(
        "the live ssh through node 1 to be cut",
        Duration::from_secs(20),
        || live.try_wait().ok().flatten(),
    )?;
    ensure!(
        !cut.success(),
        "the ssh through node 1 ended by itself? {cut}"
    );
    let mut agent = tunnel.agent;
    let status = agent.wait_exit(Duration::from_secs(20))?;
    ensure!(
        status.success(),
        "the agent exits 0 when its session is deleted: {status}"
    );
    for node in &nodes {
        let v = node.session(&http, &id)?;
        ensure!(v["state"] == "revoked", "{v}");
    }
    // After the retention, every node forgets it and one of them removes it from etcd.
    for (i, node) in nodes.iter().enumerate() {
        wait_for(
            &format!("node {} to forget the session", i + 1),
            Duration::from_secs(20),
            || {
                let answer = http
                    .get(format!("{}/v1/sessions/{id}", node.api))
                    .send()
                    .ok()?;
                (answer.status() == reqwest::StatusCode::NOT_FOUND).then_some(())
            },
        )?;
    }
    wait_for(
        "the session's keys to leave etcd",
        Duration::from_secs(20),
        || {
            let keys = etcd_keys(&etcd.client_url, "/porthole/").ok()?;
            keys.iter()
                .all(|k| !k.starts_with("/porthole/sessions/") && !k.starts_with("/porthole/join/"))
                .then_some(())
        },
    )?;
    Ok(())
}

/// The keys under `prefix` in etcd, read through its JSON gateway (`/v3/kv/range`).
fn etcd_keys(etcd: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let answer: serde_json::Value = reqwest::blocking::Client::new()
        .post(format!("{etcd}/v3/kv/range"))
        .json(&json!({"key": b64.encode(prefix), "range_end": b64.encode(&end), "keys_only": true}))
        .send()?
        .error_for_status()?
        .json()?;
    let kvs = answer["kvs"].as_array().cloned().unwrap_or_default();
    kvs.iter()
        .map(|kv| {
            let key = b64.decode(kv["key"].as_str().unwrap_or_default())?;
            Ok(String::from_utf8_lossy(&key).into_owned())
        })
        .collect()
}

#[test]
fn killing_the_owning_node_moves_the_session_to_another_node() -> anyhow::Result<()> {
    let sshd = Sshd::start()?;
    let etcd = Etcd::start()?;
    let s = setups(3)?;
    let mut nodes = start_nodes(&s, &etcd.client_url, &[])?;
    let ips: Vec<_> = s.iter().map(|setup| setup.ip).collect();
    let agent_at = |i: usize| format!("{}:{}", ips[i], s[i].agent_port);
    // The agent knows nodes 2, 3 and 1, in that order: it joins node 2.
    let relays = format!("{},{},{}", agent_at(1), agent_at(2), agent_at(0));
    let tunnel = Tunnel::builder()
        .forward("ssh", sshd.port)
        .via(&relays)
        .start_process(&s[0], &nodes[0])?;
    let (id, port) = (tunnel.session.id.clone(), tunnel.session.port("ssh"));
    let http = s[0].http()?;
    let before = wait_for(
        "node 1 to see the session active",
        Duration::from_secs(10),
        || {
            nodes[0]
                .session(&http, &id)
                .ok()
                .filter(|v| v["state"] == "active")
        },
    )?;
    let ssh = |i: usize, what: &str| {
        run_with_timeout(
            sshd.ssh(&ips[i].to_string(), port)
                .arg(format!("echo {what}")),
            Duration::from_secs(30),
        )
    };
    let ok = ssh(1, "before")?;
    ensure!(ok.status.success(), "ssh through node 2: {}", ok.stderr);

    // A second session, whose agent is on node 3: the kill must not touch it.
    let other = Tunnel::builder()
        .forward("ssh", sshd.port)
        .via(&agent_at(2))
        .start_process(&s[0], &nodes[0])?;

    // kill -9 the owner (node 2).
    let killed = std::time::Instant::now();
    nodes[1].kill9()?;
    tunnel
        .agent
        .wait_line("resumed session", Duration::from_secs(60))
        .context("the agent resumes on another node")?;
    let resumed_after = killed.elapsed();
    // The same port on a surviving node's address logs in again.
    let works = wait_for("ssh through node 3 again", Duration::from_secs(30), || {
        ssh(2, "after").ok().filter(|o| o.status.success())
    })?;
    ensure!(
        works.stdout_text() == "after\n",
        "{:?}",
        works.stdout_text()
    );
    let ssh_after = killed.elapsed();
    eprintln!("kill -9 of the owner -> agent resumed after {resumed_after:?}, ssh works again after {ssh_after:?}");
    let ok = ssh(0, "through node 1")?;
    ensure!(
        ok.status.success(),
        "ssh through node 1 after the move: {}",
        ok.stderr
    );

    // Deadlines unchanged; the session is active again on the surviving nodes.
    for i in [0, 2] {
        let after = nodes[i].session(&http, &id)?;
        ensure!(after["state"] == "active", "node {}: {after}", i + 1);
        for field in ["deadline", "expires_at", "created_at", "endpoints"] {
            ensure!(
                after[field] == before[field],
                "{field} changed: {} vs {}",
                after[field],
                before[field]
            );
        }
    }
    // Nothing else was revoked: the other session stayed with node 3, untouched.
    let v = nodes[0].session(&http, &other.session.id)?;
    ensure!(v["state"] == "active", "the other session: {v}");
    ensure!(
        other
            .agent
            .output()
            .lines()
            .all(|l| !l.contains("resumed session")),
        "the other session's agent never had to resume"
    );
    // The new owner (node 3, or node 1 if node 3 answered `session_busy` while node 2's
    // lease was still alive) wrote down the move, once.
    let rehomed: Vec<String> = [&s[0], &s[2]]
        .iter()
        .flat_map(|setup| audit_lines(setup, &id, "session_rehomed"))
        .collect();
    ensure!(
        rehomed.len() == 1 && rehomed[0].contains("\"from_node\":\"n2\""),
        "one session_rehomed from n2 on a surviving node: {rehomed:?}"
    );
    Ok(())
}

#[test]
fn a_node_without_the_agent_carries_16_mib_each_way_and_serves_instructions_that_log_in(
) -> anyhow::Result<()> {
    use common::peers::sshd::{password_ssh, password_user, SshdOptions};
    let user = password_user()?;
    let sshd = Sshd::start_with(SshdOptions {
        password_auth: true,
        user: Some(user.name.clone()),
    })?;
    let etcd = Etcd::start()?;
    let s = setups(3)?;
    let nodes = start_nodes(&s, &etcd.client_url, &[])?;
    let ips: Vec<_> = s.iter().map(|setup| setup.ip).collect();
    let dir = tempfile::tempdir()?;
    let password_file =
        common::secrets::write_secret_file(dir.path(), "ssh-password", &user.password)?;
    // Created through node 1, the agent holds its link with node 2.
    let tunnel = Tunnel::builder()
        .forward("ssh", sshd.port)
        .via(&format!("{}:{}", ips[1], s[1].agent_port))
        .args([
            "--ssh-user".to_owned(),
            user.name.clone(),
            "--ssh-password-file".to_owned(),
            password_file.display().to_string(),
            "--ssh-host-key-file".to_owned(),
            sshd.host_public_key_file().display().to_string(),
        ])
        .start_process(&s[0], &nodes[0])?;
    let (id, port) = (tunnel.session.id.clone(), tunnel.session.port("ssh"));
    let http = s[0].http()?;
    wait_for(
        "node 3 to see the session active",
        Duration::from_secs(10),
        || {
            nodes[2]
                .session(&http, &id)
                .ok()
                .filter(|v| v["state"] == "active")
        },
    )?;

    // Instructions through node 3, which fetches the login details from node 2.
    let minted = std::process::Command::new(common::relay_process::binary()?)
        .args([
            "mint-user-token",
            "--sub",
            "u-dev",
            "--app-id",
            "a",
            "--role",
            "developer",
        ])
        .arg("--data-dir")
        .arg(s[0].data.path())
        .output()?;
    ensure!(
        minted.status.success(),
        "mint-user-token: {}",
        String::from_utf8_lossy(&minted.stderr)
    );
    let token = String::from_utf8(minted.stdout)?
        .lines()
        .last()
        .context("token")?
        .to_owned();
    let answer: serde_json::Value = reqwest::blocking::Client::new()
        .get(format!("{}/v1/sessions/{id}/instructions", nodes[2].api))
        .bearer_auth(&token)
        .send()?
        .error_for_status()?
        .json()?;
    let ssh = &answer["ssh"];
    let host = ssh["host"].as_str().context("ssh.host")?;
    let password = ssh["password"].as_str().context("ssh.password")?;
    let known_hosts = ssh["known_hosts"].as_str().context("ssh.known_hosts")?;
    ensure!(
        password == user.password,
        "the password came from the owner: {ssh}"
    );
    let known_hosts_file = dir.path().join("known_hosts");
    std::fs::write(&known_hosts_file, format!("{known_hosts}\n"))?;
    // The public host (node 1's address here, standing in for the load balancer's name)
    // does not hold the agent either: strict host key checking with the returned line.
    let out = run_with_timeout(
        password_ssh(host, port, &user.name, password, &known_hosts_file)?.arg("echo ok"),
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success(),
        "ssh with the instructions: {}",
        out.stderr
    );
    ensure!(out.stdout_text() == "ok\n", "{:?}", out.stdout_text());

    // 16 MiB each way through node 3 (not the owner), intact.
    let upload = dir.path().join("up.bin");
    let sent = common::peers::write_random_file(&upload, 16 << 20)?;
    // Written by the test's SSH user, who cannot write into this test's own directory.
    let remote = std::path::PathBuf::from(format!(
        "/tmp/porthole-cluster-{}.bin",
        rand::random::<u64>()
    ));
    let node3 = ips[2].to_string();
    let up = run_with_input(
        password_ssh(&node3, port, &user.name, password, &known_hosts_file)?
            .args(["-o", &format!("HostKeyAlias=[{host}]:{port}")])
            .arg(format!("cat > {}", remote.display())),
        &std::fs::read(&upload)?,
        Duration::from_secs(120),
    )?;
    ensure!(up.status.success(), "upload through node 3: {}", up.stderr);
    ensure!(
        common::peers::sha256_file(&remote)? == sent,
        "the upload arrived changed"
    );
    let down = run_with_timeout(
        password_ssh(&node3, port, &user.name, password, &known_hosts_file)?
            .args(["-o", &format!("HostKeyAlias=[{host}]:{port}")])
            .arg(format!("cat {}", remote.display())),
        Duration::from_secs(120),
    )?;
    ensure!(
        down.status.success(),
        "download through node 3: {}",
        down.stderr
    );
    ensure!(
        down.stdout.len() == 16 << 20,
        "{} bytes came back",
        down.stdout.len()
    );
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    sha2::Digest::update(&mut hasher, &down.stdout);
    let _ = std::fs::remove_file(&remote);
    ensure!(
        hex::encode(sha2::Digest::finalize(hasher)) == sent,
        "the download arrived changed"
    );
    // Those visitors were paired through another node.
    let metrics = reqwest::blocking::get(format!("{}/metrics", nodes[2].api))?.text()?;
    ensure!(
        metrics.lines().any(
            |l| l.starts_with("porthole_visitor_pairings_total{how=\"remote\"}")
                && !l.ends_with(" 0")
        ),
        "node 3 counts remote pairings:\n{metrics}"
    );
    Ok(())
}

/// The last lines of node `i`'s log (for failure messages).
fn node_log(setup: &common::relay_process::RelaySetup, i: usize) -> String {
    let text = std::fs::read_to_string(setup.data.path().join(format!("node-{i}.log")))
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The audit lines of node `setup` that mention `id` and `event`.
fn audit_lines(setup: &common::relay_process::RelaySetup, id: &str, event: &str) -> Vec<String> {
    std::fs::read_to_string(setup.data.path().join("audit.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(id) && l.contains(event))
        .map(str::to_owned)
        .collect()
}

#[test]
fn finish_through_another_node_starts_the_grace_and_the_owner_decides_the_end() -> anyhow::Result<()>
{
    let sshd = Sshd::start()?;
    let etcd = Etcd::start()?;
    let s = setups(3)?;
    let nodes = start_nodes(&s, &etcd.client_url, &[])?;
    let ips: Vec<_> = s.iter().map(|setup| setup.ip).collect();
    let tunnel = Tunnel::builder()
        .forward("ssh", sshd.port)
        .session_fields(json!({"grace_secs": 2}))
        .via(&format!("{}:{}", ips[1], s[1].agent_port))
        .start_process(&s[0], &nodes[0])?;
    let (id, port) = (tunnel.session.id.clone(), tunnel.session.port("ssh"));
    let http = s[0].http()?;
    wait_for(
        "node 1 to see the session active",
        Duration::from_secs(10),
        || {
            nodes[0]
                .session(&http, &id)
                .ok()
                .filter(|v| v["state"] == "active")
        },
    )?;
    // A live ssh through node 3 (not the owner) until the end.
    let mut live = sshd
        .ssh(&ips[2].to_string(), port)
        .arg("echo in; sleep 120")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    wait_for("the live ssh to log in", Duration::from_secs(30), || {
        let metrics = reqwest::blocking::get(format!("{}/metrics", nodes[2].api))
            .ok()?
            .text()
            .ok()?;
        metrics
            .lines()
            .any(|l| l.starts_with("porthole_visitor_connections_active") && !l.ends_with(" 0"))
            .then_some(())
    })?;
    // Finish through node 1: the agent (on node 2) hears its deadline.
    let finished: serde_json::Value = http
        .post(format!("{}/v1/sessions/{id}/finish", nodes[0].api))
        .send()?
        .error_for_status()?
        .json()?;
    ensure!(finished["state"] == "finishing", "{finished}");
    tunnel
        .agent
        .wait_line(
            "build finished; remote access ends at",
            Duration::from_secs(10),
        )
        .context("the agent (on node 2) hears the deadline of a finish taken by node 1")?;
    // After the grace, every node closes the port, the live ssh is cut, the agent exits 0.
    for (i, ip) in ips.iter().enumerate() {
        wait_for(
            &format!("node {}'s port to close", i + 1),
            Duration::from_secs(30),
            || refuses(*ip, port).then_some(()),
        )?;
    }
    let cut = wait_for("the live ssh to be cut", Duration::from_secs(20), || {
        live.try_wait().ok().flatten()
    })?;
    ensure!(
        !cut.success(),
        "the ssh through node 3 ended by itself? {cut}"
    );
    let mut agent = tunnel.agent;
    ensure!(
        agent.wait_exit(Duration::from_secs(20))?.success(),
        "the agent exits 0"
    );
    // Decided once, by the owner: one revocation line, in node 2's audit log only.
    let revoked: Vec<_> = s
        .iter()
        .map(|setup| audit_lines(setup, &id, "session_revoked"))
        .collect();
    ensure!(
        revoked[1].len() == 1
            && revoked[1][0].contains("grace_ended")
            && revoked[0].is_empty()
            && revoked[2].is_empty(),
        "revocation lines per node: {revoked:?}"
    );
    let finished_by: Vec<_> = s
        .iter()
        .map(|setup| audit_lines(setup, &id, "session_finished"))
        .collect();
    ensure!(
        finished_by[0].len() == 1 && finished_by[1].is_empty() && finished_by[2].is_empty(),
        "the finish is recorded by the node that took it: {finished_by:?}"
    );
    Ok(())
}

#[test]
fn two_nodes_racing_to_take_one_agent_have_exactly_one_winner() -> anyhow::Result<()> {
    use common::raw;
    use porthole_protocol::message::HelloAuth;
    use porthole_protocol::{Message, Secret};
    let etcd = Etcd::start()?;
    let s = setups(2)?;
    let nodes = start_nodes(&s, &etcd.client_url, &[])?;
    let rt = tokio::runtime::Runtime::new()?;
    for round in 0..5 {
        let (id, token, _) = s[0].create_session(&nodes[0].api, json!({}))?;
        let http = s[0].http()?;
        wait_for(
            "node 2 to know the session",
            Duration::from_secs(10),
            || nodes[1].session(&http, &id).ok(),
        )?;
        let answers = rt.block_on(async {
            let hello = |i: usize| {
                let addr = format!("{}:{}", s[i].ip, s[i].agent_port);
                let (pin, token) = (nodes[i].pin.clone(), token.clone());
                async move {
                    let auth = HelloAuth::Join {
                        token: Secret::new(token),
                    };
                    raw::hello(&addr, &pin, auth).await
                }
            };
            tokio::join!(hello(0), hello(1))
        });
        let (a, b) = (answers.0?, answers.1?);
        let won = [&a.1, &b.1]
            .iter()
            .filter(|m| matches!(m, Message::Registered { .. }))
            .count();
        ensure!(won == 1, "round {round}: {:?} / {:?}", a.1, b.1);
        drop((a, b));
    }
    Ok(())
}

/// `POST /v1/sessions` through `api`: the status and the body.
fn try_create(
    http: &reqwest::blocking::Client,
    api: &str,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let answer = http
        .post(format!("{api}/v1/sessions"))
        .json(&json!({"build_id": "b", "app_id": "a", "services": ["ssh"]}))
        .send()?;
    let status = answer.status().as_u16();
    Ok((status, answer.json().unwrap_or_default()))
}

#[test]
fn an_etcd_outage_keeps_live_sessions_forwarding_and_writes_answer_503() -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let sshd = Sshd::start()?;
    let mut etcd = Etcd::start()?;
    let s = setups(2)?;
    let nodes = start_nodes(&s, &etcd.client_url, &[])?;
    let ips: Vec<_> = s.iter().map(|setup| setup.ip).collect();
    let tunnel = Tunnel::builder()
        .forward("ssh", sshd.port)
        .via(&format!("{}:{}", ips[1], s[1].agent_port))
        .start_process(&s[0], &nodes[0])?;
    let (id, port) = (tunnel.session.id.clone(), tunnel.session.port("ssh"));
    let http = s[0].http()?;
    wait_for(
        "node 1 to see the session active",
        Duration::from_secs(10),
        || {
            nodes[0]
                .session(&http, &id)
                .ok()
                .filter(|v| v["state"] == "active")
        },
    )?;
    // A live ssh through node 1 (not the owner) ticking for about 16 s.
    let mut live = sshd
        .ssh(&ips[0].to_string(), port)
        .arg("for i in $(seq 1 32); do echo tick $i; sleep 0.5; done")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut lines = std::io::BufReader::new(live.stdout.take().context("stdout")?);
    // Live means logged in and ticking before etcd goes (a login racing the stop is a new
    // visitor, checked below once the outage is seen).
    let mut first = String::new();
    lines.read_line(&mut first)?;
    ensure!(first == "tick 1\n", "the live ssh's first line: {first:?}");
    let ticks = std::thread::spawn(move || {
        let mut all = vec![first.trim_end().to_owned()];
        all.extend(lines.lines().map_while(Result::ok));
        all
    });

    etcd.stop();
    let stopped = std::time::Instant::now();
    let started = std::time::Instant::now();
    let (status, body) = try_create(&http, &nodes[0].api)?;
    let answered_in = started.elapsed();
    ensure!(status == 503, "a create during the outage: {status} {body}");
    ensure!(body["error"] == "store_unavailable", "{body}");
    ensure!(
        body["message"].as_str().is_some_and(|m| m.contains("etcd")),
        "the message says etcd is the trouble: {body}"
    );
    let (status, body) = {
        let answer = http
            .delete(format!("{}/v1/sessions/{id}", nodes[1].api))
            .send()?;
        (answer.status().as_u16(), answer.text()?)
    };
    ensure!(
        status == 503,
        "a DELETE during the outage must not half-happen: {status} {body}"
    );
    let ready = wait_for(
        "/readyz to say etcd is unreachable",
        Duration::from_secs(15),
        || {
            let answer = reqwest::blocking::get(format!("{}/readyz", nodes[0].api)).ok()?;
            let text = answer.text().ok()?;
            text.contains("etcd unreachable").then_some(text)
        },
    )?;
    // New visitors still get in, through the owner and through the other node.
    for (i, ip) in ips.iter().enumerate() {
        let ok = run_with_timeout(
            sshd.ssh(&ip.to_string(), port).arg("echo during"),
            Duration::from_secs(30),
        )?;
        ensure!(
            ok.status.success(),
            "ssh through node {} during the outage: {}",
            i + 1,
            ok.stderr
        );
    }
    std::thread::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed()));
    etcd.restart()?;
    eprintln!(
        "etcd down for {:?}; a create answered 503 in {answered_in:?}; readyz said {ready:?}",
        stopped.elapsed()
    );

    let status = live.wait()?;
    let ticks = ticks.join().map_err(|_| anyhow::anyhow!("tick reader"))?;
    ensure!(
        status.success() && ticks.len() == 32,
        "the live ssh kept working: {status}, {} ticks",
        ticks.len()
    );
    // Afterwards: writes work again, the session is the same everywhere, nothing was lost.
    wait_for("a create to work again", Duration::from_secs(30), || {
        try_create(&http, &nodes[1].api)
            .ok()
            .filter(|(status, _)| *status == 201 || *status == 200)
    })?;
    for node in &nodes {
        let v = wait_for(
            "the session to be active after the outage",
            Duration::from_secs(15),
            || {
                node.session(&http, &id)
                    .ok()
                    .filter(|v| v["state"] == "active")
            },
        )?;
        ensure!(v["endpoints"][0]["port"] == port, "{v}");
    }
    let listed = |node: &common::relay_process::RelayProcess| -> Option<usize> {
        let v: serde_json::Value = http
            .get(format!("{}/v1/sessions", node.api))
            .send()
            .ok()?
            .json()
            .ok()?;
        Some(v["sessions"].as_array()?.len())
    };
    wait_for(
        "both nodes to list the same sessions",
        Duration::from_secs(15),
        || (listed(&nodes[0]) == Some(2) && listed(&nodes[1]) == Some(2)).then_some(()),
    )?;
    Ok(())
}

#[test]
fn a_three_member_etcd_keeps_the_cluster_working_when_a_member_dies() -> anyhow::Result<()> {
    let sshd = Sshd::start()?;
    let mut etcd = common::peers::etcd::EtcdCluster::start(3)?;
    let s = setups(2)?;
    let nodes = start_nodes(&s, &etcd.endpoints(), &[])?;
    let ips: Vec<_> = s.iter().map(|setup| setup.ip).collect();
    etcd.members[0].stop();
    let probe = try_create(&s[0].http()?, &nodes[0].api)?;
    ensure!(probe.0 < 300, "probe create: {probe:?}");
    let tunnel = Tunnel::builder()
        .forward("ssh", sshd.port)
        .via(&format!("{}:{}", ips[1], s[1].agent_port))
        .start_process(&s[0], &nodes[0])
        .with_context(|| {
            format!(
                "a session created and joined with one etcd member down\nnode 1:\n{}\nnode 2:\n{}",
                node_log(&s[0], 1),
                node_log(&s[1], 2)
            )
        })?;
    let (id, port) = (tunnel.session.id.clone(), tunnel.session.port("ssh"));
    for (i, ip) in ips.iter().enumerate() {
        let ok = wait_for(
            &format!("ssh through node {}", i + 1),
            Duration::from_secs(30),
            || {
                run_with_timeout(
                    sshd.ssh(&ip.to_string(), port).arg("echo ok"),
                    Duration::from_secs(30),
                )
                .ok()
                .filter(|o| o.status.success())
            },
        )?;
        ensure!(ok.stdout_text() == "ok\n");
    }
    let http = s[0].http()?;
    http.delete(format!("{}/v1/sessions/{id}", nodes[0].api))
        .send()?
        .error_for_status()?;
    for ip in &ips {
        wait_for(
            "the port to close everywhere",
            Duration::from_secs(10),
            || refuses(*ip, port).then_some(()),
        )?;
    }
    Ok(())
}
