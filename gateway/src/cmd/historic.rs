//! `historic`: page through a room's stored messages.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::parse_data;
use crate::codec::ProtocolError;

pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 200;
/// Longest search string, in bytes.
pub const MAX_SEARCH_BYTES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Historic {
    pub before_seq: Option<u64>,
    pub after_seq: Option<u64>,
    /// Already clamped to `1..=MAX_LIMIT`.
    pub limit: u32,
    pub search: Option<String>,
}

#[derive(Deserialize)]
struct HistoricData {
    before_seq: Option<u64>,
    after_seq: Option<u64>,
    limit: Option<u32>,
    search: Option<String>,
}

impl Historic {
    pub fn parse(data: &RawValue) -> Result<Historic, ProtocolError> {
        let d: HistoricData = parse_data(data)?;
        if d.search
            .as_ref()
            .is_some_and(|s| s.len() > MAX_SEARCH_BYTES)
        {
            return Err(ProtocolError::bad_request(
                "search is longer than 256 bytes",
            ));
        }
        Ok(Historic {
            before_seq: d.before_seq,
            after_seq: d.after_seq,
            limit: d.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT),
            search: d.search.filter(|s| !s.trim().is_empty()),
        })
    }
}
