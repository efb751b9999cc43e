//! Hostile and unlucky clients: each test drives the real gateway the way such a client can,
//! and asserts what the contract (PROTOCOL.md, docs/protocol.md) promises. Each failed before
//! the fix it names; the comment above each one describes the code path that was at fault. Most run with one shard: the connection tasks and the room state then share one
//! thread, which makes the interleavings below deterministic instead of lucky.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use gateway::auth::Role;
use serde_json::{json, Value};

const TENANT: &str = "acme";

fn frame(code: &str, user: &str, room: &str, data: Value, reference: &str) -> String {
    json!({"code": code, "user_id": user, "room_id": room, "data": data, "ref": reference})
        .to_string()
}

/// A close frame (code 1000) as a client sends it: masked with an all-zero mask.
fn close_frame() -> Vec<u8> {
    let mut bytes = raw_header(true, 0x8, 2);
    bytes.extend_from_slice(&1000u16.to_be_bytes());
    bytes
}

/// Several text frames and then a close frame, in one write: the server reads them together.
fn texts_then_close(texts: &[String]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for text in texts {
        bytes.extend(raw_header(true, 0x1, text.len() as u64));
        bytes.extend_from_slice(text.as_bytes());
    }
    bytes.extend(close_frame());
    bytes
}

/// Sum of `gateway_rooms` (rooms loaded in memory) over every shard.
async fn rooms_loaded(server: &TestServer) -> i64 {
    server
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("gateway_rooms{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .sum()
}

/// Waits until no room is loaded, or `wait` passed; returns what is loaded then.
async fn rooms_loaded_after(server: &TestServer, wait: Duration) -> i64 {
    let deadline = Instant::now() + wait;
    loop {
        let n = rooms_loaded(server).await;
        if n == 0 || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until each `ref` in `expected` has its reply or `wait` passed; returns the replies by
/// `ref` and every frame read, in order.
async fn collect(
    client: &mut RawClient,
    expected: &[&str],
    wait: Duration,
) -> (HashMap<String, Value>, Vec<Value>) {
    let mut replies = HashMap::new();
    let mut all = Vec::new();
    let deadline = Instant::now() + wait;
    while expected.iter().any(|r| !replies.contains_key(*r)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(v) = client.recv_json(left).await else {
            break;
        };
        if let Some(reference) = v["ref"].as_str() {
            replies.insert(reference.to_owned(), v.clone());
        }
        all.push(v);
    }
    (replies, all)
}

/// A room of `count` messages of 16 KiB of `a`: a search for `aaa…ab` (256 bytes) costs SQLite's
/// LIKE about 16 Ki × 256 character comparisons per message, so each search holds a storage
/// reader for a long while.
async fn fill_haystack(server: &TestServer, room: &str, count: usize) {
    let mut w = server.connect("filler", TENANT, Role::Admin).await;
    w.join(room).await;
    let text = "a".repeat(16 * 1024);
    for _ in 0..count {
        let v = w.chat(room, &text).await;
        assert_eq!(v["status"], "success", "{v}");
    }
}

/// Occupies the store's history readers (4 of them) with `n` slow searches of `room`, so that
/// any history read queued after them (a `join` with `since_seq`) waits for a long time. The
/// returned client must be kept alive.
async fn hog_history_readers(server: &TestServer, room: &str, n: usize) -> RawClient {
    let mut hog = RawClient::connect(server.addr, &token("hog", TENANT, Role::Admin)).await;
    let needle = format!("{}b", "a".repeat(255));
    let frames: Vec<String> = (0..n)
        .map(|i| {
            frame(
                "historic",
                "hog",
                room,
                json!({"search": needle, "limit": 200}),
                &format!("hog-{i}"),
            )
        })
        .collect();
    hog.send_texts(&frames).await;
    // Let the shard hand every search to the store before anything else is queued there.
    tokio::time::sleep(Duration::from_millis(100)).await;
    hog
}

// -------------------------------------------------------------------------------------------
// 1. Ghost members: a membership the shard keeps after the connection is gone.
// -------------------------------------------------------------------------------------------

/// shard.rs `on_command` / `remove_member` vs `start_loading` + `room_ready` → `replay`:
/// a `join` for a room that is not loaded waits in `Slot::Loading`. When the connection closes
/// meanwhile, its `Disconnect` reaches the shard first and `remove_member` does nothing (the
/// slot is not `Ready`). Then the load finishes, the queued join is replayed and inserts a
/// member for a connection that no longer exists. Nothing ever removes it: the room never
/// unloads (`gateway_rooms` stays up), every later fan-out pushes to a dead outbox, and the
/// ghost's user is listed in the room's `presence` as joined. A client can repeat this at will
/// (join many existing rooms, close at once), so memory grows without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_still_loading_when_its_connection_closes_leaves_no_member() {
    let server = TestServer::start_with(|c| c.shards = 1).await;
    // A room that exists but is not loaded: created, written to, then left by its owner.
    let mut owner = server.connect("olive", TENANT, Role::Admin).await;
    owner.join("lobby").await;
    owner.chat("lobby", "hello").await;
    owner.request("leave", Some("lobby"), json!({})).await;
    drop(owner);
    assert_eq!(
        rooms_loaded_after(&server, Duration::from_secs(2)).await,
        0,
        "precondition: the room unloads once its owner is gone"
    );

    // The hostile client: join, then close at once (one write).
    let mut ghost = RawClient::connect(server.addr, &token("ghost", TENANT, Role::Admin)).await;
    ghost
        .write(&texts_then_close(&[frame(
            "join",
            "ghost",
            "lobby",
            json!({}),
            "j1",
        )]))
        .await;
    ghost.close_code(Duration::from_secs(5)).await;
    drop(ghost);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Somebody else looks at the room: the ghost is not a participant and not joined.
    let mut viewer = server.connect("vera", TENANT, Role::Admin).await;
    let v = viewer.join("lobby").await;
    let listed: Vec<&str> = v["data"]["presence"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["user_id"].as_str())
        .collect();
    viewer.request("leave", Some("lobby"), json!({})).await;
    drop(viewer);
    let loaded = rooms_loaded_after(&server, Duration::from_secs(2)).await;
    assert!(
        !listed.contains(&"ghost"),
        "a closed connection is still a member of the room: presence {listed:?}"
    );
    assert_eq!(
        loaded, 0,
        "nobody is connected, yet rooms stay loaded (a ghost member pins them)"
    );
    server.stop().await;
}

/// connection.rs `Session::on_text` (`RoomAction::Leave => self.joined.remove(..)`) vs
/// shard.rs `handle_ready` (`MAX_HELD_PER_MEMBER`): the connection forgets the room as soon as
/// it *reads* a `leave`, before the shard executes it. While a `join` reply is prepared, the
/// shard holds at most 64 later requests of that connection for the room and answers the 65th
/// `RATE_LIMITED` without executing it. A `leave` refused that way leaves the connection a
/// member in the shard, but no longer in `Session::joined`, so its `Disconnect` on close does
/// not name the room: the membership outlives the connection forever (same leak as above,
/// reached deterministically).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_behind_a_full_pending_join_is_still_executed() {
    let server = TestServer::start_with(|c| c.shards = 1).await;
    let mut owner = server.connect("olive", TENANT, Role::Admin).await;
    owner.join("held").await;
    owner.chat("held", "one").await;
    owner.request("leave", Some("held"), json!({})).await;
    drop(owner);
    assert_eq!(rooms_loaded_after(&server, Duration::from_secs(2)).await, 0);

    let mut c = RawClient::connect(server.addr, &token("gus", TENANT, Role::Admin)).await;
    let mut frames = vec![frame("join", "gus", "held", json!({"since_seq": 0}), "j")];
    for i in 0..64 {
        frames.push(frame(
            "historic",
            "gus",
            "held",
            json!({}),
            &format!("h{i}"),
        ));
    }
    frames.push(frame("leave", "gus", "held", json!({}), "l"));
    c.send_texts(&frames).await;
    let mut expected: Vec<String> = (0..64).map(|i| format!("h{i}")).collect();
    expected.push("j".into());
    expected.push("l".into());
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    let (replies, _) = collect(&mut c, &expected, Duration::from_secs(10)).await;
    assert_eq!(replies["j"]["status"], "success", "{}", replies["j"]);
    // A leave is never refused, however many requests wait behind the join.
    assert_eq!(replies["l"]["status"], "success", "{}", replies["l"]);
    c.write(&close_frame()).await;
    c.close_code(Duration::from_secs(5)).await;
    drop(c);
    assert_eq!(
        rooms_loaded_after(&server, Duration::from_secs(2)).await,
        0,
        "nobody is connected, yet the room stays loaded with the closed connection as a member"
    );
    server.stop().await;
}

// -------------------------------------------------------------------------------------------
// 2. Unknown write outcomes (shard.rs `on_appended`, `unknown_outcomes`).
// -------------------------------------------------------------------------------------------

/// shard.rs `on_appended`: `announce = !appended.duplicate || <remove id from
/// unknown_outcomes>`. When the first attempt's outcome is unknown and it was in fact NOT
/// stored, the retry stores it fresh (`duplicate == false`), the `||` short-circuits and the id
/// stays in `unknown_outcomes`. Every later resend with that id (a client retrying once more
/// because the reply was lost, or just resending) is a duplicate found in the list, so the room
/// gets the same `chat_response` event again: "every other connection gets exactly one".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_retried_after_an_unknown_outcome_that_was_not_stored_is_announced_once() {
    let server = TestServer::start_with(|c| c.store_timeout_ms = 300).await;
    let db = server.dir.path().join("gateway.db");
    let mut alice = server.connect("alice", TENANT, Role::Admin).await;
    let mut bob = server.connect("bob", TENANT, Role::Admin).await;
    alice.join("room-x").await;
    bob.join("room-x").await;
    let chat =
        json!({"message": "fail: lost in the crash", "sender": "alice", "message_id": "m-x"});

    // Another process holds the write lock past the store's deadline: the outcome is unknown.
    let locker = rusqlite::Connection::open(&db).unwrap();
    locker.busy_timeout(Duration::from_secs(5)).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE;").unwrap();
    let failed = alice.request("chat", Some("room-x"), chat.clone()).await;
    assert_eq!(failed["data"]["error_code"], "UNAVAILABLE", "{failed}");
    // ... and the write then fails for real once it runs (a disk error): it is not stored.
    locker
        .execute_batch(
            "CREATE TRIGGER fail_writes BEFORE INSERT ON messages WHEN NEW.message LIKE 'fail%'
             BEGIN SELECT RAISE(ABORT, 'simulated disk failure'); END;
             COMMIT;",
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    locker.execute_batch("DROP TRIGGER fail_writes;").unwrap();
    drop(locker);
    bob.expect_silence(Duration::from_millis(200)).await;

    // The retry stores it: the room hears of it once, as it should.
    let retried = alice.request("chat", Some("room-x"), chat.clone()).await;
    assert_eq!(retried["status"], "success", "{retried}");
    assert_eq!(retried["data"]["seq"], 1, "{retried}");
    let event = bob.recv_code("chat_response").await;
    assert_eq!(event["data"]["message_id"], "m-x");

    // One more resend of the same id is an ordinary duplicate: nothing for the room.
    let again = alice.request("chat", Some("room-x"), chat).await;
    assert_eq!(again["data"]["seq"], 1, "{again}");
    if let Some(v) = bob.recv_within(Duration::from_millis(500)).await {
        panic!("the room got the same message a second time: {v}");
    }
    server.stop().await;
}

/// shard.rs `on_appended` (announce of a duplicate found in `unknown_outcomes`) vs `join`
/// (`missed` = `(since_seq, last_seq]`): a write with an unknown outcome that did commit is
/// part of the store, and a later chat moves `last_seq` past it, so a connection joining with
/// `since_seq` receives it in `missed`. When the sender then retries, the shard announces the
/// message to every member, that joiner included: it gets the message twice, the second time
/// live and out of `seq` order (after seq 2). docs/protocol.md: "nothing is missed and nothing
/// is delivered twice", events "in seq order".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_unknown_outcome_is_not_delivered_again_to_a_joiner_that_got_it_in_missed() {
    let server = TestServer::start_with(|c| c.store_timeout_ms = 300).await;
    let db = server.dir.path().join("gateway.db");
    let mut alice = server.connect("alice", TENANT, Role::Admin).await;
    alice.join("room-late").await;
    let late = json!({"message": "slow one", "sender": "alice", "message_id": "m-late"});

    let locker = rusqlite::Connection::open(&db).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE;").unwrap();
    let failed = alice.request("chat", Some("room-late"), late.clone()).await;
    assert_eq!(failed["data"]["error_code"], "UNAVAILABLE", "{failed}");
    locker.execute_batch("COMMIT;").unwrap(); // the write goes through after all: seq 1
    drop(locker);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let next = alice.chat("room-late", "next").await;
    assert_eq!(next["data"]["seq"], 2, "{next}");

    // Carol joins with since_seq 0 and gets both messages in `missed`.
    let mut carol = server.connect("carol", TENANT, Role::Admin).await;
    let v = carol
        .request("join", Some("room-late"), json!({"since_seq": 0}))
        .await;
    let missed: Vec<&str> = v["data"]["missed"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["message_id"].as_str())
        .collect();
    assert!(missed.contains(&"m-late"), "{v}");

    // The retry finds it stored; Carol already has it.
    let retried = alice.request("chat", Some("room-late"), late).await;
    assert_eq!(retried["data"]["seq"], 1, "{retried}");
    while let Some(v) = carol.recv_within(Duration::from_millis(500)).await {
        assert!(
            !(v["code"] == "chat_response" && v["data"]["message_id"] == "m-late"),
            "delivered twice (in `missed`, then live after seq 2): {v}"
        );
    }
    server.stop().await;
}

