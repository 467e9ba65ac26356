//! Property tests of the wire codec: every message kind round-trips, and no
//! byte string, arbitrary or truncated, makes the decoder panic.

use phalanx_protocol::membership::{KeptResult, RecoveryReport};
use phalanx_protocol::wire::{
    decode, encode_control, encode_frame_header, AbortReason, ControlMessage, DType, DecodeError,
    Decoded, EnvelopeHeader, FrameHeader, Held, Limits, MessageKind, NodeMessage, RejectCode,
    ENVELOPE_LEN, FRAME_HEADER_LEN, MAGIC, PROTOCOL_VERSION,
};
use phalanx_protocol::{Epoch, Incarnation, MemberId, OpId, Step};
use proptest::prelude::*;

fn cases() -> ProptestConfig {
    // CI runs at least 10,000 cases per property; PHALANX_PROPTEST_CASES raises it.
    let n = std::env::var("PHALANX_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    ProptestConfig::with_cases(n)
}

fn member() -> impl Strategy<Value = MemberId> {
    any::<u32>().prop_map(MemberId)
}

fn reject_code() -> impl Strategy<Value = RejectCode> {
    prop_oneof![
        Just(RejectCode::UnsupportedVersion),
        Just(RejectCode::UnknownMember),
        Just(RejectCode::StaleIncarnation),
        Just(RejectCode::Malformed),
        Just(RejectCode::TooLarge),
        Just(RejectCode::Unavailable),
    ]
}

fn abort_reason() -> impl Strategy<Value = AbortReason> {
    prop_oneof![
        member().prop_map(AbortReason::MemberDown),
        any::<u64>().prop_map(|e| AbortReason::EpochChanged(Epoch(e))),
        Just(AbortReason::Timeout),
        member().prop_map(AbortReason::ProtocolViolation),
        Just(AbortReason::Cancelled),
    ]
}

fn control() -> impl Strategy<Value = ControlMessage> {
    prop_oneof![
        (
            any::<u16>(),
            ".{0,40}",
            member(),
            any::<u64>(),
            any::<u16>()
        )
            .prop_map(|(v, c, m, i, l)| {
                ControlMessage::Hello {
                    protocol_version: v,
                    cluster: c,
                    member: m,
                    incarnation: Incarnation(i),
                    link: l,
                }
            }),
        (member(), any::<u64>(), any::<u64>()).prop_map(|(m, i, e)| ControlMessage::Welcome {
            member: m,
            incarnation: Incarnation(i),
            epoch: Epoch(e),
        }),
        (reject_code(), ".{0,80}")
            .prop_map(|(code, detail)| ControlMessage::Reject { code, detail }),
        (member(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(m, i, e, t)| {
            ControlMessage::Heartbeat {
                member: m,
                incarnation: Incarnation(i),
                epoch: Epoch(e),
                sent_at_us: t,
            }
        }),
        (any::<u64>(), any::<u64>(), abort_reason()).prop_map(|(o, e, reason)| {
            ControlMessage::AbortOp {
                op: OpId(o),
                epoch: Epoch(e),
                reason,
            }
        }),
        (member(), ".{0,40}").prop_map(|(m, r)| ControlMessage::Goodbye {
            member: m,
            reason: r
        }),
        proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|message| ControlMessage::Raft { message }),
        proptest::collection::vec((any::<u32>(), any::<u64>()), 0..8)
            .prop_map(|streams| ControlMessage::Node(NodeMessage::Progress { streams })),
        (
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            member(),
            dtype(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(member(), 0..5)
        )
            .prop_map(|(stream, op, e, root, dtype, len, checksum, members)| {
                ControlMessage::Node(NodeMessage::JoinPoint {
                    stream,
                    op: OpId(op),
                    epoch: Epoch(e),
                    root,
                    dtype,
                    len,
                    checksum,
                    members,
                })
            }),
        (
            any::<u32>(),
            any::<u64>(),
            proptest::option::of((any::<u64>(), any::<u64>())),
            any::<u64>(),
            any::<u64>(),
            dtype(),
            any::<u64>(),
        )
            .prop_map(|(stream, e, holds, seen, checksum, dtype, len)| {
                ControlMessage::Node(NodeMessage::StateOffer {
                    stream,
                    epoch: Epoch(e),
                    holds: holds.map(|(seq, epoch)| Held {
                        seq,
                        epoch: Epoch(epoch),
                    }),
                    seen,
                    checksum,
                    dtype,
                    len,
                })
            }),
        (
            any::<u64>(),
            member(),
            proptest::collection::vec(
                (any::<u64>(), proptest::collection::vec(member(), 0..5)),
                0..4
            ),
            proptest::collection::vec(
                (any::<u64>(), proptest::collection::vec(member(), 0..5)),
                0..4
            )
        )
            .prop_map(|(e, m, p, c)| {
                ControlMessage::Node(NodeMessage::Recovery(RecoveryReport {
                    epoch: Epoch(e),
                    member: m,
                    parked: p.iter().map(|(o, ms)| (OpId(*o), ms.clone())).collect(),
                    completed: c
                        .into_iter()
                        .map(|(o, ms)| KeptResult {
                            op: OpId(o),
                            waiting: ms.iter().rev().copied().collect(),
                            contributors: ms,
                            dtype: phalanx_protocol::wire::DType::F32,
                            len: o,
                        })
                        .collect(),
                    synced: p.iter().map(|(o, _)| (*o as u32, Epoch(*o))).collect(),
                    returned: p
                        .iter()
                        .flat_map(|(o, ms)| ms.iter().map(move |m| (*o as u32, *m, Epoch(*o))))
                        .collect(),
                    returning: p
                        .iter()
                        .map(|(o, ms)| phalanx_protocol::membership::ReturnClaim {
                            stream: *o as u32,
                            next: *o,
                            last: ms.clone(),
                        })
                        .collect(),
                }))
            }),
        any::<u64>()
            .prop_map(|e| ControlMessage::Node(NodeMessage::RecoveryAsk { epoch: Epoch(e) })),
        ("[a-z0-9.-]{0,20}", "[0-9.:]{0,21}")
            .prop_map(|(name, addr)| ControlMessage::JoinRequest { name, addr }),
        proptest::collection::vec((member(), "[a-z0-9-]{0,12}", "[0-9.:]{0,21}"), 0..6)
            .prop_map(|members| ControlMessage::JoinRoster { members }),
    ]
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)]
}

