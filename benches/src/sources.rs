//! Loopback forwarders that give each agent a source address of its own, as agents on
//! separate machines have: the relay's per-source guards (64 pending agent handshakes per
//! address, a constant in `relay/src/limits.rs`) would otherwise treat N agents on one machine
//! as one crowd. Agent `i` dials forwarder `i` on 127.0.0.1, which dials the relay's agent
//! endpoint from its own address in 127.1.0.0/16 (all of 127.0.0.0/8 is local on Linux, no
//! set-up needed) and copies bytes both ways. A forwarder that cannot reach the relay closes
//! the agent's connection at once, which the agent takes as it takes a refused dial.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Runtime;

/// Most forwarders (distinct source addresses in 127.1.0.0/16 without .0 and .255).
pub const MAX_SOURCES: usize = 254 * 254;

/// Running forwarders; they stop (and their connections close) when dropped.
#[derive(Debug)]
pub struct SourceForwarders {
    /// Where agent `i` dials, in order.
    pub listen: Vec<SocketAddr>,
    /// Its runtime; dropping it stops every task.
    _rt: Runtime,
}

/// The source address of forwarder `i`: 127.1.H.L, H and L in 1..=254.
pub fn source_ip(i: usize) -> Ipv4Addr {
    let hi = (i / 254 % 254 + 1) as u8;
    let lo = (i % 254 + 1) as u8;
    Ipv4Addr::new(127, 1, hi, lo)
}

impl SourceForwarders {
    /// `count` forwarders to `upstream`, each listening on a loopback port the kernel picks
    /// and dialling from [`source_ip`]`(i)`; served by a two-thread runtime of their own.
    pub fn start(count: usize, upstream: SocketAddr) -> anyhow::Result<Self> {
        if count > MAX_SOURCES {
            bail!("at most {MAX_SOURCES} distinct agent source addresses");
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-sources")
            .enable_all()
            .build()
            .context("starting the source forwarders' runtime")?;
        let mut listen = Vec::with_capacity(count);
        for i in 0..count {
            let listener = rt
                .block_on(TcpListener::bind("127.0.0.1:0"))
                .context("binding a source forwarder")?;
            listen.push(listener.local_addr()?);
            rt.spawn(accept_loop(listener, source_ip(i), upstream));
        }
        Ok(Self { listen, _rt: rt })
    }
}

async fn accept_loop(listener: TcpListener, source: Ipv4Addr, upstream: SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((inbound, _)) => {
                tokio::spawn(forward(inbound, source, upstream));
            }
            // Out of descriptors and the like: pause instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Dials `upstream` from `source` and copies both ways until either side closes; when the
/// dial fails the inbound connection is dropped (the agent sees it close).
async fn forward(mut inbound: TcpStream, source: Ipv4Addr, upstream: SocketAddr) {
    let dial = async {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))?;
        socket.connect(upstream).await
    };
    let Ok(mut outbound) = dial.await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_are_distinct_and_valid() {
        assert_eq!(source_ip(0), Ipv4Addr::new(127, 1, 1, 1));
        assert_eq!(source_ip(253), Ipv4Addr::new(127, 1, 1, 254));
        assert_eq!(source_ip(254), Ipv4Addr::new(127, 1, 2, 1));
        let all: std::collections::HashSet<Ipv4Addr> = (0..MAX_SOURCES).map(source_ip).collect();
        assert_eq!(all.len(), MAX_SOURCES);
    }

    #[test]
    fn bytes_cross_and_the_relay_sees_the_source() -> anyhow::Result<()> {
        use std::io::{Read, Write};
        let upstream = std::net::TcpListener::bind("127.0.0.1:0")?;
        let fw = SourceForwarders::start(2, upstream.local_addr()?)?;
        let mut client = std::net::TcpStream::connect(fw.listen[1])?;
        let (mut server, peer) = upstream.accept()?;
        assert_eq!(peer.ip(), source_ip(1));
        client.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf)?;
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong")?;
        client.read_exact(&mut buf)?;
        assert_eq!(&buf, b"pong");
        Ok(())
    }
}
