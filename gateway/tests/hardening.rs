//! Hostile and racing clients: pipelined requests for rooms that are not loaded, slow readers,
//! large pages, floods of bad frames and room creation. Each test names the defence it proves.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use gateway::auth::Role;
use gateway::config::Config;
use serde_json::{json, Value};

const TENANT: &str = "acme";

fn frame(code: &str, user: &str, room: &str, data: Value, reference: &str) -> String {
    json!({"code": code, "user_id": user, "room_id": room, "data": data, "ref": reference})
        .to_string()
}

/// Reads until every `ref` in `expected` has had its reply, failing on a second reply to the
/// same `ref`; returns each reply by `ref`.
async fn replies_by_ref(client: &mut RawClient, expected: &[&str]) -> HashMap<String, Value> {
    let mut replies: HashMap<String, Value> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while expected.iter().any(|r| !replies.contains_key(*r)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(v) = client.recv_json(left).await else {
            let missing: Vec<_> = expected
                .iter()
                .filter(|r| !replies.contains_key(**r))
                .collect();
            panic!("no reply to {missing:?}; got {replies:?}");
        };
        if let Some(reference) = v["ref"].as_str() {
            assert!(
                replies.insert(reference.to_owned(), v.clone()).is_none(),
                "two replies to {reference}: {v}"
            );
        }
    }
    // Nothing more for these refs arrives later.
    while let Some(v) = client.recv_json(Duration::from_millis(200)).await {
        if let Some(reference) = v["ref"].as_str() {
            assert!(
                !expected.contains(&reference),
                "a second reply to {reference}: {v}"
            );
        }
    }
    replies
}

/// Joins and chats in rooms spread over every shard, proving each shard still answers.
async fn every_shard_answers(server: &TestServer, user: &str) {
    let mut c = server.connect(user, TENANT, Role::Admin).await;
    for i in 0..8 {
        let room = format!("alive-{i}");
        let v = c.join(&room).await;
        assert_eq!(v["status"], "success", "{v}");
        let v = c.chat(&room, "still here").await;
        assert_eq!(v["status"], "success", "{v}");
    }
}

