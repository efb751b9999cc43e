//! Where a conversation's messages stand with the side they are for: `sent` (stored),
//! `delivered` (a connection of that side has it), `read` (that side read it, a read receipt)
//! or `failed` (the SMS, WhatsApp or email provider refused it). The room keeps each side's
//! marks ([`DeliveryMarks`], saved on the conversation with its activity); a message's JSON
//! carries its state as `delivery`; a side's members hear `delivery_response` when the other
//! side receives their messages later than live (on a join with `since_seq`, or a `historic`
//! page). Team rooms have no delivery state.

use std::collections::HashMap;

use serde::Serialize;
use storage::records::{
    self, Channel, Conversation, Delivery, DeliveryMarks, Inbox, MessageDelivery,
};
use storage::{Direction, Message, RoomKey, RoomKind, Store};

use crate::auth::Role;
use crate::codec::FrameBuilder;
use crate::integration::DELIVERY_RESPONSE;
use crate::outbox::FrameClass;
use crate::shard::{Route, Shard, Slot};

/// The side a connection reads for: the team (`true`), the customer (`false`), or neither.
pub(crate) fn side_of(role: Role) -> Option<bool> {
    match role {
        Role::Customer => Some(false),
        Role::Agent | Role::Admin => Some(true),
        Role::User | Role::Service => None,
    }
}

/// Appends `"delivery":"<state>"` to a serialized message (a JSON object).
pub(crate) fn mark_delivery(message_json: &mut Vec<u8>, state: MessageDelivery) {
    let value: &[u8] = match state {
        MessageDelivery::Sent => b"\"sent\"",
        MessageDelivery::Failed => b"\"failed\"",
        MessageDelivery::Delivered => b"\"delivered\"",
        MessageDelivery::Read => b"\"read\"",
    };
    crate::cmd::append_field(message_json, "delivery", value);
}

/// What a page of a conversation's messages needs to tell each one's state.
#[derive(Debug, Default, Clone)]
pub(crate) struct PageDelivery {
    pub marks: DeliveryMarks,
    /// The provider's state of each of the team's messages on the page that an SMS, WhatsApp
    /// or email worker carried, by message id.
    pub provider: HashMap<String, MessageDelivery>,
    /// The side reading the page, if any.
    pub reader: Option<bool>,
}

impl PageDelivery {
    /// The page as the reader's side (the team's, `Some(true)`) gets it: the messages for it
    /// on the page are delivered by this very page.
    pub(crate) fn for_reader(mut self, reader: Option<bool>) -> PageDelivery {
        self.reader = reader;
        self
    }

    /// The message's state: the later of its side's marks and its provider's word (a
    /// provider's `failed` stands until a mark says the message did arrive).
    pub(crate) fn state_of(&self, message: &Message) -> Option<MessageDelivery> {
        let mut state = self.marks.state_of(message.direction, message.seq)?;
        if let Some(&provider) = self.provider.get(&message.message_id) {
            state = state.max(provider);
        }
        if self.reader.is_some() && DeliveryMarks::for_team(message.direction) == self.reader {
            state = state.max(MessageDelivery::Delivered);
        }
        Some(state)
    }
}

/// Reads what a page of a conversation's `messages` needs to tell their states: the marks
/// saved on the conversation (joined with `live`, the loaded room's) and, when SMS, WhatsApp
/// or email carries the conversation, the provider's state of each of the team's messages on
/// the page (one read each, at most a page's worth).
pub(crate) async fn page_delivery<S: Store>(
    store: &S,
    room: &RoomKey,
    live: DeliveryMarks,
    messages: &[Message],
) -> storage::Result<PageDelivery> {
    let mut page = PageDelivery {
        marks: live,
        ..PageDelivery::default()
    };
    let Some(conversation) =
        records::load::<Conversation, _>(store, &room.tenant_id, &room.room_id).await?
    else {
        return Ok(page);
    };
    page.marks.merge(&conversation.value.delivery);
    let outgoing: Vec<&Message> = messages
        .iter()
        .filter(|m| m.direction == Direction::Outgoing)
        .collect();
    let Some(inbox_id) = conversation.value.inbox_id.as_deref() else {
        return Ok(page);
    };
    if outgoing.is_empty() {
        return Ok(page);
    }
    let carried = records::load::<Inbox, _>(store, &room.tenant_id, inbox_id)
        .await?
        .is_some_and(|inbox| !matches!(inbox.value.channel, Channel::WebWidget { .. }));
    if !carried {
        return Ok(page);
    }
    let states = futures_util::future::join_all(outgoing.iter().map(|m| {
        let id = Delivery::id(&room.room_id, &m.message_id);
        async move { records::load::<Delivery, _>(store, &room.tenant_id, &id).await }
    }))
    .await;
    for (message, state) in outgoing.iter().zip(states) {
        if let Some(state) = state?.and_then(|d| MessageDelivery::of_provider(&d.value.status)) {
            page.provider.insert(message.message_id.clone(), state);
        }
    }
    Ok(page)
}

/// `delivery_response` when a side's marks move: every message for it up to `through_seq` is
/// `delivered`.
#[derive(Serialize)]
struct MarksData {
    status: MessageDelivery,
    /// `team` or `contact`: whose connections received them.
    side: &'static str,
    through_seq: u64,
}

impl Shard {
    /// The room's marks, when it is a loaded conversation.
    pub(crate) fn delivery_marks(&self, room: &RoomKey) -> Option<DeliveryMarks> {
        match self.rooms.get(room) {
            Some(Slot::Ready(state)) if state.room.kind != RoomKind::Team => Some(state.delivery),
            _ => None,
        }
    }

    /// A connection of one side (the team's, `team`) received the conversation's messages up
    /// to `seq` other than live (a join's `missed`, a `historic` page): the side's mark moves,
    /// is saved with the conversation's activity, and the other side's members hear it.
    pub(crate) fn delivered_through(&mut self, room: &RoomKey, team: bool, seq: u64) {
        let Some(Slot::Ready(state)) = self.rooms.get_mut(room) else {
            // Unloaded meanwhile: nobody is connected to hear it, and only the mark is saved.
            let (store, room) = (self.shared.store.clone(), room.clone());
            tokio::spawn(async move {
                let saved = records::update::<Conversation, _, _>(
                    &store,
                    &room.tenant_id,
                    &room.room_id,
                    |current| {
                        Ok(current.and_then(|c| {
                            let mut next = c.clone();
                            next.delivery.side(team).delivered(seq).then_some(next)
                        }))
                    },
                )
                .await;
                if let Err(e) = saved {
                    tracing::warn!(room_id = %room.room_id, error = %e, "saving a delivery mark failed");
                }
            });
            return;
        };
        if state.room.kind == RoomKind::Team || !state.delivery.side(team).delivered(seq) {
            return;
        }
        state.activity.delivery.side(team).delivered(seq);
        let frame = FrameBuilder::success(
            DELIVERY_RESPONSE,
            "system",
            Some(&room.room_id),
            None,
            MarksData {
                status: MessageDelivery::Delivered,
                side: if team { "team" } else { "contact" },
                through_seq: seq,
            },
        );
        let route = Route::new(&self.shared.shards, self.index);
        let senders = state
            .members
            .values_mut()
            .filter(|m| side_of(m.conn.claims.role) == Some(!team));
        let n = route.broadcast(&mut self.lists, senders, &frame, FrameClass::Durable);
        self.shared.metrics.deliveries.inc_by(n);
        self.save_activity(room);
    }
}