fn frame() -> impl Strategy<Value = (FrameHeader, Vec<u8>)> {
    (
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
        (member(), any::<u32>(), any::<u32>(), dtype(), 0u32..300),
        any::<u8>(),
    )
        .prop_map(
            |((op, epoch, step, inc), (sender, round, chunk, dtype, n), fill)| {
                let header = FrameHeader {
                    op: OpId(op),
                    epoch: Epoch(epoch),
                    step: Step(step),
                    incarnation: Incarnation(inc),
                    sender,
                    round,
                    chunk,
                    dtype,
                    elem_count: n,
                };
                let payload = (0..header.payload_len())
                    .map(|i| fill.wrapping_add(i as u8))
                    .collect();
                (header, payload)
            },
        )
}

fn encode_frame(header: &FrameHeader, payload: &[u8]) -> Vec<u8> {
    let mut bytes = encode_frame_header(header).to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn control_round_trips(msg in control(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
        let mut bytes = encode_control(&msg);
        let len = bytes.len();
        bytes.extend_from_slice(&tail); // the next message's bytes must be left alone
        let (decoded, used) = decode(&bytes, &Limits::default()).unwrap();
        prop_assert_eq!(used, len);
        prop_assert_eq!(decoded, Decoded::Control(msg));
    }

    #[test]
    fn frame_round_trips((header, payload) in frame()) {
        let bytes = encode_frame(&header, &payload);
        let (decoded, used) = decode(&bytes, &Limits::default()).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(decoded, Decoded::Frame { header, payload: &payload });
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(&bytes, &Limits::default());
    }

    /// Bytes behind a valid envelope prefix reach the body decoders, where
    /// most of the parsing lives.
    #[test]
    fn arbitrary_bodies_never_panic(
        kind in 0u8..4,
        body in proptest::collection::vec(any::<u8>(), 0..200),
        claimed in prop_oneof![Just(None), (0u32..400).prop_map(Some)],
    ) {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        bytes.push(kind);
        bytes.push(0);
        let len = claimed.unwrap_or(body.len() as u32);
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&body);
        match decode(&bytes, &Limits::default()) {
            Ok((_, used)) => prop_assert!(used <= bytes.len()),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn truncated_messages_are_typed_errors(msg in control(), (header, payload) in frame(), cut in any::<prop::sample::Index>()) {
        for bytes in [encode_control(&msg), encode_frame(&header, &payload)] {
            let at = cut.index(bytes.len());
            let err = decode(&bytes[..at], &Limits::default()).unwrap_err();
            let truncated = matches!(err, DecodeError::Truncated { .. });
            prop_assert!(truncated, "cut at {} of {}: {:?}", at, bytes.len(), err);
        }
    }

    #[test]
    fn flipped_bytes_never_panic((header, payload) in frame(), msg in control(), pos in any::<prop::sample::Index>(), val in any::<u8>()) {
        for mut bytes in [encode_control(&msg), encode_frame(&header, &payload)] {
            let i = pos.index(bytes.len());
            bytes[i] = val;
            let _ = decode(&bytes, &Limits::default());
        }
    }
}

fn hello() -> Vec<u8> {
    encode_control(&ControlMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        cluster: "c".into(),
        member: MemberId(1),
        incarnation: Incarnation(0),
        link: 0,
    })
}

#[test]
fn bad_magic_is_refused() {
    let mut bytes = hello();
    bytes[0] = b'X';
    assert!(matches!(
        decode(&bytes, &Limits::default()),
        Err(DecodeError::BadMagic { .. })
    ));
}

#[test]
fn wrong_version_is_refused() {
    let mut bytes = hello();
    bytes[4..6].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
    let err = decode(&bytes, &Limits::default()).unwrap_err();
    assert!(
        matches!(err, DecodeError::UnsupportedVersion { found, .. } if found == PROTOCOL_VERSION + 1)
    );
    assert!(err.to_string().contains("unsupported protocol version"));
}

#[test]
fn oversized_bodies_are_refused_before_reading_them() {
    let limits = Limits {
        max_control_len: 64,
        max_frame_payload_len: 1024,
    };
    let env = EnvelopeHeader {
        version: PROTOCOL_VERSION,
        kind: MessageKind::Control,
        body_len: 65,
    };
    // Only the envelope is present: the limit must trip before any "need more bytes".
    assert!(matches!(
        decode(&env.encode(), &limits),
        Err(DecodeError::TooLarge {
            len: 65,
            max: 64,
            ..
        })
    ));
    let header = FrameHeader {
        op: OpId(1),
        epoch: Epoch(1),
        step: Step(1),
        incarnation: Incarnation(0),
        sender: MemberId(0),
        round: 0,
        chunk: 0,
        dtype: DType::F32,
        elem_count: 257,
    };
    let bytes = encode_frame_header(&header);
    assert!(matches!(
        decode(&bytes, &limits),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn unknown_dtype_and_trailing_bytes_are_refused() {
    let header = FrameHeader {
        op: OpId(1),
        epoch: Epoch(1),
        step: Step(1),
        incarnation: Incarnation(0),
        sender: MemberId(0),
        round: 0,
        chunk: 0,
        dtype: DType::F16,
        elem_count: 0,
    };
    let mut bytes = encode_frame_header(&header).to_vec();
    bytes[ENVELOPE_LEN + 44] = 9;
    assert_eq!(
        decode(&bytes, &Limits::default()).unwrap_err(),
        DecodeError::UnknownDType(9)
    );

    // A control body with a byte too many: bincode stops early, we do not.
    let mut bytes = hello();
    bytes.push(0);
    let body_len = (bytes.len() - ENVELOPE_LEN) as u32;
    bytes[8..12].copy_from_slice(&body_len.to_le_bytes());
    assert_eq!(
        decode(&bytes, &Limits::default()).unwrap_err(),
        DecodeError::TrailingBytes(1)
    );

    // A frame whose envelope claims more payload than the header implies.
    let mut bytes = encode_frame_header(&header).to_vec();
    bytes.extend_from_slice(&[0, 0]);
    let body_len = (FRAME_HEADER_LEN + 2) as u32;
    bytes[8..12].copy_from_slice(&body_len.to_le_bytes());
    assert!(matches!(
        decode(&bytes, &Limits::default()),
        Err(DecodeError::PayloadLength {
            expected: 0,
            actual: 2
        })
    ));
}
