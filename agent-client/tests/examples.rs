//! The CI examples in `examples/` (GitHub Actions, GitLab CI, Bitrise): every YAML file
//! parses; the shell in them passes `shellcheck` (the Bitrise step's script, the workflow's
//! `run:` blocks as bash, the GitLab job's scripts as POSIX sh); each keeps the tokens out of
//! command lines; and the Bitrise step runs end to end against the real relay binary and a
//! real sshd: it creates the session, starts the agent detached, `ssh` logs in through the
//! relay, and its `finish` returns once the grace period ended.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use common::agent::binary;
use common::peers::sshd::Sshd;
use common::peers::tools::{require, run_with_timeout};
use common::relay_process::RelaySetup;
use common::wait_for;
use serde_yaml::Value;

/// The workspace's `examples/`.
fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new(".."))
        .join("examples")
}

/// Every file under `dir`, recursively (hidden ones too: `.gitlab-ci.yml`).
fn files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(files(&path)?);
        } else {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn read_yaml(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("{} is not valid YAML", path.display()))
}

const GITHUB: &str = "github-actions/remote-access.yml";
const GITLAB: &str = "gitlab-ci/.gitlab-ci.yml";
const BITRISE_STEP: &str = "bitrise/step.yml";
const BITRISE_SCRIPT: &str = "bitrise/step.sh";

#[test]
fn every_yaml_file_parses() -> anyhow::Result<()> {
    let dir = examples_dir();
    let yaml: Vec<PathBuf> = files(&dir)?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect();
    for want in [GITHUB, GITLAB, BITRISE_STEP] {
        ensure!(yaml.contains(&dir.join(want)), "{want} is missing");
    }
    for path in &yaml {
        let doc = read_yaml(path)?;
        ensure!(doc.is_mapping(), "{}: not a mapping", path.display());
    }
    Ok(())
}

/// The GitHub workflow's `run:` blocks, by step name.
fn github_runs() -> anyhow::Result<Vec<(String, String)>> {
    let doc = read_yaml(&examples_dir().join(GITHUB))?;
    let jobs = doc["jobs"].as_mapping().context("jobs")?;
    let mut runs = Vec::new();
    for (job, spec) in jobs {
        let steps = spec["steps"].as_sequence().context("steps")?;
        for (i, step) in steps.iter().enumerate() {
            if let Some(run) = step["run"].as_str() {
                let name = step["name"]
                    .as_str()
                    .map_or_else(|| i.to_string(), str::to_owned);
                runs.push((
                    format!("{}-{name}", job.as_str().unwrap_or("job")),
                    run.to_owned(),
                ));
            }
        }
    }
    Ok(runs)
}

/// The GitLab jobs' `before_script`, `script` and `after_script`, each as one shell script.
fn gitlab_scripts() -> anyhow::Result<Vec<(String, String)>> {
    let doc = read_yaml(&examples_dir().join(GITLAB))?;
    let mut scripts = Vec::new();
    for (job, spec) in doc.as_mapping().context("top level")? {
        for part in ["before_script", "script", "after_script"] {
            let lines = match &spec[part] {
                Value::Sequence(lines) => lines
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("\n"),
                Value::String(text) => text.clone(),
                _ => continue,
            };
            scripts.push((format!("{}-{part}", job.as_str().unwrap_or("job")), lines));
        }
    }
    Ok(scripts)
}

