//! Micro-benchmarks of the control-frame codec: encoding and decoding `hello`, `open` and
//! `ping` frames with `porthole_protocol::frame`. Run with `cargo bench -p porthole-bench`.

#![allow(missing_docs)]

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use porthole_protocol::message::HelloAuth;
use porthole_protocol::{frame, Credential, Message, Secret, Service};

fn messages() -> Vec<(&'static str, Message)> {
    vec![
        (
            "hello",
            Message::Hello {
                protocol_version: 1,
                agent_version: "0.1.0".into(),
                auth: HelloAuth::Join {
                    token: Secret::generate("phj_"),
                },
                services: vec![Service::Ssh, Service::Vnc],
                credentials: vec![Credential {
                    service: Service::Ssh,
                    username: "vagrant".into(),
                    password: Some(Secret::generate("pw_")),
                }],
                host_keys: vec![
                    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKbench0000000000000000000000000000000000 root@vm"
                        .into(),
                ],
                visitor_reports: true,
                attach_elsewhere: false,
            },
        ),
        (
            "open",
            Message::Open {
                conn_id: 4_242,
                service: Service::Ssh,
                secret: Secret::generate("phc_"),
            },
        ),
        ("ping", Message::Ping { seq: 1_000_000 }),
    ]
}

fn encoded(msg: &Message) -> BytesMut {
    let mut buf = BytesMut::new();
    if let Err(e) = frame::encode(msg, &mut buf) {
        unreachable!("benchmark message does not encode: {e}");
    }
    buf
}

fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for (name, msg) in messages() {
        group.throughput(Throughput::Bytes(encoded(&msg).len() as u64));
        let mut buf = BytesMut::with_capacity(4096);
        group.bench_function(name, |b| {
            b.iter(|| {
                buf.clear();
                let _ = frame::encode(black_box(&msg), &mut buf);
            })
        });
    }
    group.finish();
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (name, msg) in messages() {
        let wire = encoded(&msg);
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut src = wire.clone();
                black_box(frame::decode(black_box(&mut src)).ok().flatten())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_encode, bench_decode);
criterion_main!(benches);
