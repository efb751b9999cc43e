//! `typing`: an ephemeral indicator relayed to the room's other connections.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{check_sender, parse_data, Code, RoomCall};
use crate::codec::{FrameBuilder, ProtocolError};
use crate::metrics::OutCode;
use crate::outbox::FrameClass;
use crate::shard::{Route, Shard, Slot};

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

impl Shard {
    /// `typing`: relayed to the room's other members, never stored, dropped first when an
    /// outbox is full.
    pub(crate) fn typing(&mut self, call: RoomCall, typing: Typing) {
        let (conn, room_id, status) = (&call.conn, &call.room, typing.status);
        let Some(Slot::Ready(state)) = self.rooms.get_mut(room_id) else {
            return;
        };
        let frame = FrameBuilder::success(
            Code::Typing.response(),
            &conn.claims.sub,
            Some(&room_id.room_id),
            None,
            TypingEvent {
                status,
                sender: &conn.claims.sub,
            },
        );
        let route = Route::new(&self.shared.shards, self.index);
        let members = state
            .members
            .values_mut()
            .filter(|member| member.conn.id != conn.id);
        let n = route.broadcast(&mut self.lists, members, &frame, FrameClass::Ephemeral);
        self.shared
            .metrics
            .frames_out(OutCode::Response(Code::Typing), n);
    }
}

#[derive(Serialize)]
struct TypingEvent<'a> {
    status: TypingStatus,
    sender: &'a str,
}
