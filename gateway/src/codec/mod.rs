//! The protocol codec: bytes in, envelopes out; replies in, frame bytes out. No I/O and no
//! tokio here, so it can be property-tested, fuzzed and benchmarked on its own.
//!
//! - [`envelope`]: parses one client text frame into a borrowed [`Envelope`].
//! - [`reply`]: builds server frames (`X_response`, errors, `connected`) as complete WebSocket
//!   frame bytes, serialized once and shareable between recipients.
//! - [`ws`]: the WebSocket frame header for unmasked server frames, and close frames.

pub mod envelope;
pub mod reply;
pub mod ws;

pub use envelope::{parse_envelope, Envelope, EnvelopeError};
pub use reply::{FrameBuilder, Reply};

/// The protocol's `error_code` values (PROTOCOL.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadRequest,
    UnknownCode,
    AuthError,
    Forbidden,
    NotFound,
    NotJoined,
    TooLarge,
    RateLimited,
    Unavailable,
}

impl ErrorCode {
    /// Every code, for metric label pre-registration.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownCode,
        ErrorCode::AuthError,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::NotJoined,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::UnknownCode => "UNKNOWN_CODE",
            ErrorCode::AuthError => "AUTH_ERROR",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::NotJoined => "NOT_JOINED",
            ErrorCode::TooLarge => "TOO_LARGE",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::Unavailable => "UNAVAILABLE",
        }
    }

    /// Position in [`ErrorCode::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A request that cannot be served: the error code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
    /// The `message_id` the server chose for a chat that was not accepted, so the client can
    /// retry with it idempotently. Boxed: errors travel by value and are rarely this.
    pub message_id: Option<Box<str>>,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
            message_id: None,
        }
    }

    /// The same error, carrying the `message_id` of the chat it refuses (when there is one).
    pub fn with_message_id(mut self, message_id: Option<String>) -> Self {
        self.message_id = message_id.map(String::into_boxed_str);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ProtocolError {}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::ws::payload_of;
    use super::*;

    proptest! {
        #[test]
        fn envelope_round_trips(
            code in "[a-z_]{1,20}",
            user in "\\PC{1,40}",
            room in proptest::option::of("\\PC{1,40}"),
            reference in proptest::option::of("[ -~]{0,64}"),
            text in "\\PC{0,200}",
        ) {
            let mut frame = serde_json::json!({
                "code": code, "user_id": user, "data": {"message": text},
            });
            if let Some(room) = &room {
                frame["room_id"] = serde_json::json!(room);
            }
            if let Some(reference) = &reference {
                frame["ref"] = serde_json::json!(reference);
            }
            let bytes = serde_json::to_vec(&frame).unwrap();
            let env = parse_envelope(&bytes).unwrap();
            prop_assert_eq!(env.code.as_ref(), code.as_str());
            prop_assert_eq!(env.user_id.as_ref(), user.as_str());
            prop_assert_eq!(env.room_id.as_deref(), room.as_deref());
            prop_assert_eq!(env.reference.as_deref(), reference.as_deref());
            let data: serde_json::Value = serde_json::from_str(env.data.get()).unwrap();
            prop_assert_eq!(&data["message"], &serde_json::json!(text));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_envelope(&bytes);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_frame_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            max in 0usize..200,
        ) {
            if let Ok(Some(head)) = ws::decode_head(&bytes, max) {
                prop_assert!(head.payload_len <= max);
                prop_assert!(head.header_len >= 6 && head.header_len <= 14);
                let mut payload = bytes[head.header_len.min(bytes.len())..].to_vec();
                ws::unmask(&mut payload, head.mask);
            }
            let _ = ws::check_close_payload(&bytes);
        }

        #[test]
        fn unmasking_twice_restores_the_payload(
            payload in proptest::collection::vec(any::<u8>(), 0..100),
            mask in any::<[u8; 4]>(),
        ) {
            let mut masked = payload.clone();
            ws::unmask(&mut masked, mask);
            for (i, (m, p)) in masked.iter().zip(&payload).enumerate() {
                prop_assert_eq!(*m, p ^ mask[i % 4]);
            }
            ws::unmask(&mut masked, mask);
            prop_assert_eq!(masked, payload);
        }

        #[test]
        fn arbitrary_json_objects_never_panic(value in arbitrary_json()) {
            let bytes = serde_json::to_vec(&value).unwrap();
            if let Ok(env) = parse_envelope(&bytes) {
                if let Some(code) = crate::cmd::Code::parse(&env.code) {
                    let _ = crate::cmd::Command::parse(code, env.data, &env.user_id);
                }
            }
        }

        #[test]
        fn replies_encode_to_valid_frames(user in "\\PC{1,40}", text in "\\PC{0,300}", reference in proptest::option::of("[ -~]{0,64}")) {
            let frame = FrameBuilder::success("chat_response", &user, Some("r"), reference.as_deref(), serde_json::json!({"message": text}));
            let value: serde_json::Value = serde_json::from_slice(payload_of(&frame)).unwrap();
            prop_assert_eq!(&value["user_id"], &serde_json::json!(user));
            prop_assert_eq!(&value["data"]["message"], &serde_json::json!(text));
        }
    }

    fn arbitrary_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            "\\PC{0,20}".prop_map(serde_json::Value::from),
            prop_oneof![
                Just("chat"),
                Just("join"),
                Just("typing"),
                Just("read_receipt"),
                Just("presence"),
                Just("historic"),
                Just("ping"),
                Just("leave")
            ]
            .prop_map(serde_json::Value::from),
        ];
        let value = leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("code".to_owned()),
                        Just("user_id".to_owned()),
                        Just("room_id".to_owned()),
                        Just("data".to_owned()),
                        Just("ref".to_owned()),
                        Just("message".to_owned()),
                        Just("sender".to_owned()),
                        Just("status".to_owned()),
                        "[a-z]{1,6}"
                    ],
                    inner,
                    0..6,
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        });
        proptest::collection::btree_map(
            prop_oneof![
                Just("code".to_owned()),
                Just("user_id".to_owned()),
                Just("room_id".to_owned()),
                Just("data".to_owned()),
                Just("ref".to_owned())
            ],
            value,
            0..5,
        )
        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect()))
    }
}
