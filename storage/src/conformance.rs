//! The behaviour every [`Store`] backend must show, written once against the trait.
//!
//! Each case is a `pub async fn` that takes a fresh, empty store and panics on a violation.
//! [`conformance_tests!`](crate::conformance_tests) turns them into one `#[tokio::test]` per case
//! for a backend, so a failure names the behaviour:
//!
//! ```ignore
//! async fn fresh_store() -> (MyStore, TempDir) { /* … */ }
//! storage::conformance_tests!(fresh_store);
//! ```
//!
//! The factory returns the store and a guard kept alive until the case ends (a temporary
//! directory, a keyspace to drop, …). The generated tests need `tokio` with its `macros` and
//! `rt-multi-thread` features.

use std::collections::HashSet;
use std::sync::Arc;

use crate::records::ListQuery;
use crate::{
    Direction, Error, HistoryPage, HistoryQuery, Message, MessageType, NewMessage, NewRoom,
    ReadState, Record, RecordKey, RecordKind, RoomKey, RoomKind, SearchQuery, SenderType, Store,
    Timestamp,
};

/// Generates one `#[tokio::test]` per conformance case. `$make` names an `async fn() -> (S, G)`
/// returning a fresh store and a guard to keep alive for the test. With `optional`, it returns
/// `Option<(S, G)>` instead, and a case with `None` (no database server to run on) returns
/// without checking anything: the factory decides whether that is allowed (say, not in CI).
#[macro_export]
macro_rules! conformance_tests {
    ($make:path) => {
        $crate::conformance_tests!(@list $make, required);
    };
    (optional $make:path) => {
        $crate::conformance_tests!(@list $make, optional);
    };
    (@list $make:path, $mode:ident) => {
        $crate::conformance_tests!(@cases $make, $mode;
            seq_starts_at_one_and_is_gap_free_per_room,
            an_append_at_any_seq_but_the_next_is_refused,
            duplicate_message_id_returns_the_original,
            a_retry_after_a_crash_gets_the_original,
            duplicates_within_one_batch_are_stored_once,
            an_unnumbered_repeat_gets_the_original_and_takes_no_seq,
            a_refused_append_names_the_last_seq_stored_before_it,
            pipelined_appends_are_applied_in_call_order,
            append_to_a_missing_room_is_invalid,
            invalid_request_does_not_fail_the_rest_of_its_batch,
            create_room_is_idempotent,
            room_lookup_returns_the_stored_room,
            add_participant_keeps_insertion_order_and_ignores_repeats,
            history_pages_backwards_from_the_newest,
            history_pages_forwards_after_a_cursor,
            history_between_two_cursors_reads_forwards,
            history_stops_at_its_byte_budget,
            history_limit_zero_means_fifty,
            history_hides_notes_unless_asked,
            search_matches_whole_words_case_insensitively,
            search_pages_like_plain_history,
            message_by_id_round_trips_every_field,
            mark_read_never_moves_backwards,
            unread_count_skips_own_and_read_messages,
            unread_counts_match_a_recount_under_interleaving,
            writes_are_visible_once_acknowledged,
            append_after_close_is_closed,
            same_room_id_in_two_tenants_is_two_rooms,
            another_tenants_room_looks_missing,
            a_record_is_created_once_and_then_written_only_over_its_version,
            records_of_another_tenant_or_kind_are_other_records,
            racing_record_writes_have_exactly_one_winner,
            typed_records_round_trip_every_field,
            an_update_reads_again_after_losing_a_race,
            an_oversized_record_is_invalid_and_changes_nothing,
            a_list_orders_records_by_key_and_pages_after_a_place,
            a_walk_over_a_list_sees_every_record_once_while_records_move,
            a_list_read_now_names_a_time_its_next_pages_agree_with,
        );
    };
    (@cases $make:path, required; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let (store, _guard) = $make().await;
                $crate::conformance::$case(store).await;
            }
        )+
    };
    (@cases $make:path, optional; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let Some((store, _guard)) = $make().await else {
                    return;
                };
                $crate::conformance::$case(store).await;
            }
        )+
    };
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// The tenant of every room the cases create unless they say otherwise.
const TENANT: &str = "tenant";

fn key(room_id: &str) -> RoomKey {
    RoomKey::new(TENANT, room_id)
}

async fn team_room<S: Store>(store: &S, room_id: &str) {
    let (_, created) = store
        .create_room(NewRoom::team(room_id, TENANT, "alice"))
        .await
        .unwrap();
    assert!(created, "room {room_id} already existed");
}

/// The seq the room's owner would give the next message: the stored `last_seq` + 1.
async fn next_seq<S: Store>(store: &S, room: &RoomKey) -> u64 {
    store
        .room(room)
        .await
        .unwrap()
        .expect("room exists")
        .last_seq
        + 1
}

/// A text message for the next seq of the room.
async fn next_text<S: Store>(store: &S, room_id: &str, sender: &str, text: &str) -> NewMessage {
    let room = key(room_id);
    let seq = next_seq(store, &room).await;
    NewMessage::text(&room, seq, sender, text)
}

async fn say<S: Store>(store: &S, room_id: &str, sender: &str, text: &str) -> Message {
    let message = next_text(store, room_id, sender, text).await;
    let appended = store.append(message).await.unwrap();
    assert!(!appended.duplicate);
    appended.message
}

async fn note<S: Store>(store: &S, room_id: &str, sender: &str, text: &str) -> Message {
    let mut message = next_text(store, room_id, sender, text).await;
    message.direction = Direction::Note;
    store.append(message).await.unwrap().message
}

/// Fills `room_id` with messages "m1" … "m{count}" (seq 1 … count).
async fn fill<S: Store>(store: &S, room_id: &str, count: u64) {
    for n in 1..=count {
        let message = say(store, room_id, "alice", &format!("m{n}")).await;
        assert_eq!(message.seq, n);
    }
}

fn seqs(page: &HistoryPage) -> Vec<u64> {
    page.messages.iter().map(|m| m.seq).collect()
}

fn range(from: u64, to: u64) -> Vec<u64> {
    (from..=to).collect()
}

async fn page<S: Store>(
    store: &S,
    room_id: &str,
    after: Option<u64>,
    before: Option<u64>,
    limit: u32,
) -> HistoryPage {
    let query = HistoryQuery {
        after_seq: after,
        before_seq: before,
        limit,
        ..HistoryQuery::default()
    };
    store.history(&key(room_id), query).await.unwrap()
}

async fn search<S: Store>(store: &S, room_id: &str, words: &str) -> Vec<u64> {
    let query = SearchQuery {
        words: words.to_owned(),
        limit: 100,
        include_notes: true,
        ..SearchQuery::default()
    };
    seqs(&store.search(&key(room_id), query).await.unwrap())
}

// ---------------------------------------------------------------------------------------------
// Appends and seq

/// `seq` starts at 1 in every room and grows by one per message, independently per room.
pub async fn seq_starts_at_one_and_is_gap_free_per_room<S: Store>(store: S) {
    team_room(&store, "a").await;
    team_room(&store, "b").await;
    let mut got = Vec::new();
    for room in ["a", "b", "a", "a", "b", "a"] {
        got.push((room, say(&store, room, "alice", "hi").await.seq));
    }
    assert_eq!(
        got,
        [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2), ("a", 4)]
    );
    assert_eq!(store.room(&key("a")).await.unwrap().unwrap().last_seq, 4);
    assert_eq!(store.room(&key("b")).await.unwrap().unwrap().last_seq, 2);
}

