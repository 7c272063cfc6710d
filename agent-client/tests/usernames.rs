//! User names that would carry shell syntax or an option into the instructions' `ssh`
//! command are refused when the agent starts: `--ssh-user` and `--vnc-user` must follow the
//! POSIX-portable rule, and the agent exits non-zero naming the flag and the rule (and never
//! runs anything the name holds).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::ensure;
use common::agent::Agent;

/// Names a developer could be tricked into pasting into a shell, or that are not portable.
const BAD_NAMES: &[&str] = &[
    "$(touch /tmp/x)dev",
    "`touch /tmp/x`dev",
    "a;b",
    "a b",
    "a'b",
    "a\"b",
    "-oProxyCommand=nc",
    "dév",
];

/// Where the `$(...)` and backtick names would write if anything ran them.
const MARKER: &str = "/tmp/x";

/// Starts the agent (no relay needed: it must stop before dialing) with `services` and the
/// user flag `flag` set to `name`; returns its exit code and output.
fn refused(services: &[&str], flag: &str, name: &str) -> anyhow::Result<(Option<i32>, String)> {
    let mut args = vec![
        "--relay".to_owned(),
        "127.0.0.1:9".into(),
        "--pin-sha256".into(),
        "00".repeat(32),
    ];
    for s in services {
        args.push("--service".into());
        args.push((*s).to_owned());
    }
    if flag == "--vnc-user" {
        args.push("--ssh-user=dev".into());
    }
    // `--flag=value`, so a name starting with `-` reaches the check instead of clap.
    args.push(format!("{flag}={name}"));
    let mut agent = Agent::spawn(&args, "phj_test")?;
    let status = agent.wait_exit(Duration::from_secs(20))?;
    Ok((status.code(), agent.output()))
}

/// When the marker file was last modified (`None`: absent).
fn marker_state() -> Option<SystemTime> {
    std::fs::metadata(Path::new(MARKER))
        .and_then(|m| m.modified())
        .ok()
}

#[test]
fn bad_user_names_are_refused_at_start_naming_the_flag_and_the_rule() -> anyhow::Result<()> {
    // A bad setting the agent already refused before user names were checked: the exit
    // code to match.
    let mut other = Agent::spawn(
        &[
            "--relay".into(),
            "no-port".into(),
            "--service".into(),
            "ssh=127.0.0.1:9".into(),
        ],
        "phj_test",
    )?;
    let bad_setting = other.wait_exit(Duration::from_secs(20))?.code();
    ensure!(bad_setting == Some(1), "--relay no-port: {bad_setting:?}");

    let before = marker_state();
    let cases = [
        (&["ssh=127.0.0.1:9"][..], "--ssh-user"),
        (&["ssh=embedded"][..], "--ssh-user"),
        (&["ssh=127.0.0.1:9", "vnc=127.0.0.1:9"][..], "--vnc-user"),
    ];
    for (services, flag) in cases {
        for name in BAD_NAMES {
            let (code, output) = refused(services, flag, name)?;
            ensure!(
                code == bad_setting,
                "{flag} {name:?} ({services:?}): exit {code:?}, want {bad_setting:?}:\n{output}"
            );
            ensure!(
                output.contains(&format!("{flag} `{name}` refused"))
                    && output.contains("POSIX-portable user names only"),
                "{flag} {name:?}: the error must name the flag and the rule:\n{output}"
            );
            ensure!(
                !output.contains("remote access session") && !output.contains("reconnecting"),
                "{flag} {name:?}: the agent went on:\n{output}"
            );
        }
    }
    ensure!(
        marker_state() == before,
        "{MARKER} was created or touched: a user name was run by a shell"
    );
    Ok(())
}