#[test]
fn the_shell_in_the_examples_passes_shellcheck() -> anyhow::Result<()> {
    let shellcheck = require("shellcheck", "shellcheck")?;
    let scratch = tempfile::tempdir()?;
    let mut checked = vec![examples_dir().join(BITRISE_SCRIPT)];
    // GitHub runs `run:` blocks with bash; GitLab's images may only have sh.
    for (shell, scripts) in [("bash", github_runs()?), ("sh", gitlab_scripts()?)] {
        ensure!(!scripts.is_empty(), "no {shell} scripts found");
        for (name, body) in scripts {
            ensure!(
                !body.contains("${{"),
                "{name}: expressions inside a script (pass values through `env:`)"
            );
            let file = scratch
                .path()
                .join(format!("{name}.{shell}").replace([' ', '/'], "_"));
            std::fs::write(&file, format!("#!/bin/{shell}\nset -e\n{body}\n"))?;
            checked.push(file);
        }
    }
    let mut failures = Vec::new();
    for file in &checked {
        let done = run_with_timeout(Command::new(&shellcheck).arg(file), Duration::from_secs(60))?;
        if !done.status.success() {
            let script = std::fs::read_to_string(file).unwrap_or_default();
            failures.push(format!(
                "{}:\n{}\n--- script ---\n{script}",
                file.display(),
                done.stdout_text()
            ));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n\n"));
    Ok(())
}

#[test]
fn the_examples_keep_tokens_out_of_command_lines_and_always_finish() -> anyhow::Result<()> {
    let dir = examples_dir();
    for example in [GITHUB, GITLAB, BITRISE_SCRIPT] {
        let text = std::fs::read_to_string(dir.join(example))?;
        for want in [
            "PORTHOLE_TOKEN=",
            "--detach",
            "finish --wait",
            "curl -fsS --config -",
            "-u PORTHOLE_ADMIN_TOKEN",
        ] {
            let found = text.contains(want)
                // step.sh builds `finish --wait` from an array.
                || (want == "finish --wait" && text.contains("(finish --wait)"));
            ensure!(found, "{example}: `{want}` missing");
        }
        ensure!(
            !text.contains("--token"),
            "{example}: a token as an argument"
        );
        ensure!(
            !text.contains("Bearer $"),
            "{example}: a token on curl's command line"
        );
    }
    // The final steps always run.
    let github = std::fs::read_to_string(dir.join(GITHUB))?;
    ensure!(github.contains("if: always()"));
    let gitlab = read_yaml(&dir.join(GITLAB))?;
    let after = serde_yaml::to_string(&gitlab["build"]["after_script"])?;
    ensure!(after.contains("porthole-agent finish --wait"), "{after}");
    Ok(())
}

#[test]
fn the_bitrise_step_declares_what_step_sh_reads() -> anyhow::Result<()> {
    let dir = examples_dir();
    let step = read_yaml(&dir.join(BITRISE_STEP))?;
    ensure!(step["toolkit"]["bash"]["entry_file"] == "step.sh");
    let script = std::fs::read_to_string(dir.join(BITRISE_SCRIPT))?;
    let inputs = step["inputs"].as_sequence().context("inputs")?;
    ensure!(inputs.len() >= 8, "{} inputs", inputs.len());
    for input in inputs {
        let key = input
            .as_mapping()
            .and_then(|m| m.keys().find(|k| k.as_str() != Some("opts")))
            .and_then(Value::as_str)
            .context("an input without a key")?;
        ensure!(
            script.contains(&format!("${{{key}")) || script.contains(&format!("${key}")),
            "step.sh never reads the input `{key}`"
        );
    }
    let admin = inputs
        .iter()
        .find(|i| i.get("admin_token").is_some())
        .context("admin_token input")?;
    ensure!(
        admin["opts"]["is_sensitive"] == true,
        "the admin token input must be sensitive"
    );
    Ok(())
}

/// Stops the background agent of a pid file (if it still runs) when dropped.
struct StopAgent(PathBuf);

impl Drop for StopAgent {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ =
                porthole_agent::pidfile::signal_agent(&self.0, nix::sys::signal::Signal::SIGTERM);
            let _ = wait_for("the agent to stop", Duration::from_secs(10), || {
                (!self.0.exists()).then_some(())
            });
        }
    }
}