/// The fence: only the room's next seq is stored. A taken seq (a second writer with a stale
/// counter) and a seq past a gap are both refused, nothing is stored, and the error names the
/// room's last stored seq so the owner can renumber.
pub async fn an_append_at_any_seq_but_the_next_is_refused<S: Store>(store: S) {
    team_room(&store, "r").await;
    fill(&store, "r", 3).await;
    for wrong in [0, 1, 3, 5, 100] {
        let message = NewMessage::text(&key("r"), wrong, "mallory", &format!("at {wrong}"));
        let error = store.append(message).await.unwrap_err();
        assert!(
            matches!(error, Error::SeqConflict { last_seq: 3 }),
            "seq {wrong}: {error:?}"
        );
        assert!(error.is_retryable());
    }
    let history = page(&store, "r", Some(0), None, 10).await;
    assert_eq!(seqs(&history), range(1, 3));
    assert!(history.messages.iter().all(|m| m.sender == "alice"));
    assert_eq!(say(&store, "r", "alice", "m4").await.seq, 4);
}

/// A repeated `message_id` stores nothing and returns the original; ids are scoped per room.
pub async fn duplicate_message_id_returns_the_original<S: Store>(store: S) {
    team_room(&store, "a").await;
    team_room(&store, "b").await;
    let mut first = NewMessage::text(&key("a"), 1, "alice", "first");
    first.message_id = "msg-1".to_owned();
    first.created_at = Timestamp(1_000);
    let original = store.append(first.clone()).await.unwrap();
    assert!(!original.duplicate);

    // A retry comes with the owner's next seq; the original wins and the seq stays free.
    let mut again = first.clone();
    again.seq = 2;
    again.message = "second".to_owned();
    again.created_at = Timestamp(2_000);
    let repeated = store.append(again).await.unwrap();
    assert!(repeated.duplicate);
    assert_eq!(repeated.message, original.message);
    assert_eq!(repeated.message.seq, 1);
    assert_eq!(repeated.message.created_at, Timestamp(1_000));
    assert_eq!(repeated.message.message, "first");

    let history = page(&store, "a", None, None, 10).await;
    assert_eq!(seqs(&history), [1]);
    assert_eq!(say(&store, "a", "alice", "next").await.seq, 2);

    let mut elsewhere = first;
    elsewhere.room_id = "b".to_owned();
    let other = store.append(elsewhere).await.unwrap();
    assert!(!other.duplicate);
    assert_eq!(other.message.seq, 1);
}

/// The owner crashed after a write became durable but before it was acknowledged; the client
/// retries on the restarted owner, whose counter (recovered from `last_seq`) already counts the
/// message. The retry, whatever seq it comes with, gets the original; the room stays gap-free.
pub async fn a_retry_after_a_crash_gets_the_original<S: Store>(store: S) {
    team_room(&store, "r").await;
    fill(&store, "r", 2).await;
    let mut unacknowledged = next_text(&store, "r", "bob", "did it land?").await;
    unacknowledged.message_id = "client-7".to_owned();
    let stored = store.append(unacknowledged.clone()).await.unwrap();
    assert_eq!(stored.message.seq, 3);
    // The restarted owner loads the room and numbers the retry after what is stored.
    let mut retry = unacknowledged;
    retry.seq = next_seq(&store, &key("r")).await;
    assert_eq!(retry.seq, 4);
    let answered = store.append(retry).await.unwrap();
    assert!(answered.duplicate);
    assert_eq!(answered.message, stored.message);
    // The seq the retry carried is still the next one.
    assert_eq!(say(&store, "r", "alice", "after").await.seq, 4);
    assert_eq!(
        seqs(&page(&store, "r", Some(0), None, 10).await),
        range(1, 4)
    );
}

/// Pipelined appends with the same id store it once; the seq of the duplicate stays unused, so
/// the owner's next append (numbered past it) is refused with the seq to continue from.
pub async fn duplicates_within_one_batch_are_stored_once<S: Store>(store: S) {
    team_room(&store, "r").await;
    let room = key("r");
    let mut first = NewMessage::text(&room, 1, "alice", "one");
    first.message_id = "same".to_owned();
    let mut second = first.clone();
    second.seq = 2;
    second.message = "two".to_owned();
    let third = NewMessage::text(&room, 3, "alice", "three");
    // Called in order without waiting, as a room's owner pipelines them.
    let pending = [
        store.append(first),
        store.append(second),
        store.append(third),
    ];
    let [first, second, third] = pending;
    let first = first.await.unwrap();
    let second = second.await.unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(second.message, first.message);
    let error = third.await.unwrap_err();
    assert!(
        matches!(error, Error::SeqConflict { last_seq: 1 }),
        "{error:?}"
    );
    assert_eq!(say(&store, "r", "alice", "two").await.seq, 2);
    assert_eq!(
        seqs(&page(&store, "r", Some(0), None, 10).await),
        range(1, 2)
    );
}

/// An append at seq 0, which no message has, is how an owner sends a repeat of an id it sent
/// recently without giving it a seq: a stored id (stored earlier in the same batch, or before)
/// gets the original and takes no seq, so the append numbered after the original still fits.
/// An id the room does not hold is refused like any wrong seq, and nothing is stored.
pub async fn an_unnumbered_repeat_gets_the_original_and_takes_no_seq<S: Store>(store: S) {
    team_room(&store, "r").await;
    let room = key("r");
    let mut first = NewMessage::text(&room, 1, "alice", "one");
    first.message_id = "same".to_owned();
    let mut copy = first.clone();
    copy.seq = 0;
    copy.message = "one, again".to_owned();
    let second = NewMessage::text(&room, 2, "alice", "two");
    // Called in order without waiting, as a room's owner pipelines them.
    let pending = [
        store.append(first),
        store.append(copy.clone()),
        store.append(second),
    ];
    let [first, copied, second] = pending;
    let first = first.await.unwrap();
    let copied = copied.await.unwrap();
    assert!(!first.duplicate);
    assert!(copied.duplicate);
    assert_eq!(copied.message, first.message);
    assert_eq!(second.await.unwrap().message.seq, 2);

    let later = store.append(copy).await.unwrap();
    assert!(later.duplicate);
    assert_eq!(later.message, first.message);

    let unknown = NewMessage::text(&room, 0, "alice", "never stored");
    let error = store.append(unknown).await.unwrap_err();
    assert!(
        matches!(error, Error::SeqConflict { last_seq: 2 }),
        "{error:?}"
    );
    assert_eq!(
        seqs(&page(&store, "r", Some(0), None, 10).await),
        range(1, 2)
    );
    assert_eq!(say(&store, "r", "alice", "three").await.seq, 3);
}

/// Pipelined appends, every other one at a seq the fence refuses: each refused one names the
/// room's last seq at its place in the call order, not the seq later appends of its batch
/// reached, since the owner renumbers it (and what follows it) from there.
pub async fn a_refused_append_names_the_last_seq_stored_before_it<S: Store>(store: S) {
    team_room(&store, "r").await;
    let room = key("r");
    let mut pending = Vec::new();
    for seq in 1..=100 {
        pending.push((
            store.append(NewMessage::text(&room, seq, "alice", "kept")),
            None,
        ));
        let stale = NewMessage::text(&room, seq + 1000, "alice", "refused");
        pending.push((store.append(stale), Some(seq)));
    }
    for (appended, refused_after) in pending {
        match (appended.await, refused_after) {
            (Ok(appended), None) => assert!(!appended.duplicate),
            (Err(Error::SeqConflict { last_seq }), Some(seq)) => assert_eq!(last_seq, seq),
            (answer, expected) => panic!("{answer:?}, expected a refusal after {expected:?}"),
        }
    }
    assert_eq!(
        seqs(&page(&store, "r", Some(0), None, 200).await),
        range(1, 100)
    );
}

