//! Durability and overload: concurrent writers, idempotent retries, recovery after a
//! reconnect, restarts (graceful, `kill -9`, SIGTERM and SIGINT), slow consumers and slowloris
//! clients.
//!
//! The in-process tests use [`TestServer`]; the crash and signal tests run the real binary.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use gateway::auth::Role;
use gateway::config::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const TENANT: &str = "acme";

/// Rate limiting is covered elsewhere; these tests push far more than 100 frames a second.
fn generous_limits(config: &mut Config) {
    config.rate_limit = 1_000_000;
    config.rate_burst = 1_000_000;
}

fn seq(message: &Value) -> u64 {
    message["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no seq in {message}"))
}

fn chat_frame(user: &str, room: &str, text: &str, message_id: &str, reference: &str) -> Value {
    json!({
        "code": "chat", "user_id": user, "room_id": room, "ref": reference,
        "data": {"message": text, "sender": user, "message_id": message_id},
    })
}

/// Sends a chat with a client message_id and waits for its direct reply.
async fn chat_with_id(client: &mut Client, room: &str, text: &str, message_id: &str) -> Value {
    let user = client.user.clone();
    client
        .request(
            "chat",
            Some(room),
            json!({"message": text, "sender": user, "message_id": message_id}),
        )
        .await
}

/// Reads a room's whole history, oldest first, paging with `historic` + `after_seq`.
async fn read_all(client: &mut Client, room: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut after = 0;
    loop {
        let r = client
            .request(
                "historic",
                Some(room),
                json!({"after_seq": after, "limit": 200}),
            )
            .await;
        assert_eq!(r["status"], "success", "{r}");
        let page = r["data"]["messages"].as_array().unwrap().clone();
        let has_more = r["data"]["has_more"].as_bool().expect("has_more");
        assert!(
            page.len() <= 200,
            "page larger than the limit: {}",
            page.len()
        );
        if let Some(last) = page.last() {
            after = seq(last);
        }
        out.extend(page.iter().cloned());
        if !has_more {
            return out;
        }
        assert!(!page.is_empty(), "has_more with an empty page");
    }
}

/// Asserts the stored messages are exactly seq 1..=n, each message_id once.
fn assert_gap_free(messages: &[Value]) {
    let seqs: Vec<u64> = messages.iter().map(seq).collect();
    let expected: Vec<u64> = (1..=messages.len() as u64).collect();
    assert_eq!(seqs, expected, "stored seqs are not exactly 1..=n");
    let ids: HashSet<&str> = messages
        .iter()
        .map(|m| m["message_id"].as_str().expect("message_id"))
        .collect();
    assert_eq!(ids.len(), messages.len(), "a message_id is stored twice");
}

