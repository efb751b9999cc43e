//! The support queue: each tenant's conversations waiting for an agent (`escalate`), in the
//! order they joined it, each with its position and an estimated wait.
//!
//! The conversation record is the truth (a conversation waits while it is open and `queued` or
//! `escalated`); this is the running server's ordered view of it, kept in step by
//! [`SupportQueues::sync`] after every change that can move a conversation in or out, and
//! rebuilt at start from the store's [`QueueEntry`] list ([`restore`]). Whenever a waiting
//! conversation's position or estimate changes, its members get a `queue_response`
//! ([`Shard::queue_update`]).
//!
//! One change can move every waiting conversation, so telling all of them at each change costs
//! frames quadratic in the queue's length while it fills or drains. A conversation that itself
//! changed hears its place at once; the others of its tenant are told at most once per
//! [`TELL_INTERVAL_MS`] (the first change of a quiet queue at once, later ones together at the
//! end of the interval, by [`run_ticker`]), so a queue of N sends at most about N frames per
//! interval however busy it is.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use storage::records::{self, Conversation, ListQuery, QueueEntry, Versioned};
use storage::{RecordKind, RoomKey, Store, Timestamp};

use crate::codec::FrameBuilder;
use crate::metrics::OutCode;
use crate::outbox::FrameClass;
use crate::server::Shared;
use crate::shard::{shard_of, Route, Shard, ShardCommand, Slot};

/// The server-pushed frame telling a waiting conversation's members where it stands.
pub const QUEUE_RESPONSE: &str = "queue_response";

/// How many of a tenant's latest takes (an agent taking a waiting conversation) the wait
/// estimate looks at.
const TAKES_REMEMBERED: usize = 20;

/// The shortest time between two walks of a tenant's queue telling its conversations their
/// new places.
pub const TELL_INTERVAL_MS: i64 = 1_000;

/// Conversations that left a queue are remembered this long (by version), so that a change
/// observed late cannot put one back.
const LEFT_REMEMBERED_MS: i64 = 60_000;

/// Where a waiting conversation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QueuePosition {
    /// 1: the next one an agent takes.
    pub position: u32,
    /// How many conversations of the tenant are waiting.
    pub waiting: u32,
    /// The position times the mean time between the tenant's latest takes (up to 20), in
    /// seconds; `null` until two were taken since the server started.
    pub estimated_wait_seconds: Option<u64>,
}

struct Waiting {
    /// The version of the conversation this entry follows.
    version: u64,
    /// What its members were last told.
    told: Option<QueuePosition>,
}

#[derive(Default)]
struct TenantQueue {
    /// The waiting conversations by (time they joined the queue, room id).
    waiting: BTreeMap<(i64, String), Waiting>,
    /// Room id → its key in `waiting`.
    joined_at: HashMap<String, i64>,
    /// Room id → (version, when) of conversations that left (or were never in) the queue.
    left: HashMap<String, (u64, i64)>,
    /// When the latest conversations were taken (ms).
    takes: VecDeque<i64>,
    /// When the waiting conversations were last told their places (ms).
    told_at: Option<i64>,
    /// The queue changed since: places still to tell, at the end of the interval.
    untold: bool,
}

impl TenantQueue {
    /// Mean milliseconds between the remembered takes.
    fn take_interval_ms(&self) -> Option<i64> {
        let (first, last) = (self.takes.front()?, self.takes.back()?);
        let gaps = self.takes.len() as i64 - 1;
        (gaps > 0).then(|| (last - first) / gaps)
    }

    /// The waiting conversation's new position, when its members were told something else.
    fn changed_position(&mut self, room_id: &str) -> Option<QueuePosition> {
        let interval = self.take_interval_ms();
        let waiting = self.waiting.len() as u32;
        let at = *self.joined_at.get(room_id)?;
        let key = (at, room_id.to_owned());
        let position = self.waiting.range(..&key).count() as u32 + 1;
        let now = QueuePosition {
            position,
            waiting,
            estimated_wait_seconds: estimate(position, interval),
        };
        let entry = self.waiting.get_mut(&key)?;
        (entry.told != Some(now)).then(|| {
            entry.told = Some(now);
            now
        })
    }