/// An owner pipelines 1000 appends to one room (each called before the previous is answered)
/// while other rooms get theirs at the same time: every one is stored, in call order.
pub async fn pipelined_appends_are_applied_in_call_order<S: Store>(store: S) {
    let store = Arc::new(store);
    let rooms = ["r0", "r1", "r2", "r3"];
    for room in rooms {
        team_room(&*store, room).await;
    }
    let tasks: Vec<_> = rooms
        .iter()
        .map(|room_id| {
            let store = Arc::clone(&store);
            let room = key(room_id);
            tokio::spawn(async move {
                let pending: Vec<_> = (1..=250)
                    .map(|seq| {
                        store.append(NewMessage::text(&room, seq, "alice", &format!("m{seq}")))
                    })
                    .collect();
                let mut got = Vec::new();
                for appended in pending {
                    got.push(appended.await.unwrap().message.seq);
                }
                got
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), range(1, 250));
    }
    for room in rooms {
        let mut read = Vec::new();
        let mut after = 0;
        loop {
            let history = page(&*store, room, Some(after), None, 200).await;
            read.extend(seqs(&history));
            for message in &history.messages {
                assert_eq!(message.message, format!("m{}", message.seq));
            }
            after = *read.last().unwrap();
            if !history.has_more {
                break;
            }
        }
        assert_eq!(read, range(1, 250));
        assert_eq!(store.room(&key(room)).await.unwrap().unwrap().last_seq, 250);
    }
}

/// Appending to a room that does not exist is refused as invalid.
pub async fn append_to_a_missing_room_is_invalid<S: Store>(store: S) {
    let error = store
        .append(NewMessage::text(&key("nowhere"), 1, "alice", "hi"))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Invalid(_)), "{error:?}");
    assert!(!error.is_retryable());
    assert!(store.room(&key("nowhere")).await.unwrap().is_none());
    let error = store
        .add_participant(&key("nowhere"), "bob")
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Invalid(_)), "{error:?}");
}

/// Invalid requests mixed into the same moment as valid ones fail alone.
pub async fn invalid_request_does_not_fail_the_rest_of_its_batch<S: Store>(store: S) {
    team_room(&store, "r").await;
    let mut pending = Vec::new();
    for i in 1..=100u64 {
        let room = if i % 2 == 0 { "r" } else { "missing" };
        let message = NewMessage::text(&key(room), i / 2, "alice", &format!("{i}"));
        pending.push((room, store.append(message)));
    }
    let mut stored = Vec::new();
    for (room, result) in pending {
        match (room, result.await) {
            ("r", result) => stored.push(result.unwrap().message.seq),
            (_, result) => {
                let error = result.unwrap_err();
                assert!(matches!(error, Error::Invalid(_)), "{error:?}");
            }
        }
    }
    assert_eq!(stored, range(1, 50));
    assert_eq!(
        seqs(&page(&store, "r", Some(0), None, 100).await),
        range(1, 50)
    );
}

// ---------------------------------------------------------------------------------------------
// Rooms

/// Creating an existing room returns it unchanged.
pub async fn create_room_is_idempotent<S: Store>(store: S) {
    let mut room = NewRoom::team("r", TENANT, "alice");
    room.participants = vec!["alice".into(), "bob".into(), "alice".into()];
    let (created, fresh) = store.create_room(room).await.unwrap();
    assert!(fresh);
    assert_eq!(created.participants, ["alice", "bob"]);
    assert_eq!(created.last_seq, 0);
    say(&store, "r", "alice", "hi").await;

    let mut again = NewRoom::team("r", TENANT, "carol");
    again.title = "renamed".to_owned();
    let (existing, fresh) = store.create_room(again).await.unwrap();
    assert!(!fresh);
    assert_eq!(existing.tenant_id, TENANT);
    assert_eq!(existing.title, "r");
    assert_eq!(existing.participants, ["alice", "bob"]);
    assert_eq!(existing.last_seq, 1);
    assert_eq!(store.room(&key("r")).await.unwrap().unwrap(), existing);
}

/// A stored room reads back field for field; an unknown one is `None`.
pub async fn room_lookup_returns_the_stored_room<S: Store>(store: S) {
    assert!(store.room(&key("r")).await.unwrap().is_none());
    let room = NewRoom {
        room_id: "r".into(),
        tenant_id: TENANT.into(),
        kind: RoomKind::Support,
        title: "Order #42".into(),
        status: "open".into(),
        participants: vec!["agent-1".into(), "customer-9".into()],
        created_at: Timestamp(1_700_000_000_123),
    };
    let (created, _) = store.create_room(room.clone()).await.unwrap();
    let stored = store.room(&key("r")).await.unwrap().unwrap();
    assert_eq!(stored, created);
    assert_eq!(stored.room_id, room.room_id);
    assert_eq!(stored.tenant_id, room.tenant_id);
    assert_eq!(stored.kind, room.kind);
    assert_eq!(stored.title, room.title);
    assert_eq!(stored.status, room.status);
    assert_eq!(stored.participants, room.participants);
    assert_eq!(stored.created_at, room.created_at);
    assert_eq!(stored.last_seq, 0);
    say(&store, "r", "agent-1", "hello").await;
    assert_eq!(store.room(&key("r")).await.unwrap().unwrap().last_seq, 1);
}

/// Participants keep the order they joined in; adding one twice is a no-op.
pub async fn add_participant_keeps_insertion_order_and_ignores_repeats<S: Store>(store: S) {
    team_room(&store, "r").await;
    fill(&store, "r", 3).await;
    for user in ["zed", "bob", "carol", "bob", "alice"] {
        store.add_participant(&key("r"), user).await.unwrap();
    }
    let room = store.add_participant(&key("r"), "zed").await.unwrap();
    assert_eq!(room.participants, ["alice", "zed", "bob", "carol"]);
    assert_eq!(room.last_seq, 3);
    assert_eq!(store.room(&key("r")).await.unwrap().unwrap(), room);
}

// ---------------------------------------------------------------------------------------------
// History

/// Without a cursor or with `before_seq` only, pages run backwards from the newest message.
pub async fn history_pages_backwards_from_the_newest<S: Store>(store: S) {
    team_room(&store, "r").await;
    fill(&store, "r", 25).await;
    let newest = page(&store, "r", None, None, 10).await;
    assert_eq!(seqs(&newest), range(16, 25));
    assert!(newest.has_more);
    let older = page(&store, "r", None, Some(16), 10).await;
    assert_eq!(seqs(&older), range(6, 15));
    assert!(older.has_more);
    let oldest = page(&store, "r", None, Some(6), 10).await;
    assert_eq!(seqs(&oldest), range(1, 5));
    assert!(!oldest.has_more);
    let none = page(&store, "r", None, Some(1), 10).await;
    assert!(none.messages.is_empty() && !none.has_more);
    let exact = page(&store, "r", None, Some(11), 10).await;
    assert_eq!(seqs(&exact), range(1, 10));
    assert!(!exact.has_more);
    assert_eq!(newest.messages[0].message, "m16");
    let empty = page(&store, "other", None, None, 10).await;
    assert!(empty.messages.is_empty() && !empty.has_more);
}

/// With `after_seq` only, pages run forwards, oldest first.
pub async fn history_pages_forwards_after_a_cursor<S: Store>(store: S) {
    team_room(&store, "r").await;
    fill(&store, "r", 25).await;
    let first = page(&store, "r", Some(0), None, 10).await;
    assert_eq!(seqs(&first), range(1, 10));
    assert!(first.has_more);
    let middle = page(&store, "r", Some(10), None, 10).await;
    assert_eq!(seqs(&middle), range(11, 20));
    assert!(middle.has_more);
    let last = page(&store, "r", Some(20), None, 10).await;
    assert_eq!(seqs(&last), range(21, 25));
    assert!(!last.has_more);
    let exact = page(&store, "r", Some(15), None, 10).await;
    assert_eq!(seqs(&exact), range(16, 25));
    assert!(!exact.has_more);
    let none = page(&store, "r", Some(25), None, 10).await;
    assert!(none.messages.is_empty() && !none.has_more);
}