// -------------------------------------------------------------------------------------------
// 3. A customer sees a NOTE.
// -------------------------------------------------------------------------------------------

/// shard.rs `chat` / `on_appended` + storage `append`: the store deduplicates on
/// `(room, message_id)` alone and returns the ORIGINAL message with `duplicate = true`,
/// whoever sent it and whatever its direction; the shard puts that message in the sender's
/// direct reply without checking that the sender may see it. A customer that sends a chat with
/// the `message_id` of an internal note gets the note back in its `chat_response`. Note ids are
/// not secret by design (integrations and agents choose their own ids; `reply_to` carries ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_chat_reusing_a_notes_message_id_is_refused_without_the_note() {
    let server = TestServer::start().await;
    create_room(
        &server,
        &token("root", TENANT, Role::Admin),
        json!({"room_id": "conv-n", "kind": "support", "participants": ["alice", "cust-1"]}),
    )
    .await;
    let dir = server.stop().await;
    store_note(
        dir.path(),
        TENANT,
        "conv-n",
        "alice",
        "internal: refund approved, do not tell",
        Some("note-1"),
    )
    .await;

    let server = TestServer::start_in(dir, |_| {}).await;
    let mut cust = server.connect("cust-1", TENANT, Role::Customer).await;
    cust.join("conv-n").await;
    let v = cust
        .request(
            "chat",
            Some("conv-n"),
            json!({"message": "hi", "sender": "cust-1", "message_id": "note-1"}),
        )
        .await;
    assert_ne!(v["data"]["direction"], "NOTE", "a customer got a note: {v}");
    assert!(
        !v.to_string().contains("refund approved"),
        "a customer got a note's text: {v}"
    );
    server.stop().await;
}

