//! `presence`: a user's status, shared with everyone who shares a joined room with it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{check_sender, parse_data, Code};
use crate::codec::{FrameBuilder, ProtocolError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceStatus {
    Online,
    Offline,
    Away,
    Busy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub status: PresenceStatus,
}

#[derive(Deserialize)]
struct PresenceData {
    status: PresenceStatus,
    sender: String,
}

impl Presence {
    pub fn parse(data: &RawValue, user_id: &str) -> Result<Presence, ProtocolError> {
        let d: PresenceData = parse_data(data)?;
        check_sender(&d.sender, user_id)?;
        Ok(Presence { status: d.status })
    }
}

/// A `presence_response` event about `user_id`.
pub fn presence_frame(user_id: &str, room_id: Option<&str>, status: PresenceStatus) -> Bytes {
    FrameBuilder::success(
        Code::Presence.response(),
        user_id,
        room_id,
        None,
        PresenceEvent {
            status,
            sender: user_id,
        },
    )
}

#[derive(Serialize)]
struct PresenceEvent<'a> {
    status: PresenceStatus,
    sender: &'a str,
}
