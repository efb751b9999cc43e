//! The inbox side of conversations: who follows a tenant's inbox live (`subscribe_inbox`), how a
//! conversation is shown to the team and to its customer, how its management changes are
//! applied, and how the messages of a conversation move its activity (last message, waiting
//! time, first reply, counters). The records themselves are the store's
//! ([`storage::records`]); the room's shard applies changes and fans the events out.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use storage::records::{
    self, Conversation, ConversationStatus, DeliveryMarks, LastMessage, Priority, Rating, Versioned,
};
use storage::records::{ListQuery, Snooze};
use storage::{Direction, Message, RecordKind, RoomKey, RoomKind, Store, Timestamp};

use crate::auth::{may_join, Role};
use crate::cmd::{Code, RoomCall};
use crate::codec::{ErrorCode, FrameBuilder, ProtocolError};
use crate::metrics::OutCode;
use crate::outbox::FrameClass;
use crate::server::Shared;
use crate::shard::{
    access_error, server_busy, shard_of, storage_unavailable, ConnId, ConnRef, Route, Shard,
    ShardCommand, ShardEvent, Slot,
};

const STRIPES: usize = 16;
/// Characters of a message a conversation's preview keeps.
pub const PREVIEW_CHARS: usize = 140;
/// Bounds of what `conversation_update` may set.
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_BYTES: usize = 64;
pub const MAX_TITLE_BYTES: usize = 256;
pub const MAX_ADDED_PARTICIPANTS: usize = 50;
pub const MAX_USER_ID_BYTES: usize = 256;

/// The connections following each tenant's inbox (agents and admins that sent
/// `subscribe_inbox`). Striped by tenant; touched when a conversation changes, never per chat
/// of a team room.
pub struct InboxSubscribers {
    stripes: Vec<Mutex<HashMap<String, Vec<ConnRef>>>>,
}

impl Default for InboxSubscribers {
    fn default() -> Self {
        InboxSubscribers {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl InboxSubscribers {
    fn stripe(&self, tenant: &str) -> &Mutex<HashMap<String, Vec<ConnRef>>> {
        let mut h = DefaultHasher::new();
        tenant.hash(&mut h);
        &self.stripes[h.finish() as usize % STRIPES]
    }

    /// Subscribes the connection to its tenant's inbox; false when it already was.
    pub fn subscribe(&self, conn: &ConnRef) -> bool {
        let mut map = self
            .stripe(&conn.claims.tenant)
            .lock()
            .expect("inbox lock poisoned");
        let list = map.entry(conn.claims.tenant.clone()).or_default();
        if list.iter().any(|c| c.id == conn.id) {
            return false;
        }
        list.push(conn.clone());
        true
    }

    /// Ends the connection's subscription, if it had one.
    pub fn unsubscribe(&self, tenant: &str, conn: ConnId) -> bool {
        let mut map = self.stripe(tenant).lock().expect("inbox lock poisoned");
        let Some(list) = map.get_mut(tenant) else {
            return false;
        };
        let before = list.len();
        list.retain(|c| c.id != conn);
        let removed = list.len() != before;
        if list.is_empty() {
            map.remove(tenant);
        }
        removed
    }

    /// The tenant's subscribed connections.
    pub fn of(&self, tenant: &str) -> Vec<ConnRef> {
        self.stripe(tenant)
            .lock()
            .expect("inbox lock poisoned")
            .get(tenant)
            .cloned()
            .unwrap_or_default()
    }
}

/// What the team sees of a conversation: everything, with its participants.
#[derive(Serialize, utoipa::ToSchema)]
pub struct AgentView<'a> {
    #[serde(flatten)]
    #[schema(inline)]
    pub conversation: &'a Conversation,
    pub participants: &'a [String],
}

/// What the conversation's customer sees of it: no assignee, labels, priority, internal
/// milestones or counters (an `agent_joined` event names the agent that joined, beside it).
#[derive(Serialize)]
pub struct CustomerView<'a> {
    pub room_id: &'a str,
    pub kind: RoomKind,
    pub title: &'a str,
    pub image_url: Option<&'a str>,
    pub status: ConversationStatus,
    pub is_open: bool,
    pub last_activity_at: Timestamp,
    pub rating: Option<&'a Rating>,
    /// When the team last read it (a widget's "seen").
    pub agent_last_seen_at: Option<Timestamp>,
}

impl<'a> CustomerView<'a> {
    pub fn of(conversation: &'a Conversation) -> Self {
        CustomerView {
            room_id: &conversation.room_id,
            kind: conversation.kind,
            title: &conversation.title,
            image_url: conversation.image_url.as_deref(),
            status: conversation.status,
            is_open: conversation.is_open,
            last_activity_at: conversation.last_activity_at,
            rating: conversation.rating.as_ref(),
            agent_last_seen_at: conversation.agent_last_seen_at,
        }
    }
}

/// Why a `conversation_response` event was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A management change (`conversation_update`).
    Updated,
    /// A new message moved it (to the top of the inbox).
    Activity,
    /// A second conversation for the same contact reopened it.
    Reopened,
    /// Created.
    Created,
    /// `end`.
    Ended,
    /// `rate`.
    Rated,
    /// Its snooze ran out.
    Woke,
    /// `escalate`: it joined the support queue.
    Escalated,
    /// An agent took it from the queue (`assignee` is the agent).
    AgentJoined,
    /// Its contact or an agent read it (`contact_last_seen_at` / `agent_last_seen_at`).
    Seen,
}