// -------------------------------------------------------------------------------------------
// 4. Wrong replies and wrong order.
// -------------------------------------------------------------------------------------------

/// shard.rs `room_missing`: every request queued while a missing room was being looked up gets
/// NOT_FOUND, `leave` included. A `leave` of a room that is not loaded succeeds
/// (`on_room_request`, `None` arm) and docs/protocol.md says "Leaving a room the connection did
/// not join also succeeds"; the same `leave` pipelined behind a `join` of that missing room is
/// answered NOT_FOUND instead (and UNAVAILABLE in `room_failed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_queued_behind_the_lookup_of_a_missing_room_succeeds() {
    let server = TestServer::start_with(|c| c.shards = 1).await;
    let mut cust = RawClient::connect(server.addr, &token("cust-9", TENANT, Role::Customer)).await;
    cust.send_texts(&[frame("leave", "cust-9", "nowhere", json!({}), "l0")])
        .await;
    let (r, _) = collect(&mut cust, &["l0"], Duration::from_secs(5)).await;
    assert_eq!(r["l0"]["status"], "success", "{}", r["l0"]);

    cust.send_texts(&[
        frame("join", "cust-9", "nowhere", json!({}), "j1"),
        frame("leave", "cust-9", "nowhere", json!({}), "l1"),
    ])
    .await;
    let (r, _) = collect(&mut cust, &["j1", "l1"], Duration::from_secs(5)).await;
    assert_eq!(r["j1"]["data"]["error_code"], "NOT_FOUND", "{}", r["j1"]);
    assert_eq!(
        r["l1"]["status"], "success",
        "the same leave, now behind a join: {}",
        r["l1"]
    );
    server.stop().await;
}

