//! The files in deploy/ themselves: the alert rules and the dashboard are well-formed
//! (`promtool check rules` too; scripts/test.sh installs promtool, structural checks always);
//! the Kubernetes ConfigMap's relay.toml loads with the real loader, and the manifests,
//! systemd units and Containerfile agree with it and with the relay's defaults; every
//! `PORTHOLE_*` variable they name exists.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use common::deploy_files::{alert_rules, dashboard, deploy, groupings, read};
use porthole_relay::RelayConfig;
use serde_json::{json, Value};

/// `(`/`)`, `[`/`]`, `{`/`}` and double quotes balanced (quotes hide brackets).
fn balanced(expr: &str) -> bool {
    let mut stack = Vec::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in expr.chars() {
        match (quoted, c) {
            (true, _) if escaped => escaped = false,
            (true, '\\') => escaped = true,
            (_, '"') => quoted = !quoted,
            (false, '(' | '[' | '{') => stack.push(c),
            (false, ')' | ']' | '}') => {
                let open = stack.pop();
                if open
                    != Some(match c {
                        ')' => '(',
                        ']' => '[',
                        _ => '{',
                    })
                {
                    return false;
                }
            }
            _ => {}
        }
    }
    stack.is_empty() && !quoted
}

/// `promtool` (scripts/test.sh installs it from Debian's `prometheus` package). Missing, the
/// test fails and says so: it never skips.
fn promtool() -> Result<PathBuf> {
    let ok = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ensure!(
        ok,
        "promtool not found: run scripts/test.sh (it installs promtool from Debian's prometheus package), \
         or `apt-get install prometheus`"
    );
    Ok(PathBuf::from("promtool"))
}

fn promtool_check_rules(promtool: &Path, file: &Path) {
    let out = std::process::Command::new(promtool)
        .args(["check", "rules"])
        .arg(file)
        .output()
        .expect("running promtool");
    assert!(
        out.status.success(),
        "promtool check rules {}:\n{}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_are_well_formed() -> Result<()> {
    let rules = alert_rules()?;
    ensure!(
        rules.len() >= 5,
        "expected the five alerts of issue 6, found {}",
        rules.len()
    );
    let mut names = BTreeSet::new();
    for rule in &rules {
        let name = rule["alert"].as_str().context("a rule without `alert`")?;
        ensure!(
            names.insert(name.to_owned()),
            "alert {name} is defined twice"
        );
        ensure!(
            name.starts_with("Porthole") && name.chars().all(|c| c.is_ascii_alphanumeric()),
            "alert name `{name}`: expected PortholeSomething"
        );
        let expr = rule["expr"].as_str().context("no `expr`")?;
        ensure!(
            !expr.trim().is_empty() && balanced(expr),
            "{name}: unbalanced expr {expr}"
        );
        let pending = rule["for"]
            .as_str()
            .with_context(|| format!("{name}: no `for`"))?;
        ensure!(
            humantime::parse_duration(pending).is_ok(),
            "{name}: `for: {pending}` is not a duration"
        );
        let severity = rule["labels"]["severity"].as_str();
        ensure!(
            matches!(severity, Some("critical" | "warning" | "info")),
            "{name}: labels.severity must be critical, warning or info, not {severity:?}"
        );
        for key in ["summary", "description"] {
            let text = rule["annotations"][key].as_str().unwrap_or_default();
            ensure!(!text.trim().is_empty(), "{name}: no annotations.{key}");
            ensure!(
                text.matches("{{").count() == text.matches("}}").count(),
                "{name}: unbalanced template in annotations.{key}"
            );
            // A label the aggregation drops renders empty.
            for used in text.split("$labels.").skip(1) {
                let label: String = used
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                for kept in groupings(expr) {
                    ensure!(
                        kept.contains(&label),
                        "{name}: annotations.{key} uses $labels.{label}, which `by ({})` drops",
                        kept.join(", ")
                    );
                }
            }
        }
    }
    promtool_check_rules(&promtool()?, &deploy("prometheus/porthole-alerts.yml"));
    Ok(())
}

#[test]
fn dashboard_is_well_formed() -> Result<()> {
    let d = dashboard()?;
    ensure!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    ensure!(d["uid"].as_str().is_some_and(|u| !u.is_empty()), "no uid");
    let vars = d["templating"]["list"]
        .as_array()
        .context("no templating.list")?;
    ensure!(
        vars.iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
        "no `datasource` variable: panels would be tied to one Prometheus"
    );
    let panels = d["panels"].as_array().context("no panels")?;
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    let mut exprs = Vec::new();
    for p in panels {
        let title = p["title"]
            .as_str()
            .context("a panel without title")?
            .to_owned();
        ensure!(
            ids.insert(p["id"].as_u64().context("panel id")?),
            "{title}: id reused"
        );
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| g[k].as_u64().unwrap_or(0));
        ensure!(
            w >= 1 && h >= 1 && x + w <= 24,
            "{title}: gridPos {g} is off the 24 columns"
        );
        for (other, [ox, oy, ow, oh]) in &boxes {
            let overlap = x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h;
            ensure!(!overlap, "panels `{title}` and `{other}` overlap");
        }
        boxes.push((title.clone(), [x, y, w, h]));
        if p["type"] == "row" {
            continue;
        }
        ensure!(
            p["datasource"]["uid"] == "${datasource}",
            "{title}: datasource"
        );
        let targets = p["targets"].as_array().context("no targets")?;
        ensure!(!targets.is_empty(), "{title}: no targets");
        let mut refs = BTreeSet::new();
        for t in targets {
            let expr = t["expr"].as_str().context("target without expr")?;
            ensure!(balanced(expr), "{title}: unbalanced expr {expr}");
            ensure!(refs.insert(t["refId"].to_string()), "{title}: refId reused");
            exprs.push(expr.to_owned());
        }
    }
    // promtool parses the queries too, as recording rules with Grafana's variables filled in.
    {
        let promtool = promtool()?;
        let rules: Vec<Value> = exprs
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let e = e
                    .replace("$__rate_interval", "5m")
                    .replace("$job", ".*")
                    .replace("$instance", ".*");
                json!({"record": format!("dashboard:query_{i}"), "expr": e})
            })
            .collect();
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("dashboard-queries.yml");
        // JSON is YAML.
        std::fs::write(
            &file,
            json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
        )?;
        promtool_check_rules(&promtool, &file);
    }
    Ok(())
}

