//! Real TigerVNC `Xvnc` behind the agent and a real VNC client (`vncdo`) through the relay.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::ensure;
use common::fixture::Tunnel;
use common::peers::sshd::Sshd;
use common::peers::vnc::{png_size, vncdo_capture, vncdo_refused, Xvnc};
use common::relay::TestRelay;

#[test]
fn vnc_screen_capture_through_the_relay_has_the_server_geometry() -> anyhow::Result<()> {
    let xvnc = Xvnc::start(1024, 768, "s3cret-vnc")?;
    let sshd = Sshd::start()?;
    let relay = TestRelay::start()?;
    let tunnel = Tunnel::builder()
        .forward("ssh", sshd.port)
        .forward("vnc", xvnc.port)
        .start(&relay)?;
    let session = &tunnel.session;
    let vnc_port = session.port("vnc");
    ensure!(
        vnc_port != session.port("ssh") && vnc_port != 0,
        "distinct ports: {:?}",
        session.ports
    );

    let out = tempfile::tempdir()?;
    let png = out.path().join("screen.png");
    vncdo_capture("127.0.0.1", vnc_port, "s3cret-vnc", &png)?;
    assert_eq!(png_size(&png)?, (1024, 768));

    // The wrong VNC password is refused by the real server, through the tunnel.
    let bad = out.path().join("bad.png");
    vncdo_refused("127.0.0.1", vnc_port, "wrong", &bad)?;
    // And the right one still works afterwards.
    vncdo_capture("127.0.0.1", vnc_port, "s3cret-vnc", &png)?;
    Ok(())
}