impl ChangeKind {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Updated => "updated",
            ChangeKind::Activity => "activity",
            ChangeKind::Reopened => "reopened",
            ChangeKind::Created => "created",
            ChangeKind::Ended => "ended",
            ChangeKind::Rated => "rated",
            ChangeKind::Woke => "woke",
            ChangeKind::Escalated => "escalated",
            ChangeKind::AgentJoined => "agent_joined",
            ChangeKind::Seen => "seen",
        }
    }
}

/// Deserializes a field that may be absent (`None`), `null` (`Some(None)`) or a value.
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// A management change to a conversation (`conversation_update`'s `data`, and a reopen).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConversationPatch {
    /// Open (`true`) or close (`false`).
    #[serde(default)]
    pub is_open: Option<bool>,
    /// Snooze until this time (RFC 3339, in the future); `null` wakes it.
    #[serde(default, deserialize_with = "nullable")]
    pub snoozed_until: Option<Option<Timestamp>>,
    /// Pin to the top of the inbox.
    #[serde(default)]
    pub show_on_top: Option<bool>,
    #[serde(default)]
    pub archived: Option<bool>,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub priority: Option<Option<Priority>>,
    /// The whole new label set.
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    #[serde(default)]
    pub add_participants: Vec<String>,
    /// Assign to a user; `null` unassigns.
    #[serde(default, deserialize_with = "nullable")]
    pub assignee: Option<Option<String>>,
    /// A precondition: change it only while this is its assignee (`null`: nobody). Of agents
    /// racing to take a conversation with `"if_assignee": null`, one wins; the others are
    /// refused, told who has it.
    #[serde(default, deserialize_with = "nullable")]
    pub if_assignee: Option<Option<String>>,
}

impl ConversationPatch {
    /// Checks the bounds; an empty patch is refused too.
    pub fn validate(&self, now: Timestamp) -> Result<(), ProtocolError> {
        let changes = ConversationPatch {
            if_assignee: None,
            ..self.clone()
        };
        if changes == ConversationPatch::default() {
            return Err(ProtocolError::bad_request("data: nothing to change"));
        }
        if let Some(Some(until)) = self.snoozed_until {
            if until <= now {
                return Err(ProtocolError::bad_request(
                    "data.snoozed_until must be in the future",
                ));
            }
            if self.is_open == Some(false) {
                return Err(ProtocolError::bad_request(
                    "data: a closed conversation cannot be snoozed",
                ));
            }
        }
        if let Some(title) = &self.title {
            if title.is_empty() || title.len() > MAX_TITLE_BYTES {
                return Err(ProtocolError::bad_request(
                    "data.title must be 1 to 256 bytes",
                ));
            }
        }
        if let Some(labels) = &self.labels {
            if labels.len() > MAX_LABELS
                || labels
                    .iter()
                    .any(|l| l.is_empty() || l.len() > MAX_LABEL_BYTES)
            {
                return Err(ProtocolError::bad_request(
                    "data.labels: at most 32 labels of 1 to 64 bytes",
                ));
            }
        }
        if self.add_participants.len() > MAX_ADDED_PARTICIPANTS
            || self
                .add_participants
                .iter()
                .any(|p| p.is_empty() || p.len() > MAX_USER_ID_BYTES)
        {
            return Err(ProtocolError::bad_request(
                "data.add_participants: at most 50 user ids of 1 to 256 bytes",
            ));
        }
        if let Some(Some(assignee)) = &self.assignee {
            if assignee.is_empty() || assignee.len() > MAX_USER_ID_BYTES {
                return Err(ProtocolError::bad_request(
                    "data.assignee must be 1 to 256 bytes",
                ));
            }
        }
        Ok(())
    }

    /// Applies the change; false when it changed nothing.
    pub fn apply(&self, c: &mut Conversation) -> bool {
        let before = c.clone();
        match self.is_open {
            Some(true) => reopen(c),
            Some(false) => {
                c.is_open = false;
                c.status = ConversationStatus::Closed;
                c.snoozed_until = None;
            }
            None => {}
        }
        if let Some(until) = self.snoozed_until {
            c.snoozed_until = until;
            if until.is_some() {
                reopen(c);
            }
        }
        if let Some(pin) = self.show_on_top {
            c.show_on_top = pin;
        }
        if let Some(archived) = self.archived {
            c.archived = archived;
        }
        if let Some(title) = &self.title {
            c.title.clone_from(title);
        }
        if let Some(priority) = self.priority {
            c.priority = priority;
        }
        if let Some(labels) = &self.labels {
            let mut labels = labels.clone();
            labels.dedup();
            c.labels = labels;
        }
        if let Some(assignee) = &self.assignee {
            c.assignee.clone_from(assignee);
            match assignee {
                // An agent takes it from the queue.
                Some(_) if before.waits_for_agent() && c.waits_for_agent() => {
                    c.status = ConversationStatus::Agent;
                    c.metrics.agent_joined_at.get_or_insert(Timestamp::now());
                }
                // Its agent let go: it waits for another.
                None if c.is_open && c.status == ConversationStatus::Agent => {
                    c.status = ConversationStatus::Queued;
                    c.metrics.queued_at = Some(Timestamp::now());
                }
                _ => {}
            }
        }
        *c != before
    }
}

/// Opens a conversation; one that was closed or ended becomes active again.
pub fn reopen(c: &mut Conversation) {
    c.is_open = true;
    if matches!(
        c.status,
        ConversationStatus::Closed | ConversationStatus::Ended
    ) {
        c.status = ConversationStatus::Active;
    }
}

