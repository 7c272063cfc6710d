//! The opening of the VNC protocol (RFB, RFC 6143 §7.1.1) at the relay, so a VNC port can
//! tell a viewer from a silent connection before it bothers the agent or counts toward the
//! session's visitor caps: the server speaks first with its version line, the client answers
//! with the version it picks. The relay speaks the server's part itself (`RFB 003.008`, which
//! every current viewer speaks), takes the viewer's reply within the visitor handshake
//! timeout, and only then pairs the visitor with the build machine, whose own version line
//! it consumes (checking the machine's server speaks at least the version the viewer picked,
//! e.g. macOS's `RFB 003.889`) before forwarding the viewer's reply and everything after it.

use std::time::Duration;

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::edge::visitor::guards::VisitorRefusal;

/// Length of an RFB version line: `RFB xxx.yyy\n`.
pub const VERSION_LEN: usize = 12;

/// The version the relay announces to viewers.
pub const ANNOUNCED: &[u8; VERSION_LEN] = b"RFB 003.008\n";

/// `RFB xxx.yyy\n` → (xxx, yyy), or None when it is not a version line.
pub fn parse_version(line: &[u8]) -> Option<(u16, u16)> {
    let digits = |b: &[u8]| -> Option<u16> {
        b.iter().try_fold(0u16, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u16::from(d - b'0'))
        })
    };
    if line.len() != VERSION_LEN || &line[..4] != b"RFB " || line[7] != b'.' || line[11] != b'\n' {
        return None;
    }
    Some((digits(&line[4..7])?, digits(&line[8..11])?))
}

/// Announces [`ANNOUNCED`] to a viewer and reads its version reply within `deadline`;
/// returns the reply (forwarded to the build machine later). Anything but an RFB 3.x version
/// no higher than announced is [`VisitorRefusal::NotVnc`].
pub async fn read_viewer_version<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    deadline: Duration,
) -> Result<Vec<u8>, VisitorRefusal> {
    let exchange = async {
        stream.write_all(ANNOUNCED).await.ok()?;
        let mut reply = [0u8; VERSION_LEN];
        stream.read_exact(&mut reply).await.ok()?;
        let version = parse_version(&reply)?;
        let announced = parse_version(ANNOUNCED)?;
        (version.0 == 3 && version <= announced).then(|| reply.to_vec())
    };
    match tokio::time::timeout(deadline, exchange).await {
        Ok(Some(reply)) => Ok(reply),
        _ => Err(VisitorRefusal::NotVnc),
    }
}

/// Why the build machine's side of the opening failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerVersionError {
    /// The data connection ended or failed before 12 bytes arrived, or they took too long.
    #[error("the VNC server on the build machine sent no version line: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not an RFB version line.
    #[error("the service on the build machine is not a VNC server (no RFB version line)")]
    NotRfb,
    /// The server is older than the version the viewer picked.
    #[error(
        "the VNC server on the build machine speaks RFB {0}.{1}, older than the viewer's {2}.{3}"
    )]
    TooOld(u16, u16, u16, u16),
}

/// Reads the build machine's version line from its data connection: first from `prefix`
/// (bytes already read past `attach`), then from `stream`, within `deadline`; checks it is
/// at least the viewer's `reply`.
pub async fn consume_server_version<S: AsyncRead + Unpin>(
    stream: &mut S,
    prefix: &mut bytes::BytesMut,
    reply: &[u8],
    deadline: Duration,
) -> Result<(), ServerVersionError> {
    let mut line = [0u8; VERSION_LEN];
    let from_prefix = prefix.len().min(VERSION_LEN);
    line[..from_prefix].copy_from_slice(&prefix[..from_prefix]);
    prefix.advance(from_prefix);
    let read = stream.read_exact(&mut line[from_prefix..]);
    match tokio::time::timeout(deadline, read).await {
        Ok(result) => result.map(|_| ())?,
        Err(_) => {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out").into())
        }
    }
    let server = parse_version(&line).ok_or(ServerVersionError::NotRfb)?;
    let viewer = parse_version(reply).ok_or(ServerVersionError::NotRfb)?;
    if server < viewer {
        return Err(ServerVersionError::TooOld(
            server.0, server.1, viewer.0, viewer.1,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_lines_parse() {
        assert_eq!(parse_version(b"RFB 003.008\n"), Some((3, 8)));
        assert_eq!(parse_version(b"RFB 003.889\n"), Some((3, 889)));
        for bad in [
            &b"RFB 003.008"[..],
            b"RFB 003.00x\n",
            b"SSH-2.0-xx\r\n",
            b"RFB 003,008\n",
        ] {
            assert_eq!(parse_version(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn viewers_get_the_announcement_and_their_reply_is_kept() {
        let (mut relay, mut viewer) = tokio::io::duplex(64);
        let client = async {
            let mut got = [0u8; VERSION_LEN];
            viewer.read_exact(&mut got).await.ok();
            viewer.write_all(b"RFB 003.003\n").await.ok();
            got
        };
        let (got, reply) = tokio::join!(
            client,
            read_viewer_version(&mut relay, Duration::from_secs(5))
        );
        assert_eq!(&got, ANNOUNCED);
        assert_eq!(reply, Ok(b"RFB 003.003\n".to_vec()));
    }

    #[tokio::test]
    async fn silence_garbage_and_newer_versions_are_refused() {
        let (mut relay, _silent) = tokio::io::duplex(64);
        let got = read_viewer_version(&mut relay, Duration::from_millis(50)).await;
        assert_eq!(got, Err(VisitorRefusal::NotVnc));
        for reply in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"RFB 004.000\n",
            b"RFB 003.009\n",
        ] {
            let (mut relay, mut viewer) = tokio::io::duplex(64);
            viewer.write_all(reply).await.ok();
            let got = read_viewer_version(&mut relay, Duration::from_secs(5)).await;
            assert_eq!(got, Err(VisitorRefusal::NotVnc), "{reply:?}");
        }
    }

    #[tokio::test]
    async fn the_server_version_is_consumed_from_prefix_and_stream() {
        let mut prefix = bytes::BytesMut::from(&b"RFB 003"[..]);
        let mut rest: &[u8] = b".889\nsecurity";
        let got = consume_server_version(
            &mut rest,
            &mut prefix,
            b"RFB 003.008\n",
            Duration::from_secs(1),
        )
        .await;
        assert!(got.is_ok(), "{got:?}");
        assert!(prefix.is_empty());
        assert_eq!(rest, b"security");
        let mut prefix = bytes::BytesMut::from(&b"RFB 003.008\nXY"[..]);
        let mut empty: &[u8] = b"";
        let got = consume_server_version(
            &mut empty,
            &mut prefix,
            b"RFB 003.008\n",
            Duration::from_secs(1),
        )
        .await;
        assert!(got.is_ok(), "{got:?}");
        assert_eq!(&prefix[..], b"XY");
        let mut prefix = bytes::BytesMut::new();
        let mut old: &[u8] = b"RFB 003.003\n";
        let got = consume_server_version(
            &mut old,
            &mut prefix,
            b"RFB 003.008\n",
            Duration::from_secs(1),
        )
        .await;
        assert!(
            matches!(got, Err(ServerVersionError::TooOld(3, 3, 3, 8))),
            "{got:?}"
        );
        let mut ssh: &[u8] = b"SSH-2.0-Open";
        let got = consume_server_version(
            &mut ssh,
            &mut prefix,
            b"RFB 003.008\n",
            Duration::from_secs(1),
        )
        .await;
        assert!(matches!(got, Err(ServerVersionError::NotRfb)), "{got:?}");
    }
}