/// Reads frames until `wait` passes without one; panics on any `chat_response` (other events,
/// such as presence, are allowed).
async fn expect_no_chat(client: &mut Client, wait: Duration) {
    while let Some(v) = client.recv_within(wait).await {
        assert_ne!(v["code"], "chat_response", "unexpected chat frame: {v}");
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = rest.strip_prefix(' ')?;
            value.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
}

// ---------------------------------------------------------------------------------------------
// Concurrent writers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_get_gap_free_seqs_and_every_member_sees_each_message_once_in_order() {
    const CONNS: usize = 50;
    const PER: usize = 10;
    const TOTAL: usize = CONNS * PER;
    let server = TestServer::start_with(generous_limits).await;
    let room = "busy-room";
    let mut clients = Vec::new();
    for i in 0..CONNS {
        let mut c = server
            .connect(&format!("user-{i:02}"), TENANT, Role::Admin)
            .await;
        c.join(room).await;
        clients.push(c);
    }

    let barrier = Arc::new(tokio::sync::Barrier::new(CONNS));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let mut sent: HashMap<String, String> = HashMap::new();
                let user = c.user.clone();
                for j in 0..PER {
                    let text = format!("message {j} of connection {i}");
                    let reference = format!("c{i}-{j}");
                    c.send(json!({
                        "code": "chat", "user_id": user, "room_id": room, "ref": reference,
                        "data": {"message": text, "sender": user},
                    }))
                    .await;
                    sent.insert(reference, text);
                }
                // Direct replies, in arrival order: (ref, seq, text).
                let mut own: Vec<(String, u64, String)> = Vec::new();
                // Events about the others' messages, in arrival order: (seq, text).
                let mut events: Vec<(u64, String)> = Vec::new();
                while own.len() < PER || events.len() < TOTAL - PER {
                    let v = c.recv().await;
                    if v["code"] != "chat_response" {
                        continue;
                    }
                    assert_eq!(v["status"], "success", "{v}");
                    let m = &v["data"];
                    let text = m["message"].as_str().unwrap().to_owned();
                    match v["ref"].as_str() {
                        Some(reference) => {
                            assert_eq!(sent[reference], text, "reply carries the wrong message");
                            assert_eq!(m["sender"], user.as_str());
                            own.push((reference.to_owned(), seq(m), text));
                        }
                        None => {
                            assert_ne!(m["sender"], user.as_str(), "own message echoed: {v}");
                            events.push((seq(m), text));
                        }
                    }
                }
                // Anything more would be a duplicate.
                expect_no_chat(&mut c, Duration::from_millis(300)).await;
                (user, own, events)
            })
        })
        .collect();

    let mut by_seq: BTreeMap<u64, String> = BTreeMap::new();
    let mut results = Vec::new();
    for task in tasks {
        let (user, own, events) = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("every connection finishes within 30s")
            .unwrap();
        // One connection's messages keep their order.
        let refs: Vec<&str> = own.iter().map(|(r, _, _)| r.as_str()).collect();
        let i = user.trim_start_matches("user-").parse::<usize>().unwrap();
        let expected_refs: Vec<String> = (0..PER).map(|j| format!("c{i}-{j}")).collect();
        assert_eq!(refs, expected_refs, "{user}: replies out of order");
        assert!(
            own.windows(2).all(|w| w[0].1 < w[1].1),
            "{user}: a connection's messages got seqs out of order: {own:?}"
        );
        for (_, s, text) in &own {
            assert!(
                by_seq.insert(*s, text.clone()).is_none(),
                "seq {s} assigned twice"
            );
        }
        results.push((user, own, events));
    }
    let all: Vec<u64> = by_seq.keys().copied().collect();
    assert_eq!(
        all,
        (1..=TOTAL as u64).collect::<Vec<_>>(),
        "seqs are not exactly 1..=N"
    );

    for (user, own, events) in &results {
        assert_eq!(events.len(), TOTAL - PER, "{user}: wrong number of events");
        assert!(
            events.windows(2).all(|w| w[0].0 < w[1].0),
            "{user}: events not in strictly increasing seq order"
        );
        let own_seqs: HashSet<u64> = own.iter().map(|(_, s, _)| *s).collect();
        for (s, text) in events {
            assert!(
                !own_seqs.contains(s),
                "{user}: got an event for its own message"
            );
            assert_eq!(&by_seq[s], text, "{user}: event {s} carries the wrong text");
        }
    }

    // Storage holds every message exactly once, paged through `historic`.
    let mut auditor = server.connect("auditor", TENANT, Role::Admin).await;
    let stored = read_all(&mut auditor, room).await;
    assert_eq!(stored.len(), TOTAL);
    assert_gap_free(&stored);
    for m in &stored {
        assert_eq!(by_seq[&seq(m)], m["message"].as_str().unwrap());
    }
    let texts: HashSet<&str> = stored
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), TOTAL, "a message was stored twice");
    // The newest page without cursors ends at the last seq.
    let newest = auditor
        .request("historic", Some(room), json!({"limit": 10}))
        .await;
    let newest: Vec<u64> = newest["data"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(seq)
        .collect();
    assert_eq!(
        newest,
        ((TOTAL as u64 - 9)..=TOTAL as u64).collect::<Vec<_>>()
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Idempotent retries
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn retried_message_id_stores_nothing_new_and_returns_original_seq_also_after_reconnect() {
    let server = TestServer::start().await;
    let room = "retry-room";
    let mut a = server.connect("alice", TENANT, Role::Admin).await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    a.join(room).await;
    b.join(room).await;

    let first = chat_with_id(&mut a, room, "hello", "mid-1").await;
    assert_eq!(first["status"], "success", "{first}");
    assert_eq!(first["data"]["seq"], 1);
    assert_eq!(first["data"]["message_id"], "mid-1");
    let event = b.recv_code("chat_response").await;
    assert_eq!(event["data"]["seq"], 1);

    // Same message_id, different text: the original message comes back, nothing is stored.
    let retry = chat_with_id(&mut a, room, "hello again", "mid-1").await;
    assert_eq!(retry["status"], "success", "{retry}");
    assert_eq!(retry["data"]["seq"], 1);
    assert_eq!(retry["data"]["message_id"], "mid-1");
    assert_eq!(retry["data"]["message"], "hello");
    assert_eq!(retry["data"]["created_at"], first["data"]["created_at"]);
    expect_no_chat(&mut b, Duration::from_millis(300)).await;

    // Two copies in flight at once (likely in one group commit): one message, one event.
    let user = a.user.clone();
    a.send(chat_frame(&user, room, "twice", "mid-2", "dup-a"))
        .await;
    a.send(chat_frame(&user, room, "twice", "mid-2", "dup-b"))
        .await;
    let mut replies = HashMap::new();
    while replies.len() < 2 {
        let v = a.recv_code("chat_response").await;
        assert_eq!(v["status"], "success", "{v}");
        replies.insert(v["ref"].as_str().unwrap().to_owned(), v["data"].clone());
    }
    assert_eq!(replies["dup-a"]["seq"], 2);
    assert_eq!(replies["dup-b"]["seq"], 2);
    assert_eq!(
        replies["dup-a"]["created_at"],
        replies["dup-b"]["created_at"]
    );
    let event = b.recv_code("chat_response").await;
    assert_eq!(event["data"]["seq"], 2);
    expect_no_chat(&mut b, Duration::from_millis(300)).await;

    // After a reconnect (a new session), retries still resolve to the originals.
    drop(a);
    let mut a = server.connect("alice", TENANT, Role::Admin).await;
    a.join(room).await;
    let again = chat_with_id(&mut a, room, "hello", "mid-1").await;
    assert_eq!(again["status"], "success", "{again}");
    assert_eq!(again["data"]["seq"], 1);
    assert_eq!(again["data"]["created_at"], first["data"]["created_at"]);
    let again = chat_with_id(&mut a, room, "twice", "mid-2").await;
    assert_eq!(again["data"]["seq"], 2);
    expect_no_chat(&mut b, Duration::from_millis(300)).await;

    // The next new message continues right after: nothing was stored by the retries.
    let fresh = a.chat(room, "fresh").await;
    assert_eq!(fresh["data"]["seq"], 3);
    // A message_id is unique per room only: the same id elsewhere is a new message.
    a.join("retry-elsewhere").await;
    let elsewhere = chat_with_id(&mut a, "retry-elsewhere", "other room", "mid-1").await;
    assert_eq!(elsewhere["status"], "success", "{elsewhere}");
    assert_eq!(elsewhere["data"]["seq"], 1);
    assert_eq!(elsewhere["data"]["message"], "other room");
    assert_eq!(elsewhere["data"]["room_id"], "retry-elsewhere");
    let stored = read_all(&mut a, room).await;
    assert_gap_free(&stored);
    let ids: Vec<&str> = stored
        .iter()
        .map(|m| m["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(&ids[..2], ["mid-1", "mid-2"]);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Reconnect and recover
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn reconnect_with_join_since_seq_recovers_every_missed_message_with_paging() {
    let server = TestServer::start_with(generous_limits).await;
    let room = "gap-room";
    let mut a = server.connect("alice", TENANT, Role::Admin).await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    a.join(room).await;
    b.join(room).await;
    let mut texts = BTreeMap::new();
    for i in 1..=3u64 {
        let r = a.chat(room, &format!("before {i}")).await;
        assert_eq!(r["data"]["seq"], i);
        texts.insert(i, format!("before {i}"));
    }
    let mut last_seen = 0;
    for _ in 0..3 {
        last_seen = seq(&b.recv_code("chat_response").await["data"]);
    }
    assert_eq!(last_seen, 3);
    b.ws.close(None).await.unwrap();
    drop(b);

    // 250 messages while bob is away: more than one page of `missed`.
    for i in 4..=253u64 {
        let text = format!("while away {i}");
        let r = a.chat(room, &text).await;
        assert_eq!(r["data"]["seq"], i, "{r}");
        texts.insert(i, text);
    }

    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    let j = b
        .request("join", Some(room), json!({"since_seq": last_seen}))
        .await;
    assert_eq!(j["status"], "success", "{j}");
    assert_eq!(j["data"]["room"]["last_seq"], 253);
    let missed = j["data"]["missed"].as_array().unwrap();
    assert_eq!(missed.len(), 100, "default limit is 100");
    assert_eq!(j["data"]["has_more"], true);
    let mut recovered: Vec<Value> = missed.clone();
    // Page on with historic from the last recovered seq.
    loop {
        let after = seq(recovered.last().unwrap());
        let h = b
            .request(
                "historic",
                Some(room),
                json!({"after_seq": after, "limit": 60}),
            )
            .await;
        assert_eq!(h["status"], "success", "{h}");
        recovered.extend(h["data"]["messages"].as_array().unwrap().iter().cloned());
        if h["data"]["has_more"] == false {
            break;
        }
    }
    let seqs: Vec<u64> = recovered.iter().map(seq).collect();
    assert_eq!(seqs, (4..=253).collect::<Vec<_>>());
    for m in &recovered {
        assert_eq!(m["message"].as_str().unwrap(), texts[&seq(m)]);
    }

    // A bigger limit returns everything at once; since_seq = last_seq returns nothing.
    let j = b
        .request(
            "join",
            Some(room),
            json!({"since_seq": last_seen, "limit": 500}),
        )
        .await;
    assert_eq!(j["data"]["missed"].as_array().unwrap().len(), 250);
    assert_eq!(j["data"]["has_more"], false);
    let j = b
        .request("join", Some(room), json!({"since_seq": 253}))
        .await;
    assert_eq!(j["data"]["missed"], json!([]));
    assert_eq!(j["data"]["has_more"], false);

    // Live again: the next message arrives exactly once despite the repeated joins.
    let r = a.chat(room, "back").await;
    assert_eq!(r["data"]["seq"], 254);
    let ev = b.recv_code("chat_response").await;
    assert_eq!(ev["data"]["seq"], 254);
    expect_no_chat(&mut b, Duration::from_millis(300)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoin_with_since_seq_during_concurrent_writes_has_no_gap_and_no_duplicate() {
    const TOTAL: u64 = 300;
    let server = TestServer::start_with(generous_limits).await;
    let room = "race-room";
    let mut a = server.connect("alice", TENANT, Role::Admin).await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    a.join(room).await;
    b.join(room).await;
    let writer = tokio::spawn(async move {
        for i in 1..=TOTAL {
            let r = a.chat(room, &format!("m{i}")).await;
            assert_eq!(r["data"]["seq"], i, "{r}");
        }
        a
    });
    let mut seen: Vec<u64> = Vec::new();
    while seen.len() < 40 {
        let v = b.recv_code("chat_response").await;
        seen.push(seq(&v["data"]));
    }
    drop(b);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    let since = *seen.last().unwrap();
    let j = b
        .request(
            "join",
            Some(room),
            json!({"since_seq": since, "limit": 500}),
        )
        .await;
    assert_eq!(j["status"], "success", "{j}");
    assert_eq!(j["data"]["has_more"], false);
    let last_seq = j["data"]["room"]["last_seq"].as_u64().unwrap();
    for m in j["data"]["missed"].as_array().unwrap() {
        seen.push(seq(m));
    }
    assert_eq!(*seen.last().unwrap(), last_seq, "missed ends at last_seq");
    while *seen.last().unwrap() < TOTAL {
        let v = b.recv_code("chat_response").await;
        seen.push(seq(&v["data"]));
    }
    assert_eq!(
        seen,
        (1..=TOTAL).collect::<Vec<_>>(),
        "missed + live events must continue without gap or duplicate"
    );
    writer.await.unwrap();
    expect_no_chat(&mut b, Duration::from_millis(300)).await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Restarts
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn graceful_restart_on_same_data_dir_keeps_history_and_continues_seq() {
    let server = TestServer::start_with(generous_limits).await;
    let mut a = server.connect("alice", TENANT, Role::Admin).await;
    a.join("keep-1").await;
    a.join("keep-2").await;
    let mut before = Vec::new();
    for i in 0..20 {
        let r = chat_with_id(&mut a, "keep-1", &format!("text {i}"), &format!("keep-{i}")).await;
        assert_eq!(r["data"]["seq"], i + 1);
        before.push(r["data"].clone());
    }
    for i in 0..5 {
        let r = a.chat("keep-2", &format!("other {i}")).await;
        assert_eq!(r["data"]["seq"], i + 1);
    }
    drop(a);
    let dir = server.stop().await;

    let server = TestServer::start_in(dir, generous_limits).await;
    let mut a = server.connect("alice", TENANT, Role::Admin).await;
    let j = a
        .request("join", Some("keep-1"), json!({"since_seq": 0}))
        .await;
    assert_eq!(j["status"], "success", "{j}");
    assert_eq!(j["data"]["room"]["last_seq"], 20);
    assert_eq!(j["data"]["has_more"], false);
    let missed = j["data"]["missed"].as_array().unwrap();
    assert_eq!(missed, &before, "history changed across the restart");

    let next = a.chat("keep-1", "after restart").await;
    assert_eq!(next["data"]["seq"], 21);
    // Idempotency survives the restart.
    let retry = chat_with_id(&mut a, "keep-1", "text 3", "keep-3").await;
    assert_eq!(retry["data"]["seq"], 4);
    assert_eq!(retry["data"]["created_at"], before[3]["created_at"]);
    a.join("keep-2").await;
    let next = a.chat("keep-2", "after restart").await;
    assert_eq!(next["data"]["seq"], 6);
    let stored = read_all(&mut a, "keep-1").await;
    assert_eq!(stored.len(), 21);
    assert_gap_free(&stored);
    server.stop().await;
}

/// What one loading client sent and which of it was acknowledged.
struct Load {
    room: String,
    /// message_ids in the order sent.
    sent: Vec<String>,
    /// message_id -> seq of every success reply.
    acked: HashMap<String, u64>,
}

/// Sends chats with client message_ids (`window` in flight) until `stop`, `max` or the
/// connection dies; records every acknowledgement.
async fn load(
    mut client: Client,
    room: String,
    window: usize,
    max: usize,
    text_len: usize,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicUsize>,
) -> Load {
    client.join(&room).await;
    let user = client.user.clone();
    let filler = "x".repeat(text_len);
    let (mut sink, mut stream) = client.ws.split();
    let mut result = Load {
        room: room.clone(),
        sent: Vec::new(),
        acked: HashMap::new(),
    };
    let mut outstanding = 0;
    'run: loop {
        while outstanding < window && result.sent.len() < max && !stop.load(Ordering::Relaxed) {
            let mid = format!("{user}-{}", result.sent.len());
            let frame = chat_frame(&user, &room, &format!("{mid} {filler}"), &mid, &mid);
            if sink.send(Message::text(frame.to_string())).await.is_err() {
                break 'run;
            }
            result.sent.push(mid);
            outstanding += 1;
        }
        if outstanding == 0 {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["code"] != "chat_response" {
                    continue;
                }
                let Some(reference) = v["ref"].as_str() else {
                    continue; // someone else's message
                };
                outstanding -= 1;
                assert_eq!(v["status"], "success", "{v}");
                assert_eq!(v["data"]["message_id"], reference);
                let previous = result.acked.insert(reference.to_owned(), seq(&v["data"]));
                assert!(previous.is_none(), "two replies for {reference}");
                acks.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => break,
            Err(_) => panic!("{user}: no reply within 10s"),
        }
    }
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_write_load_loses_no_acknowledged_message_and_leaves_no_gap() {
    let dir = tempfile::tempdir().unwrap();
    let mut process = GatewayProcess::spawn(dir.path()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let client = process
            .connect(&format!("writer-{i}"), TENANT, Role::Admin)
            .await;
        let room = format!("crash-{}", i % 2);
        tasks.push(tokio::spawn(load(
            client,
            room,
            8,
            usize::MAX,
            64,
            stop.clone(),
            acks.clone(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while acks.load(Ordering::Relaxed) < 600 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        acks.load(Ordering::Relaxed) >= 600,
        "the load did not get going"
    );
    process.kill_9();
    let mut loads = Vec::new();
    for task in tasks {
        loads.push(
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("loaders notice the crash")
                .unwrap(),
        );
    }
    let unacked: usize = loads.iter().map(|l| l.sent.len() - l.acked.len()).sum();
    assert!(unacked > 0, "the kill did not happen mid-load");
    let total_acked: usize = loads.iter().map(|l| l.acked.len()).sum();
    println!("killed with {total_acked} acknowledged, {unacked} in flight");

    let process = GatewayProcess::spawn(dir.path()).await;
    let mut auditor = process.connect("auditor", TENANT, Role::Admin).await;
    for room in ["crash-0", "crash-1"] {
        let stored = read_all(&mut auditor, room).await;
        assert_gap_free(&stored);
        let stored_seq: HashMap<String, u64> = stored
            .iter()
            .map(|m| (m["message_id"].as_str().unwrap().to_owned(), seq(m)))
            .collect();
        let room_loads: Vec<&Load> = loads.iter().filter(|l| l.room == room).collect();
        let sent: HashSet<&str> = room_loads
            .iter()
            .flat_map(|l| l.sent.iter().map(String::as_str))
            .collect();
        for m in &stored {
            assert!(
                sent.contains(m["message_id"].as_str().unwrap()),
                "a stored message nobody sent: {m}"
            );
        }
        for l in &room_loads {
            for (mid, s) in &l.acked {
                assert_eq!(
                    stored_seq.get(mid),
                    Some(s),
                    "acknowledged message {mid} (seq {s}) lost or moved by the crash"
                );
            }
        }

        // Client recovery: retrying every unacknowledged message_id stores each exactly once.
        auditor.join(room).await;
        let mut max = stored.len() as u64;
        for l in &room_loads {
            let user = l.sent[0].rsplit_once('-').unwrap().0.to_owned();
            let mut writer = process.connect(&user, TENANT, Role::Admin).await;
            writer.join(room).await;
            for mid in l.sent.iter().filter(|m| !l.acked.contains_key(*m)) {
                let r = chat_with_id(&mut writer, room, &format!("{mid} retry"), mid).await;
                assert_eq!(r["status"], "success", "{r}");
                match stored_seq.get(mid) {
                    Some(s) => assert_eq!(r["data"]["seq"], *s, "retry of a stored message"),
                    None => {
                        max += 1;
                        assert_eq!(r["data"]["seq"], max, "retry of a lost message");
                    }
                }
            }
        }
        let stored = read_all(&mut auditor, room).await;
        assert_gap_free(&stored);
        assert_eq!(
            stored.len(),
            sent.len(),
            "every sent message stored exactly once"
        );
    }
}

/// What a member saw from a shutdown signal on.
struct UntilClose {
    user: String,
    /// message_id -> seq of every successful direct chat reply.
    acked: HashMap<String, u64>,
    /// The close frame's code (`None` for a close frame without one).
    close: Option<u16>,
}

/// Reads a member's frames until the server's close frame; panics if the connection ends
/// without one.
async fn read_until_close(mut client: Client) -> UntilClose {
    let mut acked = HashMap::new();
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(15), client.ws.next())
            .await
            .unwrap_or_else(|_| panic!("{}: not closed within 15s", client.user))
        {
            Some(Ok(Message::Text(text))) => {
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["code"] == "chat_response" {
                    assert_eq!(v["status"], "success", "{v}");
                    if let Some(reference) = v["ref"].as_str() {
                        acked.insert(reference.to_owned(), seq(&v["data"]));
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!(
                "{}: connection ended without a close frame: {other:?}",
                client.user
            ),
        }
    };
    UntilClose {
        user: client.user,
        acked,
        close,
    }
}

/// Graceful shutdown on `signal` (`TERM` or `INT`) of the real binary: every chat the server
/// had read before the signal is answered, no new client gets in, every open socket is closed
/// with 1001, the process exits 0, and after a restart every acknowledged message is stored
/// under the seq it was acknowledged with.
async fn graceful_shutdown_on(signal: &str) {
    const IN_FLIGHT: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let mut process = GatewayProcess::spawn(dir.path()).await;
    let room = "term-room";
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = process
            .connect(&format!("member-{i}"), TENANT, Role::Admin)
            .await;
        c.join(room).await;
        clients.push(c);
    }
    let mut acked: HashMap<String, u64> = HashMap::new();
    for i in 0..20 {
        let mid = format!("settled-{i}");
        let r = chat_with_id(&mut clients[0], room, &mid, &mid).await;
        assert_eq!(r["status"], "success", "{r}");
        acked.insert(mid, seq(&r["data"]));
    }

    // A burst of chats, then a ping. A connection handles its frames in order and answers
    // `ping` itself, so the ping's reply proves the server has read every chat before it while
    // their commits may still be under way.
    let user = clients[1].user.clone();
    for i in 0..IN_FLIGHT {
        let mid = format!("inflight-{i}");
        clients[1]
            .send(chat_frame(&user, room, &mid, &mid, &mid))
            .await;
    }
    clients[1]
        .send(json!({"code": "ping", "user_id": user, "data": {}, "ref": "barrier"}))
        .await;
    loop {
        let v = clients[1].recv().await;
        if v["ref"] == "barrier" {
            break;
        }
        if v["code"] == "chat_response" && v["ref"].is_string() {
            assert_eq!(v["status"], "success", "{v}");
            acked.insert(v["ref"].as_str().unwrap().to_owned(), seq(&v["data"]));
        }
    }
    let answered_before = acked.len() - 20;
    process.signal(signal);
    let readers: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(read_until_close(c)))
        .collect();

    // Draining: /readyz stops answering 200 (503 while the process still answers, nothing once
    // its listener is closed), and from then on no handshake is let in.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match try_get_status(process.addr, "/readyz").await {
            Some(200) => assert!(
                Instant::now() < deadline,
                "still ready 10s after SIG{signal}"
            ),
            None | Some(503) => break,
            Some(other) => panic!("/readyz answered {other} while shutting down"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let late = process.url(&token("latecomer", TENANT, Role::Admin));
    match tokio_tungstenite::connect_async(late).await {
        Ok(_) => panic!("a new websocket was accepted after SIG{signal}"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503, "{response:?}")
        }
        Err(tokio_tungstenite::tungstenite::Error::Io(_)) => {} // the listener is closed
        Err(other) => panic!("unexpected handshake failure: {other:?}"),
    }

    for reader in readers {
        let seen = tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .expect("every member is closed")
            .unwrap();
        assert_eq!(seen.close, Some(1001), "{}: close code", seen.user);
        acked.extend(seen.acked);
    }
    let missing: Vec<String> = (0..IN_FLIGHT)
        .map(|i| format!("inflight-{i}"))
        .filter(|mid| !acked.contains_key(mid))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {IN_FLIGHT} chats read before SIG{signal} got no reply: {missing:?}",
        missing.len()
    );
    println!(
        "SIG{signal}: {} of {IN_FLIGHT} replies were still to come when the signal was sent",
        IN_FLIGHT - answered_before
    );
    let status = process.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIG{signal}: {status}"
    );

    let process = GatewayProcess::spawn(dir.path()).await;
    let mut auditor = process.connect("auditor", TENANT, Role::Admin).await;
    let stored = read_all(&mut auditor, room).await;
    assert_gap_free(&stored);
    let stored_seq: HashMap<&str, u64> = stored
        .iter()
        .map(|m| (m["message_id"].as_str().unwrap(), seq(m)))
        .collect();
    assert_eq!(
        stored.len(),
        acked.len(),
        "exactly the acknowledged messages"
    );
    for (mid, s) in &acked {
        assert_eq!(
            stored_seq.get(mid.as_str()),
            Some(s),
            "acknowledged {mid} lost"
        );
    }
    let j = auditor.join(room).await;
    let r = auditor.chat(room, "after restart").await;
    assert_eq!(
        r["data"]["seq"].as_u64().unwrap(),
        j["data"]["room"]["last_seq"].as_u64().unwrap() + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_answers_chats_in_flight_refuses_newcomers_closes_1001_and_exits_zero() {
    graceful_shutdown_on("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigint_answers_chats_in_flight_refuses_newcomers_closes_1001_and_exits_zero() {
    graceful_shutdown_on("INT").await;
}

// ---------------------------------------------------------------------------------------------
// Overload: slow consumers and slowloris
// ---------------------------------------------------------------------------------------------

/// A connection with a tiny receive buffer that joins `room` (waiting for the `join_response`
/// with `reference`) and then stops reading until the test reads from it again.
async fn stalled_join(
    server: &TestServer,
    user: &str,
    room: &str,
    reference: &str,
) -> (RawClient, Value) {
    let mut raw = RawClient::connect_with_recv_buffer(
        server.addr,
        &token(user, TENANT, Role::Admin),
        Some(4096),
    )
    .await;
    raw.send_text(
        &json!({"code": "join", "user_id": user, "room_id": room, "data": {}, "ref": reference})
            .to_string(),
    )
    .await;
    loop {
        let frame = raw
            .read_frame(Duration::from_secs(10))
            .await
            .expect("join reply");
        if frame.opcode == 1 {
            let v: Value = serde_json::from_slice(&frame.payload).unwrap();
            if v["code"] == "join_response" && v["ref"] == reference {
                return (raw, v);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_consumer_is_closed_with_1013_within_queue_bound_while_others_get_everything() {
    const BOUND: usize = 64;
    let server = TestServer::start_with(|c| {
        generous_limits(c);
        c.outbound_queue = BOUND;
        c.write_timeout_ms = 3000;
    })
    .await;
    let room = "firehose";

    // The slow consumer: joins, then stops reading (with a tiny receive buffer).
    let (mut slow, v) = stalled_join(&server, "slowpoke", room, "j").await;
    assert_eq!(v["status"], "success", "{v}");

    // Healthy readers.
    let done_at = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for i in 0..2 {
        let mut c = server
            .connect(&format!("reader-{i}"), TENANT, Role::Admin)
            .await;
        c.join(room).await;
        let done_at = done_at.clone();
        readers.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(40);
            loop {
                let target = done_at.load(Ordering::Acquire);
                if target != 0 && seqs.len() as u64 >= target {
                    break;
                }
                if Instant::now() > deadline {
                    break;
                }
                match c.recv_within(Duration::from_millis(200)).await {
                    Some(v) if v["code"] == "chat_response" => {
                        assert_eq!(v["status"], "success", "{v}");
                        seqs.push(seq(&v["data"]));
                    }
                    _ => {}
                }
            }
            seqs
        }));
    }

    // Writers: 2 KiB messages, a few in flight each, until the slow consumer is cut off.
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for i in 0..2 {
        let client = server
            .connect(&format!("writer-{i}"), TENANT, Role::Admin)
            .await;
        writers.push(tokio::spawn(load(
            client,
            room.to_owned(),
            8,
            4000,
            2048,
            stop.clone(),
            acks.clone(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = server.metrics().await;
        if metric(&metrics, "gateway_slow_consumer_closes_total") >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline && !writers.iter().all(|w| w.is_finished()),
            "the slow consumer was never cut off ({} messages acknowledged)",
            acks.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);

    // The slow consumer resumes reading: what was already on its way, then close 1013.
    let mut delivered = Vec::new();
    let close = loop {
        match slow.read_frame(Duration::from_secs(10)).await {
            Some(RawFrame {
                opcode: 1, payload, ..
            }) => {
                let v: Value = serde_json::from_slice(&payload).unwrap();
                if v["code"] == "chat_response" {
                    delivered.push(seq(&v["data"]));
                }
            }
            Some(RawFrame {
                opcode: 8, payload, ..
            }) => break Some(u16::from_be_bytes([payload[0], payload[1]])),
            Some(_) => {}
            None => break None,
        }
    };
    assert_eq!(close, Some(1013), "slow consumer close code");
    assert!(
        slow.read_frame(Duration::from_millis(500)).await.is_none(),
        "frames after the close"
    );

    let mut total = 0;
    for w in writers {
        let l = w.await.unwrap();
        assert_eq!(l.sent.len(), l.acked.len(), "writer lost replies");
        total += l.acked.len() as u64;
    }
    done_at.store(total, Ordering::Release);
    for r in readers {
        let seqs = r.await.unwrap();
        assert_eq!(
            seqs,
            (1..=total).collect::<Vec<_>>(),
            "a healthy reader missed or reordered messages"
        );
    }
    let delivered_expected: Vec<u64> = (1..=delivered.len() as u64).collect();
    assert_eq!(delivered, delivered_expected, "delivered before the close");
    assert!((delivered.len() as u64) < total);
    println!(
        "slow consumer got {} of {total} messages before its 1013",
        delivered.len()
    );

    let metrics = server.metrics().await;
    assert!(metric(&metrics, "gateway_slow_consumer_closes_total") >= 1.0);
    assert!(metric(&metrics, r#"gateway_closes_total{code="1013"}"#) >= 1.0);
    // Everything queued for a connection counts, written or not, so the queue that closed
    // reached the bound exactly: not before (no early close), not beyond (nothing unbounded).
    let high_water = metric(&metrics, "gateway_outbound_queue_high_water");
    assert_eq!(
        high_water, BOUND as f64,
        "the slow consumer was closed with {high_water} frames queued, bound is {BOUND}"
    );

    // The slow consumer recovers the gap from storage.
    let mut back = server.connect("slowpoke", TENANT, Role::Admin).await;
    let since = delivered.len() as u64;
    let j = back
        .request(
            "join",
            Some(room),
            json!({"since_seq": since, "limit": 500}),
        )
        .await;
    assert_eq!(j["status"], "success", "{j}");
    let mut recovered: Vec<u64> = j["data"]["missed"]
        .as_array()
        .unwrap()
        .iter()
        .map(seq)
        .collect();
    let mut more = j["data"]["has_more"] == true;
    while more {
        let after = recovered.last().copied().unwrap_or(since);
        let h = back
            .request(
                "historic",
                Some(room),
                json!({"after_seq": after, "limit": 200}),
            )
            .await;
        recovered.extend(h["data"]["messages"].as_array().unwrap().iter().map(seq));
        more = h["data"]["has_more"] == true;
    }
    assert_eq!(recovered, ((since + 1)..=total).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_idle_connections_are_dropped_after_handshake_timeout_while_others_chat() {
    let server = TestServer::start_with(|c| c.handshake_timeout_ms = 1000).await;
    let addr = server.addr;

    // Trickles the request headers, one byte every 300 ms.
    let trickle = tokio::spawn(async move {
        let started = Instant::now();
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut read, mut write) = stream.into_split();
        let request = upgrade_request(&token("loris", TENANT, Role::Admin));
        let sent = Arc::new(AtomicUsize::new(0));
        let sent_by_writer = sent.clone();
        let writer = tokio::spawn(async move {
            for byte in request.as_bytes() {
                if write.write_all(&[*byte]).await.is_err() {
                    return;
                }
                sent_by_writer.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut sink)).await;
        writer.abort();
        (started.elapsed(), sent.load(Ordering::Relaxed), sink)
    });
    // Connects and sends nothing at all.
    let idle = tokio::spawn(async move {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut sink)).await;
        (started.elapsed(), sink)
    });

    // Finishes one keep-alive request, then sends nothing more.
    let keep_alive = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut sink)).await;
        (started.elapsed(), sink)
    });

    // Meanwhile a well-behaved client connects and chats.
    let mut a = server.connect("alice", TENANT, Role::Admin).await;
    a.join("loris-room").await;
    for i in 1..=5u64 {
        let r = a.chat("loris-room", &format!("still fine {i}")).await;
        assert_eq!(r["status"], "success", "{r}");
        assert_eq!(r["data"]["seq"], i);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let (elapsed, sent, response) = trickle.await.unwrap();
    assert!(
        elapsed < Duration::from_secs(4),
        "trickling client held its connection for {elapsed:?} ({sent} bytes sent)"
    );
    assert!(
        !String::from_utf8_lossy(&response).contains(" 101 "),
        "the trickling client was upgraded"
    );
    let (elapsed, _) = idle.await.unwrap();
    assert!(
        elapsed < Duration::from_secs(4),
        "idle connection held for {elapsed:?}"
    );

    let (elapsed, response) = keep_alive.await.unwrap();
    assert!(
        String::from_utf8_lossy(&response).starts_with("HTTP/1.1 200"),
        "keep-alive request answered"
    );
    assert!(
        elapsed < Duration::from_secs(4),
        "idle keep-alive connection held for {elapsed:?}"
    );

    // And the server still accepts new clients afterwards.
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    b.join("loris-room").await;
    let r = b.chat("loris-room", "after").await;
    assert_eq!(r["data"]["seq"], 6);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_reply_under_backpressure_keeps_events_that_arrived_while_it_was_prepared() {
    // A connection whose queue is full of ephemeral frames joins a busy room. Chat events that
    // arrive while its join reply is being prepared must follow the reply (or the connection
    // must be closed with 1013): never silently dropped.
    const BOUND: usize = 512;
    const HISTORY: u64 = 400;
    const LIVE: u64 = 80;
    let server = TestServer::start_with(|c| {
        generous_limits(c);
        c.typing_rate = 1_000_000;
        c.outbound_queue = BOUND;
    })
    .await;
    let (noisy, busy) = ("noisy-room", "busy-history");

    // A long history makes the join reply (with since_seq = 0) slow to prepare.
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicUsize::new(0));
    let filler = server.connect("filler", TENANT, Role::Admin).await;
    let filled = load(
        filler,
        busy.to_owned(),
        8,
        HISTORY as usize,
        8000,
        stop.clone(),
        acks.clone(),
    )
    .await;
    assert_eq!(filled.acked.len() as u64, HISTORY);

    let (mut slow, _) = stalled_join(&server, "stalled", noisy, "j1").await;

    // Typing floods the stalled connection until its queue is full of ephemeral frames.
    let mut typer = server.connect("typer", TENANT, Role::Admin).await;
    typer.join(noisy).await;
    let typing_stop = Arc::new(AtomicBool::new(false));
    let typing = {
        let typing_stop = typing_stop.clone();
        tokio::spawn(async move {
            while !typing_stop.load(Ordering::Relaxed) {
                for _ in 0..100 {
                    typer
                        .send(
                            json!({"code": "typing", "user_id": "typer", "room_id": noisy,
                                     "data": {"status": "started", "sender": "typer"}}),
                        )
                        .await;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(
        &server.metrics().await,
        "gateway_outbound_queue_drops_total",
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "the stalled queue never filled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Chats keep landing in the busy room while the stalled connection joins it.
    let writer = server.connect("writer", TENANT, Role::Admin).await;
    let writer = tokio::spawn(load(
        writer,
        busy.to_owned(),
        1,
        LIVE as usize,
        16,
        stop.clone(),
        acks.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(5)).await;
    slow.send_text(
        &json!({"code": "join", "user_id": "stalled", "room_id": busy,
                "data": {"since_seq": 0, "limit": 500}, "ref": "j2"})
        .to_string(),
    )
    .await;
    let written = writer.await.unwrap();
    assert_eq!(written.acked.len() as u64, LIVE);
    typing_stop.store(true, Ordering::Relaxed);
    typing.await.unwrap();

    // Resume reading: after the join reply, the busy room's events continue without a gap.
    let mut last_seq = None;
    let mut events = Vec::new();
    let mut close = None;
    let mut wait = Duration::from_secs(2);
    while let Some(RawFrame {
        opcode, payload, ..
    }) = slow.read_frame(wait).await
    {
        if opcode == 8 {
            close = Some(u16::from_be_bytes([payload[0], payload[1]]));
            break;
        }
        if opcode != 1 {
            continue;
        }
        let v: Value = serde_json::from_slice(&payload).unwrap();
        if v["ref"] == "j2" {
            assert_eq!(v["status"], "success");
            let missed: Vec<u64> = v["data"]["missed"]
                .as_array()
                .unwrap()
                .iter()
                .map(seq)
                .collect();
            let last = v["data"]["room"]["last_seq"].as_u64().unwrap();
            // The page is cut to the reply's byte budget (1 MiB: some 126 of these 8 KB
            // messages), oldest first, with `has_more`; the rest is a `historic` away. Either
            // way it starts at 1 and has no gap.
            let expected: Vec<u64> = (1..=missed.len() as u64).collect();
            assert_eq!(missed, expected);
            let cut = missed.len() as u64 != last;
            assert_eq!(v["data"]["has_more"], cut, "{}", v["data"]["has_more"]);
            last_seq = Some(last);
        } else if v["code"] == "chat_response" && v["room_id"] == busy {
            assert!(last_seq.is_some(), "a chat event before the join reply");
            events.push(seq(&v["data"]));
            if seq(&v["data"]) == HISTORY + LIVE {
                // Everything arrived; anything more would be a duplicate.
                wait = Duration::from_millis(300);
            }
        }
    }
    println!(
        "join saw last_seq {last_seq:?}, then {} events, close {close:?}",
        events.len()
    );
    let Some(last_seq) = last_seq else {
        // Frames the connection had taken but not written count against its bound, so the
        // reply itself may overflow it: then the connection is closed, never left waiting.
        assert_eq!(
            close,
            Some(1013),
            "no join reply and no slow-consumer close"
        );
        server.stop().await;
        return;
    };
    assert!(
        last_seq < HISTORY + LIVE,
        "the join did not overlap the writes"
    );
    let expected: Vec<u64> = (last_seq + 1..=last_seq + events.len() as u64).collect();
    assert_eq!(events, expected, "events after the join reply have a gap");
    if close.is_none() {
        assert_eq!(
            last_seq + events.len() as u64,
            HISTORY + LIVE,
            "connection still open but messages missing"
        );
    }
    server.stop().await;
}