/// Applies `patch` to the room's conversation (re-reading after a concurrent write) and adds
/// its participants to the room. `Ok(None)`: the room has no conversation.
pub async fn update_conversation<S: Store>(
    store: &S,
    room: &RoomKey,
    patch: &ConversationPatch,
) -> storage::Result<Option<Conversation>> {
    let change = ConversationChange::Update(patch.clone());
    Ok(change_conversation(store, room, &change)
        .await?
        .filter(|changed| changed.refused.is_none())
        .map(|changed| changed.conversation))
}

/// Why a conversation ended (`end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    UserEnded,
    AgentEnded,
    Timeout,
    Resolved,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::UserEnded => "user_ended",
            EndReason::AgentEnded => "agent_ended",
            EndReason::Timeout => "timeout",
            EndReason::Resolved => "resolved",
        }
    }
}

/// A change a code makes to a conversation's state.
#[derive(Debug, Clone, PartialEq)]
pub enum ConversationChange {
    /// `conversation_update` (and a reopen).
    Update(ConversationPatch),
    /// `end`: the conversation is over, for `reason`.
    End(EndReason),
    /// `rate`: the customer's rating, once.
    Rate(Rating),
    /// The snooze until this time ran out (nothing changes when it was snoozed again later,
    /// woken or closed meanwhile).
    Wake(Timestamp),
    /// `escalate`: into the support queue; `by_team` may also hand it on from its agent.
    Escalate {
        reason: Option<String>,
        by_team: bool,
    },
}

impl ConversationChange {
    /// What the events about it say.
    pub fn kind(&self) -> ChangeKind {
        match self {
            ConversationChange::Update(_) => ChangeKind::Updated,
            ConversationChange::End(_) => ChangeKind::Ended,
            ConversationChange::Rate(_) => ChangeKind::Rated,
            ConversationChange::Wake(_) => ChangeKind::Woke,
            ConversationChange::Escalate { .. } => ChangeKind::Escalated,
        }
    }

    /// Whether it can put the conversation in the support queue.
    fn may_queue(&self) -> bool {
        match self {
            ConversationChange::Escalate { .. } => true,
            ConversationChange::Update(patch) => patch.assignee == Some(None),
            _ => false,
        }
    }

    /// Whether it can take the conversation out of the support queue.
    fn may_dequeue(&self) -> bool {
        match self {
            ConversationChange::End(_) => true,
            ConversationChange::Update(patch) => {
                patch.is_open == Some(false) || patch.assignee.is_some()
            }
            _ => false,
        }
    }

    /// Participants it adds to the room.
    pub fn added_participants(&self) -> &[String] {
        match self {
            ConversationChange::Update(patch) => &patch.add_participants,
            _ => &[],
        }
    }

    /// Applies it: `Ok(false)` when it changed nothing, `Err` when it may not be applied to the
    /// conversation as it is (the reason goes back to the client).
    pub fn apply(&self, c: &mut Conversation) -> Result<bool, ProtocolError> {
        let now = Timestamp::now();
        let was_waiting = c.waits_for_agent();
        let changed = self.apply_at(c, now)?;
        if was_waiting && !c.waits_for_agent() {
            let joined = c.metrics.queued_at.unwrap_or(now);
            c.metrics.queue_ms += u64::try_from(now.0 - joined.0).unwrap_or(0);
        }
        Ok(changed)
    }

    fn apply_at(&self, c: &mut Conversation, now: Timestamp) -> Result<bool, ProtocolError> {
        match self {
            ConversationChange::Update(patch) => {
                if let Some(expected) = &patch.if_assignee {
                    if c.assignee != *expected {
                        return Err(ProtocolError::bad_request(match &c.assignee {
                            Some(agent) => format!("data.if_assignee: {agent} has it now"),
                            None => "data.if_assignee: nobody has it now".to_owned(),
                        }));
                    }
                }
                Ok(patch.apply(c))
            }
            ConversationChange::End(reason) => {
                if c.status == ConversationStatus::Ended {
                    return Err(ProtocolError::bad_request(
                        "the conversation has ended already",
                    ));
                }
                c.status = ConversationStatus::Ended;
                c.is_open = false;
                c.snoozed_until = None;
                c.waiting_since = None;
                c.metrics.ended_at = Some(now);
                c.metrics.end_reason = Some(reason.as_str().to_owned());
                c.metrics.handle_ms = c
                    .metrics
                    .agent_joined_at
                    .map(|joined| u64::try_from(now.0 - joined.0).unwrap_or(0));
                Ok(true)
            }
            ConversationChange::Rate(rating) => {
                if c.rating.is_some() {
                    return Err(ProtocolError::bad_request(
                        "the conversation is rated already",
                    ));
                }
                c.rating = Some(rating.clone());
                Ok(true)
            }
            ConversationChange::Wake(due) => {
                let still_due = c.is_open && c.snoozed_until.is_some_and(|until| until <= *due);
                if still_due {
                    c.snoozed_until = None;
                }
                Ok(still_due)
            }
            ConversationChange::Escalate { reason, by_team } => {
                let next = match c.status {
                    ConversationStatus::Ended => {
                        return Err(ProtocolError::bad_request("the conversation has ended"))
                    }
                    _ if !c.is_open => {
                        return Err(ProtocolError::bad_request("the conversation is closed"))
                    }
                    ConversationStatus::Queued | ConversationStatus::Escalated => {
                        return Err(ProtocolError::bad_request(
                            "the conversation is in the queue already",
                        ))
                    }
                    ConversationStatus::Agent if !by_team => {
                        return Err(ProtocolError::bad_request(
                            "an agent has the conversation already",
                        ))
                    }
                    // Its agent (or the team) hands it on: it waits for another agent.
                    ConversationStatus::Agent => ConversationStatus::Escalated,
                    _ => ConversationStatus::Queued,
                };
                c.status = next;
                c.assignee = None;
                c.snoozed_until = None;
                c.metrics.queued_at = Some(now);
                c.metrics.escalation_reason.clone_from(reason);
                Ok(true)
            }
        }
    }
}

