//! `note`: internal notes reach agents and admins only — never a customer's socket, `join`
//! recovery or `historic`, nor an integration service — and mentioned users are notified with
//! their unread count.

mod common;

use std::time::Duration;

use common::*;
use gateway::auth::Role;
use serde_json::{json, Value};

const TENANT: &str = "acme";
const ROOM: &str = "conv-1";

/// A support conversation with customer `cust`.
async fn conversation(server: &TestServer) {
    create_room(
        server,
        &token("root", TENANT, Role::Admin),
        json!({"room_id": ROOM, "kind": "support", "participants": ["cust"]}),
    )
    .await;
}

async fn note(client: &mut Client, text: &str, mentions: &[&str]) -> Value {
    let user = client.user.clone();
    client
        .request(
            "note",
            Some(ROOM),
            json!({"message": text, "sender": user, "mentions": mentions}),
        )
        .await
}

#[tokio::test]
async fn a_note_reaches_agents_and_admins_and_never_the_customer_or_a_service() {
    let server = TestServer::start().await;
    conversation(&server).await;
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    let mut boss = server.connect("boss", TENANT, Role::Admin).await;
    let mut cust = server.connect("cust", TENANT, Role::Customer).await;
    let mut bot = server.connect("sms-worker", TENANT, Role::Service).await;
    for client in [&mut alice, &mut boss, &mut cust, &mut bot] {
        client.join(ROOM).await;
    }
    // Joins announce presence; what matters below is what comes after.
    for client in [&mut alice, &mut boss, &mut cust, &mut bot] {
        client.drain(Duration::from_millis(200)).await;
    }

    let reply = note(&mut alice, "customer is upset, go gently", &["boss"]).await;
    assert_eq!(reply["status"], "success", "{reply}");
    assert_eq!(reply["code"], "note_response");
    assert_eq!(reply["data"]["direction"], "NOTE");
    assert_eq!(reply["data"]["mentions"], json!(["boss"]));
    assert_eq!(reply["data"]["seq"], 1);

    let event = boss.recv_code("note_response").await;
    assert_eq!(event["data"]["message"], "customer is upset, go gently");
    assert_eq!(event["user_id"], "alice");
    assert!(event.get("ref").is_none(), "{event}");

    // A chat after it reaches everyone: the customer's next frame is that chat, not the note.
    let chat = alice.chat(ROOM, "hello, how can I help?").await;
    assert_eq!(chat["data"]["seq"], 2);
    for client in [&mut cust, &mut bot] {
        let seen = client.recv().await;
        assert_eq!(seen["code"], "chat_response", "{seen}");
        assert_eq!(seen["data"]["seq"], 2, "{seen}");
        for frame in client.drain(Duration::from_millis(300)).await {
            assert_ne!(frame["code"], "note_response", "{frame}");
            assert_ne!(frame["data"]["direction"], "NOTE", "{frame}");
        }
    }

    // Reads: the customer's and the service's history skip the note; an agent's has it.
    for client in [&mut cust, &mut bot] {
        let page = client.request("historic", Some(ROOM), json!({})).await;
        let seqs: Vec<u64> = page["data"]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, [2], "{page}");
    }
    let page = boss.request("historic", Some(ROOM), json!({})).await;
    assert_eq!(page["data"]["messages"].as_array().unwrap().len(), 2);

    // Recovery after a reconnect never carries it either.
    drop(cust);
    let mut cust = server.connect("cust", TENANT, Role::Customer).await;
    let joined = cust
        .request("join", Some(ROOM), json!({"since_seq": 0}))
        .await;
    let missed: Vec<&Value> = joined["data"]["missed"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert_eq!(missed.len(), 1, "{joined}");
    assert_eq!(missed[0]["seq"], 2);
    server.stop().await;
}

#[tokio::test]
async fn only_agents_and_admins_write_notes() {
    let server = TestServer::start().await;
    conversation(&server).await;
    let mut cust = server.connect("cust", TENANT, Role::Customer).await;
    cust.join(ROOM).await;
    let mut bot = server.connect("sms-worker", TENANT, Role::Service).await;
    bot.join(ROOM).await;
    for client in [&mut cust, &mut bot] {
        let reply = note(client, "let me in", &[]).await;
        assert_eq!(reply["status"], "error", "{reply}");
        assert_eq!(reply["code"], "note_response");
        assert_eq!(reply["data"]["error_code"], "FORBIDDEN");
    }
    // Nothing was stored.
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    alice.join(ROOM).await;
    let page = alice.request("historic", Some(ROOM), json!({})).await;
    assert_eq!(page["data"]["messages"], json!([]));
    // Not joined: the shared rule answers first.
    let mut bob = server.connect("bob", TENANT, Role::Agent).await;
    let reply = note(&mut bob, "hi", &[]).await;
    assert_eq!(reply["data"]["error_code"], "NOT_JOINED", "{reply}");
    server.stop().await;
}

#[tokio::test]
async fn bad_mentions_are_refused_naming_the_field() {
    let server = TestServer::start().await;
    conversation(&server).await;
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    alice.join(ROOM).await;
    let too_many: Vec<String> = (0..21).map(|n| format!("u{n}")).collect();
    let long = "x".repeat(65);
    for mentions in [
        json!(too_many),
        json!([""]),
        json!([long]),
        json!("bob"),
        json!([1, 2]),
    ] {
        let reply = alice
            .request(
                "note",
                Some(ROOM),
                json!({"message": "hi", "sender": "alice", "mentions": mentions}),
            )
            .await;
        assert_eq!(reply["status"], "error", "{mentions}: {reply}");
        assert_eq!(reply["data"]["error_code"], "BAD_REQUEST", "{reply}");
        let message = reply["data"]["message"].as_str().unwrap();
        assert!(message.contains("mentions"), "{message}");
    }
    let page = alice.request("historic", Some(ROOM), json!({})).await;
    assert_eq!(page["data"]["messages"], json!([]));
    server.stop().await;
}

