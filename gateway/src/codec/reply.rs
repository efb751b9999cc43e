//! Server frames (PROTOCOL.md §2): each one serialized once, straight into a framed buffer.

use bytes::Bytes;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::value::RawValue;
use storage::Timestamp;

use super::ws::{FrameBuf, OpCode};
use super::ProtocolError;

/// One server frame before encoding.
pub struct Reply<'a, D> {
    /// `true` for `"status":"success"`, `false` for `"error"`.
    pub success: bool,
    /// The full code, e.g. `chat_response`, `connected` or `error`.
    pub code: &'a str,
    /// The user whose action the frame reports.
    pub user_id: Option<&'a str>,
    pub room_id: Option<&'a str>,
    pub reference: Option<&'a str>,
    pub timestamp: Timestamp,
    pub data: D,
}

struct ErrorData<'a> {
    error: &'a ProtocolError,
}

impl Serialize for ErrorData<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("error_code", self.error.code.as_str())?;
        map.serialize_entry("message", &self.error.message)?;
        if let Some(message_id) = &self.error.message_id {
            map.serialize_entry("message_id", message_id)?;
        }
        map.end()
    }
}

impl<D: Serialize> Serialize for Reply<'_, D> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("status", if self.success { "success" } else { "error" })?;
        map.serialize_entry("code", self.code)?;
        if let Some(user_id) = self.user_id {
            map.serialize_entry("user_id", user_id)?;
        }
        if let Some(room_id) = self.room_id {
            map.serialize_entry("room_id", room_id)?;
        }
        map.serialize_entry("timestamp", &self.timestamp)?;
        if let Some(reference) = self.reference {
            map.serialize_entry("ref", reference)?;
        }
        map.serialize_entry("data", &self.data)?;
        map.end()
    }
}

/// Encodes replies as complete WebSocket text frames.
pub struct FrameBuilder;

impl FrameBuilder {
    /// Serializes a reply into one shareable frame.
    pub fn encode<D: Serialize>(reply: &Reply<'_, D>) -> Bytes {
        Self::encode_sized(reply, 256)
    }

    /// [`Self::encode`] into a buffer of `capacity` payload bytes to start with: one that
    /// fits spares the copies of growing it.
    fn encode_sized<D: Serialize>(reply: &Reply<'_, D>, capacity: usize) -> Bytes {
        let mut buf = FrameBuf::with_capacity(capacity);
        serde_json::to_writer(buf.payload_writer(), reply)
            .expect("serializing a reply into memory cannot fail");
        buf.finish(OpCode::Text)
    }

    /// A success frame.
    pub fn success<D: Serialize>(
        code: &str,
        user_id: &str,
        room_id: Option<&str>,
        reference: Option<&str>,
        data: D,
    ) -> Bytes {
        Self::encode(&Reply {
            success: true,
            code,
            user_id: Some(user_id),
            room_id,
            reference,
            timestamp: Timestamp::now(),
            data,
        })
    }

    /// A success frame around data serialized already (a stored message), stamped with
    /// `timestamp` so that the frames of one event share one clock read.
    pub fn success_raw(
        code: &str,
        user_id: &str,
        room_id: Option<&str>,
        reference: Option<&str>,
        timestamp: Timestamp,
        data: &RawValue,
    ) -> Bytes {
        // The envelope's names and punctuation, the timestamp, and room for escapes.
        let envelope = 128 + code.len() + user_id.len();
        let fields = room_id.map_or(0, str::len) + reference.map_or(0, str::len);
        Self::encode_sized(
            &Reply {
                success: true,
                code,
                user_id: Some(user_id),
                room_id,
                reference,
                timestamp,
                data,
            },
            envelope + fields + data.get().len(),
        )
    }

    /// An error frame with `data: { error_code, message }`.
    pub fn error(
        code: &str,
        user_id: Option<&str>,
        room_id: Option<&str>,
        reference: Option<&str>,
        error: &ProtocolError,
    ) -> Bytes {
        Self::encode(&Reply {
            success: false,
            code,
            user_id,
            room_id,
            reference,
            timestamp: Timestamp::now(),
            data: ErrorData { error },
        })
    }
}

/// `X_response` for a request code `X`.
pub fn response_code(code: &str) -> String {
    let mut out = String::with_capacity(code.len() + 9);
    out.push_str(code);
    out.push_str("_response");
    out
}

#[cfg(test)]
mod tests {
    use super::super::ws::payload_of;
    use super::super::ErrorCode;
    use super::*;

    #[test]
    fn error_frames_have_the_documented_shape() {
        let err = ProtocolError::new(ErrorCode::NotJoined, "join the room first");
        let frame = FrameBuilder::error("chat_response", Some("u1"), Some("r1"), Some("c-1"), &err);
        let v: serde_json::Value = serde_json::from_slice(payload_of(&frame)).unwrap();
        assert_eq!(v["status"], "error");
        assert_eq!(v["code"], "chat_response");
        assert_eq!(v["ref"], "c-1");
        assert_eq!(v["room_id"], "r1");
        assert_eq!(v["data"]["error_code"], "NOT_JOINED");
        assert_eq!(v["data"]["message"], "join the room first");
    }
}
