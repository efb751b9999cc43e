//! `presence`: a user's status, shared with everyone who shares a joined room with it.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{check_sender, parse_data};
use crate::codec::ProtocolError;

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
