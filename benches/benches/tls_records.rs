//! What rustls costs per byte on the `tls` data plane, by cipher suite: plaintext written on
//! a client connection, sealed into records, opened by the server, read back, all in memory
//! (no sockets), so only the TLS work is timed. The client is the agent's configuration
//! (`porthole_protocol::tls::client_config`); the server offers one suite at a time.
//! Run with `cargo bench -p porthole-bench --bench tls_records`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use porthole_protocol::tls::{cipher_suites, client_config, fingerprint_sha256, RelayTrust};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConnection, ServerConfig, ServerConnection};

/// Bytes moved per iteration, in writes of one record's worth.
const MOVED: usize = 1 << 20;
const WRITE: usize = 16 * 1024;

fn pair(suite: rustls::SupportedCipherSuite) -> (ClientConnection, ServerConnection) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let der = cert.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![suite];
    let server = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let pin = porthole_protocol::tls::parse_pin(&fingerprint_sha256(&der)).unwrap();
    let client = client_config(&RelayTrust::Pin(pin)).unwrap();
    let mut c = ClientConnection::new(client, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut s = ServerConnection::new(Arc::new(server)).unwrap();
    while c.is_handshaking() || s.is_handshaking() {
        shuttle(&mut c, &mut s);
    }
    assert_eq!(c.negotiated_cipher_suite(), Some(suite));
    (c, s)
}

/// Moves pending TLS bytes both ways.
fn shuttle(c: &mut ClientConnection, s: &mut ServerConnection) {
    let mut buf = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut buf).unwrap();
    }
    let mut slice = &buf[..];
    while !slice.is_empty() {
        s.read_tls(&mut slice).unwrap();
        s.process_new_packets().unwrap();
    }
    buf.clear();
    while s.wants_write() {
        s.write_tls(&mut buf).unwrap();
    }
    let mut slice = &buf[..];
    while !slice.is_empty() {
        c.read_tls(&mut slice).unwrap();
        c.process_new_packets().unwrap();
    }
}

fn records(cr: &mut Criterion) {
    let mut group = cr.benchmark_group("tls_seal_open");
    group.throughput(Throughput::Bytes(MOVED as u64));
    let chunk = vec![0x5a_u8; WRITE];
    let mut out = vec![0u8; WRITE];
    let mut wire = Vec::with_capacity(WRITE * 2);
    for suite in cipher_suites() {
        let name = format!("{:?}", suite.suite());
        let (mut c, mut s) = pair(suite);
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut moved = 0;
                while moved < MOVED {
                    c.writer().write_all(&chunk).unwrap();
                    wire.clear();
                    while c.wants_write() {
                        c.write_tls(&mut wire).unwrap();
                    }
                    let mut slice = &wire[..];
                    while !slice.is_empty() {
                        s.read_tls(&mut slice).unwrap();
                        s.process_new_packets().unwrap();
                    }
                    let mut got = 0;
                    while got < WRITE {
                        got += s.reader().read(&mut out[got..]).unwrap();
                    }
                    moved += WRITE;
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, records);
criterion_main!(benches);