/// connection.rs `spawn_presence_broadcast` vs shard.rs `Member::pending`: a status change is
/// fanned out by a task on the sender's thread that collects the rooms' members
/// (`CollectMembers`, pending members included) and pushes straight into their outboxes. It
/// bypasses both the room shard's route and the frames held behind a join reply, so a
/// connection whose `join` (with `since_seq`) is being prepared receives a `presence_response`
/// about a user it shares no other room with before its `join_response` — and, by the same path,
/// after its `leave_response` (racy, not tested here). The join's own presence announcement goes
/// through `Route::broadcast` and is held correctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_change_reaches_a_joining_connection_after_its_join_response() {
    let server = TestServer::start_with(|c| {
        c.shards = 1;
        c.max_reply_bytes = 16 << 20;
        // The filler's 300 chats come faster than the default per-connection rate.
        c.rate_limit = 100_000;
        c.rate_burst = 100_000;
    })
    .await;
    // Bob's join reads 5 MB of missed messages: its reply takes a while to prepare.
    fill_haystack(&server, "p-room", 300).await;
    let mut alice = server.connect("alice", TENANT, Role::Admin).await;
    alice.join("p-room").await;
    let mut bob = RawClient::connect(server.addr, &token("bob", TENANT, Role::Admin)).await;
    bob.recv_json(Duration::from_secs(5)).await; // connected

    bob.send_texts(&[frame(
        "join",
        "bob",
        "p-room",
        json!({"since_seq": 0, "limit": 500}),
        "j",
    )])
    .await;
    tokio::time::sleep(Duration::from_millis(2)).await;
    alice
        .send(json!({"code": "presence", "user_id": "alice", "data": {"status": "away", "sender": "alice"}}))
        .await;

    let (replies, frames) = collect(&mut bob, &["j"], Duration::from_secs(15)).await;
    assert_eq!(replies["j"]["status"], "success", "{:?}", replies.get("j"));
    let first = &frames[0];
    assert_eq!(
        first["code"], "join_response",
        "bob got {} before his join_response: {frames:?}",
        first["code"]
    );
    server.stop().await;
}

