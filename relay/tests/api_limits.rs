//! The API listener's public-edge limits over raw TCP against an in-process relay: a client
//! that never finishes its request headers is closed after `--api-header-timeout` while
//! others are served, and `--max-api-connections` holds further clients in the accept queue
//! until a connection closes; on shutdown a request in flight is still answered. Outcomes
//! and order only, no timing assertions.

mod common;

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::TestRelay;
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest a test waits for something that must happen (a close, an answer).
const MUST_HAPPEN: Duration = Duration::from_secs(15);
/// How long a test looks for an answer that must not come yet.
const NOT_YET: Duration = Duration::from_millis(500);

/// Request headers cut before the blank line that ends them.
const UNFINISHED: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n";
/// A complete request.
const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// Reads until the peer closes (EOF or reset); returns what was read. Fails if the peer
/// keeps the connection open for [`MUST_HAPPEN`].
async fn read_until_closed(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let read = tokio::time::timeout(MUST_HAPPEN, stream.read(&mut buf))
            .await
            .context("the relay kept the connection open")?;
        match read {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(got),
            Err(e) => return Err(e).context("reading from the relay"),
        }
    }
}

/// Sends `GET /healthz` on a connection of its own; the answer's status.
async fn healthz(addr: SocketAddr) -> Result<StatusCode> {
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .timeout(MUST_HAPPEN)
        .send()
        .await?;
    Ok(resp.status())
}

/// A slow client on `addr` is closed without an answer while another is served.
async fn slow_client_is_closed(addr: SocketAddr) -> Result<()> {
    let mut slow = TcpStream::connect(addr).await?;
    slow.write_all(UNFINISHED).await?;
    // Meanwhile, on another connection, a normal request is answered.
    assert_eq!(healthz(addr).await?, StatusCode::OK);
    let got = read_until_closed(&mut slow).await?;
    let text = String::from_utf8_lossy(&got);
    ensure!(
        !text.starts_with("HTTP/1.1 200"),
        "an unfinished request was answered: {text}"
    );
    // A connection that sends nothing at all is closed too.
    let mut silent = TcpStream::connect(addr).await?;
    let got = read_until_closed(&mut silent).await?;
    ensure!(
        !String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"),
        "a silent connection got an answer"
    );
    Ok(())
}

#[tokio::test]
async fn clients_that_never_finish_their_headers_are_closed() -> Result<()> {
    let relay = TestRelay::start_with(common::DEFAULT_RANGE_LEN, |c| {
        c.api_header_timeout = Duration::from_secs(1);
        c.metrics_listen = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    })
    .await?;
    slow_client_is_closed(relay.handle.info.api_addr).await?;
    let metrics = relay
        .handle
        .info
        .metrics_addr
        .context("no metrics listener")?;
    slow_client_is_closed(metrics).await?;
    Ok(())
}

#[tokio::test]
async fn connections_over_the_cap_wait_until_one_closes() -> Result<()> {
    let relay = TestRelay::start_with(common::DEFAULT_RANGE_LEN, |c| {
        c.max_api_connections = 2;
        // Long enough that the held connections are not closed for being idle.
        c.api_header_timeout = Duration::from_secs(300);
    })
    .await?;
    let addr = relay.handle.info.api_addr;
    // Two idle connections take both permits (the accept queue is first in, first out, so
    // they are accepted before the third).
    let first = TcpStream::connect(addr).await?;
    let _second = TcpStream::connect(addr).await?;

    let mut third = TcpStream::connect(addr).await?;
    third.write_all(HEALTHZ).await?;
    let mut buf = [0u8; 1024];
    let early = tokio::time::timeout(NOT_YET, third.read(&mut buf)).await;
    ensure!(
        early.is_err(),
        "the third connection was served while two were held: {early:?}"
    );

    drop(first);
    let got = read_until_closed(&mut third).await?;
    let text = String::from_utf8_lossy(&got);
    ensure!(
        text.starts_with("HTTP/1.1 200"),
        "the third connection was not answered once a permit was free: {text:?}"
    );
    ensure!(text.ends_with("ok\n"), "{text:?}");
    Ok(())
}

#[tokio::test]
async fn a_request_in_flight_at_shutdown_is_answered() -> Result<()> {
    let relay = TestRelay::start_with(common::DEFAULT_RANGE_LEN, |c| {
        c.api_header_timeout = Duration::from_secs(300);
    })
    .await?;
    let addr = relay.handle.info.api_addr;
    let idle = TcpStream::connect(addr).await?;
    let body = br#"{"build_id":"b1","app_id":"a1","services":["ssh"]}"#;
    let head = format!(
        "POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\
         Expect: 100-continue\r\n\r\n",
        relay.handle.admin_token().expose(),
        body.len()
    );
    let mut busy = TcpStream::connect(addr).await?;
    busy.write_all(head.as_bytes()).await?;
    // `100 Continue` comes when the handler reads the body: the request is in flight.
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(MUST_HAPPEN, busy.read(&mut buf)).await??;
    let interim = String::from_utf8_lossy(&buf[..n]).into_owned();
    ensure!(interim.starts_with("HTTP/1.1 100"), "{interim:?}");

    let mut idle = idle;
    let client = async {
        // The idle connection is closed by the shutdown (not by the header timeout, which is
        // long here): from then on the request in flight is on its own.
        read_until_closed(&mut idle).await?;
        busy.write_all(body).await?;
        read_until_closed(&mut busy).await
    };
    let ((), answer) = tokio::time::timeout(MUST_HAPPEN, async {
        tokio::join!(relay.handle.shutdown(Duration::ZERO), client)
    })
    .await
    .context("shutdown did not end")?;
    let answer = answer?;
    let text = String::from_utf8_lossy(&answer);
    // Shutting down, the relay creates no session, but it answers the request.
    ensure!(text.starts_with("HTTP/1.1 503"), "{text:?}");
    ensure!(text.contains("shutting_down"), "{text:?}");
    Ok(())
}

#[tokio::test]
async fn one_source_cannot_take_every_connection() -> Result<()> {
    let relay = TestRelay::start_with(common::DEFAULT_RANGE_LEN, |c| {
        c.api_header_timeout = Duration::from_secs(300);
    })
    .await?;
    let addr = relay.handle.info.api_addr;
    // 16 idle connections from 127.0.0.1 are this source's share...
    let mut held = Vec::new();
    for _ in 0..16 {
        held.push(TcpStream::connect(addr).await?);
    }
    // ...so its 17th is closed without an answer once the relay accepts it,
    let mut extra = TcpStream::connect(addr).await?;
    extra.write_all(HEALTHZ).await?;
    let got = read_until_closed(&mut extra).await?;
    ensure!(
        got.is_empty(),
        "the 17th connection of one source was served: {got:?}"
    );
    // ...while another source is served.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((Ipv4Addr::new(127, 0, 0, 2), 0).into())?;
    let mut other = socket.connect(addr).await?;
    other.write_all(HEALTHZ).await?;
    let got = read_until_closed(&mut other).await?;
    let text = String::from_utf8_lossy(&got);
    ensure!(text.starts_with("HTTP/1.1 200"), "another source: {text:?}");
    // One of the 16 leaves: the source gets a connection again.
    drop(held.pop());
    let mut again = None;
    for _ in 0..50 {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(HEALTHZ).await?;
        let got = read_until_closed(&mut s).await?;
        if !got.is_empty() {
            again = Some(got);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = again.context("the source never got a connection back")?;
    ensure!(String::from_utf8_lossy(&again).starts_with("HTTP/1.1 200"));
    Ok(())
}
