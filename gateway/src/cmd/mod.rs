//! One module per protocol code (PROTOCOL.md §3): each parses and validates its `data`.
//! [`Command::parse`] is the single dispatch point; it rejects unknown codes.

pub mod chat;
pub mod historic;
pub mod join;
pub mod presence;
pub mod read_receipt;
pub mod typing;

use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use crate::codec::{ErrorCode, ProtocolError};

/// The request codes a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    Join,
    Leave,
    Chat,
    Typing,
    ReadReceipt,
    Presence,
    Historic,
    Ping,
}

impl Code {
    /// Every code, for metric label pre-registration.
    pub const ALL: [Code; 8] = [
        Code::Join,
        Code::Leave,
        Code::Chat,
        Code::Typing,
        Code::ReadReceipt,
        Code::Presence,
        Code::Historic,
        Code::Ping,
    ];

    pub fn parse(code: &str) -> Option<Code> {
        Some(match code {
            "join" => Code::Join,
            "leave" => Code::Leave,
            "chat" => Code::Chat,
            "typing" => Code::Typing,
            "read_receipt" => Code::ReadReceipt,
            "presence" => Code::Presence,
            "historic" => Code::Historic,
            "ping" => Code::Ping,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Code::Join => "join",
            Code::Leave => "leave",
            Code::Chat => "chat",
            Code::Typing => "typing",
            Code::ReadReceipt => "read_receipt",
            Code::Presence => "presence",
            Code::Historic => "historic",
            Code::Ping => "ping",
        }
    }

    /// The code of every server frame about this kind.
    pub fn response(self) -> &'static str {
        match self {
            Code::Join => "join_response",
            Code::Leave => "leave_response",
            Code::Chat => "chat_response",
            Code::Typing => "typing_response",
            Code::ReadReceipt => "read_receipt_response",
            Code::Presence => "presence_response",
            Code::Historic => "historic_response",
            Code::Ping => "ping_response",
        }
    }

    /// Whether the envelope must carry a `room_id`.
    pub fn needs_room(self) -> bool {
        !matches!(self, Code::Presence | Code::Ping)
    }

    /// Position in [`Code::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Join(join::Join),
    Leave,
    Chat(chat::Chat),
    Typing(typing::Typing),
    ReadReceipt(read_receipt::ReadReceipt),
    Presence(presence::Presence),
    Historic(historic::Historic),
    Ping,
}

impl Command {
    /// Parses `data` for `code`. `user_id` is the authenticated subject: a `sender` naming
    /// anyone else is `FORBIDDEN`.
    pub fn parse(code: Code, data: &RawValue, user_id: &str) -> Result<Command, ProtocolError> {
        Ok(match code {
            Code::Join => Command::Join(join::Join::parse(data)?),
            Code::Leave => {
                parse_data::<serde::de::IgnoredAny>(data)?;
                Command::Leave
            }
            Code::Chat => Command::Chat(chat::Chat::parse(data, user_id)?),
            Code::Typing => Command::Typing(typing::Typing::parse(data, user_id)?),
            Code::ReadReceipt => {
                Command::ReadReceipt(read_receipt::ReadReceipt::parse(data, user_id)?)
            }
            Code::Presence => Command::Presence(presence::Presence::parse(data, user_id)?),
            Code::Historic => Command::Historic(historic::Historic::parse(data)?),
            Code::Ping => {
                parse_data::<serde::de::IgnoredAny>(data)?;
                Command::Ping
            }
        })
    }
}

/// Deserializes `data` into a typed struct; any mismatch is `BAD_REQUEST` naming the field.
pub(crate) fn parse_data<T: DeserializeOwned>(data: &RawValue) -> Result<T, ProtocolError> {
    serde_json::from_str(data.get())
        .map_err(|e| ProtocolError::bad_request(format!("invalid data: {e}")))
}

/// `sender` must name the authenticated user.
pub(crate) fn check_sender(sender: &str, user_id: &str) -> Result<(), ProtocolError> {
    if sender == user_id {
        Ok(())
    } else {
        Err(ProtocolError::new(
            ErrorCode::Forbidden,
            "data.sender must equal the authenticated user",
        ))
    }
}