    /// Tells the others their places now when the interval since the last telling is over;
    /// otherwise leaves it to the ticker ([`SupportQueues::due`]).
    fn tell_or_defer(
        &mut self,
        tenant: &str,
        now: Timestamp,
        updates: &mut Vec<(RoomKey, QueuePosition)>,
    ) {
        if self.told_at.is_some_and(|at| now.0 - at < TELL_INTERVAL_MS) {
            self.untold = true;
        } else {
            updates.extend(self.changed_positions(tenant, now));
        }
    }

    /// The new position of every waiting conversation whose members were told something else.
    fn changed_positions(&mut self, tenant: &str, now: Timestamp) -> Vec<(RoomKey, QueuePosition)> {
        self.told_at = Some(now.0);
        self.untold = false;
        let interval = self.take_interval_ms();
        let waiting = self.waiting.len() as u32;
        let mut changed = Vec::new();
        for (index, ((_, room_id), entry)) in self.waiting.iter_mut().enumerate() {
            let position = index as u32 + 1;
            let now = QueuePosition {
                position,
                waiting,
                estimated_wait_seconds: estimate(position, interval),
            };
            if entry.told != Some(now) {
                entry.told = Some(now);
                changed.push((RoomKey::new(tenant, room_id), now));
            }
        }
        changed
    }
}

fn estimate(position: u32, interval_ms: Option<i64>) -> Option<u64> {
    interval_ms.map(|ms| (u64::from(position) * ms.max(0) as u64).div_ceil(1000))
}

/// Every tenant's support queue.
#[derive(Default)]
pub struct SupportQueues {
    tenants: Mutex<HashMap<String, TenantQueue>>,
}

impl SupportQueues {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, TenantQueue>> {
        // A panic while holding it leaves consistent maps (no multi-step invariant spans a
        // panic point), so a poisoned lock is still usable.
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts the conversation (at `version`) in or out of its tenant's queue, as its state says,
    /// and returns the positions that changed for it and the others (their members are told).
    /// A version older than one already seen changes nothing.
    pub fn sync(
        &self,
        room: &RoomKey,
        conversation: &Conversation,
        version: u64,
        now: Timestamp,
    ) -> Vec<(RoomKey, QueuePosition)> {
        let mut tenants = self.lock();
        let queue = tenants.entry(room.tenant_id.clone()).or_default();
        let room_id = &room.room_id;
        let current = queue.joined_at.get(room_id).copied();
        let seen = match current {
            Some(at) => queue.waiting.get(&(at, room_id.clone())).map(|w| w.version),
            None => queue.left.get(room_id).map(|&(v, _)| v),
        };
        if seen.is_some_and(|seen| seen >= version) {
            return Vec::new();
        }
        let joined_at = conversation
            .metrics
            .queued_at
            .unwrap_or(conversation.last_activity_at)
            .0;
        if queue.left.len() > 1024 {
            queue
                .left
                .retain(|_, &mut (_, at)| now.0 - at < LEFT_REMEMBERED_MS);
        }
        let waits = conversation.waits_for_agent();
        match (current, waits) {
            (Some(at), true) => {
                let told = queue
                    .waiting
                    .remove(&(at, room_id.clone()))
                    .and_then(|w| w.told);
                queue.joined_at.insert(room_id.clone(), joined_at);
                queue
                    .waiting
                    .insert((joined_at, room_id.clone()), Waiting { version, told });
            }
            (None, true) => {
                queue.left.remove(room_id);
                queue.joined_at.insert(room_id.clone(), joined_at);
                let entry = Waiting {
                    version,
                    told: None,
                };
                queue.waiting.insert((joined_at, room_id.clone()), entry);
            }
            (Some(at), false) => {
                queue.waiting.remove(&(at, room_id.clone()));
                queue.joined_at.remove(room_id);
                queue.left.insert(room_id.clone(), (version, now.0));
                if conversation.assignee.is_some() {
                    queue.takes.push_back(now.0);
                    if queue.takes.len() > TAKES_REMEMBERED {
                        queue.takes.pop_front();
                    }
                }
            }
            (None, false) => {
                // Only conversations that were ever queued can race a queue change.
                if conversation.metrics.queued_at.is_some() {
                    queue.left.insert(room_id.clone(), (version, now.0));
                }
                // The queue did not change: nobody's place moved (and no walk over it).
                return Vec::new();
            }
        }
        // The conversation that changed hears its place at once; the others may wait.
        let mut updates = Vec::new();
        if waits {
            if let Some(position) = queue.changed_position(room_id) {
                updates.push((room.clone(), position));
            }
        }
        queue.tell_or_defer(&room.tenant_id, now, &mut updates);
        updates
    }