/// A byte budget cuts a page at the end it reads from, keeps at least one message, and says
/// `has_more`; paging on from the cut reaches every message.
pub async fn history_stops_at_its_byte_budget<S: Store>(store: S) {
    team_room(&store, "r").await;
    for n in 1..=10u64 {
        let text = format!("{n:0>1000}");
        assert_eq!(say(&store, "r", "alice", &text).await.seq, n);
    }
    let budget = |after_seq, before_seq, max_bytes| HistoryQuery {
        after_seq,
        before_seq,
        limit: 50,
        max_bytes,
        ..HistoryQuery::default()
    };
    // About 1 KB a message: a 3.5 KB budget holds three (the newest, paging backwards).
    let newest = store
        .history(&key("r"), budget(None, None, 3500))
        .await
        .unwrap();
    assert_eq!(seqs(&newest), range(8, 10));
    assert!(newest.has_more);
    let mut seen = seqs(&newest);
    let mut before = 8;
    while before > 1 {
        let older = store
            .history(&key("r"), budget(None, Some(before), 3500))
            .await
            .unwrap();
        assert!(!older.messages.is_empty());
        before = older.messages[0].seq;
        seen.splice(0..0, seqs(&older));
        assert_eq!(older.has_more, before > 1);
    }
    assert_eq!(seen, range(1, 10));
    // Forwards, the oldest are kept.
    let first = store
        .history(&key("r"), budget(Some(0), None, 3500))
        .await
        .unwrap();
    assert_eq!(seqs(&first), range(1, 3));
    assert!(first.has_more);
    // A budget smaller than one message still returns one.
    let one = store
        .history(&key("r"), budget(Some(0), None, 10))
        .await
        .unwrap();
    assert_eq!(seqs(&one), [1]);
    assert!(one.has_more);
    // A budget that holds the rest is no cut.
    let rest = store
        .history(&key("r"), budget(Some(7), None, 1 << 20))
        .await
        .unwrap();
    assert_eq!(seqs(&rest), range(8, 10));
    assert!(!rest.has_more);
}

/// With both cursors, the open interval is read forwards from `after_seq`.
pub async fn history_between_two_cursors_reads_forwards<S: Store>(store: S) {
    team_room(&store, "r").await;
    fill(&store, "r", 25).await;
    let part = page(&store, "r", Some(5), Some(12), 3).await;
    assert_eq!(seqs(&part), [6, 7, 8]);
    assert!(part.has_more);
    let rest = page(&store, "r", Some(8), Some(12), 3).await;
    assert_eq!(seqs(&rest), [9, 10, 11]);
    assert!(!rest.has_more);
    let whole = page(&store, "r", Some(5), Some(12), 10).await;
    assert_eq!(seqs(&whole), range(6, 11));
    assert!(!whole.has_more);
    let empty = page(&store, "r", Some(5), Some(6), 10).await;
    assert!(empty.messages.is_empty() && !empty.has_more);
}

/// `limit` 0 means the default page of 50.
pub async fn history_limit_zero_means_fifty<S: Store>(store: S) {
    team_room(&store, "r").await;
    fill(&store, "r", 60).await;
    let newest = page(&store, "r", None, None, 0).await;
    assert_eq!(seqs(&newest), range(11, 60));
    assert!(newest.has_more);
    let forwards = page(&store, "r", Some(0), None, 0).await;
    assert_eq!(seqs(&forwards), range(1, 50));
    assert!(forwards.has_more);
}

/// `NOTE` messages show only with `include_notes`, and hidden ones do not count for `has_more`.
pub async fn history_hides_notes_unless_asked<S: Store>(store: S) {
    team_room(&store, "r").await;
    note(&store, "r", "alice", "n1").await;
    say(&store, "r", "alice", "m2").await;
    note(&store, "r", "alice", "n3").await;
    say(&store, "r", "alice", "m4").await;
    note(&store, "r", "alice", "n5").await;

    let hidden = page(&store, "r", None, None, 2).await;
    assert_eq!(seqs(&hidden), [2, 4]);
    assert!(!hidden.has_more);
    let forwards = page(&store, "r", Some(0), None, 2).await;
    assert_eq!(seqs(&forwards), [2, 4]);
    assert!(!forwards.has_more);

    let query = HistoryQuery {
        limit: 2,
        include_notes: true,
        ..HistoryQuery::default()
    };
    let shown = store.history(&key("r"), query).await.unwrap();
    assert_eq!(seqs(&shown), [4, 5]);
    assert!(shown.has_more);
    assert_eq!(shown.messages[1].direction, Direction::Note);
}

/// Search words match whole words of the text, case-insensitively (Unicode aware), all of them.
pub async fn search_matches_whole_words_case_insensitively<S: Store>(store: S) {
    team_room(&store, "r").await;
    for text in [
        "hello world",       // 1
        "Hello, World!",     // 2
        "say hello",         // 3
        "shellout",          // 4
        "world peace",       // 5
        "HELLO there",       // 6
        "Été chaud",         // 7
        "100% sure_thing",   // 8
        "straße in MÜNCHEN", // 9
    ] {
        say(&store, "r", "alice", text).await;
    }
    assert_eq!(search(&store, "r", "Hello").await, [1, 2, 3, 6]);
    assert_eq!(search(&store, "r", "hello").await, [1, 2, 3, 6]);
    assert_eq!(search(&store, "r", "ell").await, Vec::<u64>::new());
    assert_eq!(search(&store, "r", "hell").await, Vec::<u64>::new());
    assert_eq!(search(&store, "r", "hello world").await, [1, 2]);
    assert_eq!(search(&store, "r", "  WORLD,hello ").await, [1, 2]);
    assert_eq!(search(&store, "r", "hello peace").await, Vec::<u64>::new());
    assert_eq!(search(&store, "r", "été").await, [7]);
    assert_eq!(search(&store, "r", "ÉTÉ").await, [7]);
    assert_eq!(search(&store, "r", "ete").await, Vec::<u64>::new());
    assert_eq!(search(&store, "r", "100%").await, [8]);
    assert_eq!(search(&store, "r", "sure").await, [8]);
    assert_eq!(search(&store, "r", "thing").await, [8]);
    assert_eq!(search(&store, "r", "%").await, range(1, 9));
    assert_eq!(search(&store, "r", "_").await, range(1, 9));
    assert_eq!(search(&store, "r", "münchen").await, [9]);
    assert_eq!(search(&store, "r", "STRASSE").await, Vec::<u64>::new());
    assert_eq!(search(&store, "r", "Straße").await, [9]);
    assert_eq!(search(&store, "r", "   ").await, range(1, 9));
    assert_eq!(search(&store, "r", "").await, range(1, 9));
}

/// A search pages like plain history: `limit` counts matches, `has_more` looks for more matches.
pub async fn search_pages_like_plain_history<S: Store>(store: S) {
    team_room(&store, "r").await;
    for n in 1..=20 {
        let text = if n % 3 == 0 { "ping" } else { "pong" };
        say(&store, "r", "alice", text).await;
    }
    note(&store, "r", "alice", "ping").await; // 21
    let query = |after_seq, before_seq, limit, include_notes| SearchQuery {
        words: "PING".to_owned(),
        after_seq,
        before_seq,
        limit,
        include_notes,
        max_bytes: 0,
    };
    let newest = store
        .search(&key("r"), query(None, None, 2, false))
        .await
        .unwrap();
    assert_eq!(seqs(&newest), [15, 18]);
    assert!(newest.has_more);
    let with_notes = store
        .search(&key("r"), query(None, None, 2, true))
        .await
        .unwrap();
    assert_eq!(seqs(&with_notes), [18, 21]);
    let older = store
        .search(&key("r"), query(None, Some(15), 10, false))
        .await
        .unwrap();
    assert_eq!(seqs(&older), [3, 6, 9, 12]);
    assert!(!older.has_more);
    let forwards = store
        .search(&key("r"), query(Some(3), None, 3, false))
        .await
        .unwrap();
    assert_eq!(seqs(&forwards), [6, 9, 12]);
    assert!(forwards.has_more);
    let last = store
        .search(&key("r"), query(Some(12), Some(18), 3, false))
        .await
        .unwrap();
    assert_eq!(seqs(&last), [15]);
    assert!(!last.has_more);
}

