//! Protocol chaos: many clients of two tenants, spread over several shards, send random
//! pipelined sequences of every code (valid, invalid, oversized, binary, for loaded and unloaded
//! rooms, for rooms of the other tenant), and drop their connections in the middle. Afterwards
//! the process is alive, every request got at most one reply (exactly one on a connection that
//! stayed open), every room's stored `seq` is gap-free, every acknowledged message is stored once
//! with the `seq` it was acknowledged with, and no customer ever saw a note.
//!
//! CI runs it for a few seconds. The long run is the same test with more time and clients:
//! `CHAOS_SECS=600 CHAOS_CLIENTS=64 cargo test --release -p gateway --test chaos`
//! (`CHAOS_SEED` replays a run; each run prints its seed).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use gateway::auth::Role;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const TENANTS: [&str; 2] = ["t1", "t2"];
const ROOMS: usize = 6;
const MAX_MESSAGE_BYTES: usize = 8 * 1024;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Who a chaos client speaks for.
#[derive(Clone)]
struct Identity {
    user: String,
    tenant: &'static str,
    role: Role,
}

/// What every client found, merged at the end.
#[derive(Default)]
struct Findings {
    /// (tenant, room, message_id) → seq it was acknowledged with.
    acked: HashMap<(String, String, String), u64>,
    requests: u64,
    replies: u64,
    sessions: u64,
}

fn room_name(rng: &mut StdRng) -> String {
    match rng.random_range(0..10) {
        0..=5 => format!("room-{}", rng.random_range(0..ROOMS)),
        6..=7 => format!("support-{}", rng.random_range(0..2)),
        // A room nobody created yet: loading, creation and NOT_FOUND paths.
        _ => format!("fresh-{}", rng.random_range(0..1000)),
    }
}

/// One random frame; `Some(ref)` when a reply is due (typing and presence answer only errors).
fn random_frame(rng: &mut StdRng, me: &Identity, n: u64) -> (Message, Option<String>, bool) {
    let reference = format!("q{n}");
    let room = room_name(rng);
    let user = me.user.as_str();
    let envelope = |code: &str, data: Value| json!({"code": code, "user_id": user, "room_id": room, "data": data, "ref": reference});
    if rng.random_bool(0.01) {
        // A frame the server closes the connection for: over the message limit (1009), or
        // binary (1003).
        let message = if rng.random_bool(0.5) {
            Message::text("x".repeat(MAX_MESSAGE_BYTES + 1))
        } else {
            Message::binary(vec![1u8, 2, 3])
        };
        return (message, None, true);
    }
    let value = match rng.random_range(0..100) {
        0..=17 => envelope("join", json!({})),
        18..=22 => envelope(
            "join",
            json!({"since_seq": rng.random_range(0..20), "limit": 50}),
        ),
        23..=27 => envelope("leave", json!({})),
        28..=49 => {
            let mut data = json!({"message": format!("m{n}"), "sender": user});
            if rng.random_bool(0.3) {
                // Reused ids exercise idempotency (same id, same room: the original reply).
                data["message_id"] = json!(format!("{user}-{}", rng.random_range(0..20)));
            }
            envelope("chat", data)
        }
        50..=55 => {
            let status = if rng.random_bool(0.5) {
                "started"
            } else {
                "stopped"
            };
            let v = envelope("typing", json!({"status": status, "sender": user}));
            return (Message::text(v.to_string()), None, false);
        }
        56..=59 => {
            let v = json!({"code": "presence", "user_id": user,
                           "data": {"status": "away", "sender": user}, "ref": reference});
            return (Message::text(v.to_string()), None, false);
        }
        60..=64 => envelope(
            "read_receipt",
            json!({"message_id": format!("{user}-{}", rng.random_range(0..20)), "sender": user}),
        ),
        65..=74 => envelope(
            "historic",
            json!({"limit": rng.random_range(1..60), "before_seq": rng.random_range(1..50)}),
        ),
        75..=77 => envelope("historic", json!({"search": "m1"})),
        78..=80 => {
            json!({"code": "ping", "user_id": user, "data": {}, "ref": reference})
        }
        81..=84 => {
            // Someone else's user_id: FORBIDDEN.
            json!({"code": "chat", "user_id": "mallory", "room_id": room,
                   "data": {"message": "x", "sender": "mallory"}, "ref": reference})
        }
        85..=88 => envelope("no_such_code", json!({})),
        89..=92 => envelope("chat", json!({"message": 42})),
        _ => {
            // Not JSON at all: a reply with code "error" and no ref.
            return (Message::text("{not json"), None, false);
        }
    };
    (Message::text(value.to_string()), Some(reference), false)
}

