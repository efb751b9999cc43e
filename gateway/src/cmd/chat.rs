//! `chat`: a message to store durably and fan out to the room.

use serde::Deserialize;
use serde_json::value::RawValue;
use storage::MessageType;

use super::{check_sender, parse_data};
use crate::codec::{ErrorCode, ProtocolError};

/// Longest client-chosen `message_id`, in bytes.
pub const MAX_MESSAGE_ID_BYTES: usize = 64;
/// Longest message text, in bytes.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;
/// Most attachments per message, and the longest reference to one.
pub const MAX_ATTACHMENTS: usize = 32;
pub const MAX_ATTACHMENT_BYTES: usize = 2048;
/// Largest `metadata` object, serialized.
pub const MAX_METADATA_BYTES: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct Chat {
    pub message: String,
    pub message_id: Option<String>,
    pub attached_files: Vec<String>,
    pub reply_to: Option<String>,
    pub kind: MessageType,
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct ChatData {
    message: String,
    sender: String,
    message_id: Option<String>,
    #[serde(default)]
    attached_files: Vec<String>,
    reply_to: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Chat {
    pub fn parse(data: &RawValue, user_id: &str) -> Result<Chat, ProtocolError> {
        let d: ChatData = parse_data(data)?;
        check_sender(&d.sender, user_id)?;
        if d.message.is_empty() && d.attached_files.is_empty() {
            return Err(ProtocolError::bad_request(
                "message may be empty only when attached_files is not",
            ));
        }
        if let Some(id) = &d.message_id {
            if id.is_empty() || id.len() > MAX_MESSAGE_ID_BYTES {
                return Err(ProtocolError::bad_request(
                    "message_id must be 1 to 64 bytes",
                ));
            }
        }
        if d.message.len() > MAX_TEXT_BYTES {
            return Err(ProtocolError::new(
                ErrorCode::TooLarge,
                "message is longer than 16384 bytes",
            ));
        }
        if d.attached_files.len() > MAX_ATTACHMENTS
            || d.attached_files
                .iter()
                .any(|f| f.len() > MAX_ATTACHMENT_BYTES)
        {
            return Err(ProtocolError::new(
                ErrorCode::TooLarge,
                "at most 32 attached_files of at most 2048 bytes each",
            ));
        }
        let kind = match d.kind.as_deref() {
            None => MessageType::Text,
            Some(k) => MessageType::parse(k)
                .ok_or_else(|| ProtocolError::bad_request(format!("unknown message type {k:?}")))?,
        };
        let metadata = d.metadata.unwrap_or_default();
        if !metadata.is_empty()
            && serde_json::to_vec(&metadata).map_or(0, |v| v.len()) > MAX_METADATA_BYTES
        {
            return Err(ProtocolError::new(
                ErrorCode::TooLarge,
                "metadata is larger than 8192 bytes",
            ));
        }
        Ok(Chat {
            message: d.message,
            message_id: d.message_id,
            attached_files: d.attached_files,
            reply_to: d.reply_to,
            kind,
            metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Chat, ProtocolError> {
        let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
        Chat::parse(&raw, "u1")
    }

    #[test]
    fn validates_chat_data() {
        assert!(parse(r#"{"message":"hi","sender":"u1"}"#).is_ok());
        assert_eq!(
            parse(r#"{"message":"hi","sender":"u2"}"#).unwrap_err().code,
            ErrorCode::Forbidden
        );
        assert_eq!(
            parse(r#"{"message":"","sender":"u1"}"#).unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert!(parse(r#"{"message":"","sender":"u1","attached_files":["a.png"]}"#).is_ok());
        assert_eq!(
            parse(r#"{"message":"hi","sender":"u1","type":"gif"}"#)
                .unwrap_err()
                .code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            parse(r#"{"message":5,"sender":"u1"}"#).unwrap_err().code,
            ErrorCode::BadRequest
        );
        let long = format!(
            r#"{{"message":"{}","sender":"u1"}}"#,
            "a".repeat(MAX_TEXT_BYTES + 1)
        );
        assert_eq!(parse(&long).unwrap_err().code, ErrorCode::TooLarge);
    }
}