/// A stored message reads back exactly as it was appended (plus its seq).
pub async fn message_by_id_round_trips_every_field<S: Store>(store: S) {
    team_room(&store, "r").await;
    team_room(&store, "other").await;
    say(&store, "r", "alice", "first").await;
    let mut metadata = serde_json::Map::new();
    metadata.insert("channel".into(), "whatsapp".into());
    metadata.insert(
        "nested".into(),
        serde_json::json!({"a": [1, 2, null], "b": true}),
    );
    let new = NewMessage {
        message_id: "01HXYZ".into(),
        seq: 2,
        tenant_id: TENANT.into(),
        room_id: "r".into(),
        sender: "customer-9".into(),
        sender_type: SenderType::Customer,
        direction: Direction::Incoming,
        kind: MessageType::Image,
        message: "look: ünïcødé 🎉 'quotes' \"double\"".into(),
        attached_files: vec!["https://files/a.png".into(), "b.pdf".into()],
        reply_to: Some("earlier-id".into()),
        mentions: vec!["alice".into(), "bob".into()],
        metadata,
        created_at: Timestamp(1_700_000_000_999),
    };
    let appended = store.append(new.clone()).await.unwrap();
    assert_eq!(appended.message, new.clone().into_message());
    let found = store.message_by_id(&key("r"), "01HXYZ").await.unwrap();
    assert_eq!(found, Some(new.into_message()));
    assert_eq!(
        store.message_by_id(&key("r"), "unknown").await.unwrap(),
        None
    );
    assert_eq!(
        store.message_by_id(&key("other"), "01HXYZ").await.unwrap(),
        None
    );
    let history = page(&store, "r", None, None, 10).await;
    assert_eq!(Some(&history.messages[1]), found.as_ref());
}

// ---------------------------------------------------------------------------------------------
// Read markers

/// The read marker only moves forwards; it starts at 0.
pub async fn mark_read_never_moves_backwards<S: Store>(store: S) {
    team_room(&store, "r").await;
    fill(&store, "r", 10).await;
    let marker = |state: ReadState| state.read_seq;
    assert_eq!(marker(store.read_state(&key("r"), "bob").await.unwrap()), 0);
    assert_eq!(
        marker(store.mark_read(&key("r"), "bob", 5).await.unwrap()),
        5
    );
    assert_eq!(
        marker(store.mark_read(&key("r"), "bob", 3).await.unwrap()),
        5
    );
    assert_eq!(marker(store.read_state(&key("r"), "bob").await.unwrap()), 5);
    assert_eq!(
        marker(store.mark_read(&key("r"), "bob", 7).await.unwrap()),
        7
    );
    assert_eq!(marker(store.read_state(&key("r"), "bob").await.unwrap()), 7);
    assert_eq!(
        marker(store.read_state(&key("r"), "carol").await.unwrap()),
        0
    );
    assert_eq!(
        store.read_state(&key("nowhere"), "bob").await.unwrap(),
        ReadState::default()
    );
    let error = store
        .mark_read(&key("nowhere"), "bob", 1)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Invalid(_)), "{error:?}");
    let error = store.mark_read(&key("r"), "bob", 11).await.unwrap_err();
    assert!(matches!(error, Error::Invalid(_)), "{error:?}");
}

/// The unread counts a reader gets, with and without notes.
async fn unread<S: Store>(store: &S, room_id: &str, user_id: &str) -> (u64, u64) {
    let state = store.read_state(&key(room_id), user_id).await.unwrap();
    (state.unread, state.unread_with_notes)
}

/// Unread counts what others sent after the reader's marker; notes only in the count with
/// notes. The counts come back from `mark_read` too.
pub async fn unread_count_skips_own_and_read_messages<S: Store>(store: S) {
    team_room(&store, "r").await;
    say(&store, "r", "alice", "a1").await; // 1
    say(&store, "r", "bob", "b2").await; // 2
    say(&store, "r", "alice", "a3").await; // 3
    note(&store, "r", "alice", "n4").await; // 4
    say(&store, "r", "alice", "a5").await; // 5
    say(&store, "r", "bob", "b6").await; // 6
    note(&store, "r", "bob", "n7").await; // 7

    assert_eq!(unread(&store, "r", "bob").await, (3, 4));
    assert_eq!(unread(&store, "r", "alice").await, (2, 3));
    assert_eq!(unread(&store, "r", "carol").await, (5, 7));

    let state = store.mark_read(&key("r"), "bob", 3).await.unwrap();
    assert_eq!(
        (state.read_seq, state.unread, state.unread_with_notes),
        (3, 1, 2)
    );
    assert_eq!(unread(&store, "r", "bob").await, (1, 2));
    // Past bob's own latest message: nothing of anyone else's is left.
    let state = store.mark_read(&key("r"), "bob", 7).await.unwrap();
    assert_eq!((state.unread, state.unread_with_notes), (0, 0));
    // A marker that stops below the reader's own latest message.
    let state = store.mark_read(&key("r"), "alice", 2).await.unwrap();
    assert_eq!((state.unread, state.unread_with_notes), (1, 2));
    let state = store.mark_read(&key("r"), "alice", 4).await.unwrap();
    assert_eq!((state.unread, state.unread_with_notes), (1, 2));
    assert_eq!(unread(&store, "r", "alice").await, (1, 2));
    // New messages raise the counts of everyone but their sender.
    say(&store, "r", "carol", "c8").await;
    note(&store, "r", "alice", "n9").await;
    assert_eq!(unread(&store, "r", "alice").await, (2, 3));
    assert_eq!(unread(&store, "r", "bob").await, (1, 2));
    assert_eq!(unread(&store, "r", "carol").await, (5, 8));
    assert_eq!(unread(&store, "nowhere", "bob").await, (0, 0));
}

/// Counts stay exact when appends and markers of many readers interleave (likely within one
/// batch): each reader's count equals a count over the stored messages.
pub async fn unread_counts_match_a_recount_under_interleaving<S: Store>(store: S) {
    team_room(&store, "r").await;
    let users = ["alice", "bob", "carol"];
    let room = key("r");
    let mut markers = [0u64; 3];
    let mut pending_appends = Vec::new();
    let mut pending_marks = Vec::new();
    for seq in 1..=120u64 {
        let sender = users[(seq % 3) as usize];
        let mut message = NewMessage::text(&key("r"), seq, sender, &format!("m{seq}"));
        if seq % 7 == 0 {
            message.direction = Direction::Note;
        }
        pending_appends.push(store.append(message));
        if seq % 5 == 0 {
            let reader = ((seq / 5) % 3) as usize;
            let upto = seq - (seq % 4);
            markers[reader] = markers[reader].max(upto);
            pending_marks.push(store.mark_read(&room, users[reader], upto));
        }
        if seq % 10 == 0 {
            for appended in pending_appends.drain(..) {
                assert!(!appended.await.unwrap().duplicate);
            }
            for mark in pending_marks.drain(..) {
                mark.await.unwrap();
            }
        }
    }
    let everything = HistoryQuery {
        after_seq: Some(0),
        limit: 200,
        include_notes: true,
        ..HistoryQuery::default()
    };
    let all = store.history(&key("r"), everything).await.unwrap().messages;
    assert_eq!(all.len(), 120);
    for (index, user) in users.iter().enumerate() {
        let state = store.read_state(&key("r"), user).await.unwrap();
        assert_eq!(state.read_seq, markers[index], "{user}");
        let after: Vec<_> = all
            .iter()
            .filter(|m| m.seq > markers[index] && m.sender != *user)
            .collect();
        let with_notes = after.len() as u64;
        let without = after
            .iter()
            .filter(|m| m.direction != Direction::Note)
            .count() as u64;
        assert_eq!(
            (state.unread, state.unread_with_notes),
            (without, with_notes),
            "{user}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Visibility and lifecycle

/// Every read issued after a write's future resolved sees that write.
pub async fn writes_are_visible_once_acknowledged<S: Store>(store: S) {
    team_room(&store, "r").await;
    for n in 1..=50u64 {
        let message = say(&store, "r", "alice", &format!("m{n}")).await;
        assert_eq!(message.seq, n);
        let after = page(&store, "r", Some(n - 1), None, 10).await;
        assert_eq!(after.messages, std::slice::from_ref(&message));
        let found = store
            .message_by_id(&key("r"), &message.message_id)
            .await
            .unwrap();
        assert_eq!(found.as_ref(), Some(&message));
        assert_eq!(store.room(&key("r")).await.unwrap().unwrap().last_seq, n);
        assert_eq!(
            store.mark_read(&key("r"), "bob", n).await.unwrap().read_seq,
            n
        );
        assert_eq!(
            store.read_state(&key("r"), "bob").await.unwrap().read_seq,
            n
        );
        let user = format!("user-{n}");
        let room = store.add_participant(&key("r"), &user).await.unwrap();
        let stored = store.room(&key("r")).await.unwrap().unwrap();
        assert_eq!(stored.participants, room.participants);
        assert_eq!(stored.participants.last(), Some(&user));
    }
    let ids: HashSet<_> = page(&store, "r", Some(0), None, 100)
        .await
        .messages
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(ids.len(), 50);
}

/// `close` makes later writes fail with `Closed`; closing twice is fine.
pub async fn append_after_close_is_closed<S: Store>(store: S) {
    team_room(&store, "r").await;
    say(&store, "r", "alice", "before").await;
    store.close().await.unwrap();
    let error = store
        .append(NewMessage::text(&key("r"), 2, "alice", "after"))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Closed), "{error:?}");
    assert!(error.is_retryable());
    let error = store
        .create_room(NewRoom::team("s", TENANT, "alice"))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Closed), "{error:?}");
    store.close().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Tenants