/// A conversation as a change left it (or as it was read, when the change was refused).
#[derive(Debug, Clone)]
pub struct Changed {
    pub conversation: Conversation,
    /// Its stored version.
    pub version: u64,
    /// It was waiting in the queue, and an agent took it.
    pub agent_joined: bool,
    /// Why the change was refused (nothing was written), if it was.
    pub refused: Option<ProtocolError>,
}

/// Applies `change` to the room's conversation, again to a fresh read when another writer got
/// there first, after adding its participants to the room, and keeps the durable queue list in
/// step (see [`crate::queue::enter_list`]). `Ok(None)`: the room has no conversation.
pub async fn change_conversation<S: Store>(
    store: &S,
    room: &RoomKey,
    change: &ConversationChange,
) -> storage::Result<Option<Changed>> {
    let moves_queue = change.may_queue() || change.may_dequeue();
    if change.may_queue() {
        // A change that would be refused touches nothing (no list entry to write and remove).
        let Some(current) =
            records::load::<Conversation, _>(store, &room.tenant_id, &room.room_id).await?
        else {
            return Ok(None);
        };
        if let Err(refusal) = change.apply(&mut current.value.clone()) {
            return Ok(Some(Changed {
                conversation: current.value,
                version: current.version,
                agent_joined: false,
                refused: Some(refusal),
            }));
        }
        crate::queue::enter_list(store, room).await?;
    }
    for user in change.added_participants() {
        store.add_participant(room, user).await?;
    }
    if let ConversationChange::Update(ConversationPatch {
        snoozed_until: Some(Some(until)),
        ..
    }) = change
    {
        // On the wake-up list before the conversation says it is snoozed: a crash between the
        // two leaves an entry that wakes nothing, never a snooze that never ends.
        schedule_wake_up(store, room, *until).await?;
    }
    let mut refused = None;
    let mut was_waiting = false;
    let updated =
        records::update::<Conversation, _, _>(store, &room.tenant_id, &room.room_id, |current| {
            refused = None;
            Ok(current.and_then(|c| {
                was_waiting = c.waits_for_agent();
                let mut next = c.clone();
                match change.apply(&mut next) {
                    Ok(changed) => changed.then_some(next),
                    Err(error) => {
                        refused = Some(error);
                        None
                    }
                }
            }))
        })
        .await?;
    let Some(Versioned { value, version }) = updated else {
        return Ok(None);
    };
    if moves_queue && !value.waits_for_agent() {
        // The change is saved: a list entry left behind is only a start-up cost (the restore
        // drops entries whose conversation does not wait), so a failure here is not the
        // change's.
        if let Err(e) = crate::queue::leave_list(store, room).await {
            tracing::warn!(room_id = %room.room_id, error = %e, "taking a conversation off the queue list failed");
        }
    }
    Ok(Some(Changed {
        agent_joined: refused.is_none() && was_waiting && value.status == ConversationStatus::Agent,
        conversation: value,
        version,
        refused,
    }))
}

/// Puts the room on the wake-up list at `until` ([`Snooze`]).
async fn schedule_wake_up<S: Store>(
    store: &S,
    room: &RoomKey,
    until: Timestamp,
) -> storage::Result<()> {
    let entry = Snooze {
        tenant_id: room.tenant_id.clone(),
        room_id: room.room_id.clone(),
        until: Some(until),
    };
    records::update::<Snooze, _, _>(store, Snooze::TENANT, &Snooze::id(room), |_| {
        Ok(Some(entry.clone()))
    })
    .await?;
    Ok(())
}

/// How often the wake-up list is read.
const WAKE_UP_POLL: Duration = Duration::from_millis(500);
/// Entries handled per read of the list.
const WAKE_UPS_PER_ROUND: u32 = 100;

/// Wakes snoozed conversations when their time comes, for as long as the server runs: reads
/// the wake-up list from its oldest entry, and for each one due wakes the conversation (if it
/// is still snoozed until then), tells its members and the inbox (`woke`), and takes the entry
/// off the list. The list is in the store, so snoozes that fell due while the server was down
/// wake right after it starts.
pub async fn run_wake_ups(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown_signal();
    loop {
        if let Err(e) = wake_due(&shared).await {
            tracing::warn!(error = %e, "waking snoozed conversations failed; retrying");
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(WAKE_UP_POLL) => {}
        }
    }
}

