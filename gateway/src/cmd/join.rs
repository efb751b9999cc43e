//! `join`: subscribe this connection to a room, optionally recovering missed messages.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use storage::{HistoryQuery, Room, RoomKey, Store};

use super::historic::{page_json, PageEnd};
use super::presence::{presence_frame, PresenceStatus};
use super::{marks_mine, parse_data, Code, RoomCall};
use crate::auth::may_join;
use crate::codec::{FrameBuilder, ProtocolError};
use crate::delivery::{page_delivery, side_of};
use crate::metrics::OutCode;
use crate::outbox::FrameClass;
use crate::presence::UserKey;
use crate::shard::{
    access_error, server_busy, storage_unavailable, ConnRef, Member, Pending, Route, Shard,
    ShardEvent, Slot,
};

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

impl Shard {
    /// `join`: access check, membership, presence to the others, and the reply with the
    /// room's summary and presence (and, with `since_seq`, the missed messages, read and
    /// serialized in helper tasks while events for the new member wait behind the reply).
    pub(crate) fn join(&mut self, call: RoomCall, join: Join) {
        let RoomCall {
            conn,
            room: room_id,
            reference,
            ..
        } = call;
        let Some(Slot::Ready(state)) = self.rooms.get_mut(&room_id) else {
            return;
        };
        if let Some(error) = access_error(may_join(&conn.claims, &state.room)) {
            self.reply_error(&conn, Code::Join, &room_id, reference.as_deref(), error);
            self.maybe_unload(&room_id);
            return;
        }
        // A join with `since_seq` reads the store in a helper task: it needs a permit.
        let permit = match join.since_seq {
            Some(_) => match self.work.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    let error = server_busy();
                    self.reply_error(&conn, Code::Join, &room_id, reference.as_deref(), error);
                    self.maybe_unload(&room_id);
                    return;
                }
            },
            None => None,
        };
        let Some(Slot::Ready(state)) = self.rooms.get_mut(&room_id) else {
            return;
        };
        let user_key = conn.user_key();
        let already_member = state.members.contains_key(&conn.id);
        let first_of_user =
            !already_member && self.shared.presence.joined(&user_key, &room_id.room_id);
        // Tell the others this user is here, with its current status (once per user and room).
        if first_of_user {
            let status = self.shared.presence.status(&user_key);
            let frame = presence_frame(&conn.claims.sub, Some(&room_id.room_id), status);
            let route = Route::new(&self.shared.shards, self.index);
            let members = state.members.values_mut().filter(|member| {
                member.conn.claims.sub != conn.claims.sub
                    || member.conn.claims.tenant != conn.claims.tenant
            });
            let n = route.broadcast(&mut self.lists, members, &frame, FrameClass::Ephemeral);
            self.shared
                .metrics
                .frames_out(OutCode::Response(Code::Presence), n);
        }
        let mut users: Vec<&str> = state.room.participants.iter().map(String::as_str).collect();
        for member in state.members.values() {
            if member.conn.claims.tenant == state.room.tenant_id {
                users.push(&member.conn.claims.sub);
            }
        }
        users.push(&conn.claims.sub);
        users.sort_unstable();
        users.dedup();
        users.truncate(500);
        let presence: Vec<PresenceEntry> = users
            .into_iter()
            .map(|user_id| PresenceEntry {
                status: self.shared.presence.status(&UserKey {
                    tenant: state.room.tenant_id.clone(),
                    user_id: user_id.to_owned(),
                }),
                user_id: user_id.to_owned(),
            })
            .collect();
        let last_seq = state.room.last_seq;
        let room_summary = RoomSummary::of(&state.room, last_seq);
        let (Some(since), Some(permit)) = (join.since_seq, permit) else {
            // Nothing to read: the reply goes out at once.
            state.members.insert(
                conn.id,
                Member {
                    conn: conn.clone(),
                    pending: None,
                    joined_at_seq: last_seq,
                    held: Vec::new(),
                },
            );
            self.shared
                .metrics
                .frames_out(OutCode::Response(Code::Join), 1);
            let frame = FrameBuilder::success(
                Code::Join.response(),
                &conn.claims.sub,
                Some(&room_id.room_id),
                reference.as_deref(),
                JoinReply {
                    room: room_summary,
                    presence,
                    missed: None,
                    has_more: None,
                },
            );
            self.route().send(&conn, frame, FrameClass::Durable);
            return;
        };
        state.members.insert(
            conn.id,
            Member {
                conn: conn.clone(),
                pending: Some(Pending::default()),
                joined_at_seq: last_seq,
                held: Vec::new(),
            },
        );
        self.joins_in_flight += 1;

        let store = self.shared.store.clone();
        let events = self.events_tx.clone();
        let budget = self.shared.config.max_reply_bytes;
        // A conversation's messages carry their delivery state; the joiner's side has them.
        let marks = self.delivery_marks(&room_id);
        let reader = side_of(conn.claims.role);
        let query = HistoryQuery {
            after_seq: Some(since),
            before_seq: Some(last_seq + 1),
            limit: join.limit,
            include_notes: conn.claims.role.sees_notes(),
            max_bytes: budget,
        };
        tokio::spawn(async move {
            let page = match (store.history(&room_id, query).await, marks) {
                (Ok(page), Some(live)) => page_delivery(&store, &room_id, live, &page.messages)
                    .await
                    .map(|delivery| (page, Some(delivery.for_reader(reader)))),
                (page, _) => page.map(|page| (page, None)),
            };
            let mut through = None;
            let (frame, ok) = match page {
                Ok((page, delivery)) => {
                    let user_id = conn.claims.sub.clone();
                    let room = room_id.clone();
                    let role = conn.claims.role;
                    // A page may be large: it is serialized off the shard's thread.
                    let built = tokio::task::spawn_blocking(move || {
                        let customer = marks_mine(role).then_some(user_id.as_str());
                        let missed =
                            page_json(&page, budget, PageEnd::Oldest, customer, delivery.as_ref());
                        let delivered = delivery.and(missed.through);
                        let frame = FrameBuilder::success(
                            Code::Join.response(),
                            &user_id,
                            Some(&room.room_id),
                            reference.as_deref(),
                            JoinReply {
                                room: room_summary,
                                presence,
                                missed: Some(missed.messages),
                                has_more: Some(missed.has_more),
                            },
                        );
                        (frame, delivered)
                    })
                    .await;
                    match built {
                        Ok((frame, delivered)) => {
                            through = delivered;
                            (frame, true)
                        }
                        Err(_) => (join_unavailable(&conn, &room_id, None), false),
                    }
                }
                Err(e) => {
                    tracing::warn!(room_id = %room_id.room_id, error = %e, "reading missed messages failed");
                    (
                        join_unavailable(&conn, &room_id, reference.as_deref()),
                        false,
                    )
                }
            };
            let _ = events
                .send(ShardEvent::JoinReady {
                    room_id: room_id.clone(),
                    conn: conn.id,
                    frame,
                    ok,
                })
                .await;
            if let (Some(team), Some(seq)) = (reader, through) {
                let delivered =
                    move |shard: &mut Shard| shard.delivered_through(&room_id, team, seq);
                let _ = events.send(ShardEvent::Continue(Box::new(delivered))).await;
            }
            drop(permit);
        });
    }
}

/// The `UNAVAILABLE` reply to a join whose missed messages could not be read.
fn join_unavailable(conn: &ConnRef, room_id: &RoomKey, reference: Option<&str>) -> Bytes {
    FrameBuilder::error(
        Code::Join.response(),
        Some(&conn.claims.sub),
        Some(&room_id.room_id),
        reference,
        &storage_unavailable(),
    )
}

#[derive(Serialize)]
struct PresenceEntry {
    user_id: String,
    status: PresenceStatus,
}

#[derive(Serialize)]
struct RoomSummary {
    room_id: String,
    kind: &'static str,
    title: String,
    status: String,
    last_seq: u64,
}

impl RoomSummary {
    fn of(room: &Room, last_seq: u64) -> RoomSummary {
        RoomSummary {
            room_id: room.room_id.clone(),
            kind: room.kind.as_str(),
            title: room.title.clone(),
            status: room.status.clone(),
            last_seq,
        }
    }
}

#[derive(Serialize)]
struct JoinReply {
    room: RoomSummary,
    presence: Vec<PresenceEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    missed: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    has_more: Option<bool>,
}