/// The same room id in two tenants names two rooms: creating one never touches the other, and
/// seqs, histories, message ids, participants and read markers are independent.
pub async fn same_room_id_in_two_tenants_is_two_rooms<S: Store>(store: S) {
    let a = RoomKey::new("tenant-a", "x");
    let b = RoomKey::new("tenant-b", "x");
    let (room_a, created) = store
        .create_room(NewRoom::team("x", "tenant-a", "alice"))
        .await
        .unwrap();
    assert!(created);
    let mut new_b = NewRoom::team("x", "tenant-b", "bob");
    new_b.title = "b's room".to_owned();
    let (room_b, created) = store.create_room(new_b).await.unwrap();
    assert!(
        created,
        "tenant-b's x must be created, not found in tenant-a"
    );
    assert_eq!(room_b.tenant_id, "tenant-b");
    assert_eq!(room_b.participants, ["bob"]);
    assert_eq!(store.room(&a).await.unwrap().unwrap(), room_a);

    let mut seqs_seen = Vec::new();
    for (room, text) in [(&a, "a1"), (&a, "a2"), (&b, "b1"), (&a, "a3"), (&b, "b2")] {
        let sender = if room == &a { "alice" } else { "bob" };
        let seq = next_seq(&store, room).await;
        let message = store
            .append(NewMessage::text(room, seq, sender, text))
            .await
            .unwrap()
            .message;
        seqs_seen.push((text, message.seq));
    }
    assert_eq!(
        seqs_seen,
        [("a1", 1), ("a2", 2), ("b1", 1), ("a3", 3), ("b2", 2)]
    );
    let texts = |page: HistoryPage| -> Vec<String> {
        page.messages.into_iter().map(|m| m.message).collect()
    };
    let history_a = store.history(&a, HistoryQuery::default()).await.unwrap();
    assert_eq!(texts(history_a), ["a1", "a2", "a3"]);
    let history_b = store.history(&b, HistoryQuery::default()).await.unwrap();
    assert_eq!(texts(history_b), ["b1", "b2"]);
    let search = HistoryQuery::default().search("b1");
    assert!(store.search(&a, search).await.unwrap().messages.is_empty());

    // Message ids are scoped per room, hence per tenant.
    let mut in_a = NewMessage::text(&a, 4, "alice", "same id in a");
    in_a.message_id = "shared-id".to_owned();
    let mut in_b = NewMessage::text(&b, 3, "bob", "same id in b");
    in_b.message_id = "shared-id".to_owned();
    assert!(!store.append(in_a).await.unwrap().duplicate);
    let stored_b = store.append(in_b).await.unwrap();
    assert!(!stored_b.duplicate);
    assert_eq!(stored_b.message.seq, 3);
    let found = store.message_by_id(&a, "shared-id").await.unwrap().unwrap();
    assert_eq!(found.message, "same id in a");

    store.add_participant(&b, "carol").await.unwrap();
    assert_eq!(
        store.room(&a).await.unwrap().unwrap().participants,
        ["alice"]
    );
    assert_eq!(
        store.room(&b).await.unwrap().unwrap().participants,
        ["bob", "carol"]
    );

    assert_eq!(store.mark_read(&a, "carol", 4).await.unwrap().read_seq, 4);
    let in_b = store.read_state(&b, "carol").await.unwrap();
    assert_eq!((in_b.read_seq, in_b.unread), (0, 3));
    assert_eq!(store.read_state(&a, "carol").await.unwrap().unread, 0);
    assert_eq!(store.room(&a).await.unwrap().unwrap().last_seq, 4);
    assert_eq!(store.room(&b).await.unwrap().unwrap().last_seq, 3);
}

/// Every lookup of another tenant's room answers as if the room did not exist.
pub async fn another_tenants_room_looks_missing<S: Store>(store: S) {
    let owner = RoomKey::new("tenant-a", "secret");
    let stranger = RoomKey::new("tenant-b", "secret");
    store
        .create_room(NewRoom::team("secret", "tenant-a", "alice"))
        .await
        .unwrap();
    let mut message = NewMessage::text(&owner, 1, "alice", "hidden");
    message.message_id = "m-1".to_owned();
    store.append(message).await.unwrap();
    store.mark_read(&owner, "alice", 1).await.unwrap();

    assert!(store.room(&stranger).await.unwrap().is_none());
    let page = store
        .history(&stranger, HistoryQuery::default())
        .await
        .unwrap();
    assert!(page.messages.is_empty() && !page.has_more);
    assert_eq!(store.message_by_id(&stranger, "m-1").await.unwrap(), None);
    assert_eq!(
        store.read_state(&stranger, "alice").await.unwrap(),
        ReadState::default()
    );
    assert_eq!(
        store.read_state(&stranger, "bob").await.unwrap(),
        ReadState::default()
    );
    assert!(store
        .search(&stranger, HistoryQuery::default().search("hidden"))
        .await
        .unwrap()
        .messages
        .is_empty());
    let error = store
        .append(NewMessage::text(&stranger, 1, "mallory", "hi"))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Invalid(_)), "{error:?}");
    let error = store
        .add_participant(&stranger, "mallory")
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Invalid(_)), "{error:?}");
    let error = store.mark_read(&stranger, "alice", 1).await.unwrap_err();
    assert!(matches!(error, Error::Invalid(_)), "{error:?}");
    let owned = store.room(&owner).await.unwrap().unwrap();
    assert_eq!(owned.participants, ["alice"]);
    assert_eq!(owned.last_seq, 1);
}

// ---------------------------------------------------------------------------------------------
// Records (contacts, inboxes, conversations)

fn record(tenant: &str, kind: RecordKind, id: &str, version: u64, body: &str) -> Record {
    Record {
        key: RecordKey::new(tenant, kind, id),
        version,
        body: body.to_owned(),
        updated_at: Timestamp::now(),
        list_key: None,
    }
}

/// Writes conversation record `id` (version `version`) at list place `key`.
async fn place<S: Store>(store: &S, tenant: &str, id: &str, version: u64, key: Option<i64>) {
    let mut listed = record(tenant, RecordKind::Conversation, id, version, "{}");
    listed.list_key = key;
    store.put_record(listed).await.unwrap();
}

async fn list_ids<S: Store>(store: &S, tenant: &str, query: ListQuery) -> Vec<(i64, String)> {
    store
        .list_records(tenant, RecordKind::Conversation, query)
        .await
        .unwrap()
        .entries
        .into_iter()
        .map(|l| (l.list_key, l.record.key.id))
        .collect()
}