async fn wake_due(shared: &Arc<Shared>) -> storage::Result<()> {
    let store = &shared.store;
    let now = Timestamp::now();
    let query = ListQuery {
        as_of: None,
        descending: false,
        after: None,
        limit: WAKE_UPS_PER_ROUND,
    };
    let due = store
        .list_records(Snooze::TENANT, RecordKind::Snooze, query)
        .await?;
    for listed in due.entries.into_iter().take_while(|l| l.list_key <= now.0) {
        let Ok(entry) = serde_json::from_str::<Snooze>(&listed.record.body) else {
            continue;
        };
        let room = RoomKey::new(&entry.tenant_id, &entry.room_id);
        let due_at = Timestamp(listed.list_key);
        if let Some(Changed {
            conversation,
            refused: None,
            ..
        }) = change_conversation(store, &room, &ConversationChange::Wake(due_at)).await?
        {
            let shard = &shared.shards[shard_of(&room, shared.shards.len())];
            let room_key = room.clone();
            let work = ShardCommand::Run(Box::new(move |shard: &mut Shard| {
                let change = (ChangeKind::Woke, "system");
                shard.conversation_event(&room_key, &conversation, change, None, true);
            }));
            if shard.commands.try_send(work).is_err() {
                tracing::warn!("a wake-up event was dropped: the room's shard is overloaded");
            }
        }
        // Off the list, unless it was snoozed again (to a later time) meanwhile.
        records::update::<Snooze, _, _>(store, Snooze::TENANT, &listed.record.key.id, |current| {
            Ok(current.filter(|c| c.until == Some(due_at)).map(|c| Snooze {
                until: None,
                ..c.clone()
            }))
        })
        .await?;
    }
    Ok(())
}

/// What the messages stored (and the reads) since the last save did to a conversation, folded
/// in order so that any number of them is one write (the shard keeps one save per room in
/// flight).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ActivityDelta {
    /// Messages by sender type, notes not included.
    messages: BTreeMap<String, u64>,
    notes: u64,
    last: Option<LastMessage>,
    /// The first team reply among them.
    first_reply_at: Option<Timestamp>,
    /// The first contact message that reply answered.
    first_reply_to: Option<Timestamp>,
    /// The latest read by its customer, and by an agent (read receipts), and who read last.
    contact_seen_at: Option<Timestamp>,
    agent_seen_at: Option<Timestamp>,
    seen_by: Option<String>,
    /// Whether the team replied at all, and the first contact message after its last reply.
    replied: bool,
    waiting_from: Option<Timestamp>,
    /// How far each side received and read the other's messages meanwhile.
    pub(crate) delivery: DeliveryMarks,
}

impl ActivityDelta {
    pub fn is_empty(&self) -> bool {
        !self.has_messages() && self.seen_by.is_none() && self.delivery == DeliveryMarks::default()
    }

    fn has_messages(&self) -> bool {
        self.last.is_some() || self.notes > 0
    }

    /// Adds a read (a read receipt) by the conversation's customer or by the team.
    pub fn seen(&mut self, reader: &str, by_team: bool, at: Timestamp) {
        let seen = if by_team {
            &mut self.agent_seen_at
        } else {
            &mut self.contact_seen_at
        };
        *seen = Some(at);
        self.seen_by = Some(reader.to_owned());
    }

    /// Adds a newly stored message of the conversation.
    pub fn add(&mut self, message: &Message) {
        if message.direction == Direction::Note {
            self.notes += 1;
            return;
        }
        *self
            .messages
            .entry(message.sender_type.as_str().to_owned())
            .or_default() += 1;
        match message.direction {
            Direction::Incoming => {
                self.waiting_from.get_or_insert(message.created_at);
            }
            Direction::Outgoing => {
                if self.first_reply_at.is_none() {
                    self.first_reply_at = Some(message.created_at);
                    self.first_reply_to = self.waiting_from;
                }
                self.replied = true;
                self.waiting_from = None;
            }
            _ => {}
        }
        self.last = Some(LastMessage {
            seq: message.seq,
            message_id: message.message_id.clone(),
            sender: message.sender.clone(),
            sender_type: message.sender_type,
            direction: message.direction,
            preview: message.message.chars().take(PREVIEW_CHARS).collect(),
            created_at: message.created_at,
        });
    }

    /// Applies the folded messages to the stored conversation.
    pub fn apply(&self, c: &mut Conversation) {
        for (sender_type, n) in &self.messages {
            *c.metrics.messages.entry(sender_type.clone()).or_default() += n;
        }
        c.metrics.notes += self.notes;
        c.delivery.merge(&self.delivery);
        // Never back in time (saves of a busy room may carry older reads).
        if let Some(at) = self.contact_seen_at {
            c.contact_last_seen_at = c.contact_last_seen_at.max(Some(at));
        }
        if let Some(at) = self.agent_seen_at {
            c.agent_last_seen_at = c.agent_last_seen_at.max(Some(at));
        }
        if c.metrics.first_reply_at.is_none() {
            if let Some(reply) = self.first_reply_at {
                c.metrics.first_reply_at = Some(reply);
                // Measured from the message it answered (none: the team wrote first).
                c.metrics.first_reply_ms = c
                    .waiting_since
                    .or(self.first_reply_to)
                    .map(|asked| u64::try_from(reply.0 - asked.0).unwrap_or(0));
            }
        }
        c.waiting_since = if self.replied {
            self.waiting_from
        } else {
            c.waiting_since.or(self.waiting_from)
        };
        if let Some(last) = &self.last {
            // Pipelined saves never move it back to an older message.
            if c.last_message.as_ref().is_none_or(|m| m.seq < last.seq) {
                c.last_activity_at = last.created_at;
                c.last_message = Some(last.clone());
            }
        }
    }
}

/// The code of the events about a conversation (to its members and to inbox subscribers).
pub const CONVERSATION_RESPONSE: &str = "conversation_response";

#[derive(Serialize)]
struct ConversationEvent<'a, V: Serialize> {
    change: ChangeKind,
    /// The agent that took it (`agent_joined`).
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_id: Option<&'a str>,
    conversation: V,
}

