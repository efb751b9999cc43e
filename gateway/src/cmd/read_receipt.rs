//! `read_receipt`: move the user's read marker in a room forward to a message.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{check_sender, parse_data};
use crate::codec::ProtocolError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReceipt {
    pub message_id: String,
}

#[derive(Deserialize)]
struct ReadReceiptData {
    message_id: String,
    sender: String,
}

impl ReadReceipt {
    pub fn parse(data: &RawValue, user_id: &str) -> Result<ReadReceipt, ProtocolError> {
        let d: ReadReceiptData = parse_data(data)?;
        check_sender(&d.sender, user_id)?;
        if d.message_id.is_empty() || d.message_id.len() > super::chat::MAX_MESSAGE_ID_BYTES {
            return Err(ProtocolError::bad_request(
                "message_id must be 1 to 64 bytes",
            ));
        }
        Ok(ReadReceipt {
            message_id: d.message_id,
        })
    }
}
