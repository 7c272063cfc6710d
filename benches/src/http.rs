//! A minimal HTTP/1.1 client for the relay's loopback API (one request per connection), so
//! the harness needs no HTTP stack of its own.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;

/// How long one API call may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// `POST path` with a JSON body and a bearer token; returns the status and the JSON answer.
pub fn post_json(
    addr: SocketAddr,
    path: &str,
    bearer: &str,
    body: &Value,
) -> anyhow::Result<(u16, Value)> {
    let body = serde_json::to_vec(body)?;
    let raw = request(addr, "POST", path, Some(bearer), Some(&body), TIMEOUT)?;
    parse_response(&raw)
}

/// `GET path` (with a bearer token when given); returns the status and the JSON answer.
pub fn get_json(
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<(u16, Value)> {
    let raw = request(addr, "GET", path, bearer, None, timeout)?;
    parse_response(&raw)
}

/// `DELETE path` with a bearer token; returns the status.
pub fn delete(addr: SocketAddr, path: &str, bearer: &str) -> anyhow::Result<u16> {
    let raw = request(addr, "DELETE", path, Some(bearer), None, TIMEOUT)?;
    Ok(split_response(&raw)?.0)
}

/// `GET path` without a token; returns the status and the body as text (`/metrics`).
pub fn get_text(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let raw = request(addr, "GET", path, None, None, timeout)?;
    let (status, body) = split_response(&raw)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// One request on a fresh connection (`Connection: close`); returns the raw answer.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to the API at {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    if let Some(token) = bearer {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("Connection: close\r\n\r\n");
    s.write_all(head.as_bytes())?;
    if let Some(body) = body {
        s.write_all(body)?;
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).context("reading the API answer")?;
    Ok(raw)
}

/// Splits a whole HTTP/1.1 response into its status and JSON body (chunked or not).
fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, Value)> {
    let (status, body) = split_response(raw)?;
    let json = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).context("API answer is not JSON")?
    };
    Ok((status, json))
}

/// Splits a whole HTTP/1.1 response into its status and body (de-chunked).
fn split_response(raw: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("HTTP answer without a header end")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("HTTP answer without a status")?;
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body)?;
    }
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("bad chunk header")?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .context("bad chunk size")?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_answers() -> anyhow::Result<()> {
        let plain = b"HTTP/1.1 201 Created\r\ncontent-length: 8\r\n\r\n{\"a\":1}\n";
        let (status, v) = parse_response(plain)?;
        assert_eq!((status, v["a"].as_u64()), (201, Some(1)));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"b\"\r\n3\r\n:2}\r\n0\r\n\r\n";
        let (status, v) = parse_response(chunked)?;
        assert_eq!((status, v["b"].as_u64()), (200, Some(2)));
        Ok(())
    }
}