// -------------------------------------------------------------------------------------------
// 5. Counters that lie.
// -------------------------------------------------------------------------------------------

/// `gateway_errors_total{error_code}` under-counts: every error reply goes through
/// `Metrics::error` (`reply_error`, `send_error`, the read-receipt and historic helpers) except
/// the UNAVAILABLE reply to a `join` whose missed messages could not be read (shard.rs `join`'s
/// helper builds it with `join_unavailable`, and `JoinReady` only counts it as a frame out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_whose_missed_read_fails_is_counted_as_an_error() {
    fn unavailable_count(metrics: &str) -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with("gateway_errors_total{error_code=\"UNAVAILABLE\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    }
    let server = TestServer::start().await;
    let db = server.dir.path().join("gateway.db");
    let mut owner = server.connect("owner", TENANT, Role::Admin).await;
    owner.join("room-j").await;
    owner.chat("room-j", "one").await;
    let before = unavailable_count(&server.metrics().await);

    // Reads of messages fail while the table is away, as on a damaged disk.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch("ALTER TABLE messages RENAME TO messages_away;")
        .unwrap();
    let mut alice = server.connect("alice", TENANT, Role::Admin).await;
    let failed = alice
        .request("join", Some("room-j"), json!({"since_seq": 0}))
        .await;
    assert_eq!(failed["data"]["error_code"], "UNAVAILABLE", "{failed}");
    conn.execute_batch("ALTER TABLE messages_away RENAME TO messages;")
        .unwrap();
    drop(conn);

    let after = unavailable_count(&server.metrics().await);
    assert_eq!(
        after,
        before + 1,
        "one UNAVAILABLE error reply was sent; gateway_errors_total says {}",
        after - before
    );
    server.stop().await;
}

/// connection.rs `Session::on_close` + presence.rs `disconnect`: the last connection closing
/// always broadcasts `offline`, even when the user had already set `offline` itself, so the
/// room gets a second `presence_response` that reports no change. PROTOCOL.md: presence goes
/// out "once per change"; docs/protocol.md: "Setting the current status again sends nothing".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_after_setting_offline_broadcasts_nothing_more() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice", TENANT, Role::Admin).await;
    let mut bob = server.connect("bob", TENANT, Role::Admin).await;
    alice.join("pr").await;
    bob.join("pr").await;
    alice.drain(Duration::from_millis(200)).await;
    bob.drain(Duration::from_millis(200)).await;

    alice
        .send(json!({"code": "presence", "user_id": "alice", "data": {"status": "offline", "sender": "alice"}}))
        .await;
    let v = bob.recv_code("presence_response").await;
    assert_eq!(v["data"]["status"], "offline", "{v}");
    alice.ws.close(None).await.unwrap();
    drop(alice);
    let later = bob.drain(Duration::from_millis(700)).await;
    assert!(
        later.iter().all(|v| v["code"] != "presence_response"),
        "alice was already offline, yet bob is told again: {later:?}"
    );
    server.stop().await;
}