#[test]
fn the_bitrise_step_runs_end_to_end() -> anyhow::Result<()> {
    let bash = require("bash", "bash")?;
    require("curl", "curl")?;
    let sshd = Sshd::start()?;
    let setup = RelaySetup::new()?;
    let relay = setup.start()?;
    let http = setup.http()?;
    let admin = setup.admin_token()?;
    let work = tempfile::tempdir()?;
    let pid_file = work.path().join("agent.pid");
    let _stop = StopAgent(pid_file.clone());
    let log = work.path().join("agent.log");
    let script = examples_dir().join(BITRISE_SCRIPT);
    // The step's inputs, as Bitrise passes them: in the environment.
    let step = |action: &str| {
        let mut cmd = Command::new(&bash);
        cmd.arg(&script)
            .env("action", action)
            .env("relay_api_url", &relay.api)
            .env("admin_token", &admin)
            .env("PORTHOLE_ADMIN_TOKEN", &admin)
            .env("relay_address", format!("127.0.0.1:{}", setup.agent_port))
            .env("relay_pin_sha256", &relay.pin)
            .env("services", format!("ssh=127.0.0.1:{}", sshd.port))
            .env("grace_secs", "4")
            .env("agent_bin", binary())
            .env("agent_args", format!("--log-file {}", log.display()))
            .env("PORTHOLE_PID_FILE", &pid_file)
            .env("BITRISE_BUILD_SLUG", "build-e2e")
            .env("BITRISE_APP_SLUG", "app-e2e");
        cmd
    };

    // Step 1: start.
    let started = run_with_timeout(&mut step("start"), Duration::from_secs(90))?;
    let out = format!("{}{}", started.stdout_text(), started.stderr);
    ensure!(started.status.success(), "action=start failed:\n{out}");
    ensure!(!out.contains(&admin), "the admin token was printed:\n{out}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("porthole step: remote access session "))
        .context("no session id printed")?
        .trim()
        .to_owned();
    ensure!(
        out.contains("running in the background"),
        "the agent did not start:\n{out}"
    );
    let view = relay.session(&http, &id)?;
    ensure!(
        view["state"] == "active" && view["build_id"] == "build-e2e",
        "{view}"
    );
    let port = view["endpoints"][0]["port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .context("port")?;
    // The admin token stays out of the background agent's environment.
    let pid = porthole_agent::pidfile::read_pid(&pid_file)?.context("pid")?;
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    ensure!(
        !String::from_utf8_lossy(&environ).contains(&admin),
        "the admin token reached the agent's environment"
    );

    // The build: a user logs in through the relay.
    let ssh = run_with_timeout(
        sshd.ssh("127.0.0.1", port).arg("echo logged in"),
        Duration::from_secs(60),
    )?;
    ensure!(ssh.status.success(), "ssh: {}\n{}", ssh.stderr, sshd.log());
    ensure!(ssh.stdout_text() == "logged in\n");

    // Step 2 (always run): finish, waiting for the grace period to end.
    let output = tempfile::NamedTempFile::new()?;
    let mut finish = step("finish")
        .stdin(Stdio::null())
        .stdout(output.reopen()?)
        .stderr(output.reopen()?)
        .spawn()?;
    let printed = || std::fs::read_to_string(output.path()).unwrap_or_default();
    wait_for(
        "action=finish to be waiting while the session is finishing",
        Duration::from_secs(30),
        || {
            let running = finish.try_wait().ok().flatten().is_none();
            let state = relay.session(&http, &id).ok()?["state"].clone();
            (running && state == "finishing").then_some(())
        },
    )
    .with_context(|| format!("action=finish printed:\n{}", printed()))?;
    let done = wait_for("action=finish to return", Duration::from_secs(60), || {
        finish.try_wait().ok().flatten()
    })
    .with_context(|| format!("action=finish printed:\n{}", printed()))?;
    let view = relay.session(&http, &id)?;
    ensure!(
        view["state"] == "revoked" && view["revoke_reason"] == "grace_ended",
        "{view}"
    );
    ensure!(
        done.success(),
        "action=finish exited {done}:\n{}",
        printed()
    );
    ensure!(printed().contains("session ended"), "{}", printed());
    wait_for("the agent to exit", Duration::from_secs(20), || {
        (!pid_file.exists()).then_some(())
    })?;

    // Without an agent, the always-run finish has nothing to do and says so.
    let again = run_with_timeout(&mut step("finish"), Duration::from_secs(30))?;
    ensure!(again.status.success(), "{}", again.stderr);
    ensure!(again
        .stdout_text()
        .contains("no remote access session to finish"));
    Ok(())
}