impl<'a, V: Serialize> ConversationEvent<'a, V> {
    fn new(change: ChangeKind, conversation: &'a Conversation, view: V) -> Self {
        let agent_id = match change {
            ChangeKind::AgentJoined => conversation.assignee.as_deref(),
            _ => None,
        };
        ConversationEvent {
            change,
            agent_id,
            conversation: view,
        }
    }
}

impl Shard {
    /// Tells about a conversation change made by `actor` (the frames' `user_id`): its members
    /// (a customer gets the customer view) when `to_members`, and every inbox subscriber of the
    /// tenant that is not a member; never `except` (the connection that asked for the change,
    /// which gets the reply instead).
    pub(crate) fn conversation_event(
        &mut self,
        room_id: &RoomKey,
        conversation: &Conversation,
        (change, actor): (ChangeKind, &str),
        except: Option<ConnId>,
        to_members: bool,
    ) {
        // A message's activity is its `message.created` event already.
        if change != ChangeKind::Activity {
            self.shared.integration.conversation_changed(
                self.index,
                room_id,
                change.as_str(),
                conversation,
            );
        }
        let mut participants = Vec::new();
        let mut member_ids = Vec::new();
        let route = Route::new(&self.shared.shards, self.index);
        let mut sent = 0;
        if let Some(Slot::Ready(state)) = self.rooms.get_mut(room_id) {
            participants.clone_from(&state.room.participants);
            member_ids = state.members.keys().copied().collect();
            if to_members {
                let frame = |team: bool| {
                    if team {
                        event_frame(room_id, conversation, &participants, (change, actor))
                    } else {
                        FrameBuilder::success(
                            CONVERSATION_RESPONSE,
                            actor,
                            Some(&room_id.room_id),
                            None,
                            ConversationEvent::new(
                                change,
                                conversation,
                                CustomerView::of(conversation),
                            ),
                        )
                    }
                };
                let (team_frame, customer_frame) = (frame(true), frame(false));
                for member in state.members.values_mut() {
                    if Some(member.conn.id) == except {
                        continue;
                    }
                    let frame = if member.conn.claims.role.sees_notes() {
                        team_frame.clone()
                    } else {
                        customer_frame.clone()
                    };
                    route.deliver(member, frame, FrameClass::Durable);
                    sent += 1;
                }
            }
        }
        let subscribers: Vec<ConnRef> = self
            .shared
            .inbox
            .of(&room_id.tenant_id)
            .into_iter()
            .filter(|c| Some(c.id) != except && !member_ids.contains(&c.id))
            .collect();
        if !subscribers.is_empty() {
            let frame = event_frame(room_id, conversation, &participants, (change, actor));
            for conn in &subscribers {
                route.send(conn, frame.clone(), FrameClass::Durable);
            }
            sent += subscribers.len() as u64;
        }
        self.shared.metrics.frames_out(OutCode::Conversation, sent);
    }

