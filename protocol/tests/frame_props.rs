//! Property tests of the wire codec: every message round-trips, and arbitrary bytes never
//! panic the decoder nor make it reserve more than one frame's limit.

use bytes::{BufMut, BytesMut};
use porthole_protocol::frame::{decode, encode, FrameError};
use porthole_protocol::limits::{FRAME_HEADER_LEN, MAX_FRAME_LEN};
use porthole_protocol::message::HelloAuth;
use porthole_protocol::{ErrorCode, Message, Secret, Service};
use proptest::prelude::*;

fn service() -> impl Strategy<Value = Service> {
    prop_oneof![Just(Service::Ssh), Just(Service::Vnc)]
}

fn secret() -> impl Strategy<Value = Secret> {
    "[a-z0-9_]{0,80}".prop_map(Secret::new)
}

fn text() -> impl Strategy<Value = String> {
    any::<String>().prop_map(|s| s.chars().take(200).collect())
}

fn message() -> impl Strategy<Value = Message> {
    let auth = prop_oneof![
        secret().prop_map(|token| HelloAuth::Join { token }),
        (text(), secret())
            .prop_map(|(session_id, secret)| HelloAuth::Resume { session_id, secret }),
    ];
    let code = prop_oneof![
        Just(ErrorCode::VersionMismatch),
        Just(ErrorCode::BadToken),
        Just(ErrorCode::SessionRevoked),
        Just(ErrorCode::BadAttach),
        Just(ErrorCode::Internal),
    ];
    prop_oneof![
        (
            any::<u32>(),
            text(),
            auth,
            prop::collection::vec(service(), 0..3)
        )
            .prop_map(
                |(protocol_version, agent_version, auth, services)| Message::Hello {
                    protocol_version,
                    agent_version,
                    auth,
                    credentials: services
                        .iter()
                        .map(|s| porthole_protocol::Credential {
                            service: *s,
                            username: "vagrant".into(),
                            password: Some(Secret::new("pw")),
                        })
                        .collect(),
                    services,
                    host_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI test".into()],
                    visitor_reports: protocol_version % 2 == 0,
                    attach_elsewhere: false,
                }
            ),
        (
            text(),
            secret(),
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(
                |(session_id, resume_secret, port, deadline_unix_ms, heartbeat_ms, resumed)| {
                    Message::Registered {
                        session_id,
                        resume_secret,
                        endpoints: vec![porthole_protocol::Endpoint {
                            service: Service::Ssh,
                            host: "relay.example.com".into(),
                            port,
                        }],
                        deadline_unix_ms,
                        heartbeat_ms,
                        resumed,
                        data_plane: porthole_protocol::DataPlane::Tls,
                        data_port: Some(port),
                        park_secret: resumed.then(|| porthole_protocol::Secret::new("php_x")),
                        visitor_auth_reports: !resumed,
                        accepts_end: resumed,
                    }
                }
            ),
        (code, text()).prop_map(|(code, message)| Message::Error { code, message }),
        (any::<u64>(), service(), secret()).prop_map(|(conn_id, service, secret)| Message::Open {
            conn_id,
            service,
            secret
        }),
        (any::<u64>(), text())
            .prop_map(|(conn_id, reason)| Message::OpenFailed { conn_id, reason }),
        any::<u64>().prop_map(|conn_id| Message::VisitorAuthenticated { conn_id }),
        (text(), any::<u64>(), secret()).prop_map(|(session_id, conn_id, secret)| {
            Message::Attach {
                session_id,
                conn_id,
                secret,
            }
        }),
        (text(), secret()).prop_map(|(session_id, secret)| Message::Park { session_id, secret }),
        (any::<u64>(), service())
            .prop_map(|(conn_id, service)| Message::Assign { conn_id, service }),
        any::<u64>().prop_map(|seq| Message::Ping { seq }),
        any::<u64>().prop_map(|seq| Message::Pong { seq }),
        Just(Message::Finish),
        Just(Message::End),
        any::<u32>().prop_map(|count| Message::Visitors { count }),
        (any::<u64>(), any::<bool>()).prop_map(|(deadline_unix_ms, finishing)| Message::Deadline {
            deadline_unix_ms,
            finishing
        }),
        text().prop_map(|reason| Message::Revoked { reason }),
    ]
}

proptest! {
    #[test]
    fn every_message_roundtrips(msgs in prop::collection::vec(message(), 1..5)) {
        let mut buf = BytesMut::new();
        for m in &msgs {
            encode(m, &mut buf).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        for m in &msgs {
            let got = decode(&mut buf).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(got.as_ref(), Some(m));
        }
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic_or_overallocate(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let mut buf = BytesMut::new();
        buf.put_slice(&bytes);
        // Decode until the decoder wants more bytes or refuses the stream.
        while let Ok(Some(_)) = decode(&mut buf) {}
        prop_assert!(buf.capacity() <= (bytes.len() + FRAME_HEADER_LEN + MAX_FRAME_LEN).max(64));
    }

    #[test]
    fn declared_lengths_past_the_limit_are_refused(len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX, tail in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut buf = BytesMut::new();
        buf.put_u32(len);
        buf.put_slice(&tail);
        let refused = matches!(decode(&mut buf), Err(FrameError::TooLarge { .. }));
        prop_assert!(refused);
        prop_assert!(buf.capacity() < MAX_FRAME_LEN);
    }

    #[test]
    fn valid_length_with_random_payload_never_panics(payload in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::new();
        buf.put_u32(payload.len() as u32);
        buf.put_slice(&payload);
        let _ = decode(&mut buf);
    }
}