/// One connection's life: connect, send a random pipelined burst or several, maybe drop the
/// connection mid-flight, check the replies.
async fn session(
    url_for: &(dyn Fn(&Identity) -> String + Sync),
    me: &Identity,
    rng: &mut StdRng,
    counter: &mut u64,
    findings: &Mutex<Findings>,
) {
    let (ws, _) = tokio_tungstenite::connect_async(url_for(me))
        .await
        .expect("handshake");
    let (mut sink, mut stream) = ws.split();
    let mut expected: HashSet<String> = HashSet::new();
    let mut sent_chats: HashMap<String, Option<String>> = HashMap::new();
    let mut ended_early = false;
    let bursts = rng.random_range(1..4);
    let mut frames = Vec::new();
    for _ in 0..bursts {
        for _ in 0..rng.random_range(1..40) {
            *counter += 1;
            let (message, reference, kills) = random_frame(rng, me, *counter);
            if let (Some(r), Message::Text(text)) = (&reference, &message) {
                let v: Value = serde_json::from_str(text).unwrap();
                if v["code"] == "chat" {
                    sent_chats.insert(r.clone(), v["data"]["message_id"].as_str().map(Into::into));
                }
                expected.insert(r.clone());
            }
            frames.push(message);
            if kills {
                ended_early = true;
                break;
            }
        }
        if ended_early {
            break;
        }
    }
    let drop_mid_flight = rng.random_bool(0.2);
    let request_count = expected.len() as u64;
    let mut all = futures_util::stream::iter(frames.into_iter().map(Ok));
    if sink.send_all(&mut all).await.is_err() {
        ended_early = true;
    }
    if drop_mid_flight {
        // Gone with requests in flight: the server must cope, and answers nothing more here.
        drop(sink);
        drop(stream);
        let mut f = findings.lock().unwrap();
        f.sessions += 1;
        f.requests += request_count;
        return;
    }

    let mut seen: HashSet<String> = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut acked = Vec::new();
    let mut closed = false;
    while seen.len() < expected.len() {
        let next = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(_) => {
                closed = true;
                break;
            }
            Err(_) => break,
        };
        let text = match message_text(&next) {
            Some(text) => text,
            None if matches!(next, Message::Close(_)) => {
                closed = true;
                break;
            }
            None => continue,
        };
        let v: Value = serde_json::from_str(&text).expect("server frames are json");
        if me.role == Role::Customer {
            assert!(
                !text.contains("\"NOTE\""),
                "a customer received a note: {text}"
            );
        }
        let Some(reference) = v["ref"].as_str() else {
            continue;
        };
        if !expected.contains(reference) {
            continue;
        }
        assert!(
            seen.insert(reference.to_owned()),
            "two replies to {reference}: {v}"
        );
        if v["code"] == "chat_response" && v["status"] == "success" {
            let data = &v["data"];
            let message_id = data["message_id"].as_str().unwrap().to_owned();
            if let Some(Some(given)) = sent_chats.get(reference) {
                assert_eq!(given, &message_id, "{v}");
            }
            acked.push((
                v["room_id"].as_str().unwrap().to_owned(),
                message_id,
                data["seq"].as_u64().unwrap(),
            ));
        }
    }
    if !ended_early && !closed {
        let missing: Vec<_> = expected.difference(&seen).collect();
        assert!(missing.is_empty(), "no reply to {missing:?} ({})", me.user);
    }
    let mut f = findings.lock().unwrap();
    f.sessions += 1;
    f.requests += request_count;
    f.replies += seen.len() as u64;
    for (room, message_id, seq) in acked {
        let key = (me.tenant.to_owned(), room, message_id);
        if let Some(previous) = f.acked.insert(key.clone(), seq) {
            assert_eq!(
                previous, seq,
                "one message_id acknowledged with two seqs: {key:?}"
            );
        }
    }
}

fn message_text(message: &Message) -> Option<String> {
    match message {
        Message::Text(text) => Some(text.to_string()),
        _ => None,
    }
}