// --- manifests, unit and image agree with the relay --------------------------------------

/// Every YAML document of a file.
fn yaml_docs(rel: &str) -> Result<Vec<serde_yaml::Value>> {
    let text = read(rel)?;
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).with_context(|| format!("deploy/{rel}")))
        .collect()
}

/// The relay's drain: `shutdown_grace`, then up to `FINAL_SHUTDOWN_WAIT` for its tasks.
fn stop_takes(config: &RelayConfig) -> Duration {
    config.shutdown_grace + porthole_relay::limits::FINAL_SHUTDOWN_WAIT
}

#[test]
fn kubernetes_manifests_match_their_relay_toml() -> Result<()> {
    let mut by_kind: BTreeMap<String, Vec<serde_yaml::Value>> = BTreeMap::new();
    for file in [
        "configmap.yaml",
        "secret.yaml",
        "services.yaml",
        "statefulset.yaml",
    ] {
        for doc in yaml_docs(&format!("kubernetes/{file}"))? {
            ensure!(
                doc["metadata"]["namespace"].is_null(),
                "{file}: names a namespace"
            );
            let kind = doc["kind"].as_str().context("a document without kind")?;
            by_kind
                .entry(kind.to_owned())
                .or_default()
                .push(doc.clone());
        }
    }
    for rel in [
        "kubernetes/kustomization.yaml",
        "kubernetes/hostnetwork-patch.yaml",
    ] {
        yaml_docs(rel)?;
    }
    let toml = by_kind["ConfigMap"][0]["data"]["relay.toml"]
        .as_str()
        .context("ConfigMap without relay.toml")?;
    let config = porthole_relay::config::file::parse_str(toml)
        .map_err(|e| anyhow!("the ConfigMap's relay.toml: {e}"))?;
    config
        .validate()
        .map_err(|e| anyhow!("the ConfigMap's relay.toml: {e}"))?;

    let set = &by_kind["StatefulSet"][0];
    assert_eq!(
        set["spec"]["replicas"].as_u64(),
        Some(1),
        "one relay per volume"
    );
    let pod = &set["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .context("no grace period")?;
    assert!(
        Duration::from_secs(grace) > stop_takes(&config),
        "terminationGracePeriodSeconds {grace} does not cover the drain ({:?})",
        stop_takes(&config)
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let c = &pod["containers"][0];
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    let port_of = |name: &str| {
        c["ports"].as_sequence().and_then(|ports| {
            ports
                .iter()
                .find(|p| p["name"] == name)
                .and_then(|p| p["containerPort"].as_u64())
        })
    };
    assert_eq!(
        port_of("agents"),
        Some(u64::from(config.agent_listen.port()))
    );
    assert_eq!(port_of("api"), Some(u64::from(config.api_listen.port())));
    assert!(
        config.metrics_listen.is_none(),
        "probes expect /healthz on the API port"
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some(path), "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"].as_str(), Some("api"), "{probe}");
    }
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .context("args")?
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    let mounts = c["volumeMounts"].as_sequence().context("volumeMounts")?;
    let mounted = |path: &Path| {
        mounts
            .iter()
            .any(|m| m["mountPath"].as_str().is_some_and(|p| path.starts_with(p)))
    };
    let config_path = args
        .iter()
        .skip_while(|a| **a != "--config")
        .nth(1)
        .context("--config")?;
    assert!(
        mounted(Path::new(config_path)),
        "--config {config_path} is not mounted"
    );
    assert!(
        mounted(&config.data_dir),
        "data_dir {:?} is not mounted",
        config.data_dir
    );
    assert!(
        mounted(&config.user_token_secret_file()),
        "the user token secret is not mounted"
    );
    let claim = &set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"];
    assert!(
        mounts.iter().any(|m| m["name"] == *claim
            && Path::new(m["mountPath"].as_str().unwrap_or("")) == config.data_dir),
        "the volumeClaimTemplate is not the data dir"
    );
    // Services point at named container ports; the agent port is public, the API is not.
    for svc in &by_kind["Service"] {
        let spec = &svc["spec"];
        for p in spec["ports"].as_sequence().context("ports")? {
            let target = p["targetPort"].as_str().context("targetPort by name")?;
            assert!(
                port_of(target).is_some(),
                "Service targetPort {target} is no container port"
            );
            if target == "api" {
                assert_ne!(
                    spec["type"].as_str(),
                    Some("LoadBalancer"),
                    "the API must stay internal"
                );
            }
        }
    }
    assert!(
        by_kind["Service"]
            .iter()
            .any(|s| s["spec"]["type"] == "LoadBalancer"
                && s["spec"]["ports"][0]["targetPort"] == "agents"),
        "no LoadBalancer for the agent port"
    );
    let secret = by_kind["Secret"][0]["stringData"]
        .as_mapping()
        .context("Secret stringData")?;
    let file_name = config
        .user_token_secret_file()
        .file_name()
        .map(|f| f.to_string_lossy().into_owned());
    assert!(
        secret.keys().any(|k| k.as_str() == file_name.as_deref()),
        "the Secret has no key {file_name:?}"
    );
    Ok(())
}