fn list_query(
    as_of: Timestamp,
    descending: bool,
    after: Option<(i64, &str)>,
    limit: u32,
) -> ListQuery {
    ListQuery {
        as_of: Some(as_of),
        descending,
        after: after.map(|(k, id)| (k, id.to_owned())),
        limit,
    }
}

fn version_conflict(error: Error) -> u64 {
    match error {
        Error::VersionConflict { stored } => stored,
        other => panic!("expected a version conflict, got {other:?}"),
    }
}

pub async fn a_record_is_created_once_and_then_written_only_over_its_version<S: Store>(store: S) {
    let key = RecordKey::new(TENANT, RecordKind::Contact, "c-1");
    assert_eq!(store.record(&key).await.unwrap(), None);
    // Version 0 does not exist: a write must name version 1 to create.
    let error = store
        .put_record(record(TENANT, RecordKind::Contact, "c-1", 2, r#"{"v":2}"#))
        .await
        .unwrap_err();
    assert_eq!(version_conflict(error), 0);
    let first = store
        .put_record(record(TENANT, RecordKind::Contact, "c-1", 1, r#"{"v":1}"#))
        .await
        .unwrap();
    assert_eq!(first.version, 1);
    let read = store.record(&key).await.unwrap().unwrap();
    assert_eq!((read.version, read.body.as_str()), (1, r#"{"v":1}"#));
    assert_eq!(read.key, key);
    // Creating again, or skipping a version, is refused and changes nothing.
    for version in [1, 3] {
        let error = store
            .put_record(record(TENANT, RecordKind::Contact, "c-1", version, "{}"))
            .await
            .unwrap_err();
        assert_eq!(version_conflict(error), 1);
    }
    store
        .put_record(record(TENANT, RecordKind::Contact, "c-1", 2, r#"{"v":2}"#))
        .await
        .unwrap();
    let read = store.record(&key).await.unwrap().unwrap();
    assert_eq!((read.version, read.body.as_str()), (2, r#"{"v":2}"#));
}

pub async fn records_of_another_tenant_or_kind_are_other_records<S: Store>(store: S) {
    store
        .put_record(record("tenant-a", RecordKind::Inbox, "x", 1, r#""a""#))
        .await
        .unwrap();
    store
        .put_record(record("tenant-b", RecordKind::Inbox, "x", 1, r#""b""#))
        .await
        .unwrap();
    store
        .put_record(record("tenant-a", RecordKind::Contact, "x", 1, r#""c""#))
        .await
        .unwrap();
    for (tenant, kind, body) in [
        ("tenant-a", RecordKind::Inbox, r#""a""#),
        ("tenant-b", RecordKind::Inbox, r#""b""#),
        ("tenant-a", RecordKind::Contact, r#""c""#),
    ] {
        let read = store
            .record(&RecordKey::new(tenant, kind, "x"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read.body, body);
    }
    assert_eq!(
        store
            .record(&RecordKey::new("tenant-b", RecordKind::Contact, "x"))
            .await
            .unwrap(),
        None
    );
}

pub async fn racing_record_writes_have_exactly_one_winner<S: Store>(store: S) {
    let store = Arc::new(store);
    store
        .put_record(record(TENANT, RecordKind::Conversation, "r", 1, "0"))
        .await
        .unwrap();
    let writers: Vec<_> = (0..8)
        .map(|n| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .put_record(record(
                        TENANT,
                        RecordKind::Conversation,
                        "r",
                        2,
                        &n.to_string(),
                    ))
                    .await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for (n, writer) in writers.into_iter().enumerate() {
        match writer.await.unwrap() {
            Ok(_) => winners.push(n.to_string()),
            Err(error) => assert_eq!(version_conflict(error), 2),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let read = store
        .record(&RecordKey::new(TENANT, RecordKind::Conversation, "r"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((read.version, &read.body), (2, &winners[0]));
}

pub async fn typed_records_round_trip_every_field<S: Store>(store: S) {
    use crate::records::*;
    let contact = Contact {
        contact_id: "c-1".into(),
        name: "Ada Lovelace".into(),
        email: Some("ada@example.com".into()),
        phone: Some("+15550100".into()),
        avatar_url: Some("https://example.com/ada.png".into()),
        external_ids: [("crm".to_owned(), "42".to_owned())].into(),
        custom_attributes: serde_json::json!({"plan": "pro", "seats": 3})
            .as_object()
            .cloned()
            .unwrap(),
        created_at: Timestamp(1_700_000_000_123),
    };
    let saved = save(
        &store,
        TENANT,
        "c-1",
        Versioned {
            value: contact.clone(),
            version: 0,
        },
    )
    .await
    .unwrap();
    assert_eq!(saved.version, 1);
    let read = load::<Contact, _>(&store, TENANT, "c-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        read,
        Versioned {
            value: contact.clone(),
            version: 1
        }
    );

    for (id, channel) in [
        (
            "web",
            Channel::WebWidget {
                widget_key: "wk-1".into(),
                brand_color: Some("#1f93ff".into()),
                authorized_domains: vec!["example.com".into()],
            },
        ),
        (
            "sms",
            Channel::Sms {
                phone_number: "+15550101".into(),
            },
        ),
        (
            "wa",
            Channel::Whatsapp {
                phone_number: "+15550102".into(),
            },
        ),
        (
            "mail",
            Channel::Email {
                address: "help@example.com".into(),
            },
        ),
    ] {
        let inbox = Inbox {
            inbox_id: id.into(),
            name: format!("{id} inbox"),
            channel,
            created_at: Timestamp(1_700_000_000_000),
        };
        save(
            &store,
            TENANT,
            id,
            Versioned {
                value: inbox.clone(),
                version: 0,
            },
        )
        .await
        .unwrap();
        let read = load::<Inbox, _>(&store, TENANT, id).await.unwrap().unwrap();
        assert_eq!(read.value, inbox);
    }

    let room = RoomKey::new(TENANT, "conv-1");
    let mut conversation = Conversation::new(&room, RoomKind::Prospect, Some(&contact));
    assert_eq!(conversation.title, "Ada Lovelace");
    assert_eq!(
        conversation.image_url.as_deref(),
        Some("https://example.com/ada.png")
    );
    conversation.inbox_id = Some("sms".into());
    conversation.assignee = Some("alice".into());
    conversation.status = ConversationStatus::Queued;
    conversation.snoozed_until = Some(Timestamp(1_800_000_000_000));
    conversation.show_on_top = true;
    conversation.archived = true;
    conversation.priority = Some(Priority::Urgent);
    conversation.labels = vec!["vip".into(), "billing".into()];
    conversation.last_message = Some(LastMessage {
        seq: 7,
        message_id: "m-7".into(),
        sender: "c-1".into(),
        sender_type: SenderType::Contact,
        direction: Direction::Incoming,
        preview: "hello ✓".into(),
        created_at: Timestamp(1_700_000_001_000),
    });
    conversation.contact_last_seen_at = Some(Timestamp(1_700_000_002_000));
    conversation.agent_last_seen_at = Some(Timestamp(1_700_000_003_000));
    conversation.waiting_since = Some(Timestamp(1_700_000_001_000));
    conversation.rating = Some(Rating {
        score: RatingScore::Good,
        comment: Some("quick".into()),
        rated_at: Timestamp(1_700_000_004_000),
    });
    conversation.metrics.messages.insert("contact".into(), 3);
    conversation.metrics.notes = 1;
    conversation.metrics.first_reply_at = Some(Timestamp(1_700_000_005_000));
    conversation.metrics.end_reason = Some("resolved".into());
    conversation.metrics.escalation_reason = Some("wants a human".into());
    conversation.metrics.queue_ms = 42_000;
    conversation.metrics.first_reply_ms = Some(4_000);
    conversation.metrics.handle_ms = Some(600_000);
    save(
        &store,
        TENANT,
        "conv-1",
        Versioned {
            value: conversation.clone(),
            version: 0,
        },
    )
    .await
    .unwrap();
    let read = load::<Conversation, _>(&store, TENANT, "conv-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.value, conversation);
    let pointer = ContactConversation::id("c-1", RoomKind::Prospect);
    save(
        &store,
        TENANT,
        &pointer,
        Versioned {
            value: ContactConversation {
                room_id: "conv-1".into(),
            },
            version: 0,
        },
    )
    .await
    .unwrap();
    let found = load::<ContactConversation, _>(&store, TENANT, &pointer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.value.room_id, "conv-1");
    // Typed reads of another tenant find nothing.
    assert_eq!(
        load::<Contact, _>(&store, "other", "c-1").await.unwrap(),
        None
    );
}

pub async fn an_update_reads_again_after_losing_a_race<S: Store>(store: S) {
    use crate::records::*;
    let contact = |name: &str| Contact {
        contact_id: "c-2".into(),
        name: name.into(),
        email: None,
        phone: None,
        avatar_url: None,
        external_ids: Default::default(),
        custom_attributes: Default::default(),
        created_at: Timestamp(1),
    };
    save(
        &store,
        TENANT,
        "c-2",
        Versioned {
            value: contact("first"),
            version: 0,
        },
    )
    .await
    .unwrap();
    let mut rounds = 0;
    let updated = update::<Contact, _, _>(&store, TENANT, "c-2", |current| {
        rounds += 1;
        let mut next = current.cloned().expect("exists");
        if rounds == 1 {
            // Another writer gets in between this read and this write.
            // (The cases run on a multi-threaded runtime, where this may block one worker.)
            let write = save(
                &store,
                TENANT,
                "c-2",
                Versioned {
                    value: contact("other writer"),
                    version: 1,
                },
            );
            tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(write))
                .unwrap();
        }
        next.email = Some(format!("{}@example.com", next.name.replace(' ', ".")));
        Ok(Some(next))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(rounds, 2);
    assert_eq!(updated.version, 3);
    assert_eq!(
        updated.value.name, "other writer",
        "built on the other writer's record"
    );
    assert_eq!(
        updated.value.email.as_deref(),
        Some("other.writer@example.com")
    );
    // A change that writes nothing leaves the record as it is.
    let same = update::<Contact, _, _>(&store, TENANT, "c-2", |_| Ok(None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(same.version, 3);
}

pub async fn an_oversized_record_is_invalid_and_changes_nothing<S: Store>(store: S) {
    let big = format!("\"{}\"", "x".repeat(crate::records::MAX_RECORD_BYTES));
    let error = store
        .put_record(record(TENANT, RecordKind::Contact, "big", 1, &big))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Invalid(_)), "{error:?}");
    assert_eq!(
        store
            .record(&RecordKey::new(TENANT, RecordKind::Contact, "big"))
            .await
            .unwrap(),
        None
    );
}

pub async fn a_list_orders_records_by_key_and_pages_after_a_place<S: Store>(store: S) {
    for (id, key) in [("c", 30), ("a", 10), ("e", 50), ("b", 30), ("d", 40)] {
        place(&store, TENANT, id, 1, Some(key)).await;
    }
    // Not listed: no place, another kind, another tenant.
    place(&store, TENANT, "unlisted", 1, None).await;
    let mut contact = record(TENANT, RecordKind::Contact, "x", 1, "{}");
    contact.list_key = Some(99);
    store.put_record(contact).await.unwrap();
    place(&store, "other", "z", 1, Some(60)).await;
    // A time past every write (a store's list clock may run a little ahead of the wall clock
    // when writes come faster than one a millisecond).
    let now = Timestamp(Timestamp::now().0 + 1000);
    let ids = |v: Vec<(i64, String)>| v.into_iter().map(|(_, id)| id).collect::<Vec<_>>();
    let all = ids(list_ids(&store, TENANT, list_query(now, true, None, 10)).await);
    assert_eq!(
        all,
        ["e", "d", "c", "b", "a"],
        "by key, then id, largest first"
    );
    let first = list_ids(&store, TENANT, list_query(now, true, None, 2)).await;
    assert_eq!(first, [(50, "e".to_owned()), (40, "d".to_owned())]);
    let next = ids(list_ids(&store, TENANT, list_query(now, true, Some((40, "d")), 2)).await);
    assert_eq!(next, ["c", "b"]);
    let last = ids(list_ids(&store, TENANT, list_query(now, true, Some((30, "b")), 2)).await);
    assert_eq!(last, ["a"]);
    let oldest = ids(list_ids(&store, TENANT, list_query(now, false, Some((30, "b")), 10)).await);
    assert_eq!(oldest, ["c", "d", "e"], "smallest first, after a place");
    // A record written again without a place leaves the list.
    place(&store, TENANT, "d", 2, None).await;
    let later = Timestamp(Timestamp::now().0 + 1000);
    let all = ids(list_ids(&store, TENANT, list_query(later, true, None, 10)).await);
    assert_eq!(all, ["e", "c", "b", "a"]);
}

pub async fn a_walk_over_a_list_sees_every_record_once_while_records_move<S: Store>(store: S) {
    for n in 1..=6 {
        place(&store, TENANT, &format!("r{n}"), 1, Some(n)).await;
    }
    // Clear of the writes on both sides (a list clock may run a few milliseconds ahead).
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let as_of = Timestamp::now();
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let mut seen = list_ids(&store, TENANT, list_query(as_of, true, None, 2)).await;
    assert_eq!(seen, [(6, "r6".to_owned()), (5, "r5".to_owned())]);
    // Meanwhile r1 (not seen yet) and r5 (seen) move to the top, r3 moves twice, and r7 is new.
    place(&store, TENANT, "r1", 2, Some(100)).await;
    place(&store, TENANT, "r5", 2, Some(101)).await;
    place(&store, TENANT, "r3", 2, Some(102)).await;
    place(&store, TENANT, "r3", 3, Some(103)).await;
    place(&store, TENANT, "r7", 1, Some(104)).await;
    loop {
        let (key, id) = seen.last().cloned().unwrap();
        let page = list_ids(&store, TENANT, list_query(as_of, true, Some((key, &id)), 2)).await;
        if page.is_empty() {
            break;
        }
        seen.extend(page);
    }
    let walked: Vec<&str> = seen.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(
        walked,
        ["r6", "r5", "r4", "r3", "r2", "r1"],
        "each once, at its place then"
    );
    // Each comes with its current body and version.
    let listed = store
        .list_records(
            TENANT,
            RecordKind::Conversation,
            list_query(as_of, true, Some((4, "r4")), 1),
        )
        .await
        .unwrap()
        .entries;
    assert_eq!((listed[0].list_key, listed[0].record.version), (3, 3));
    assert_eq!(listed[0].record.list_key, Some(103));
    // A walk started now sees the moves.
    let later = Timestamp(Timestamp::now().0 + 1000);
    let now = list_ids(&store, TENANT, list_query(later, true, None, 4)).await;
    let ids: Vec<&str> = now.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids, ["r7", "r3", "r5", "r1"]);
}

pub async fn a_list_read_now_names_a_time_its_next_pages_agree_with<S: Store>(store: S) {
    for n in 1..=4 {
        place(&store, TENANT, &format!("n{n}"), 1, Some(n)).await;
    }
    // A store may read "now" a moment in the past (one without a commit-ordered clock, such as
    // a CQL cluster, by two seconds): the writes are older than that.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let now = ListQuery {
        as_of: None,
        descending: true,
        after: None,
        limit: 2,
    };
    let first = store
        .list_records(TENANT, RecordKind::Conversation, now)
        .await
        .unwrap();
    let ids: Vec<&str> = first
        .entries
        .iter()
        .map(|l| l.record.key.id.as_str())
        .collect();
    assert_eq!(
        ids,
        ["n4", "n3"],
        "everything written before is on a list read now"
    );
    // A move after the read is not on the next page read at the page's time.
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    place(&store, TENANT, "n1", 2, Some(50)).await;
    let rest = list_ids(
        &store,
        TENANT,
        list_query(first.as_of, true, Some((3, "n3")), 10),
    )
    .await;
    assert_eq!(rest, [(2, "n2".to_owned()), (1, "n1".to_owned())]);
}
