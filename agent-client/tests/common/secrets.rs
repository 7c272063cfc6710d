//! Secrets for tests: random passwords and files that hold them.

use std::path::{Path, PathBuf};

/// A random password of `len` letters and digits.
pub fn random_password(len: usize) -> String {
    use rand::Rng as _;
    const CHARS: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| char::from(CHARS[rng.gen_range(0..CHARS.len())]))
        .collect()
}

/// Writes `contents` (plus a newline) to `dir/name`, mode 0600; returns the path.
pub fn write_secret_file(dir: &Path, name: &str, contents: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, format!("{contents}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}