/// `Key=value` lines of a unit file (repeated keys keep every value).
fn unit(rel: &str) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in read(rel)?.lines().map(str::trim) {
        if line.starts_with(['#', ';', '[']) || line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .with_context(|| format!("{rel}: `{line}`"))?;
        out.entry(k.to_owned()).or_default().push(v.to_owned());
    }
    Ok(out)
}

#[test]
fn systemd_units_and_containerfile_match_the_relay() -> Result<()> {
    let relay = unit("porthole-relay.service")?;
    let one = |k: &str| relay.get(k).and_then(|v| v.last()).map(String::as_str);
    for (key, want) in [
        ("DynamicUser", "yes"),
        ("StateDirectory", "porthole"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("LimitNOFILE", "1048576"),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(one(key), Some(want), "porthole-relay.service: {key}");
    }
    assert!(relay["Environment"].contains(&"PORTHOLE_DATA_DIR=/var/lib/porthole".to_owned()));
    let stop = humantime::parse_duration(one("TimeoutStopSec").context("TimeoutStopSec")?)?;
    let defaults = RelayConfig::default();
    assert!(
        stop > stop_takes(&defaults),
        "TimeoutStopSec {stop:?} cuts the drain short"
    );

    let agent = unit("porthole-agent.service")?;
    assert_eq!(agent["Restart"], ["no"], "the agent reconnects by itself");
    assert_eq!(agent["EnvironmentFile"], ["/etc/porthole/agent.env"]);

    let image = read("Containerfile")?;
    let expose: Vec<&str> = image
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(str::split_whitespace)
        .collect();
    for port in [
        defaults.agent_listen.port().to_string(),
        defaults.api_listen.port().to_string(),
        defaults.port_range.to_string(),
    ] {
        assert!(
            expose.contains(&port.as_str()),
            "Containerfile does not EXPOSE {port}"
        );
    }
    assert!(image.contains("cargo build --release --locked -p porthole-relay -p porthole-agent"));
    assert!(
        image.contains("USER 10001"),
        "the image must not run as root"
    );
    // Cargo loads every workspace member: the build stage must copy each one.
    let root: toml::Table = std::fs::read_to_string(deploy("../Cargo.toml"))?.parse()?;
    for member in root["workspace"]["members"].as_array().context("members")? {
        let m = member.as_str().context("member")?;
        assert!(
            image.contains(&format!("COPY {m} {m}")),
            "Containerfile does not copy member {m}"
        );
    }
    Ok(())
}

/// The `PORTHOLE_*` variables a clap command reads.
fn env_names(command: clap::Command) -> BTreeSet<String> {
    command
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect()
}

/// Every `PORTHOLE_[A-Z0-9_]+` in `text`.
fn env_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("PORTHOLE_") {
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        // `PORTHOLE_*` in prose names them all.
        if !name.ends_with('_') {
            out.insert(name);
        }
    }
    out
}