    /// Runs a code's change of a conversation: access as for `join` (the code has checked the
    /// caller's role), saved in a helper task (see [`change_conversation`]), then answered with
    /// the conversation in the caller's view and announced to the members and the inbox.
    pub(crate) fn change_conversation(
        &mut self,
        call: RoomCall,
        code: Code,
        change: ConversationChange,
    ) {
        let Some(Slot::Ready(state)) = self.rooms.get_mut(&call.room) else {
            return;
        };
        if let Some(error) = access_error(may_join(&call.conn.claims, &state.room)) {
            return self.refuse(call, code, error);
        }
        let Some(permit) = self.try_work() else {
            return self.refuse(call, code, server_busy());
        };
        if let Some(Slot::Ready(state)) = self.rooms.get_mut(&call.room) {
            // Loaded until the answer is out: the event goes to its members.
            state.inflight += 1;
        }
        let store = self.shared.store.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = change_conversation(&store, &call.room, &change).await;
            let _ = events
                .send(ShardEvent::Continue(Box::new(move |shard: &mut Shard| {
                    shard.conversation_changed(call, code, change, result)
                })))
                .await;
            drop(permit);
        });
    }

    fn conversation_changed(
        &mut self,
        call: RoomCall,
        code: Code,
        change: ConversationChange,
        result: storage::Result<Option<Changed>>,
    ) {
        if let Some(Slot::Ready(state)) = self.rooms.get_mut(&call.room) {
            state.inflight = state.inflight.saturating_sub(1);
        }
        let changed = match result {
            Ok(Some(changed)) => changed,
            Ok(None) => {
                let error = ProtocolError::new(ErrorCode::NotFound, "not a conversation");
                return self.refuse(call, code, error);
            }
            Err(e) => {
                tracing::warn!(room_id = %call.room.room_id, error = %e, "changing a conversation failed");
                return self.refuse(call, code, storage_unavailable());
            }
        };
        let Changed {
            conversation,
            version,
            agent_joined,
            refused,
        } = changed;
        // Also a refused change: what it read may be news to this server's queue (a change
        // whose answer was lost, made here or on another node).
        let now = Timestamp::now();
        let positions = self
            .shared
            .queue
            .sync(&call.room, &conversation, version, now);
        let shared = self.shared.clone();
        if let Some(refusal) = refused {
            crate::queue::announce(&shared, Some(self), positions);
            return self.refuse(call, code, refusal);
        }
        self.observe_milestones(&change, &conversation, agent_joined);
        self.add_participants(&call.room, change.added_participants());
        let participants = self.participants(&call.room);
        self.shared.metrics.frames_out(OutCode::Response(code), 1);
        let (user, room_id, reference) = (
            &call.conn.claims.sub,
            Some(call.room.room_id.as_str()),
            call.reference.as_deref(),
        );
        let reply = if call.conn.claims.role.sees_notes() {
            let view = AgentView {
                conversation: &conversation,
                participants: &participants,
            };
            FrameBuilder::success(code.response(), user, room_id, reference, view)
        } else {
            let view = CustomerView::of(&conversation);
            FrameBuilder::success(code.response(), user, room_id, reference, view)
        };
        self.route().send(&call.conn, reply, FrameClass::Durable);
        let kind = if agent_joined {
            ChangeKind::AgentJoined
        } else {
            change.kind()
        };
        let announced = (kind, call.conn.claims.sub.as_str());
        self.conversation_event(
            &call.room,
            &conversation,
            announced,
            Some(call.conn.id),
            true,
        );
        // After the change's own frames: a customer hears it was queued, then where.
        crate::queue::announce(&shared, Some(self), positions);
        self.maybe_unload(&call.room);
    }

    /// Feeds the life-cycle histograms when a change reached a milestone.
    fn observe_milestones(
        &self,
        change: &ConversationChange,
        conversation: &Conversation,
        agent_joined: bool,
    ) {
        let metrics = &self.shared.metrics;
        if agent_joined {
            if let Some(joined) = conversation.metrics.queued_at {
                let waited = Timestamp::now().0.saturating_sub(joined.0);
                metrics.queue_seconds.observe(waited as f64 / 1000.0);
            }
        }
        if matches!(change, ConversationChange::End(_)) {
            if let Some(handle) = conversation.metrics.handle_ms {
                metrics.handle_seconds.observe(handle as f64 / 1000.0);
            }
        }
    }

    /// Adds participants the store now has to the loaded room (its access checks read them).
    pub(crate) fn add_participants(&mut self, room: &RoomKey, users: &[String]) {
        if let Some(Slot::Ready(state)) = self.rooms.get_mut(room) {
            for user in users {
                if !state.room.participants.contains(user) {
                    state.room.participants.push(user.clone());
                }
            }
        }
    }

    /// The loaded room's participants.
    pub(crate) fn participants(&self, room: &RoomKey) -> Vec<String> {
        match self.rooms.get(room) {
            Some(Slot::Ready(state)) => state.room.participants.clone(),
            _ => Vec::new(),
        }
    }

    /// A message of a conversation was stored: its activity is saved (folded with whatever
    /// else arrives meanwhile, one save in flight per room) and the inbox subscribers hear of
    /// it, so the conversation moves to the top of their lists.
    pub(crate) fn conversation_activity(&mut self, room_id: &RoomKey, message: &Message) {
        let Some(Slot::Ready(state)) = self.rooms.get_mut(room_id) else {
            return;
        };
        if state.room.kind == RoomKind::Team {
            return;
        }
        state.activity.add(message);
        self.save_activity(room_id);
    }

    pub(crate) fn save_activity(&mut self, room_id: &RoomKey) {
        let Some(Slot::Ready(state)) = self.rooms.get_mut(room_id) else {
            return;
        };
        if state.saving_activity || state.activity.is_empty() {
            return;
        }
        let delta = std::mem::take(&mut state.activity);
        let actor = match (&delta.seen_by, delta.has_messages()) {
            (Some(reader), false) => Actor::Read(reader.clone()),
            (None, false) => Actor::Received,
            (_, true) => Actor::Wrote,
        };
        state.saving_activity = true;
        // The room stays loaded until the save is answered.
        state.inflight += 1;
        let store = self.shared.store.clone();
        let metrics = self.shared.metrics.clone();
        let events = self.events_tx.clone();
        let room = room_id.clone();
        tokio::spawn(async move {
            // Set when this save holds the team's first answer.
            let mut first_reply_ms = None;
            let result = records::update::<Conversation, _, _>(
                &store,
                &room.tenant_id,
                &room.room_id,
                |current| {
                    Ok(current.map(|c| {
                        let mut next = c.clone();
                        delta.apply(&mut next);
                        first_reply_ms = c
                            .metrics
                            .first_reply_at
                            .is_none()
                            .then_some(next.metrics.first_reply_ms)
                            .flatten();
                        next
                    }))
                },
            )
            .await;
            if let (Ok(Some(_)), Some(ms)) = (&result, first_reply_ms) {
                metrics.first_reply_seconds.observe(ms as f64 / 1000.0);
            }
            let _ = events
                .send(ShardEvent::Continue(Box::new(move |shard: &mut Shard| {
                    shard.activity_saved(&room, (result, actor))
                })))
                .await;
        });
    }

    /// A member read the conversation up to `seq` (a read receipt): its customer's or the
    /// team's `…_last_seen_at` moves, saved with the activity. A receipt that reads nothing
    /// newer than an earlier one (a repeat) changes nothing.
    pub(crate) fn conversation_seen(&mut self, room_id: &RoomKey, reader: &ConnRef, seq: u64) {
        let Some(Slot::Ready(state)) = self.rooms.get_mut(room_id) else {
            return;
        };
        let by_team = match reader.claims.role {
            Role::Customer => false,
            Role::Agent | Role::Admin => true,
            _ => return,
        };
        if state.room.kind == RoomKind::Team {
            return;
        }
        let seen = &mut state.seen_seq[usize::from(by_team)];
        if seq <= *seen {
            return;
        }
        *seen = seq;
        state
            .activity
            .seen(&reader.claims.sub, by_team, Timestamp::now());
        // Read up to `seq`: so are the messages for the reader's side (the read receipt told
        // the room already).
        state.delivery.side(by_team).read(seq);
        state.activity.delivery.side(by_team).read(seq);
        self.save_activity(room_id);
    }

    fn activity_saved(
        &mut self,
        room_id: &RoomKey,
        (result, actor): (storage::Result<Option<Versioned<Conversation>>>, Actor),
    ) {
        if let Some(Slot::Ready(state)) = self.rooms.get_mut(room_id) {
            state.saving_activity = false;
            state.inflight = state.inflight.saturating_sub(1);
            // Marks saved before the room was loaded this time join the room's.
            if let Ok(Some(saved)) = &result {
                state.delivery.merge(&saved.value.delivery);
            }
        }
        match result {
            Ok(Some(saved)) => {
                let change = match &actor {
                    Actor::Wrote => {
                        let sender = saved.value.last_message.as_ref().map(|m| &m.sender);
                        Some((ChangeKind::Activity, sender.map_or("", String::as_str)))
                    }
                    Actor::Read(reader) => Some((ChangeKind::Seen, reader.as_str())),
                    // The other side heard of it (`delivery_response`); the inbox did not move.
                    Actor::Received => None,
                };
                if let Some(change) = change {
                    self.conversation_event(room_id, &saved.value, change, None, false)
                }
            }
            Ok(None) => {}
            // The messages are stored; only the inbox's view of them lags until the next one.
            Err(e) => {
                tracing::warn!(room_id = %room_id.room_id, error = %e, "saving a conversation's activity failed")
            }
        }
        self.save_activity(room_id);
        self.maybe_unload(room_id);
    }
}