#[tokio::test]
async fn mentioned_users_are_notified_on_every_connection_with_their_unread_count() {
    let server = TestServer::start().await;
    conversation(&server).await;
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    alice.join(ROOM).await;
    // Bob is online on two connections but has not opened the conversation.
    let mut bob_desk = server.connect("bob", TENANT, Role::Agent).await;
    let mut bob_phone = server.connect("bob", TENANT, Role::Agent).await;
    let mut cust = server.connect("cust", TENANT, Role::Customer).await;
    cust.join(ROOM).await;

    cust.chat(ROOM, "my order is late").await;
    // Mentions of oneself and of users who are offline notify nobody.
    let first = note(
        &mut alice,
        "@bob can you check the order?",
        &["bob", "alice", "carol"],
    )
    .await;
    assert_eq!(first["status"], "success", "{first}");
    for bob in [&mut bob_desk, &mut bob_phone] {
        let n = bob.recv_code("notification_response").await;
        assert_eq!(n["status"], "success");
        assert_eq!(n["user_id"], "bob", "{n}");
        assert_eq!(n["room_id"], ROOM);
        assert_eq!(n["data"]["type"], "mention");
        assert_eq!(n["data"]["title"], "alice mentioned you");
        assert_eq!(n["data"]["message"], "@bob can you check the order?");
        assert_eq!(n["data"]["data"]["seq"], first["data"]["seq"]);
        assert_eq!(n["data"]["data"]["message_id"], first["data"]["message_id"]);
        // The customer's chat and the note: both unread for bob.
        assert_eq!(n["data"]["data"]["unread_count"], 2, "{n}");
    }
    alice.expect_silence(Duration::from_millis(300)).await;

    // Bob reads up to the note; the next mention counts only what came after.
    bob_desk.join(ROOM).await;
    let receipt = bob_desk
        .request(
            "read_receipt",
            Some(ROOM),
            json!({"message_id": first["data"]["message_id"], "sender": "bob"}),
        )
        .await;
    assert_eq!(receipt["data"]["unread_count"], 0, "{receipt}");
    cust.chat(ROOM, "hello?").await;
    let second = note(&mut alice, "@bob ping", &["bob"]).await;
    let n = bob_phone.recv_code("notification_response").await;
    assert_eq!(n["data"]["data"]["seq"], second["data"]["seq"]);
    assert_eq!(n["data"]["data"]["unread_count"], 2, "{n}");
    // A notification goes to the user, not to the other agents in the room.
    alice.expect_silence(Duration::from_millis(300)).await;
    server.stop().await;
}

/// Notes and chats pipelined together from two agents: the customer gets every chat, in order,
/// and not one note, live or when recovering after a reconnect.
#[tokio::test]
async fn a_customer_never_sees_a_note_under_mixed_load_or_after_reconnecting() {
    let server = TestServer::start_with(|c| c.rate_burst = 1000).await;
    conversation(&server).await;
    let mut cust = server.connect("cust", TENANT, Role::Customer).await;
    cust.join(ROOM).await;
    let mut agents = Vec::new();
    for name in ["alice", "bob"] {
        let mut raw = RawClient::connect(server.addr, &token(name, TENANT, Role::Agent)).await;
        raw.recv_json(Duration::from_secs(5)).await.unwrap();
        raw.send_text(
            &json!({"code": "join", "user_id": name, "room_id": ROOM, "data": {}}).to_string(),
        )
        .await;
        agents.push((name, raw));
    }
    const EACH: usize = 100;
    for (name, raw) in &mut agents {
        let frames: Vec<String> = (0..EACH)
            .map(|n| {
                let code = if n % 2 == 0 { "chat" } else { "note" };
                json!({"code": code, "user_id": name, "room_id": ROOM,
                       "data": {"message": format!("{code} {n} from {name}"), "sender": name}})
                .to_string()
            })
            .collect();
        raw.send_texts(&frames).await;
    }
    // Every chat arrives (EACH / 2 from each agent), and nothing else that carries a message.
    let mut chats = Vec::new();
    while chats.len() < EACH {
        let frame = cust.recv().await;
        assert_ne!(frame["code"], "note_response", "{frame}");
        assert_ne!(frame["data"]["direction"], "NOTE", "{frame}");
        if frame["code"] == "chat_response" {
            chats.push(frame["data"]["seq"].as_u64().unwrap());
        }
    }
    for frame in cust.drain(Duration::from_millis(500)).await {
        assert_ne!(frame["data"]["direction"], "NOTE", "{frame}");
    }
    assert!(chats.windows(2).all(|w| w[0] < w[1]), "in order: {chats:?}");

    drop(cust);
    let mut cust = server.connect("cust", TENANT, Role::Customer).await;
    let joined = cust
        .request("join", Some(ROOM), json!({"since_seq": 0, "limit": 500}))
        .await;
    let missed: Vec<u64> = joined["data"]["missed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_ne!(m["direction"], "NOTE", "{m}");
            m["seq"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(missed, chats, "recovery has exactly the chats");
    server.stop().await;
}