    /// The places not yet told of every tenant whose interval is over (see [`run_ticker`]).
    pub fn due(&self, now: Timestamp) -> Vec<(RoomKey, QueuePosition)> {
        let mut tenants = self.lock();
        let mut updates = Vec::new();
        for (tenant, queue) in tenants.iter_mut() {
            if queue.untold
                && queue
                    .told_at
                    .is_none_or(|at| now.0 - at >= TELL_INTERVAL_MS)
            {
                updates.extend(queue.changed_positions(tenant, now));
            }
        }
        updates
    }

    /// Where the room's conversation stands, when it is waiting.
    pub fn position(&self, room: &RoomKey) -> Option<QueuePosition> {
        let tenants = self.lock();
        let queue = tenants.get(&room.tenant_id)?;
        let at = *queue.joined_at.get(&room.room_id)?;
        let index = queue.waiting.range(..(at, room.room_id.clone())).count();
        let position = index as u32 + 1;
        Some(QueuePosition {
            position,
            waiting: queue.waiting.len() as u32,
            estimated_wait_seconds: estimate(position, queue.take_interval_ms()),
        })
    }

    /// Forgets what the rooms' members were told (their positions could not be delivered), so
    /// the next change tells them again.
    pub fn untold(&self, rooms: &[RoomKey]) {
        let mut tenants = self.lock();
        for room in rooms {
            let Some(queue) = tenants.get_mut(&room.tenant_id) else {
                continue;
            };
            if let Some(&at) = queue.joined_at.get(&room.room_id) {
                if let Some(entry) = queue.waiting.get_mut(&(at, room.room_id.clone())) {
                    entry.told = None;
                    queue.untold = true;
                }
            }
        }
    }

    /// Conversations of `tenant` waiting.
    pub fn waiting_in(&self, tenant: &str) -> usize {
        self.lock().get(tenant).map_or(0, |q| q.waiting.len())
    }