/// Who moved a conversation in an activity save: message senders, only a reader, or only a
/// side receiving messages.
enum Actor {
    Wrote,
    Read(String),
    Received,
}

/// The team's `conversation_response` event.
fn event_frame(
    room_id: &RoomKey,
    conversation: &Conversation,
    participants: &[String],
    (change, actor): (ChangeKind, &str),
) -> bytes::Bytes {
    FrameBuilder::success(
        CONVERSATION_RESPONSE,
        actor,
        Some(&room_id.room_id),
        None,
        ConversationEvent::new(
            change,
            conversation,
            AgentView {
                conversation,
                participants,
            },
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use storage::{MessageType, SenderType};

    fn message(seq: u64, direction: Direction, at: i64) -> Message {
        Message {
            message_id: format!("m{seq}"),
            seq,
            room_id: "c".into(),
            sender: "x".into(),
            sender_type: match direction {
                Direction::Incoming => SenderType::Customer,
                _ => SenderType::Agent,
            },
            direction,
            kind: MessageType::Text,
            message: format!("text {seq}"),
            attached_files: vec![],
            reply_to: None,
            mentions: vec![],
            metadata: Default::default(),
            created_at: Timestamp(at),
        }
    }

    fn conversation() -> Conversation {
        Conversation::new(&RoomKey::new("t", "c"), RoomKind::Support, None)
    }

    #[test]
    fn activity_folds_in_order_and_tracks_waiting_and_first_reply() {
        let mut c = conversation();
        let mut delta = ActivityDelta::default();
        delta.add(&message(1, Direction::Incoming, 10));
        delta.add(&message(2, Direction::Incoming, 20));
        delta.apply(&mut c);
        assert_eq!(c.waiting_since, Some(Timestamp(10)));
        assert_eq!(c.metrics.first_reply_at, None);
        assert_eq!(c.last_message.as_ref().unwrap().seq, 2);

        let mut delta = ActivityDelta::default();
        delta.add(&message(3, Direction::Outgoing, 30));
        delta.add(&message(4, Direction::Note, 35));
        delta.add(&message(5, Direction::Incoming, 40));
        delta.apply(&mut c);
        assert_eq!(
            c.waiting_since,
            Some(Timestamp(40)),
            "waiting again since 5"
        );
        assert_eq!(c.metrics.first_reply_at, Some(Timestamp(30)));
        assert_eq!(c.metrics.messages["customer"], 3);
        assert_eq!(c.metrics.messages["agent"], 1);
        assert_eq!(c.metrics.notes, 1);
        assert_eq!(c.last_message.as_ref().unwrap().seq, 5);
        assert_eq!(c.last_activity_at, Timestamp(40));

        let mut delta = ActivityDelta::default();
        delta.add(&message(6, Direction::Outgoing, 50));
        delta.apply(&mut c);
        assert_eq!(c.waiting_since, None);
        assert_eq!(c.metrics.first_reply_at, Some(Timestamp(30)), "kept");
    }

    #[test]
    fn a_patch_opens_closes_snoozes_and_says_whether_it_changed_anything() {
        let mut c = conversation();
        let close = ConversationPatch {
            is_open: Some(false),
            ..Default::default()
        };
        assert!(close.apply(&mut c));
        assert_eq!((c.is_open, c.status), (false, ConversationStatus::Closed));
        assert!(!close.apply(&mut c), "closing twice changes nothing");
        let snooze = ConversationPatch {
            snoozed_until: Some(Some(Timestamp(i64::MAX))),
            ..Default::default()
        };
        assert!(snooze.apply(&mut c));
        assert_eq!((c.is_open, c.status), (true, ConversationStatus::Active));
        assert!(close.apply(&mut c));
        assert_eq!(c.snoozed_until, None, "closing ends the snooze");
        assert!(ConversationPatch::default().validate(Timestamp(0)).is_err());
    }
}
