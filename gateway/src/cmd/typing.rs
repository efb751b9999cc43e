//! `typing`: an ephemeral indicator relayed to the room's other connections.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{check_sender, parse_data};
use crate::codec::ProtocolError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TypingStatus {
    Started,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Typing {
    pub status: TypingStatus,
}

#[derive(Deserialize)]
struct TypingData {
    status: TypingStatus,
    sender: String,
}

impl Typing {
    pub fn parse(data: &RawValue, user_id: &str) -> Result<Typing, ProtocolError> {
        let d: TypingData = parse_data(data)?;
        check_sender(&d.sender, user_id)?;
        Ok(Typing { status: d.status })
    }
}
