//! `join`: subscribe this connection to a room, optionally recovering missed messages.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::parse_data;
use crate::codec::ProtocolError;

/// Default and largest page of `missed` messages.
pub const DEFAULT_MISSED_LIMIT: u32 = 100;
pub const MAX_MISSED_LIMIT: u32 = 500;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    pub since_seq: Option<u64>,
    /// Already clamped to `1..=MAX_MISSED_LIMIT`.
    pub limit: u32,
}

#[derive(Deserialize)]
struct JoinData {
    since_seq: Option<u64>,
    limit: Option<u32>,
}

impl Join {
    pub fn parse(data: &RawValue) -> Result<Join, ProtocolError> {
        let d: JoinData = parse_data(data)?;
        Ok(Join {
            since_seq: d.since_seq,
            limit: d
                .limit
                .unwrap_or(DEFAULT_MISSED_LIMIT)
                .clamp(1, MAX_MISSED_LIMIT),
        })
    }
}
