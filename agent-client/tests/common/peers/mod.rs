//! Harness for driving REAL peers in integration tests: OpenSSH `sshd`/`ssh`,
//! TigerVNC `Xvnc` and `vncdo` (PyPI `vncdotool`), etcd (Debian's `etcd-server`).
//!
//! Every helper is blocking (`std::process`) and bounded by a deadline, so a
//! misbehaving peer turns into a test failure with its logs, never a hang.
//! A missing tool is an error naming the package to install (see
//! [`tools::require`]); tests fail rather than skip.

// Each integration test binary uses a different subset of this harness.
#![allow(dead_code)]

pub mod etcd;
pub mod sshd;
pub mod tools;
pub mod vnc;

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

/// Returns the lowercase hex SHA-256 of the file at `path`.
pub fn sha256_file(path: impl AsRef<Path>) -> anyhow::Result<String> {
    let path = path.as_ref();
    let mut file =
        File::open(path).with_context(|| format!("opening {} to hash it", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {} to hash it", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Writes `bytes` pseudo-random bytes to `path` (created or truncated) and
/// returns their lowercase hex SHA-256.
///
/// The data comes from a xorshift64* generator seeded from the clock and the
/// process id: incompressible and different on every call, but not
/// cryptographically random (it does not need to be).
pub fn write_random_file(path: impl AsRef<Path>, bytes: usize) -> anyhow::Result<String> {
    let path = path.as_ref();
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::new(file);
    let mut rng = XorShift64::from_clock();
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let len = left.min(chunk.len());
        rng.fill(&mut chunk[..len]);
        hasher.update(&chunk[..len]);
        out.write_all(&chunk[..len])
            .with_context(|| format!("writing {}", path.display()))?;
        left -= len;
    }
    out.flush()
        .with_context(|| format!("flushing {}", path.display()))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Minimal xorshift64* PRNG (Vigna), enough for test payloads.
#[derive(Debug)]
struct XorShift64(u64);

impl XorShift64 {
    fn from_clock() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        let seed = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x2545_F491_4F6C_DD1D;
        // The state must never be zero.
        Self(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}