    /// Conversations waiting, all tenants together.
    pub fn waiting(&self) -> usize {
        self.lock().values().map(|q| q.waiting.len()).sum()
    }
}

/// Puts the room on the durable queue list, before a change that can queue its conversation is
/// written: a crash between the two leaves an entry that [`restore`] drops, never a waiting
/// conversation nobody lists. The entry is written even when it is listed already (keeping its
/// time): the new version makes a racing [`leave_list`], which read the conversation before
/// this change, fail and look again.
pub async fn enter_list<S: Store>(store: &S, room: &RoomKey) -> storage::Result<()> {
    let now = Timestamp::now();
    records::update::<QueueEntry, _, _>(store, QueueEntry::TENANT, &QueueEntry::id(room), |c| {
        Ok(Some(QueueEntry {
            tenant_id: room.tenant_id.clone(),
            room_id: room.room_id.clone(),
            queued_at: c.and_then(|c| c.queued_at).or(Some(now)),
        }))
    })
    .await?;
    Ok(())
}

/// Takes the room's entry off the durable queue list once its conversation does not wait. The
/// conversation is read after the entry and the entry written back at the version read, so a
/// change that queued the conversation again meanwhile ([`enter_list`] first) is never undone.
pub async fn leave_list<S: Store>(store: &S, room: &RoomKey) -> storage::Result<()> {
    let id = QueueEntry::id(room);
    for _ in 0..records::MAX_UPDATE_ROUNDS {
        let Some(entry) = records::load::<QueueEntry, _>(store, QueueEntry::TENANT, &id).await?
        else {
            return Ok(());
        };
        if entry.value.queued_at.is_none() {
            return Ok(());
        }
        let waits = records::load::<Conversation, _>(store, &room.tenant_id, &room.room_id)
            .await?
            .is_some_and(|c| c.value.waits_for_agent());
        if waits {
            return Ok(());
        }
        let left = Versioned {
            value: QueueEntry {
                queued_at: None,
                ..entry.value
            },
            version: entry.version,
        };
        match records::save(store, QueueEntry::TENANT, &id, left).await {
            Err(storage::Error::VersionConflict { .. }) => continue,
            other => return other.map(|_| ()),
        }
    }
    Err(storage::Error::NotApplied(format!(
        "the queue entry of {:?} changed under every attempt",
        room.room_id
    )))
}

/// Rebuilds the queues at start ([`restore`]), again after a pause while the store fails.
pub async fn run_restore(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown_signal();
    loop {
        match restore(shared.clone()).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "restoring the support queues failed; retrying"),
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

/// Tells the places left untold by [`SupportQueues::sync`]'s interval, until shutdown.
pub async fn run_ticker(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown_signal();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(
        TELL_INTERVAL_MS as u64 / 4,
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        let updates = shared.queue.due(Timestamp::now());
        if !updates.is_empty() {
            announce(&shared, None, updates);
        }
    }
}

/// How far past the clock the restore reads the list (see [`restore`]).
const RESTORE_AHEAD_MILLIS: i64 = 60_000;

/// Entries read per page of the durable list at start.
const RESTORE_PAGE: u32 = 500;

/// Rebuilds the queues from the durable list at start: every listed conversation that still
/// waits takes its place (by the time it joined the queue); entries whose conversation no
/// longer waits leave the list.
pub async fn restore(shared: Arc<Shared>) -> storage::Result<()> {
    let store = &shared.store;
    let mut after = None;
    // Every entry listed now, also one written a moment ago: a read without a time may look a
    // little into the past (a CQL store does, by two seconds), and the entries of changes made
    // just before a restart must not be missed. Nothing of this node is still writing.
    let mut as_of = Some(Timestamp(Timestamp::now().0 + RESTORE_AHEAD_MILLIS));
    loop {
        let query = ListQuery {
            as_of,
            descending: false,
            after: after.clone(),
            limit: RESTORE_PAGE,
        };
        let page = store
            .list_records(QueueEntry::TENANT, RecordKind::QueueEntry, query)
            .await?;
        as_of = Some(page.as_of);
        let full = page.entries.len() as u32 == RESTORE_PAGE;
        for listed in &page.entries {
            after = Some((listed.list_key, listed.record.key.id.clone()));
            let Ok(entry) = serde_json::from_str::<QueueEntry>(&listed.record.body) else {
                continue;
            };
            let room = RoomKey::new(&entry.tenant_id, &entry.room_id);
            let conversation =
                records::load::<Conversation, _>(store, &room.tenant_id, &room.room_id).await?;
            match conversation {
                Some(c) if c.value.waits_for_agent() => {
                    let updates = shared
                        .queue
                        .sync(&room, &c.value, c.version, Timestamp::now());
                    announce(&shared, None, updates);
                }
                _ => leave_list(store, &room).await?,
            }
        }
        if !full {
            return Ok(());
        }
    }
}

/// Sends each changed position to its room's shard (the caller's own shard, when given, runs
/// them at once).
pub fn announce(
    shared: &Shared,
    mut here: Option<&mut Shard>,
    updates: Vec<(RoomKey, QueuePosition)>,
) {
    shared
        .metrics
        .support_queue_waiting
        .set(shared.queue.waiting() as i64);
    let shards = shared.shards.len();
    let mut by_shard: HashMap<usize, Vec<(RoomKey, QueuePosition)>> = HashMap::new();
    for (room, position) in updates {
        let owner = shard_of(&room, shards);
        match here.as_deref_mut() {
            Some(shard) if shard.index == owner => shard.queue_update(&room, position),
            _ => by_shard.entry(owner).or_default().push((room, position)),
        }
    }
    for (owner, updates) in by_shard {
        let rooms: Vec<RoomKey> = updates.iter().map(|(room, _)| room.clone()).collect();
        let work = ShardCommand::Run(Box::new(move |shard: &mut Shard| {
            for (room, position) in &updates {
                shard.queue_update(room, *position);
            }
        }));
        if shared.shards[owner].commands.try_send(work).is_err() {
            tracing::warn!("queue positions were dropped: the rooms' shard is overloaded");
            shared.queue.untold(&rooms);
        }
    }
}

impl Shard {
    /// Tells a loaded room's members where its conversation stands in the queue (nobody is
    /// connected to a room that is not loaded).
    pub(crate) fn queue_update(&mut self, room: &RoomKey, position: QueuePosition) {
        let Some(Slot::Ready(state)) = self.rooms.get_mut(room) else {
            return;
        };
        if state.members.is_empty() {
            return;
        }
        let frame = FrameBuilder::success(
            QUEUE_RESPONSE,
            "system",
            Some(&room.room_id),
            None,
            position,
        );
        let route = Route::new(&self.shared.shards, self.index);
        let mut sent = 0;
        for member in state.members.values_mut() {
            route.deliver(member, frame.clone(), FrameClass::Durable);
            sent += 1;
        }
        self.shared.metrics.frames_out(OutCode::Queue, sent);
    }
}

#[cfg(test)]
mod tests {
    use storage::records::ConversationStatus;
    use storage::RoomKind;

    use super::*;

    fn waiting(room: &RoomKey, queued_at: i64) -> Conversation {
        let mut c = Conversation::new(room, RoomKind::Support, None);
        c.status = ConversationStatus::Queued;
        c.metrics.queued_at = Some(Timestamp(queued_at));
        c
    }

    fn taken(room: &RoomKey, queued_at: i64) -> Conversation {
        let mut c = waiting(room, queued_at);
        c.status = ConversationStatus::Agent;
        c.assignee = Some("agent".into());
        c
    }

    fn positions(updates: &[(RoomKey, QueuePosition)]) -> Vec<(&str, u32, u32)> {
        updates
            .iter()
            .map(|(r, p)| (r.room_id.as_str(), p.position, p.waiting))
            .collect()
    }

    #[test]
    fn positions_follow_the_order_of_joining_and_only_changes_are_told() {
        let queues = SupportQueues::default();
        let (a, b, c) = (
            RoomKey::new("t", "a"),
            RoomKey::new("t", "b"),
            RoomKey::new("t", "c"),
        );
        assert_eq!(
            positions(&queues.sync(&a, &waiting(&a, 10), 1, Timestamp(100))),
            [("a", 1, 1)]
        );
        // b and c join within the interval: each hears its own place at once ...
        assert_eq!(
            positions(&queues.sync(&c, &waiting(&c, 30), 1, Timestamp(200))),
            [("c", 2, 2)]
        );
        assert_eq!(
            positions(&queues.sync(&b, &waiting(&b, 20), 1, Timestamp(300))),
            [("b", 2, 3)]
        );
        // ... and the others theirs (every `waiting` count changed) once the interval is over.
        assert!(queues.due(Timestamp(1_099)).is_empty());
        assert_eq!(
            positions(&queues.due(Timestamp(1_100))),
            [("a", 1, 3), ("c", 3, 3)]
        );
        assert!(queues.due(Timestamp(5_000)).is_empty());
        // The same state again tells nobody anything.
        assert!(queues
            .sync(&b, &waiting(&b, 20), 2, Timestamp(5_000))
            .is_empty());
        // Nor does a change of a conversation that is not in the queue.
        let other = RoomKey::new("t", "other");
        let not_queued = Conversation::new(&other, RoomKind::Support, None);
        assert!(queues
            .sync(&other, &not_queued, 1, Timestamp(5_000))
            .is_empty());
        // a is taken in a quiet queue: b and c move up at once.
        assert_eq!(
            positions(&queues.sync(&a, &taken(&a, 10), 2, Timestamp(7_000))),
            [("b", 1, 2), ("c", 2, 2)]
        );
        assert_eq!(queues.position(&c).map(|p| p.position), Some(2));
        assert_eq!(queues.position(&a), None);
        assert_eq!(queues.waiting(), 2);
    }

    /// A queue of N filling and draining within a few intervals sends about N frames per
    /// interval, not one per conversation per change (N² in all), and what each was told last
    /// is where it stands.
    #[test]
    fn a_busy_queue_tells_each_conversation_at_most_once_per_interval() {
        const N: i64 = 1_000;
        let queues = SupportQueues::default();
        let rooms: Vec<RoomKey> = (0..N)
            .map(|i| RoomKey::new("t", &format!("r{i:04}")))
            .collect();
        let mut told: HashMap<String, QueuePosition> = HashMap::new();
        let mut frames = 0;
        let mut record = |told: &mut HashMap<String, QueuePosition>,
                          updates: Vec<(RoomKey, QueuePosition)>| {
            frames += updates.len();
            for (room, position) in updates {
                told.insert(room.room_id, position);
            }
        };
        // One joins every millisecond, the ticker runs every 250 ms.
        for (i, room) in rooms.iter().enumerate() {
            let now = Timestamp(i as i64);
            record(
                &mut told,
                queues.sync(room, &waiting(room, i as i64), 1, now),
            );
            if i % 250 == 0 {
                record(&mut told, queues.due(now));
            }
        }
        record(&mut told, queues.due(Timestamp(N + TELL_INTERVAL_MS)));
        for room in &rooms {
            assert_eq!(told.get(&room.room_id), queues.position(room).as_ref());
        }
        // Then the first half is taken, one every millisecond.
        let start = N + TELL_INTERVAL_MS;
        for (i, room) in rooms.iter().take(N as usize / 2).enumerate() {
            let now = Timestamp(start + i as i64);
            record(&mut told, queues.sync(room, &taken(room, i as i64), 2, now));
            if i % 250 == 0 {
                record(&mut told, queues.due(now));
            }
        }
        record(
            &mut told,
            queues.due(Timestamp(start + N + TELL_INTERVAL_MS)),
        );
        for room in rooms.iter().skip(N as usize / 2) {
            assert_eq!(told.get(&room.room_id), queues.position(room).as_ref());
        }
        // Telling every change would be about N²/2 while it fills and 3N²/8 while half of it
        // drains: some 875,000 frames here.
        assert!(frames <= 8 * N as usize, "{frames} frames");
    }

    #[test]
    fn a_change_seen_late_does_not_put_a_conversation_back() {
        let queues = SupportQueues::default();
        let a = RoomKey::new("t", "a");
        queues.sync(&a, &waiting(&a, 10), 2, Timestamp(100));
        queues.sync(&a, &taken(&a, 10), 3, Timestamp(100));
        // Version 2's answer arriving after version 3's.
        assert!(queues
            .sync(&a, &waiting(&a, 10), 2, Timestamp(100))
            .is_empty());
        assert_eq!(queues.position(&a), None);
    }

    /// The durable list follows the conversation: an entry stays while the conversation waits
    /// (whoever asks it to leave), and leaves once it does not.
    #[tokio::test]
    async fn a_listed_conversation_leaves_the_list_only_once_it_stops_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("q.db").display());
        let store = storage::open(&url).unwrap();
        let room = RoomKey::new("t", "a");
        let listed = |store: storage::AnyStore| async move {
            let page = store
                .list_records(
                    QueueEntry::TENANT,
                    RecordKind::QueueEntry,
                    ListQuery {
                        as_of: None,
                        descending: false,
                        after: None,
                        limit: 10,
                    },
                )
                .await
                .unwrap();
            (store, page.entries.len())
        };
        enter_list(&store, &room).await.unwrap();
        let mut conversation = waiting(&room, 10);
        records::save(
            &store,
            "t",
            "a",
            Versioned {
                value: conversation.clone(),
                version: 0,
            },
        )
        .await
        .unwrap();
        // Asked to leave while the conversation still waits (a late, stale leave): it stays.
        leave_list(&store, &room).await.unwrap();
        let (store, n) = listed(store).await;
        assert_eq!(n, 1);
        conversation.status = ConversationStatus::Agent;
        records::save(
            &store,
            "t",
            "a",
            Versioned {
                value: conversation,
                version: 1,
            },
        )
        .await
        .unwrap();
        leave_list(&store, &room).await.unwrap();
        let (store, n) = listed(store).await;
        assert_eq!(n, 0);
        // Entering again keeps working, and a second enter keeps the first time.
        enter_list(&store, &room).await.unwrap();
        let id = QueueEntry::id(&room);
        let first = records::load::<QueueEntry, _>(&store, QueueEntry::TENANT, &id)
            .await
            .unwrap()
            .unwrap();
        enter_list(&store, &room).await.unwrap();
        let second = records::load::<QueueEntry, _>(&store, QueueEntry::TENANT, &id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.value.queued_at, second.value.queued_at);
        assert!(second.version > first.version, "bumped for racing leaves");
    }

