//! `porthole-relay mint-user-token`: prints a user token (alone on the last stdout line)
//! signed with the secret the relay uses, found the way the relay finds it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context as _};
use porthole_relay::user_token::{load_or_create_secret, Roles, UserTokens};

fn mint(args: &[&str], cwd: &Path) -> anyhow::Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_porthole-relay"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PORTHOLE_") {
            cmd.env_remove(name);
        }
    }
    Ok(cmd
        .arg("mint-user-token")
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()?)
}

/// The last stdout line of a successful run.
fn token_of(out: &Output) -> anyhow::Result<String> {
    ensure!(
        out.status.success(),
        "mint-user-token failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout.clone())?;
    let last = stdout
        .lines()
        .last()
        .context("no output")?
        .trim()
        .to_owned();
    ensure!(
        last.split('.').count() == 3 && !last.contains(' '),
        "the last line should be the token alone: {stdout:?}"
    );
    Ok(last)
}

fn denied() -> Vec<String> {
    vec!["tester".into(), "qa".into()]
}

#[test]
fn minted_tokens_verify_with_the_relays_secret() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let data_arg = data.display().to_string();
    let out = mint(
        &[
            "--sub",
            "u1",
            "--app-id",
            "app-1",
            "--role",
            "developer",
            "--role",
            "tester",
            "--ttl",
            "10m",
            "--data-dir",
            &data_arg,
        ],
        dir.path(),
    )?;
    let token = token_of(&out)?;
    let secret_file = data.join("user-token.secret");
    let mode = std::fs::metadata(&secret_file)
        .context("the secret is created in DATA_DIR")?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the secret file is private");
    let (secret, created) = load_or_create_secret(&secret_file)?;
    assert!(!created);

    let tokens = UserTokens::new(&secret, &denied());
    let claims = tokens.verify(&token).map_err(anyhow::Error::msg)?;
    assert_eq!(claims.sub, "u1");
    assert_eq!(claims.app_id, "app-1");
    assert_eq!(
        claims.role,
        Roles::Many(vec!["developer".into(), "tester".into()])
    );
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    ensure!(
        (now + 540..=now + 660).contains(&claims.exp),
        "exp should be about now + 10 min: {} vs {now}",
        claims.exp
    );
    assert_eq!(tokens.denied_role(&claims), Some("tester"));

    // A second run reuses the secret: its token verifies with the same key.
    let again = token_of(&mint(
        &[
            "--sub",
            "u2",
            "--app-id",
            "app-1",
            "--role",
            "owner",
            "--data-dir",
            &data_arg,
        ],
        dir.path(),
    )?)?;
    let claims = tokens.verify(&again).map_err(anyhow::Error::msg)?;
    assert_eq!(claims.role, Roles::One("owner".into()));
    Ok(())
}

#[test]
fn an_explicit_secret_file_is_used_and_a_short_one_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("shared.secret");
    std::fs::write(&file, "0123456789abcdef0123456789abcdef0123\n")?;
    let file_arg = file.display().to_string();
    let token = token_of(&mint(
        &[
            "--sub",
            "u1",
            "--app-id",
            "a",
            "--role",
            "qa",
            "--user-token-secret-file",
            &file_arg,
        ],
        dir.path(),
    )?)?;
    let right = UserTokens::new(b"0123456789abcdef0123456789abcdef0123", &denied());
    right.verify(&token).map_err(anyhow::Error::msg)?;
    let wrong = UserTokens::new(b"another-secret-another-secret-another", &denied());
    ensure!(
        wrong.verify(&token).is_err(),
        "signed with the given file only"
    );
    ensure!(
        !dir.path().join("porthole-data").exists(),
        "no default data dir is created when the secret file is given"
    );

    std::fs::write(&file, "short\n")?;
    let out = mint(
        &[
            "--sub",
            "u1",
            "--app-id",
            "a",
            "--role",
            "qa",
            "--user-token-secret-file",
            &file_arg,
        ],
        dir.path(),
    )?;
    ensure!(!out.status.success(), "a short secret must be refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("at least 32 bytes"),
        "the error should say how long the secret must be: {stderr}"
    );
    Ok(())
}
