//! The scanner filter for SSH ports: an SSH client sends its identification line first
//! (`SSH-2.0-...`, RFC 4253 §4.2), so the relay reads it, within a deadline and a byte
//! bound, before asking the agent to open anything. Port scanners, HTTP probes and silent
//! connections never reach the build machine. The bytes read are returned so they are
//! forwarded, not lost. (VNC servers speak first: [`crate::edge::visitor::rfb`] does the same for VNC ports.)

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::edge::visitor::guards::VisitorRefusal;
use crate::limits::SSH_BANNER_MAX;

/// Identification prefixes of SSH 2 clients (`1.99` is a 2-capable client of old).
const PREFIXES: [&[u8]; 2] = [b"SSH-2.0-", b"SSH-1.99-"];

/// Whether `buf` can still become, or already is, an SSH identification.
fn plausible(buf: &[u8]) -> bool {
    PREFIXES.iter().any(|p| {
        let n = buf.len().min(p.len());
        buf[..n] == p[..n]
    })
}

/// Reads until the client's identification line ends; returns every byte read.
pub async fn read_ssh_banner<S: AsyncRead + Unpin>(
    stream: &mut S,
    deadline: Duration,
) -> Result<Vec<u8>, VisitorRefusal> {
    let mut buf = Vec::with_capacity(64);
    let read = async {
        let mut chunk = [0u8; SSH_BANNER_MAX];
        loop {
            let room = SSH_BANNER_MAX - buf.len();
            let n = stream
                .read(&mut chunk[..room])
                .await
                .map_err(|_| VisitorRefusal::NotSsh)?;
            if n == 0 {
                return Err(VisitorRefusal::NotSsh);
            }
            buf.extend_from_slice(&chunk[..n]);
            if !plausible(&buf) {
                return Err(VisitorRefusal::NotSsh);
            }
            if buf.contains(&b'\n') && buf.len() > 8 {
                return Ok(());
            }
            if buf.len() >= SSH_BANNER_MAX {
                return Err(VisitorRefusal::NotSsh);
            }
        }
    };
    match tokio::time::timeout(deadline, read).await {
        Ok(Ok(())) => Ok(buf),
        Ok(Err(refusal)) => Err(refusal),
        Err(_) => Err(VisitorRefusal::NotSsh),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn check(input: &[u8]) -> Result<Vec<u8>, VisitorRefusal> {
        let mut reader = input;
        read_ssh_banner(&mut reader, Duration::from_secs(1)).await
    }

    #[tokio::test]
    async fn ssh_clients_pass_with_every_byte_kept() {
        let hello = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n\x00\x00\x05\xdc kexinit...";
        assert_eq!(check(hello).await, Ok(hello.to_vec()));
        assert!(check(b"SSH-1.99-old\r\n").await.is_ok());
    }

    #[tokio::test]
    async fn everything_else_is_refused() {
        assert_eq!(
            check(b"GET / HTTP/1.1\r\n").await,
            Err(VisitorRefusal::NotSsh)
        );
        assert_eq!(check(b"").await, Err(VisitorRefusal::NotSsh));
        assert_eq!(
            check(b"SSH-2.0-").await,
            Err(VisitorRefusal::NotSsh),
            "EOF before the line ends"
        );
        assert_eq!(check(&[b'S'; 300]).await, Err(VisitorRefusal::NotSsh));
        let long = [b"SSH-2.0-".as_slice(), &[b'x'; 400]].concat();
        assert_eq!(
            check(&long).await,
            Err(VisitorRefusal::NotSsh),
            "no newline within the bound"
        );
    }

    #[tokio::test]
    async fn silent_clients_time_out() {
        let (mut client, _server) = tokio::io::duplex(64);
        let got = read_ssh_banner(&mut client, Duration::from_millis(50)).await;
        assert_eq!(got, Err(VisitorRefusal::NotSsh));
    }
}