    #[test]
    fn tenants_have_queues_of_their_own() {
        let queues = SupportQueues::default();
        let (a, b) = (RoomKey::new("t1", "x"), RoomKey::new("t2", "x"));
        queues.sync(&a, &waiting(&a, 10), 1, Timestamp(100));
        let updates = queues.sync(&b, &waiting(&b, 20), 1, Timestamp(100));
        assert_eq!(positions(&updates), [("x", 1, 1)]);
        assert_eq!(updates[0].0.tenant_id, "t2");
        assert_eq!(queues.position(&a).map(|p| p.waiting), Some(1));
    }

    #[test]
    fn the_estimate_is_the_position_times_the_mean_gap_between_takes() {
        let queues = SupportQueues::default();
        let rooms: Vec<RoomKey> = (0..5)
            .map(|i| RoomKey::new("t", &format!("r{i}")))
            .collect();
        for (i, room) in rooms.iter().enumerate() {
            queues.sync(room, &waiting(room, i as i64), 1, Timestamp(0));
        }
        assert_eq!(
            queues.position(&rooms[4]).unwrap().estimated_wait_seconds,
            None
        );
        // Taken 30 s apart.
        queues.sync(&rooms[0], &taken(&rooms[0], 0), 2, Timestamp(1_000));
        assert_eq!(
            queues.position(&rooms[4]).unwrap().estimated_wait_seconds,
            None
        );
        let updates = queues.sync(&rooms[1], &taken(&rooms[1], 1), 2, Timestamp(31_000));
        let estimates: Vec<Option<u64>> = updates
            .iter()
            .map(|(_, p)| p.estimated_wait_seconds)
            .collect();
        assert_eq!(estimates, [Some(30), Some(60), Some(90)]);
    }
}