/// Every stored message of a room, oldest first, read as the tenant's admin.
async fn stored(server: &TestServer, tenant: &str, room: &str) -> Vec<Value> {
    let mut admin = server.connect("auditor", tenant, Role::Admin).await;
    let mut messages: Vec<Value> = Vec::new();
    let mut after = 0;
    loop {
        let v = admin
            .request(
                "historic",
                Some(room),
                json!({"after_seq": after, "limit": 200}),
            )
            .await;
        if v["status"] != "success" {
            return messages;
        }
        let page = v["data"]["messages"].as_array().unwrap().clone();
        if page.is_empty() {
            return messages;
        }
        after = page.last().unwrap()["seq"].as_u64().unwrap();
        messages.extend(page);
        if v["data"]["has_more"] != true {
            return messages;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_pipelined_traffic_never_breaks_the_gateway_or_its_data() {
    let secs = env_or("CHAOS_SECS", 6);
    let clients = env_or("CHAOS_CLIENTS", 12) as usize;
    let seed = env_or("CHAOS_SEED", rand::rng().random());
    println!("chaos: {clients} clients for {secs} s, CHAOS_SEED={seed}");

    let dir = tempfile::tempdir().unwrap();
    seed_notes(dir.path()).await;
    let server = TestServer::start_in(dir, |c| {
        c.shards = 3;
        c.max_message_bytes = MAX_MESSAGE_BYTES;
        c.rate_limit = 2_000;
        c.rate_burst = 400;
        c.rooms_per_connection = 20;
        c.rooms_per_tenant_minute = 1_000_000;
    })
    .await;
    let addr = server.addr;
    let url_for = move |me: &Identity| {
        format!(
            "ws://{addr}/ws?token={}",
            token(&me.user, me.tenant, me.role)
        )
    };

    let findings = Arc::new(Mutex::new(Findings::default()));
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..clients {
        let tenant = TENANTS[i % 2];
        let me = match i % 4 {
            0 | 1 => Identity {
                user: format!("agent-{i}"),
                tenant,
                role: Role::Agent,
            },
            2 => Identity {
                user: format!("admin-{i}"),
                tenant,
                role: Role::Admin,
            },
            _ => Identity {
                user: format!("cust-{}", i % 2),
                tenant,
                role: Role::Customer,
            },
        };
        let findings = findings.clone();
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(i as u64));
        tasks.push(tokio::spawn(async move {
            let mut counter = 0;
            while Instant::now() < until {
                session(&url_for, &me, &mut rng, &mut counter, &findings).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    // Alive: every shard still answers.
    let mut probe = server.connect("probe", "t1", Role::Admin).await;
    for i in 0..6 {
        let room = format!("probe-{i}");
        assert_eq!(probe.join(&room).await["status"], "success");
        assert_eq!(probe.chat(&room, "ok").await["status"], "success");
    }
    let (status, _) = http_get(addr, "/readyz").await;
    assert_eq!(status, 200);

    // Stored data: gap-free seqs, each acknowledged message once with its seq.
    let findings = std::mem::take(&mut *findings.lock().unwrap());
    let mut rooms: HashSet<(String, String)> = findings
        .acked
        .keys()
        .map(|(t, r, _)| (t.clone(), r.clone()))
        .collect();
    for tenant in TENANTS {
        for i in 0..ROOMS {
            rooms.insert((tenant.to_owned(), format!("room-{i}")));
        }
    }
    let mut stored_total = 0;
    for (tenant, room) in &rooms {
        let messages = stored(&server, tenant, room).await;
        let seqs: Vec<u64> = messages
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "{tenant}/{room} has a gap"
        );
        let mut ids = HashMap::new();
        for m in &messages {
            let id = m["message_id"].as_str().unwrap().to_owned();
            assert!(
                ids.insert(id.clone(), m["seq"].as_u64().unwrap()).is_none(),
                "{tenant}/{room} stores {id} twice"
            );
        }
        for ((t, r, id), seq) in &findings.acked {
            if t == tenant && r == room {
                assert_eq!(
                    ids.get(id),
                    Some(seq),
                    "acknowledged {id} in {t}/{r} not stored"
                );
            }
        }
        stored_total += messages.len();
    }
    println!(
        "chaos: {} sessions, {} requests, {} replies, {} messages acknowledged, {stored_total} stored",
        findings.sessions,
        findings.requests,
        findings.replies,
        findings.acked.len()
    );
    assert!(findings.acked.len() > 10, "the run stored almost nothing");
    server.stop().await;
}

/// Support rooms holding a note each, for the customers of each tenant (no protocol code
/// writes notes yet, so they go straight into the store before the gateway starts).
async fn seed_notes(dir: &std::path::Path) {
    let store = storage::open(&test_config(dir).store_url()).unwrap();
    for tenant in TENANTS {
        for i in 0..2 {
            let room = format!("support-{i}");
            let mut new_room = storage::NewRoom::team(&room, tenant, "admin-0");
            new_room.kind = storage::RoomKind::Support;
            new_room.participants = vec![format!("cust-{i}"), "admin-0".to_owned()];
            let (created, _) = storage::Store::create_room(&store, new_room).await.unwrap();
            let mut note =
                storage::NewMessage::text(&created.key(), 1, "admin-0", "internal: refund ok");
            note.sender_type = storage::SenderType::Agent;
            note.direction = storage::Direction::Note;
            storage::Store::append(&store, note).await.unwrap();
        }
    }
    storage::Store::close(&store).await.unwrap();
}
