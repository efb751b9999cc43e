//! Client envelope parsing (PROTOCOL.md §2), borrowing from the frame buffer.
//!
//! Every top-level field is first captured as raw JSON and then checked on its own, so a wrong
//! type is reported against the right `code` (`X_response`) whenever the code itself is usable.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{ErrorCode, ProtocolError};

/// Longest accepted `ref`, in bytes.
pub const MAX_REF_BYTES: usize = 64;
/// Longest accepted `room_id`, in bytes.
pub const MAX_ROOM_ID_BYTES: usize = 128;
/// Longest accepted `code`, in bytes (longer ones are not echoed back).
pub const MAX_CODE_BYTES: usize = 64;

/// One parsed client frame. `data` stays raw JSON until the command parses it.
#[derive(Debug)]
pub struct Envelope<'a> {
    pub code: Cow<'a, str>,
    pub user_id: Cow<'a, str>,
    pub room_id: Option<Cow<'a, str>>,
    pub data: &'a RawValue,
    pub reference: Option<Cow<'a, str>>,
}

/// Why a frame is not a usable envelope. `code` is the request's code when it could be read
/// (the error reply then uses `code_response`), `None` otherwise (the reply uses `error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeError {
    pub code: Option<String>,
    pub reference: Option<String>,
    pub room_id: Option<String>,
    pub error: ProtocolError,
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow, default)]
    code: Option<&'a RawValue>,
    #[serde(borrow, default)]
    user_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    room_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "ref")]
    reference: Option<&'a RawValue>,
}

fn raw_string<'a>(raw: &'a RawValue) -> Option<Cow<'a, str>> {
    // Borrowed when the string has no escapes, owned otherwise.
    if let Ok(text) = <&'a str as Deserialize>::deserialize(raw) {
        return Some(Cow::Borrowed(text));
    }
    String::deserialize(raw).ok().map(Cow::Owned)
}

fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// Parses one text frame into an envelope.
pub fn parse_envelope(frame: &[u8]) -> Result<Envelope<'_>, EnvelopeError> {
    let raw: RawEnvelope<'_> = match serde_json::from_slice(frame) {
        Ok(raw) => raw,
        Err(e) => {
            let message = if e.is_syntax() || e.is_eof() {
                format!("malformed json: {e}")
            } else {
                format!("frame must be a json object with a string code: {e}")
            };
            return Err(EnvelopeError {
                code: None,
                reference: None,
                room_id: None,
                error: ProtocolError::bad_request(message),
            });
        }
    };

    let code = raw
        .code
        .and_then(raw_string)
        .filter(|c| !c.is_empty() && c.len() <= MAX_CODE_BYTES);
    let Some(code) = code else {
        return Err(EnvelopeError {
            code: None,
            reference: None,
            room_id: None,
            error: ProtocolError::bad_request("missing or invalid code"),
        });
    };

    let reference = match raw.reference.filter(|r| !is_null(r)) {
        None => None,
        Some(r) => match raw_string(r) {
            Some(r) if r.len() <= MAX_REF_BYTES => Some(r),
            Some(_) => return Err(fail(&code, None, None, "ref is longer than 64 bytes")),
            None => return Err(fail(&code, None, None, "ref must be a string")),
        },
    };
    let echo_ref = reference.as_deref();

    let room_id = match raw.room_id.filter(|r| !is_null(r)) {
        None => None,
        Some(r) => match raw_string(r) {
            Some(r) if !r.is_empty() && r.len() <= MAX_ROOM_ID_BYTES => Some(r),
            _ => {
                return Err(fail(
                    &code,
                    echo_ref,
                    None,
                    "room_id must be a non-empty string of at most 128 bytes",
                ))
            }
        },
    };
    let echo_room = room_id.as_deref();

    let user_id = match raw.user_id.and_then(raw_string) {
        Some(u) if !u.is_empty() => u,
        _ => {
            return Err(fail(
                &code,
                echo_ref,
                echo_room,
                "user_id is required and must be a string",
            ))
        }
    };
    let data = match raw.data {
        Some(d) if d.get().starts_with('{') => d,
        _ => {
            return Err(fail(
                &code,
                echo_ref,
                echo_room,
                "data is required and must be an object",
            ))
        }
    };
    if let Some(ts) = raw.timestamp.filter(|t| !is_null(t)) {
        if raw_string(ts).is_none() {
            return Err(fail(
                &code,
                echo_ref,
                echo_room,
                "timestamp must be an ISO 8601 string",
            ));
        }
    }

    Ok(Envelope {
        code,
        user_id,
        room_id,
        data,
        reference,
    })
}

fn fail(
    code: &str,
    reference: Option<&str>,
    room_id: Option<&str>,
    message: &str,
) -> EnvelopeError {
    EnvelopeError {
        code: Some(code.to_owned()),
        reference: reference.map(str::to_owned),
        room_id: room_id.map(str::to_owned),
        error: ProtocolError::new(ErrorCode::BadRequest, message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_envelope_without_copying_plain_strings() {
        let frame = br#"{"code":"chat","user_id":"u1","room_id":"r1","data":{"message":"hi"},"ref":"c-1","extra":[1,2]}"#;
        let env = parse_envelope(frame).unwrap();
        assert_eq!(env.code, "chat");
        assert!(matches!(env.user_id, Cow::Borrowed("u1")));
        assert_eq!(env.room_id.as_deref(), Some("r1"));
        assert_eq!(env.reference.as_deref(), Some("c-1"));
        assert_eq!(env.data.get(), r#"{"message":"hi"}"#);
    }

    #[test]
    fn not_an_object_has_no_code() {
        for frame in [
            &b"[1,2]"[..],
            b"42",
            b"\"chat\"",
            b"{",
            b"",
            b"{\"code\":5}",
        ] {
            let err = parse_envelope(frame).unwrap_err();
            assert_eq!(err.code, None, "{:?}", String::from_utf8_lossy(frame));
            assert_eq!(err.error.code, ErrorCode::BadRequest);
        }
    }

    #[test]
    fn wrong_types_keep_the_code() {
        let err = parse_envelope(br#"{"code":"chat","user_id":7,"data":{}}"#).unwrap_err();
        assert_eq!(err.code.as_deref(), Some("chat"));
        let err = parse_envelope(br#"{"code":"chat","user_id":"u","data":[]}"#).unwrap_err();
        assert_eq!(err.code.as_deref(), Some("chat"));
        let err = parse_envelope(br#"{"code":"chat","user_id":"u"}"#).unwrap_err();
        assert_eq!(err.code.as_deref(), Some("chat"));
        let long_ref = format!(
            r#"{{"code":"ping","user_id":"u","data":{{}},"ref":"{}"}}"#,
            "x".repeat(65)
        );
        let err = parse_envelope(long_ref.as_bytes()).unwrap_err();
        assert_eq!(err.reference, None);
    }

    #[test]
    fn deep_nesting_is_rejected_without_overflow() {
        let mut frame = String::from(r#"{"code":"chat","user_id":"u","data":"#);
        frame.push_str(&"[".repeat(10_000));
        frame.push_str(&"]".repeat(10_000));
        frame.push('}');
        assert!(parse_envelope(frame.as_bytes()).is_err());
    }
}
