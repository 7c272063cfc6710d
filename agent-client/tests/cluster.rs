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
    let nodes = start_nodes(&s, &etcd.client_url, &[])?;
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

    // DELETE through node 3: every node closes the port; the agent hears it and exits 0.
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
    Ok(())
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
    // The new owner wrote down the move.
    let audit = std::fs::read_to_string(s[2].data.path().join("audit.log"))?;
    ensure!(
        audit
            .lines()
            .any(|l| l.contains("session_rehomed") && l.contains(&id) && l.contains("\"n2\"")),
        "no session_rehomed from n2 in node 3's audit log:\n{audit}"
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