// -------------------------------------------------------------------------------------------
// 6. A limit that does not bound what it is meant to bound.
// -------------------------------------------------------------------------------------------

/// `--search-scan-rows` bounds a search by rows, "so a rare word in a large room never holds a
/// storage reader for the whole room" (docs/protocol.md). Its cost per row is not bounded: each
/// search word becomes `message LIKE '%word%'`, which SQLite evaluates in O(text × word) per
/// message; with 16 KiB messages and a 256-byte word that is ~4 M character comparisons a row.
/// storage/src/timeout.rs then gives up waiting after `--store-timeout-ms` but the SQLite
/// statement keeps running on the reader thread (nothing interrupts it), so a handful of
/// searches from one client occupies every history reader (4 per process) and every tenant's
/// `historic` and `join` + `since_seq` wait behind them or fail UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_searches_from_one_tenant_do_not_starve_other_tenants_history_reads() {
    // A store deadline shorter than the default 5 s keeps the test short; before searches had a
    // time budget, the history read waited behind them until that deadline.
    let server = TestServer::start_with(|c| c.store_timeout_ms = 2000).await;
    // Enough rows that, unbounded, two rounds of these searches outlast the deadline.
    fill_haystack(&server, "haystack", 96).await;
    let mut other = server.connect("olga", "globex", Role::Admin).await;
    other.join("elsewhere").await;
    other.chat("elsewhere", "hello").await;
    let started = Instant::now();
    let v = other
        .request("historic", Some("elsewhere"), json!({}))
        .await;
    assert_eq!(v["status"], "success", "{v}");
    let unloaded = started.elapsed();

    let _hog = hog_history_readers(&server, "haystack", 8).await;
    let started = Instant::now();
    let v = other
        .request("historic", Some("elsewhere"), json!({}))
        .await;
    let waited = started.elapsed();
    assert_eq!(v["status"], "success", "after {waited:?}: {v}");
    assert!(
        // Two rounds of 100 ms searches on four readers, with room for a loaded machine.
        waited < Duration::from_millis(1000),
        "another tenant's one-message history page took {waited:?} (idle: {unloaded:?})"
    );
    server.stop().await;
}

// -------------------------------------------------------------------------------------------
// 7. Shutdown.
// -------------------------------------------------------------------------------------------

/// server.rs `Gateway::shutdown` waits (`ShardCommand::Drain`) only for chat commits already
/// started (`appends_started`). A chat the connection had read but the shard is holding behind
/// the same connection's pending `join` reply (`Member::held`) is not a commit yet, so the
/// drain does not wait for it: the sockets are closed with 1001 and the chat is never answered.
/// docs/protocol.md §1: "every chat the gateway had already read is committed and answered;
/// then each socket is closed with 1001".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_held_behind_a_pending_join_is_answered_before_the_shutdown_close() {
    let server = TestServer::start_with(|c| {
        c.shards = 1;
        c.search_time_ms = 60_000;
    })
    .await;
    fill_haystack(&server, "haystack", 24).await;
    let mut alice = RawClient::connect(server.addr, &token("alice", TENANT, Role::Admin)).await;
    alice.recv_json(Duration::from_secs(5)).await; // connected
    alice
        .send_texts(&[frame("join", "alice", "r9", json!({}), "j0")])
        .await;
    let (r, _) = collect(&mut alice, &["j0"], Duration::from_secs(5)).await;
    assert_eq!(r["j0"]["status"], "success", "{}", r["j0"]);

    // The re-join's read waits behind slow searches; the chat behind it waits for its reply.
    let _hog = hog_history_readers(&server, "haystack", 8).await;
    alice
        .send_texts(&[
            frame("join", "alice", "r9", json!({"since_seq": 0}), "j"),
            frame(
                "chat",
                "alice",
                "r9",
                json!({"message": "read before the shutdown", "sender": "alice"}),
                "c",
            ),
        ])
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::spawn(async move { server.stop().await });
    let (replies, frames) = collect(&mut alice, &["c"], Duration::from_secs(10)).await;
    let _ = stopping.await;
    assert!(
        replies.contains_key("c"),
        "a chat read before the shutdown got no reply before the close: {frames:?}"
    );
}