async fn pipelined_requests_for_unloaded_rooms(shards: usize) {
    let server = TestServer::start_with(|c| c.shards = shards).await;
    // A room that exists but is not loaded: created, written to, then left by everyone.
    let mut owner = server.connect("owner", TENANT, Role::Agent).await;
    owner.join("quiet").await;
    let v = owner.chat("quiet", "first").await;
    assert_eq!(v["data"]["seq"], 1, "{v}");
    owner.request("leave", Some("quiet"), json!({})).await;
    drop(owner);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // 1. historic then join (and more) in one write, on the unloaded room.
    let mut admin = RawClient::connect(server.addr, &token("boss", TENANT, Role::Admin)).await;
    admin
        .send_texts(&[
            frame("historic", "boss", "quiet", json!({}), "h1"),
            frame("join", "boss", "quiet", json!({"since_seq": 0}), "j1"),
            frame("historic", "boss", "quiet", json!({"limit": 1}), "h2"),
            frame(
                "chat",
                "boss",
                "quiet",
                json!({"message": "hi", "sender": "boss"}),
                "c1",
            ),
            frame("leave", "boss", "quiet", json!({}), "l1"),
            frame("historic", "boss", "quiet", json!({}), "h3"),
            frame("join", "boss", "quiet", json!({}), "j2"),
        ])
        .await;
    let r = replies_by_ref(&mut admin, &["h1", "j1", "h2", "c1", "l1", "h3", "j2"]).await;
    for reference in ["h1", "j1", "h2", "c1", "l1", "h3", "j2"] {
        assert_eq!(r[reference]["status"], "success", "{}", r[reference]);
    }
    assert_eq!(r["c1"]["data"]["seq"], 2, "{r:?}");
    // `h3` may be read before `c1` commits (its reply may come first): one or both messages.
    let h3 = r["h3"]["data"]["messages"].as_array().unwrap().len();
    assert!(h3 == 1 || h3 == 2, "{}", r["h3"]);

    // 2. A join that fails (not a participant) followed by more requests for the room.
    admin
        .send_texts(&[frame("leave", "boss", "quiet", json!({}), "l2")])
        .await;
    replies_by_ref(&mut admin, &["l2"]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut outsider = RawClient::connect(server.addr, &token("eve", TENANT, Role::Agent)).await;
    outsider
        .send_texts(&[
            frame("join", "eve", "quiet", json!({}), "e1"),
            frame("join", "eve", "quiet", json!({"since_seq": 0}), "e2"),
            frame("historic", "eve", "quiet", json!({}), "e3"),
            frame(
                "chat",
                "eve",
                "quiet",
                json!({"message": "x", "sender": "eve"}),
                "e4",
            ),
        ])
        .await;
    let r = replies_by_ref(&mut outsider, &["e1", "e2", "e3", "e4"]).await;
    for (reference, code) in [
        ("e1", "FORBIDDEN"),
        ("e2", "FORBIDDEN"),
        ("e3", "FORBIDDEN"),
        ("e4", "NOT_JOINED"),
    ] {
        assert_eq!(r[reference]["data"]["error_code"], code, "{}", r[reference]);
    }

    // 3. Two agents open the same new room at once, each pipelining more behind the join.
    let mut a = RawClient::connect(server.addr, &token("ann", TENANT, Role::Admin)).await;
    let mut b = RawClient::connect(server.addr, &token("bob", TENANT, Role::Admin)).await;
    let batch = |user: &str| {
        vec![
            frame("historic", user, "fresh", json!({}), "x1"),
            frame("join", user, "fresh", json!({"since_seq": 0}), "x2"),
            frame(
                "chat",
                user,
                "fresh",
                json!({"message": "m", "sender": user}),
                "x3",
            ),
            frame("leave", user, "fresh", json!({}), "x4"),
        ]
    };
    let (ta, tb) = (batch("ann"), batch("bob"));
    tokio::join!(a.send_texts(&ta), b.send_texts(&tb));
    let (ra, rb) = tokio::join!(
        replies_by_ref(&mut a, &["x1", "x2", "x3", "x4"]),
        replies_by_ref(&mut b, &["x1", "x2", "x3", "x4"])
    );
    for r in [&ra, &rb] {
        for reference in ["x2", "x3", "x4"] {
            assert_eq!(r[reference]["status"], "success", "{}", r[reference]);
        }
    }
    let mut seqs = [
        ra["x3"]["data"]["seq"].as_u64().unwrap(),
        rb["x3"]["data"]["seq"].as_u64().unwrap(),
    ];
    seqs.sort_unstable();
    assert_eq!(seqs, [1, 2], "both chats stored once, gap-free");

    every_shard_answers(&server, "after").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_for_an_unloaded_room_never_kill_the_only_shard() {
    pipelined_requests_for_unloaded_rooms(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_for_unloaded_rooms_never_kill_either_of_two_shards() {
    pipelined_requests_for_unloaded_rooms(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trickling_reader_that_keeps_pinging_is_closed_at_the_byte_bound() {
    // A client that reads a little all the time and pings is not stalled, so the write timeout
    // never fires: only a bound covering every frame queued for it, written or not, stops it.
    const BOUND_BYTES: usize = 1024 * 1024;
    let server = TestServer::start_with(|c| {
        c.rate_limit = 1_000_000;
        c.rate_burst = 1_000_000;
        c.outbound_queue = 100_000;
        c.outbound_queue_bytes = BOUND_BYTES;
    })
    .await;
    let room = "busy";
    let mut slow = RawClient::connect_with_recv_buffer(
        server.addr,
        &token("trickle", TENANT, Role::Admin),
        Some(4096),
    )
    .await;
    slow.send_text(&frame("join", "trickle", room, json!({}), "j"))
        .await;
    while slow.recv_json(Duration::from_secs(5)).await.unwrap()["ref"] != "j" {}

    let mut writers = Vec::new();
    for n in 0..2 {
        let mut w = server
            .connect(&format!("writer-{n}"), TENANT, Role::Admin)
            .await;
        writers.push(tokio::spawn(async move {
            w.join(room).await;
            let text = "x".repeat(4000);
            for i in 0..100_000u32 {
                w.send(
                    json!({"code": "chat", "user_id": format!("writer-{n}"), "room_id": room,
                               "data": {"message": text, "sender": format!("writer-{n}")}}),
                )
                .await;
                if i % 16 == 15 {
                    // Keep many in flight, as a busy client would, and read every reply.
                    let mut acked = 0;
                    while acked < 16 {
                        let v = w.recv().await;
                        if v["code"] == "chat_response" && v["user_id"] == format!("writer-{n}") {
                            acked += 1;
                        }
                    }
                }
            }
        }));
    }

    // Read about 8 KB per 200 ms (far slower than the room) and ping each time, until the
    // server gives up on this reader. Its close frame sits behind what was already queued, which
    // this reader is too slow to reach before the close linger ends, so the metric tells.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = server.metrics().await;
        if metrics.contains("gateway_slow_consumer_closes_total 1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the trickling reader was never closed"
        );
        // The server may have closed the connection already: a failed ping write is fine.
        let mut ping = raw_header(true, 0x9, 10);
        ping.extend_from_slice(b"still here");
        let _ = tokio::io::AsyncWriteExt::write_all(slow.writer.as_mut().unwrap(), &ping).await;
        let mut got = 0;
        while got < 8_000 {
            match slow.read_frame(Duration::from_millis(100)).await {
                Some(f) => got += f.payload.len(),
                None => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for writer in writers {
        writer.abort();
    }
    // What the reader still gets ends with the 1013 close (or the socket ends first).
    if let Some(code) = slow.close_code(Duration::from_secs(5)).await {
        assert_eq!(code, 1013);
    }
    let metrics = server.metrics().await;
    let high_water = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gateway_outbound_queue_high_water_bytes "))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("bytes high-water gauge");
    assert!(
        high_water <= (BOUND_BYTES + 8 * 1024) as f64,
        "{high_water} bytes were queued for one connection, bound is {BOUND_BYTES}"
    );
    server.stop().await;
}

/// Fills `room` with `count` messages of about `size` bytes each.
async fn fill_room(server: &TestServer, room: &str, count: usize, size: usize) {
    let mut w = server.connect("filler", TENANT, Role::Admin).await;
    w.join(room).await;
    let text = "y".repeat(size);
    for _ in 0..count {
        let v = w.chat(room, &text).await;
        assert_eq!(v["status"], "success", "{v}");
    }
}

fn seqs(messages: &Value) -> Vec<u64> {
    messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_cut_to_the_reply_byte_budget_and_say_has_more() {
    const BUDGET: usize = 256 * 1024;
    let server = TestServer::start_with(|c: &mut Config| {
        c.rate_limit = 1_000_000;
        c.rate_burst = 1_000_000;
        c.max_reply_bytes = BUDGET;
    })
    .await;
    // 150 messages of 16 KB: 2.4 MB, far over the budget.
    fill_room(&server, "big", 150, 16_000).await;
    let mut c = server.connect("reader", TENANT, Role::Admin).await;

    let v = c
        .request("join", Some("big"), json!({"since_seq": 0, "limit": 500}))
        .await;
    let text = v.to_string();
    assert!(
        text.len() <= BUDGET + 4096,
        "join reply of {} bytes",
        text.len()
    );
    let missed = seqs(&v["data"]["missed"]);
    assert!(!missed.is_empty() && missed.len() < 150, "{missed:?}");
    assert_eq!(missed, (1..=missed.len() as u64).collect::<Vec<_>>());
    assert_eq!(v["data"]["has_more"], true);

    // The newest page keeps the newest messages; paging back continues without a gap.
    let mut seen = Vec::new();
    let mut query = json!({"limit": 200});
    loop {
        let v = c.request("historic", Some("big"), query.clone()).await;
        assert!(v.to_string().len() <= BUDGET + 4096);
        let page = seqs(&v["data"]["messages"]);
        assert!(!page.is_empty());
        seen.splice(0..0, page.iter().copied());
        if v["data"]["has_more"] == false {
            break;
        }
        query = json!({"limit": 200, "before_seq": page[0]});
    }
    assert_eq!(seen, (1..=150).collect::<Vec<_>>());

    // Paging forward keeps the oldest messages of each page.
    let v = c
        .request(
            "historic",
            Some("big"),
            json!({"after_seq": 10, "limit": 200}),
        )
        .await;
    let page = seqs(&v["data"]["messages"]);
    assert_eq!(page[0], 11);
    assert_eq!(v["data"]["has_more"], true);
    server.stop().await;
}

#[tokio::test]
async fn malformed_frames_and_unknown_codes_spend_the_rate_limit() {
    let server = TestServer::start_with(|c| {
        c.rate_limit = 1;
        c.rate_burst = 3;
    })
    .await;
    let mut c = server.connect("flooder", TENANT, Role::Agent).await;
    let mut codes = Vec::new();
    for i in 0..6 {
        let text = if i % 2 == 0 {
            "not json".to_owned()
        } else {
            json!({"code": "nope", "user_id": "flooder", "data": {}}).to_string()
        };
        c.send_text(&text).await;
        let v = c.recv().await;
        codes.push(v["data"]["error_code"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        codes,
        [
            "BAD_REQUEST",
            "UNKNOWN_CODE",
            "BAD_REQUEST",
            "RATE_LIMITED",
            "RATE_LIMITED",
            "RATE_LIMITED"
        ]
    );
    server.stop().await;
}

#[tokio::test]
async fn joins_create_a_bounded_number_of_rooms_per_connection_and_per_tenant() {
    let server = TestServer::start_with(|c| {
        c.rooms_per_connection = 3;
        c.rooms_per_tenant_minute = 5;
    })
    .await;
    let mut a = server.connect("ann", TENANT, Role::Agent).await;
    for i in 0..3 {
        let v = a.join(&format!("new-{i}")).await;
        assert_eq!(v["status"], "success", "{v}");
    }
    let v = a.request("join", Some("new-3"), json!({})).await;
    assert_eq!(v["data"]["error_code"], "RATE_LIMITED", "{v}");
    // Joining rooms that exist is not limited.
    assert_eq!(a.join("new-0").await["status"], "success");

    // The tenant's budget (5 a minute) is shared by its connections; other tenants have theirs.
    let mut b = server.connect("bob", TENANT, Role::Agent).await;
    assert_eq!(b.join("new-4").await["status"], "success");
    assert_eq!(b.join("new-5").await["status"], "success");
    let v = b.request("join", Some("new-6"), json!({})).await;
    assert_eq!(v["data"]["error_code"], "RATE_LIMITED", "{v}");
    let mut other = server.connect("olga", "globex", Role::Agent).await;
    assert_eq!(other.join("elsewhere").await["status"], "success");
    server.stop().await;
}

#[tokio::test]
async fn a_read_receipt_on_a_note_is_not_broadcast_to_customers() {
    let server = TestServer::start().await;
    let admin = token("boss", TENANT, Role::Admin);
    create_room(
        &server,
        &admin,
        json!({"room_id": "conv-r", "kind": "support", "participants": ["alice", "cust-r"]}),
    )
    .await;
    let dir = server.stop().await;
    let note_id = store_note(
        dir.path(),
        TENANT,
        "conv-r",
        "alice",
        "refund approved",
        None,
    )
    .await
    .message_id;

    let server = TestServer::start_in(dir, |_| {}).await;
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    let mut cust = server.connect("cust-r", TENANT, Role::Customer).await;
    let mut bob = server.connect("bob", TENANT, Role::Admin).await;
    alice.join("conv-r").await;
    cust.join("conv-r").await;
    bob.join("conv-r").await;
    cust.drain(Duration::from_millis(200)).await;
    alice.drain(Duration::from_millis(200)).await;

    let v = bob
        .request(
            "read_receipt",
            Some("conv-r"),
            json!({"message_id": note_id, "sender": "bob"}),
        )
        .await;
    assert_eq!(v["status"], "success", "{v}");
    let team_saw = alice.recv_code("read_receipt_response").await;
    assert_eq!(team_saw["data"]["message_id"], note_id.as_str());
    let customer_saw = cust.drain(Duration::from_millis(300)).await;
    assert!(
        customer_saw
            .iter()
            .all(|v| v["code"] != "read_receipt_response"),
        "the customer learnt of a note: {customer_saw:?}"
    );

    // A receipt on a message the customer can see still reaches the customer.
    let hello = alice.chat("conv-r", "hello").await;
    cust.recv_code("chat_response").await;
    bob.recv_code("chat_response").await;
    bob.request(
        "read_receipt",
        Some("conv-r"),
        json!({"message_id": hello["data"]["message_id"], "sender": "bob"}),
    )
    .await;
    let v = cust.recv_code("read_receipt_response").await;
    assert_eq!(v["data"]["seq"], 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn across_shards_events_keep_their_order_and_stop_at_leave() {
    let server = TestServer::start_with(|c| {
        c.shards = 3;
        c.rate_limit = 1_000_000;
        c.rate_burst = 1_000_000;
    })
    .await;
    let room = "crossing";
    // Connections land on shards round-robin: several readers cover every shard.
    let mut readers = Vec::new();
    for i in 0..6 {
        let mut r = server
            .connect(&format!("reader-{i}"), TENANT, Role::Admin)
            .await;
        r.join(room).await;
        readers.push(r);
    }
    let mut writer = server.connect("writer", TENANT, Role::Admin).await;
    writer.join(room).await;
    let sending = tokio::spawn(async move {
        for i in 0..300 {
            let v = writer.chat(room, &format!("n{i}")).await;
            assert_eq!(v["status"], "success", "{v}");
        }
        writer
    });
    let mut checks = Vec::new();
    for (i, mut r) in readers.into_iter().enumerate() {
        checks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            // Half the readers leave midway; after their leave reply nothing of the room comes.
            let leave_after = if i % 2 == 0 { 50 } else { usize::MAX };
            loop {
                let Some(v) = r.recv_within(Duration::from_secs(5)).await else {
                    break;
                };
                if v["code"] == "chat_response" {
                    seqs.push(v["data"]["seq"].as_u64().unwrap());
                    if seqs.len() == leave_after {
                        r.send(json!({"code": "leave", "user_id": format!("reader-{i}"),
                                      "room_id": room, "data": {}, "ref": "bye"}))
                            .await;
                        loop {
                            let v = r.recv().await;
                            if v["ref"] == "bye" {
                                break;
                            }
                            assert_eq!(v["code"], "chat_response");
                            seqs.push(v["data"]["seq"].as_u64().unwrap());
                        }
                        r.expect_silence(Duration::from_millis(500)).await;
                        break;
                    }
                    if seqs.len() == 300 {
                        break;
                    }
                }
            }
            assert_eq!(
                seqs,
                (1..=seqs.len() as u64).collect::<Vec<_>>(),
                "reader {i} got events out of order or with a gap"
            );
            if leave_after == usize::MAX {
                assert_eq!(seqs.len(), 300, "reader {i} missed events");
            }
        }));
    }
    sending.await.unwrap();
    for check in checks {
        check.await.unwrap();
    }
    server.stop().await;
}
