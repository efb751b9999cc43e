//! `leave`: unsubscribe this connection from a room. Never refused: the connection forgets the
//! room at once, so a refused leave would leave a membership nobody removes.

use storage::RoomKey;

use super::{Code, RoomCall};
use crate::codec::FrameBuilder;
use crate::metrics::OutCode;
use crate::outbox::FrameClass;
use crate::shard::{ConnRef, Shard};

impl Shard {
    pub(crate) fn leave(&mut self, call: RoomCall) {
        self.reply_leave(&call.conn, &call.room, call.reference.as_deref());
        self.remove_member(&call.room, call.conn.id);
    }

    /// The `leave` reply (a leave always succeeds, whether the room exists or not).
    pub(crate) fn reply_leave(&self, conn: &ConnRef, room: &RoomKey, reference: Option<&str>) {
        self.shared
            .metrics
            .frames_out(OutCode::Response(Code::Leave), 1);
        let frame = FrameBuilder::success(
            Code::Leave.response(),
            &conn.claims.sub,
            Some(&room.room_id),
            reference,
            serde_json::Map::new(),
        );
        self.route().send(conn, frame, FrameClass::Durable);
    }
}
