//! `rate`: the conversation's customer rates it, `good` or `bad`, with an optional comment of
//! at most 1,000 bytes. Once: a second rating is `BAD_REQUEST`. Only the customer
//! (`FORBIDDEN` for anyone else). Saved, answered and announced by
//! [`Shard::change_conversation`].

use serde::Deserialize;
use serde_json::value::RawValue;
use storage::records::{Rating, RatingScore};
use storage::Timestamp;

use super::{parse_data, Code, RoomCall};
use crate::auth::Role;
use crate::codec::{ErrorCode, ProtocolError};
use crate::inbox::ConversationChange;
use crate::shard::Shard;

/// Longest rating comment, in bytes.
pub const MAX_COMMENT_BYTES: usize = 1000;

#[derive(Debug, Clone, PartialEq)]
pub struct Rate {
    pub score: RatingScore,
    pub comment: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Data {
    score: RatingScore,
    comment: Option<String>,
}

impl Rate {
    pub fn parse(data: &RawValue) -> Result<Rate, ProtocolError> {
        let Data { score, comment } = parse_data(data)?;
        if comment
            .as_ref()
            .is_some_and(|c| c.len() > MAX_COMMENT_BYTES)
        {
            return Err(ProtocolError::new(
                ErrorCode::TooLarge,
                "data.comment is longer than 1000 bytes",
            ));
        }
        Ok(Rate { score, comment })
    }
}

impl Shard {
    pub(crate) fn rate(&mut self, call: RoomCall, rate: Rate) {
        if call.conn.claims.role != Role::Customer {
            let error = ProtocolError::new(
                ErrorCode::Forbidden,
                "only the conversation's customer rates it",
            );
            return self.refuse(call, Code::Rate, error);
        }
        let rating = Rating {
            score: rate.score,
            comment: rate.comment,
            rated_at: Timestamp::now(),
        };
        self.change_conversation(call, Code::Rate, ConversationChange::Rate(rating));
    }
}