#[test]
fn environment_variables_in_deploy_files_exist() -> Result<()> {
    use clap::{Args, Command};
    // `--config` is the binary's own flag, beside the settings.
    let mut relay = env_names(RelayConfig::augment_args(Command::new("porthole-relay")));
    relay.insert("PORTHOLE_CONFIG".into());
    let agent = env_names(porthole_agent::AgentConfig::augment_args(Command::new(
        "porthole-agent",
    )));
    ensure!(relay.contains("PORTHOLE_DATA_DIR") && agent.contains("PORTHOLE_TOKEN"));
    let both: BTreeSet<String> = relay.union(&agent).cloned().collect();
    let mut problems = Vec::new();
    for (file, known) in [
        ("porthole-relay.service", &relay),
        ("Containerfile", &relay),
        ("kubernetes/statefulset.yaml", &relay),
        ("kubernetes/hostnetwork-patch.yaml", &relay),
        ("kubernetes/cluster/relay.yaml", &relay),
        ("porthole-agent.service", &agent),
        ("README.md", &both),
    ] {
        for name in env_refs(&read(file)?) {
            if !known.contains(&name) {
                problems.push(format!("deploy/{file}: {name} is read by neither binary"));
            }
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// The cluster manifests: they parse, name no namespace, and the relay nodes' settings (the
/// `PORTHOLE_*` values, with the pod's fields filled in) pass the relay's own checks in
/// cluster mode; every node binds its node's addresses; as many etcd endpoints as members.
#[test]
fn kubernetes_cluster_manifests_make_a_valid_cluster() -> Result<()> {
    yaml_docs("kubernetes/cluster/kustomization.yaml")?;
    let mut docs = yaml_docs("kubernetes/cluster/etcd.yaml")?;
    docs.extend(yaml_docs("kubernetes/cluster/relay.yaml")?);
    for doc in &docs {
        ensure!(
            doc["metadata"]["namespace"].is_null(),
            "a manifest names a namespace"
        );
    }
    let sets: Vec<&serde_yaml::Value> =
        docs.iter().filter(|d| d["kind"] == "StatefulSet").collect();
    let etcd = sets
        .iter()
        .find(|d| d["metadata"]["name"] == "etcd")
        .context("etcd StatefulSet")?;
    let relay = sets
        .iter()
        .find(|d| d["metadata"]["name"] == "porthole-relay")
        .context("relay StatefulSet")?;
    let members = etcd["spec"]["replicas"].as_u64().context("etcd replicas")?;
    let spec = &relay["spec"]["template"]["spec"];
    ensure!(
        spec["hostNetwork"] == true,
        "relay nodes use their node's network"
    );
    let container = &spec["containers"][0];
    let mut vars = std::collections::BTreeMap::new();
    for env in container["env"].as_sequence().context("env")? {
        if let (Some(name), Some(value)) = (env["name"].as_str(), env["value"].as_str()) {
            // What Kubernetes substitutes for the pod's own fields.
            let value = value
                .replace("$(NODE_IP)", "10.0.0.11")
                .replace("$(POD_NAME)", "porthole-relay-0");
            vars.insert(name.to_owned(), value);
        }
    }
    let endpoints = vars
        .get("PORTHOLE_ETCD_ENDPOINTS")
        .context("etcd endpoints")?;
    ensure!(
        endpoints.split(',').count() as u64 == members,
        "{endpoints} vs {members} members"
    );
    let mut argv = vec!["porthole-relay".to_owned()];
    for (name, value) in &vars {
        if let Some(flag) = name.strip_prefix("PORTHOLE_") {
            argv.push(format!("--{}", flag.to_ascii_lowercase().replace('_', "-")));
            argv.push(value.clone());
        }
    }
    let cmd = <RelayConfig as clap::Args>::augment_args(clap::Command::new("porthole-relay"));
    let matches = cmd.try_get_matches_from(&argv)?;
    let config = <RelayConfig as clap::FromArgMatches>::from_arg_matches(&matches)?;
    ensure!(config.cluster_mode(), "the relay nodes run in cluster mode");
    if cfg!(feature = "cluster") {
        config.validate().map_err(anyhow::Error::msg)?;
    }
    ensure!(
        config.advertise_agent().as_deref() == Some("10.0.0.11:7443")
            && config.advertise_peer().as_deref() == Some("10.0.0.11:7445"),
        "each node advertises its node's address"
    );
    Ok(())
}
