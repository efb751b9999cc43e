//! Happy paths of the coded JSON protocol (PROTOCOL.md §1-4) and the HTTP API, against a real
//! gateway on port 0 with an independent WebSocket client (tokio-tungstenite).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use gateway::auth::Role;
use serde_json::{json, Value};

const TENANT: &str = "acme";
const QUIET: Duration = Duration::from_millis(300);

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("expected an object, got {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// `2023-05-01T12:34:56.789Z`.
fn assert_timestamp(v: &Value) {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("timestamp is not a string: {v}"));
    assert_eq!(s.len(), 24, "{s}");
    assert!(
        s.ends_with('Z') && &s[10..11] == "T" && &s[19..20] == ".",
        "{s}"
    );
    assert!(
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_ok(),
        "{s}"
    );
}

fn assert_error(v: &Value, code: &str, error_code: &str) {
    assert_eq!(v["status"], "error", "{v}");
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["data"]["error_code"], error_code, "{v}");
    assert!(v["data"]["message"].is_string(), "{v}");
}

fn seqs(messages: &Value) -> Vec<u64> {
    messages
        .as_array()
        .unwrap_or_else(|| panic!("expected an array, got {messages}"))
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

async fn agent(server: &TestServer, user: &str) -> Client {
    server.connect(user, TENANT, Role::Agent).await
}

/// Sends `n` chats without waiting in between, then collects the `n` direct replies.
async fn fill(client: &mut Client, room: &str, texts: &[String]) {
    let user = client.user.clone();
    for (i, text) in texts.iter().enumerate() {
        client
            .send(
                json!({"code": "chat", "user_id": user, "room_id": room, "ref": format!("fill-{i}"),
                         "data": {"message": text, "sender": user}}),
            )
            .await;
    }
    let mut got = 0;
    while got < texts.len() {
        let v = client.recv().await;
        if v["code"] == "chat_response" && v["ref"].is_string() {
            assert_eq!(v["status"], "success", "{v}");
            got += 1;
        }
    }
}

fn normal_close() -> tokio_tungstenite::tungstenite::protocol::CloseFrame {
    tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: close_code(1000),
        reason: "bye".into(),
    }
}

fn numbered(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("msg {i}")).collect()
}

/// A server whose request bucket does not get in the way of filling rooms quickly.
async fn roomy_server() -> TestServer {
    TestServer::start_with(|c| {
        c.rate_limit = 10_000;
        c.rate_burst = 10_000;
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// connected, join, leave

#[tokio::test]
async fn connected_frame_carries_session_tenant_and_heartbeat() {
    let server = TestServer::start().await;
    let a = agent(&server, "alice").await;
    let a2 = agent(&server, "alice").await;
    let c = &a.connected;
    assert_eq!(
        keys(c),
        set(&["status", "code", "user_id", "timestamp", "data"])
    );
    assert_eq!(c["status"], "success");
    assert_eq!(c["code"], "connected");
    assert_eq!(c["user_id"], "alice");
    assert_timestamp(&c["timestamp"]);
    assert_eq!(
        keys(&c["data"]),
        set(&["session_id", "tenant_id", "heartbeat_ms"])
    );
    let session = c["data"]["session_id"].as_str().unwrap();
    assert!(!session.is_empty());
    assert_eq!(c["data"]["tenant_id"], TENANT);
    assert_eq!(c["data"]["heartbeat_ms"], 30_000);
    assert_ne!(a2.connected["data"]["session_id"], c["data"]["session_id"]);
    server.stop().await;
}

#[tokio::test]
async fn connected_frame_reports_the_configured_heartbeat() {
    let server = TestServer::start_with(|c| c.heartbeat_ms = 1234).await;
    let a = agent(&server, "alice").await;
    assert_eq!(a.connected["data"]["heartbeat_ms"], 1234);
    server.stop().await;
}

#[tokio::test]
async fn join_of_a_new_room_creates_a_team_room() {
    let server = TestServer::start().await;
    let mut a = agent(&server, "alice").await;
    let v = a.request("join", Some("fresh-room"), json!({})).await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(v["code"], "join_response");
    assert_eq!(v["user_id"], "alice");
    assert_eq!(v["room_id"], "fresh-room");
    assert!(v["ref"].is_string());
    assert_timestamp(&v["timestamp"]);
    assert_eq!(keys(&v["data"]), set(&["room", "presence"]));
    let room = &v["data"]["room"];
    assert_eq!(
        keys(room),
        set(&["room_id", "kind", "title", "status", "last_seq"])
    );
    assert_eq!(room["room_id"], "fresh-room");
    assert_eq!(room["kind"], "team");
    assert_eq!(room["title"], "fresh-room");
    assert_eq!(room["status"], "active");
    assert_eq!(room["last_seq"], 0);
    assert_eq!(
        v["data"]["presence"],
        json!([{"user_id": "alice", "status": "online"}])
    );
    // The creator is a participant: the room survives and POST /api/rooms finds it.
    let (status, body) = http_post(
        server.addr,
        "/api/rooms",
        Some(&token("admin", TENANT, Role::Admin)),
        &json!({"room_id": "fresh-room", "kind": "team"}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["participants"], json!(["alice"]));
    assert_eq!(body["tenant_id"], TENANT);
    server.stop().await;
}

#[tokio::test]
async fn joining_twice_is_harmless_and_answers_the_same_shape() {
    let server = TestServer::start().await;
    let mut a = agent(&server, "alice").await;
    let first = a.join("twice").await;
    let second = a.join("twice").await;
    assert_eq!(keys(&first), keys(&second));
    assert_eq!(first["data"], second["data"]);
    assert_eq!(keys(&second["data"]), set(&["room", "presence"]));
    assert_eq!(second["data"]["room"]["kind"], "team");
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    b.join("twice").await;
    // Still one membership: one event per chat, and no duplicate of one's own message.
    assert_eq!(
        a.recv_code("presence_response").await["data"]["sender"],
        "bob"
    );
    let r = b.chat("twice", "hello").await;
    assert_eq!(r["status"], "success", "{r}");
    let events = a.drain(QUIET).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["data"]["message"], "hello");
    let r = a.chat("twice", "back").await;
    assert_eq!(r["data"]["seq"], 2);
    a.expect_silence(QUIET).await;
    let events = b.drain(QUIET).await;
    assert_eq!(events.len(), 1, "{events:?}");
    server.stop().await;
}

#[tokio::test]
async fn leave_stops_events_of_the_room() {
    let server = TestServer::start().await;
    let mut a = server.connect("alice", TENANT, Role::Admin).await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    a.join("lobby").await;
    b.join("lobby").await;
    a.recv_code("presence_response").await; // bob arrived
    let v = b.request("leave", Some("lobby"), json!({})).await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(v["code"], "leave_response");
    assert_eq!(v["room_id"], "lobby");
    assert_eq!(v["user_id"], "bob");
    assert_eq!(v["data"], json!({}));
    assert!(a.chat("lobby", "anyone?").await["status"] == "success");
    a.send(
        json!({"code": "typing", "user_id": "alice", "room_id": "lobby",
                  "data": {"status": "started", "sender": "alice"}}),
    )
    .await;
    a.send(json!({"code": "presence", "user_id": "alice",
                  "data": {"status": "busy", "sender": "alice"}}))
        .await;
    b.expect_silence(QUIET).await;
    // And bob may no longer post there.
    let v = b.chat("lobby", "hi").await;
    assert_error(&v, "chat_response", "NOT_JOINED");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// chat

#[tokio::test]
async fn chat_reply_carries_ref_and_message_and_every_other_connection_gets_one_event() {
    let server = TestServer::start().await;
    let mut a1 = agent(&server, "alice").await;
    let mut a2 = agent(&server, "alice").await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    a1.join("general").await;
    a2.join("general").await;
    b.join("general").await;
    // Settle the join announcements.
    a1.drain(QUIET).await;
    a2.drain(QUIET).await;

    a1.send(
        json!({"code": "chat", "user_id": "alice", "room_id": "general", "ref": "c-17",
                   "timestamp": "2023-05-01T12:34:56.789Z", "extra": true,
                   "data": {"message": "Hello", "sender": "alice"}}),
    )
    .await;
    let direct = a1.recv().await;
    assert_eq!(direct["status"], "success", "{direct}");
    assert_eq!(direct["code"], "chat_response");
    assert_eq!(direct["ref"], "c-17");
    assert_eq!(direct["user_id"], "alice");
    assert_eq!(direct["room_id"], "general");
    assert_timestamp(&direct["timestamp"]);
    let m = &direct["data"];
    assert_eq!(
        keys(m),
        set(&[
            "message_id",
            "seq",
            "room_id",
            "sender",
            "sender_type",
            "direction",
            "type",
            "message",
            "attached_files",
            "reply_to",
            "mentions",
            "metadata",
            "created_at"
        ])
    );
    assert!(!m["message_id"].as_str().unwrap().is_empty());
    assert_eq!(m["seq"], 1);
    assert_eq!(m["room_id"], "general");
    assert_eq!(m["sender"], "alice");
    assert_eq!(m["sender_type"], "agent");
    assert_eq!(m["direction"], "INTERNAL");
    assert_eq!(m["type"], "text");
    assert_eq!(m["message"], "Hello");
    assert_eq!(m["attached_files"], json!([]));
    assert_eq!(m["reply_to"], Value::Null);
    assert_eq!(m["mentions"], json!([]));
    assert_eq!(m["metadata"], json!({}));
    assert_timestamp(&m["created_at"]);
    // The client's timestamp is not authoritative.
    assert_ne!(m["created_at"], "2023-05-01T12:34:56.789Z");

    for other in [&mut a2, &mut b] {
        let events = other.drain(QUIET).await;
        assert_eq!(events.len(), 1, "{events:?}");
        let e = &events[0];
        assert_eq!(e["status"], "success");
        assert_eq!(e["code"], "chat_response");
        assert_eq!(e["user_id"], "alice");
        assert_eq!(e["room_id"], "general");
        assert!(e.get("ref").is_none(), "an event carries no ref: {e}");
        assert_eq!(&e["data"], m);
    }
    // No duplicate for the sender.
    a1.expect_silence(QUIET).await;
    server.stop().await;
}

#[tokio::test]
async fn chat_seq_starts_at_one_and_increases_without_gaps() {
    let server = TestServer::start().await;
    let mut a = agent(&server, "alice").await;
    a.join("seqs").await;
    for i in 1..=5u64 {
        let v = a.chat("seqs", &format!("m{i}")).await;
        assert_eq!(v["data"]["seq"], i, "{v}");
    }
    let v = a.request("join", Some("seqs"), json!({})).await;
    assert_eq!(v["data"]["room"]["last_seq"], 5);
    server.stop().await;
}

#[tokio::test]
async fn chat_type_defaults_to_text_and_keeps_the_given_type_and_fields() {
    let server = TestServer::start().await;
    let mut a = agent(&server, "alice").await;
    a.join("types").await;
    let v = a.chat("types", "plain").await;
    assert_eq!(v["data"]["type"], "text");
    let v = a
        .request(
            "chat",
            Some("types"),
            json!({"message": "**bold**", "sender": "alice", "type": "markdown",
                   "reply_to": v["data"]["message_id"], "metadata": {"k": [1, "two"]}}),
        )
        .await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(v["data"]["type"], "markdown");
    assert_eq!(v["data"]["metadata"], json!({"k": [1, "two"]}));
    assert!(v["data"]["reply_to"].is_string());
    server.stop().await;
}

#[tokio::test]
async fn chat_with_attached_files_may_have_an_empty_message() {
    let server = TestServer::start().await;
    let mut a = agent(&server, "alice").await;
    a.join("files").await;
    let bearer = token("alice", "acme", Role::Agent);
    let pdf = upload_file(&server, &bearer, "b.pdf", "application/pdf", None).await;
    let v = a
        .request(
            "chat",
            Some("files"),
            json!({"message": "", "sender": "alice", "type": "image",
                   "attached_files": ["https://cdn.example/a.png", pdf]}),
        )
        .await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(v["data"]["message"], "");
    assert_eq!(
        v["data"]["attached_files"],
        json!(["https://cdn.example/a.png", pdf])
    );
    assert_eq!(v["data"]["type"], "image");
    server.stop().await;
}

#[tokio::test]
async fn an_attached_file_id_must_name_an_uploaded_file_of_the_tenant_and_room() {
    let server = TestServer::start().await;
    support_room(&server, "att-1", "cust-1").await;
    support_room(&server, "att-2", "cust-2").await;
    let mut a = agent(&server, "alice").await;
    a.join("att-1").await;
    let bearer = token("alice", "acme", Role::Agent);
    let here = upload_file(&server, &bearer, "a.png", "image/png", Some("att-1")).await;
    let there = upload_file(&server, &bearer, "b.png", "image/png", Some("att-2")).await;
    let globex = upload_file(
        &server,
        &token("g", "globex", Role::Agent),
        "c.png",
        "image/png",
        None,
    )
    .await;
    for unknown in ["file_789", there.as_str(), globex.as_str()] {
        let data = json!({"message": "look", "sender": "alice", "attached_files": [here, unknown]});
        let refused = a.request("chat", Some("att-1"), data).await;
        assert_eq!(refused["data"]["error_code"], "BAD_REQUEST", "{refused}");
        let message = refused["data"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("data.attached_files[1]: no file"),
            "{message}"
        );
    }
    // Pipelined behind a message whose files are being looked up, a plain one keeps its place.
    let first = json!({"code": "chat", "user_id": "alice", "room_id": "att-1", "ref": "1",
                       "data": {"message": "with file", "sender": "alice", "attached_files": [here]}});
    let second = json!({"code": "chat", "user_id": "alice", "room_id": "att-1", "ref": "2",
                        "data": {"message": "plain", "sender": "alice"}});
    a.send(first).await;
    a.send(second).await;
    let one = a.recv_code("chat_response").await;
    let two = a.recv_code("chat_response").await;
    assert_eq!(
        (one["ref"].as_str(), two["ref"].as_str()),
        (Some("1"), Some("2"))
    );
    assert!(one["data"]["seq"].as_u64() < two["data"]["seq"].as_u64());
    let page = a.request("historic", Some("att-1"), json!({})).await;
    assert_eq!(
        page["data"]["messages"].as_array().unwrap().len(),
        2,
        "{page}"
    );
    server.stop().await;
}

#[tokio::test]
async fn typed_messages_carry_described_attachments_and_rich_payloads() {
    let server = TestServer::start().await;
    support_room(&server, "typed", "cust").await;
    let mut a = agent(&server, "alice").await;
    a.join("typed").await;
    let mut b = agent(&server, "bob").await;
    b.join("typed").await;
    let png = json!({"url": "https://cdn.example/a.png", "content_type": "image/png",
                     "name": "a.png", "size": 48213});
    let image = a
        .request(
            "chat",
            Some("typed"),
            json!({"message": "", "sender": "alice", "type": "image",
                   "attached_files": ["https://cdn.example/file_789"], "metadata": {"attachments": [png]}}),
        )
        .await;
    assert_eq!(image["status"], "success", "{image}");
    assert_eq!(
        image["data"]["attached_files"],
        json!(["https://cdn.example/file_789"])
    );
    assert_eq!(image["data"]["metadata"]["attachments"], json!([png]));
    let event = b.recv_code("chat_response").await;
    assert_eq!(event["data"]["metadata"]["attachments"][0], png);
    let card = json!({"title": "Plan A", "image_url": "https://cdn.example/a.png",
                      "buttons": [{"title": "Buy", "value": "buy-a"}]});
    let rich = a
        .request(
            "chat",
            Some("typed"),
            json!({"message": "Plan A", "sender": "alice", "type": "carousel",
                   "metadata": {"payload": {"cards": [card]}}}),
        )
        .await;
    assert_eq!(rich["status"], "success", "{rich}");
    assert_eq!(rich["data"]["metadata"]["payload"]["cards"][0], card);

    // Refused, naming the field; nothing is stored.
    for (data, names) in [
        (
            json!({"message": "", "sender": "alice", "type": "video",
                   "metadata": {"attachments": [png]}}),
            "data.metadata.attachments[0].content_type must be video/*",
        ),
        (
            json!({"message": "", "sender": "alice", "type": "audio", "attached_files": []}),
            "data.attached_files: an audio message needs at least one attachment",
        ),
        (
            json!({"message": "", "sender": "alice", "type": "file",
                   "metadata": {"attachments": [{"url": "https://x/y", "content_type": "application/pdf", "bytes": 3}]}}),
            "invalid data.metadata.attachments[0].bytes: unknown field",
        ),
        (
            json!({"message": "here", "sender": "alice", "type": "location",
                   "metadata": {"payload": {"latitude": 48.8}}}),
            "invalid data.metadata.payload: missing field `longitude`",
        ),
        (
            json!({"message": "pick", "sender": "alice", "type": "choice",
                   "metadata": {"payload": {"options": [{"title": "Yes", "value": ""}]}}}),
            "data.metadata.payload.options[0].value must be 1 to 1024 bytes",
        ),
        (
            json!({"message": "hi", "sender": "alice", "metadata": {"payload": {"x": 1}}}),
            "data.metadata.payload belongs to location, card",
        ),
    ] {
        let refused = a.request("chat", Some("typed"), data).await;
        assert_eq!(refused["data"]["error_code"], "BAD_REQUEST", "{refused}");
        let message = refused["data"]["message"].as_str().unwrap();
        assert!(message.starts_with(names), "{message}");
    }
    let page = a.request("historic", Some("typed"), json!({})).await;
    let stored = page["data"]["messages"].as_array().unwrap();
    assert_eq!(stored.len(), 2, "{page}");
    assert_eq!(
        stored[0]["attached_files"],
        json!(["https://cdn.example/file_789"])
    );
    assert_eq!(stored[0]["metadata"]["attachments"], json!([png]));
    assert_eq!(stored[1]["type"], "carousel");
    server.stop().await;
}

#[tokio::test]
async fn chat_keeps_the_client_message_id() {
    let server = TestServer::start().await;
    let mut a = agent(&server, "alice").await;
    a.join("ids").await;
    let v = a
        .request(
            "chat",
            Some("ids"),
            json!({"message": "hi", "sender": "alice", "message_id": "client-id-1"}),
        )
        .await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(v["data"]["message_id"], "client-id-1");
    // Without one the server assigns distinct ids.
    let x = a.chat("ids", "one").await;
    let y = a.chat("ids", "two").await;
    assert_ne!(x["data"]["message_id"], y["data"]["message_id"]);
    server.stop().await;
}

#[tokio::test]
async fn retried_message_id_returns_the_original_and_broadcasts_nothing() {
    let server = TestServer::start().await;
    let mut a = server.connect("alice", TENANT, Role::Admin).await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    a.join("retry").await;
    b.join("retry").await;
    a.drain(QUIET).await;
    let data = json!({"message": "once", "sender": "alice", "message_id": "m-1"});
    let first = a.request("chat", Some("retry"), data.clone()).await;
    assert_eq!(first["status"], "success", "{first}");
    assert_eq!(
        b.recv_code("chat_response").await["data"]["message_id"],
        "m-1"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    // A retry, even with different text, returns the stored original.
    let retry = a
        .request(
            "chat",
            Some("retry"),
            json!({"message": "twice?", "sender": "alice", "message_id": "m-1"}),
        )
        .await;
    assert_eq!(retry["status"], "success", "{retry}");
    assert_eq!(retry["data"], first["data"]);
    assert_ne!(retry["ref"], first["ref"]);
    b.expect_silence(QUIET).await;
    a.expect_silence(QUIET).await;
    // Nothing was stored: the next message follows without a gap.
    let next = a.chat("retry", "next").await;
    assert_eq!(next["data"]["seq"], 2);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// typing, read_receipt, presence

#[tokio::test]
async fn typing_is_relayed_to_others_only_without_a_reply() {
    let server = TestServer::start().await;
    let mut a1 = server.connect("alice", TENANT, Role::Admin).await;
    let mut a2 = server.connect("alice", TENANT, Role::Admin).await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    a1.join("typing").await;
    a2.join("typing").await;
    b.join("typing").await;
    a1.drain(QUIET).await;
    a2.drain(QUIET).await;
    a1.send(
        json!({"code": "typing", "user_id": "alice", "room_id": "typing", "ref": "t-1",
                   "data": {"status": "started", "sender": "alice"}}),
    )
    .await;
    for other in [&mut b, &mut a2] {
        let events = other.drain(QUIET).await;
        assert_eq!(events.len(), 1, "{events:?}");
        let e = &events[0];
        assert_eq!(e["status"], "success");
        assert_eq!(e["code"], "typing_response");
        assert_eq!(e["user_id"], "alice");
        assert_eq!(e["room_id"], "typing");
        assert_eq!(e["data"], json!({"status": "started", "sender": "alice"}));
    }
    a1.expect_silence(QUIET).await;
    a1.send(
        json!({"code": "typing", "user_id": "alice", "room_id": "typing",
                   "data": {"status": "stopped", "sender": "alice"}}),
    )
    .await;
    assert_eq!(
        b.recv_code("typing_response").await["data"]["status"],
        "stopped"
    );
    a1.expect_silence(QUIET).await;
    server.stop().await;
}

#[tokio::test]
async fn read_receipt_replies_with_marker_and_notifies_others() {
    let server = TestServer::start().await;
    let mut a = server.connect("alice", TENANT, Role::Admin).await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    a.join("receipts").await;
    b.join("receipts").await;
    a.drain(QUIET).await;
    let m1 = a.chat("receipts", "first").await["data"].clone();
    let m2 = a.chat("receipts", "second").await["data"].clone();
    b.drain(QUIET).await;

    let v = b
        .request(
            "read_receipt",
            Some("receipts"),
            json!({"message_id": m1["message_id"], "sender": "bob"}),
        )
        .await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(v["code"], "read_receipt_response");
    assert_eq!(v["user_id"], "bob");
    assert_eq!(v["room_id"], "receipts");
    assert_eq!(v["data"]["message_id"], m1["message_id"]);
    assert_eq!(v["data"]["seq"], 1);
    assert_eq!(v["data"]["read_seq"], 1);
    assert_eq!(v["data"]["unread_count"], 1);
    assert_eq!(v["data"]["sender"], "bob");
    assert_timestamp(&v["data"]["read_at"]);

    let e = a.recv_code("read_receipt_response").await;
    assert_eq!(e["status"], "success");
    assert_eq!(e["user_id"], "bob");
    assert_eq!(e["room_id"], "receipts");
    assert!(e.get("ref").is_none(), "{e}");
    assert_eq!(
        keys(&e["data"]),
        set(&["message_id", "seq", "sender", "read_at"])
    );
    assert_eq!(e["data"]["message_id"], m1["message_id"]);
    assert_eq!(e["data"]["seq"], 1);
    assert_eq!(e["data"]["sender"], "bob");
    assert_timestamp(&e["data"]["read_at"]);

    let v = b
        .request(
            "read_receipt",
            Some("receipts"),
            json!({"message_id": m2["message_id"], "sender": "bob"}),
        )
        .await;
    assert_eq!(v["data"]["read_seq"], 2);
    assert_eq!(v["data"]["unread_count"], 0);
    assert_eq!(a.recv_code("read_receipt_response").await["data"]["seq"], 2);
    // No reply-echo for the reader itself.
    b.expect_silence(QUIET).await;
}

#[tokio::test]
async fn read_marker_never_moves_backwards() {
    let server = TestServer::start().await;
    let mut a = server.connect("alice", TENANT, Role::Admin).await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    a.join("marker").await;
    b.join("marker").await;
    let m1 = a.chat("marker", "older").await["data"].clone();
    let m2 = a.chat("marker", "newer").await["data"].clone();
    let v = b
        .request(
            "read_receipt",
            Some("marker"),
            json!({"message_id": m2["message_id"], "sender": "bob"}),
        )
        .await;
    assert_eq!(v["data"]["read_seq"], 2, "{v}");
    let v = b
        .request(
            "read_receipt",
            Some("marker"),
            json!({"message_id": m1["message_id"], "sender": "bob"}),
        )
        .await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(v["data"]["seq"], 1, "{v}");
    assert_eq!(v["data"]["read_seq"], 2, "{v}");
    assert_eq!(v["data"]["unread_count"], 0, "{v}");
    server.stop().await;
}

#[tokio::test]
async fn read_receipt_of_an_unknown_message_is_not_found_and_moves_nothing() {
    let server = TestServer::start().await;
    let mut a = server.connect("alice", TENANT, Role::Admin).await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    a.join("receipts-nf").await;
    b.join("receipts-nf").await;
    let m1 = a.chat("receipts-nf", "first").await["data"].clone();
    a.chat("receipts-nf", "second").await;
    // A message of another room is unknown in this one.
    a.join("elsewhere").await;
    let foreign = a.chat("elsewhere", "not here").await["data"].clone();
    a.drain(QUIET).await;
    b.drain(QUIET).await;

    for message_id in [json!("no-such-message"), foreign["message_id"].clone()] {
        let v = b
            .request(
                "read_receipt",
                Some("receipts-nf"),
                json!({"message_id": message_id, "sender": "bob"}),
            )
            .await;
        assert_error(&v, "read_receipt_response", "NOT_FOUND");
        assert_eq!(v["room_id"], "receipts-nf", "{v}");
    }
    // Nobody heard of it, and bob's marker did not move: both messages are still unread.
    a.expect_silence(QUIET).await;
    let v = b
        .request(
            "read_receipt",
            Some("receipts-nf"),
            json!({"message_id": m1["message_id"], "sender": "bob"}),
        )
        .await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(v["data"]["read_seq"], 1, "{v}");
    assert_eq!(v["data"]["unread_count"], 1, "{v}");
    server.stop().await;
}

/// The shard (of the test server's two) owning room `room_id` of [`TENANT`].
fn shard_of(room_id: &str) -> usize {
    gateway::shard::shard_of(&storage::RoomKey::new(TENANT, room_id), 2)
}

/// Two room names owned by different shards (the test server runs two).
fn rooms_on_two_shards() -> (String, String) {
    let first = "shared-0".to_owned();
    let s0 = shard_of(&first);
    let second = (1..)
        .map(|i| format!("shared-{i}"))
        .find(|r| shard_of(r) != s0)
        .unwrap();
    (first, second)
}

/// Two room names owned by the same shard.
fn rooms_on_one_shard() -> (String, String) {
    let first = "same-0".to_owned();
    let s0 = shard_of(&first);
    let second = (1..)
        .map(|i| format!("same-{i}"))
        .find(|r| shard_of(r) == s0)
        .unwrap();
    (first, second)
}

#[tokio::test]
async fn presence_change_reaches_each_connection_sharing_rooms_once_and_not_the_sender() {
    for (r1, r2) in [rooms_on_two_shards(), rooms_on_one_shard()] {
        let server = TestServer::start().await;
        let mut a = server.connect("alice", TENANT, Role::Admin).await;
        let mut b = server.connect("bob", TENANT, Role::Admin).await;
        let mut c = server.connect("carol", TENANT, Role::Admin).await;
        b.join(&r1).await;
        b.join(&r2).await;
        c.join("elsewhere").await;
        a.join(&r1).await;
        a.join(&r2).await;
        // bob hears alice arrive in each room.
        let arrivals = b.drain(QUIET).await;
        assert_eq!(arrivals.len(), 2, "{arrivals:?}");
        a.drain(QUIET).await;

        a.send(json!({"code": "presence", "user_id": "alice", "ref": "p-1",
                      "data": {"status": "away", "sender": "alice"}}))
            .await;
        let events = b.drain(QUIET).await;
        assert_eq!(events.len(), 1, "{events:?}");
        let e = &events[0];
        assert_eq!(e["status"], "success");
        assert_eq!(e["code"], "presence_response");
        assert_eq!(e["user_id"], "alice");
        assert_eq!(e["data"], json!({"status": "away", "sender": "alice"}));
        a.expect_silence(QUIET).await;
        c.expect_silence(Duration::from_millis(50)).await;

        // The same status again is not a change.
        a.send(
            json!({"code": "presence", "user_id": "alice", "room_id": r1,
                      "data": {"status": "away", "sender": "alice"}}),
        )
        .await;
        b.expect_silence(QUIET).await;
        // The new status shows in presence lists.
        let v = c.join(&r1).await;
        let presence = v["data"]["presence"].as_array().unwrap().clone();
        assert!(
            presence.contains(&json!({"user_id": "alice", "status": "away"})),
            "{presence:?}"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn joining_user_is_announced_to_the_room() {
    let server = TestServer::start().await;
    let mut a1 = server.connect("alice", TENANT, Role::Admin).await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    b.join("hall").await;
    let v = a1.join("hall").await;
    let presence = v["data"]["presence"].as_array().unwrap();
    assert!(presence.contains(&json!({"user_id": "bob", "status": "online"})));
    assert!(presence.contains(&json!({"user_id": "alice", "status": "online"})));
    let e = b.recv().await;
    assert_eq!(e["status"], "success");
    assert_eq!(e["code"], "presence_response", "{e}");
    assert_eq!(e["user_id"], "alice");
    assert_eq!(e["room_id"], "hall");
    assert_eq!(e["data"], json!({"status": "online", "sender": "alice"}));
    // Alice's second device joining is not a new arrival.
    let mut a2 = server.connect("alice", TENANT, Role::Admin).await;
    a2.join("hall").await;
    b.expect_silence(QUIET).await;
    server.stop().await;
}

#[tokio::test]
async fn last_connection_closing_announces_offline() {
    let server = TestServer::start().await;
    let mut a1 = server.connect("alice", TENANT, Role::Admin).await;
    let mut a2 = server.connect("alice", TENANT, Role::Admin).await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    b.join("exit").await;
    a1.join("exit").await;
    a2.join("exit").await;
    b.drain(QUIET).await;

    a1.ws.close(Some(normal_close())).await.unwrap();
    assert_eq!(a1.closed().await, Closed::Code(1000));
    b.expect_silence(QUIET).await; // alice is still online on a2

    a2.ws.close(Some(normal_close())).await.unwrap();
    assert_eq!(a2.closed().await, Closed::Code(1000));
    let events = b.drain(Duration::from_millis(500)).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["code"], "presence_response", "{e}");
    assert_eq!(e["user_id"], "alice");
    assert_eq!(e["data"], json!({"status": "offline", "sender": "alice"}));
    server.stop().await;
}

#[tokio::test]
async fn dropped_connection_announces_offline() {
    let server = TestServer::start().await;
    let a = server.connect("alice", TENANT, Role::Admin).await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    let mut a = a;
    b.join("drop").await;
    a.join("drop").await;
    b.drain(QUIET).await;
    drop(a); // no close handshake
    let e = b.recv_code("presence_response").await;
    assert_eq!(e["data"], json!({"status": "offline", "sender": "alice"}));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// historic and join since_seq

#[tokio::test]
async fn historic_without_cursors_returns_the_newest_limit_oldest_first() {
    let server = roomy_server().await;
    let mut a = agent(&server, "alice").await;
    a.join("hist").await;
    fill(&mut a, "hist", &numbered(10)).await;
    let v = a
        .request("historic", Some("hist"), json!({"limit": 3}))
        .await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(v["code"], "historic_response");
    assert_eq!(v["room_id"], "hist");
    assert_eq!(keys(&v["data"]), set(&["messages", "has_more"]));
    assert_eq!(seqs(&v["data"]["messages"]), vec![8, 9, 10]);
    assert_eq!(v["data"]["messages"][0]["message"], "msg 8");
    assert_eq!(v["data"]["has_more"], true);
    let v = a.request("historic", Some("hist"), json!({})).await;
    assert_eq!(seqs(&v["data"]["messages"]), (1..=10).collect::<Vec<_>>());
    assert_eq!(v["data"]["has_more"], false);
    // Default limit is 50.
    fill(&mut a, "hist", &numbered(50)).await;
    let v = a.request("historic", Some("hist"), json!({})).await;
    assert_eq!(seqs(&v["data"]["messages"]), (11..=60).collect::<Vec<_>>());
    assert_eq!(v["data"]["has_more"], true);
    server.stop().await;
}

#[tokio::test]
async fn historic_pages_with_before_seq_and_after_seq() {
    let server = roomy_server().await;
    let mut a = agent(&server, "alice").await;
    a.join("pages").await;
    fill(&mut a, "pages", &numbered(10)).await;
    let page = |v: &Value| (seqs(&v["data"]["messages"]), v["data"]["has_more"].clone());
    let v = a
        .request(
            "historic",
            Some("pages"),
            json!({"before_seq": 8, "limit": 3}),
        )
        .await;
    assert_eq!(page(&v), (vec![5, 6, 7], json!(true)));
    let v = a
        .request(
            "historic",
            Some("pages"),
            json!({"before_seq": 3, "limit": 3}),
        )
        .await;
    assert_eq!(page(&v), (vec![1, 2], json!(false)));
    let v = a
        .request(
            "historic",
            Some("pages"),
            json!({"after_seq": 7, "limit": 2}),
        )
        .await;
    assert_eq!(page(&v), (vec![8, 9], json!(true)));
    let v = a
        .request(
            "historic",
            Some("pages"),
            json!({"after_seq": 8, "limit": 5}),
        )
        .await;
    assert_eq!(page(&v), (vec![9, 10], json!(false)));
    let v = a
        .request("historic", Some("pages"), json!({"after_seq": 10}))
        .await;
    assert_eq!(page(&v), (vec![], json!(false)));
    // Walking backwards page by page visits every message once.
    let mut before = None::<u64>;
    let mut seen = Vec::new();
    loop {
        let mut data = json!({"limit": 4});
        if let Some(b) = before {
            data["before_seq"] = json!(b);
        }
        let v = a.request("historic", Some("pages"), data).await;
        let mut s = seqs(&v["data"]["messages"]);
        before = s.first().copied();
        s.extend(seen);
        seen = s;
        if v["data"]["has_more"] == false {
            break;
        }
    }
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test]
async fn historic_limit_is_clamped_to_200() {
    let server = roomy_server().await;
    let mut a = agent(&server, "alice").await;
    a.join("big").await;
    fill(&mut a, "big", &numbered(205)).await;
    let v = a
        .request("historic", Some("big"), json!({"limit": 1000}))
        .await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(seqs(&v["data"]["messages"]), (6..=205).collect::<Vec<_>>());
    assert_eq!(v["data"]["has_more"], true);
    server.stop().await;
}

#[tokio::test]
async fn historic_search_matches_whole_words_case_insensitively() {
    let server = roomy_server().await;
    let mut a = agent(&server, "alice").await;
    a.join("search").await;
    let texts: Vec<String> = [
        "Hello World",
        "hello there",
        "shell game",
        "HELLO",
        "say hello-world!",
        "othello",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    fill(&mut a, "search", &texts).await;
    let v = a
        .request("historic", Some("search"), json!({"search": "hello"}))
        .await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(seqs(&v["data"]["messages"]), vec![1, 2, 4, 5]);
    assert_eq!(v["data"]["has_more"], false);
    let v = a
        .request("historic", Some("search"), json!({"search": "WORLD hello"}))
        .await;
    assert_eq!(seqs(&v["data"]["messages"]), vec![1, 5]);
    let v = a
        .request("historic", Some("search"), json!({"search": "hell"}))
        .await;
    assert_eq!(seqs(&v["data"]["messages"]), Vec::<u64>::new());
    let v = a
        .request(
            "historic",
            Some("search"),
            json!({"search": "hello", "limit": 2}),
        )
        .await;
    assert_eq!(seqs(&v["data"]["messages"]), vec![4, 5]);
    assert_eq!(v["data"]["has_more"], true);
    server.stop().await;
}

#[tokio::test]
async fn join_with_since_seq_returns_missed_messages_oldest_first() {
    let server = roomy_server().await;
    let mut a = server.connect("alice", TENANT, Role::Admin).await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    a.join("catchup").await;
    fill(&mut a, "catchup", &numbered(10)).await;
    let v = b
        .request("join", Some("catchup"), json!({"since_seq": 4, "limit": 3}))
        .await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(
        keys(&v["data"]),
        set(&["room", "presence", "missed", "has_more"])
    );
    assert_eq!(v["data"]["room"]["last_seq"], 10);
    assert_eq!(seqs(&v["data"]["missed"]), vec![5, 6, 7]);
    assert_eq!(v["data"]["missed"][0]["message"], "msg 5");
    assert_eq!(v["data"]["has_more"], true);
    let v = b
        .request("join", Some("catchup"), json!({"since_seq": 7}))
        .await;
    assert_eq!(seqs(&v["data"]["missed"]), vec![8, 9, 10]);
    assert_eq!(v["data"]["has_more"], false);
    let v = b
        .request("join", Some("catchup"), json!({"since_seq": 10}))
        .await;
    assert_eq!(seqs(&v["data"]["missed"]), Vec::<u64>::new());
    assert_eq!(v["data"]["has_more"], false);
    let v = b
        .request("join", Some("catchup"), json!({"since_seq": 0}))
        .await;
    assert_eq!(seqs(&v["data"]["missed"]), (1..=10).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test]
async fn join_since_seq_limit_defaults_to_100_and_is_capped_at_500() {
    let server = roomy_server().await;
    let mut a = server.connect("alice", TENANT, Role::Admin).await;
    a.join("many").await;
    fill(&mut a, "many", &numbered(520)).await;
    let mut b = server.connect("bob", TENANT, Role::Admin).await;
    let v = b
        .request("join", Some("many"), json!({"since_seq": 0}))
        .await;
    assert_eq!(seqs(&v["data"]["missed"]), (1..=100).collect::<Vec<_>>());
    assert_eq!(v["data"]["has_more"], true);
    let v = b
        .request(
            "join",
            Some("many"),
            json!({"since_seq": 0, "limit": 10_000}),
        )
        .await;
    assert_eq!(seqs(&v["data"]["missed"]), (1..=500).collect::<Vec<_>>());
    assert_eq!(v["data"]["has_more"], true);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// ping

#[tokio::test]
async fn ping_answers_with_a_timestamp() {
    let server = TestServer::start().await;
    let mut a = agent(&server, "alice").await;
    a.send(json!({"code": "ping", "user_id": "alice", "data": {}, "ref": "p-9"}))
        .await;
    let v = a.recv().await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(v["code"], "ping_response");
    assert_eq!(v["ref"], "p-9");
    assert_eq!(v["user_id"], "alice");
    assert_eq!(keys(&v["data"]), set(&["timestamp"]));
    assert_timestamp(&v["data"]["timestamp"]);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// HTTP

#[tokio::test]
async fn healthz_and_readyz_answer_ok() {
    let server = TestServer::start().await;
    let (status, body) = http_get(server.addr, "/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"status": "ok"})
    );
    let (status, body) = http_get(server.addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = http_get(server.addr, "/nope").await;
    assert_eq!(status, 404);
    server.stop().await;
}

/// The sum of a metric's samples (all label sets).
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test]
async fn metrics_serve_prometheus_text() {
    let server = TestServer::start().await;
    let mut a = agent(&server, "alice").await;
    a.join("metered").await;
    a.chat("metered", "count me").await;
    let (status, text) = http_get(server.addr, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "gateway_connections",
        "gateway_rooms",
        "gateway_frames_in_total",
        "gateway_frames_out_total",
        "gateway_errors_total",
        "gateway_fanout_latency_seconds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{text}"
        );
    }
    assert_eq!(metric_sum(&text, "gateway_connections"), 1.0, "{text}");
    assert!(
        metric_sum(&text, "gateway_frames_in_total") >= 2.0,
        "{text}"
    );
    drop(a);
    // The gauge comes back down when the connection ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = server.metrics().await;
        if metric_sum(&text, "gateway_connections") == 0.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn create_room_api_answers_201_then_200() {
    let server = TestServer::start().await;
    let admin = token("root", TENANT, Role::Admin);
    let body = json!({"room_id": "conv-1", "kind": "support", "title": "Help",
                      "participants": ["cust-1"]})
    .to_string();
    let (status, text) = http_post(server.addr, "/api/rooms", Some(&admin), &body).await;
    assert_eq!(status, 201, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["room_id"], "conv-1");
    assert_eq!(v["tenant_id"], TENANT);
    assert_eq!(v["kind"], "support");
    assert_eq!(v["title"], "Help");
    assert_eq!(v["status"], "active");
    assert_eq!(v["participants"], json!(["cust-1"]));
    assert_eq!(v["last_seq"], 0);
    assert_eq!(v["created"], true);
    let (status, text) = http_post(server.addr, "/api/rooms", Some(&admin), &body).await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["created"], false);
    assert_eq!(v["room_id"], "conv-1");
    // Without a room_id the server picks one.
    let agent_token = token("ann", TENANT, Role::Agent);
    let (status, text) = http_post(
        server.addr,
        "/api/rooms",
        Some(&agent_token),
        r#"{"kind":"team"}"#,
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(!v["room_id"].as_str().unwrap().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn create_room_api_refuses_missing_token_customers_and_bad_bodies() {
    let server = TestServer::start().await;
    let body = json!({"room_id": "r", "kind": "team"}).to_string();
    let (status, _) = http_post(server.addr, "/api/rooms", None, &body).await;
    assert_eq!(status, 401);
    let (status, _) = http_post(server.addr, "/api/rooms", Some("garbage"), &body).await;
    assert_eq!(status, 401);
    let customer = token("cust-1", TENANT, Role::Customer);
    let (status, _) = http_post(server.addr, "/api/rooms", Some(&customer), &body).await;
    assert_eq!(status, 403);
    let admin = token("root", TENANT, Role::Admin);
    for bad in [
        "{",
        "[]",
        r#"{"room_id":"r"}"#,
        r#"{"room_id":"r","kind":"lobby"}"#,
        r#"{"room_id":"","kind":"team"}"#,
        r#"{"room_id":"r","kind":"team","participants":"x"}"#,
        r#"{"room_id":"r","kind":"team","bogus":1}"#,
    ] {
        let (status, text) = http_post(server.addr, "/api/rooms", Some(&admin), bad).await;
        assert_eq!(status, 400, "{bad}: {text}");
    }
    // None of them created anything.
    let (status, _) = http_post(server.addr, "/api/rooms", Some(&admin), &body).await;
    assert_eq!(status, 201);
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// join access rules

async fn support_room(server: &TestServer, room: &str, customer: &str) {
    create_room(
        server,
        &token("root", TENANT, Role::Admin),
        json!({"room_id": room, "kind": "support", "participants": [customer]}),
    )
    .await;
}

#[tokio::test]
async fn customer_may_join_only_its_own_conversation() {
    let server = TestServer::start().await;
    support_room(&server, "conv-1", "cust-1").await;
    support_room(&server, "conv-2", "cust-2").await;
    let mut c = server.connect("cust-1", TENANT, Role::Customer).await;
    let v = c.join("conv-1").await;
    assert_eq!(v["data"]["room"]["kind"], "support");
    let v = c.request("join", Some("conv-2"), json!({})).await;
    assert_error(&v, "join_response", "NOT_FOUND");
    assert_eq!(v["room_id"], "conv-2");
    let v = c.request("join", Some("no-such-room"), json!({})).await;
    assert_error(&v, "join_response", "NOT_FOUND");
    // The customer's join did not create the room.
    let (status, text) = http_post(
        server.addr,
        "/api/rooms",
        Some(&token("root", TENANT, Role::Admin)),
        &json!({"room_id": "no-such-room", "kind": "team"}).to_string(),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    // A customer's message in its conversation is INCOMING.
    let v = c.chat("conv-1", "help").await;
    assert_eq!(v["data"]["direction"], "INCOMING", "{v}");
    assert_eq!(v["data"]["sender_type"], "customer", "{v}");
    server.stop().await;
}

#[tokio::test]
async fn agents_join_support_conversations_of_their_tenant() {
    let server = TestServer::start().await;
    support_room(&server, "conv-9", "cust-9").await;
    let mut a = agent(&server, "alice").await;
    let v = a.join("conv-9").await;
    assert_eq!(v["data"]["room"]["kind"], "support");
    // Participants are listed even when offline.
    let presence = v["data"]["presence"].as_array().unwrap();
    assert!(
        presence.contains(&json!({"user_id": "cust-9", "status": "offline"})),
        "{presence:?}"
    );
    assert!(presence.contains(&json!({"user_id": "alice", "status": "online"})));
    let v = a.chat("conv-9", "how can I help?").await;
    assert_eq!(v["data"]["direction"], "OUTGOING", "{v}");
    assert_eq!(v["data"]["sender_type"], "agent", "{v}");
    server.stop().await;
}

#[tokio::test]
async fn customer_never_sees_a_note_in_historic_join_or_read_receipt() {
    let server = TestServer::start().await;
    support_room(&server, "conv-notes", "cust-1").await;
    let mut a = agent(&server, "alice").await;
    a.join("conv-notes").await;
    assert_eq!(a.chat("conv-notes", "hello there").await["data"]["seq"], 1);
    let dir = server.stop().await;

    let stored = store_note(
        dir.path(),
        TENANT,
        "conv-notes",
        "alice",
        "internal refund approved",
        None,
    )
    .await;
    assert_eq!(stored.seq, 2);
    let note_id = stored.message_id;

    let server = TestServer::start_in(dir, |_| {}).await;
    let mut a = agent(&server, "alice").await;
    a.join("conv-notes").await;
    assert_eq!(a.chat("conv-notes", "all sorted").await["data"]["seq"], 3);
    // The team sees the note.
    let v = a.request("historic", Some("conv-notes"), json!({})).await;
    assert_eq!(seqs(&v["data"]["messages"]), [1, 2, 3], "{v}");
    assert_eq!(v["data"]["messages"][1]["direction"], "NOTE", "{v}");

    let mut c = server.connect("cust-1", TENANT, Role::Customer).await;
    for query in [
        json!({}),
        json!({"after_seq": 0}),
        json!({"before_seq": 3}),
        json!({"limit": 1, "before_seq": 3}),
    ] {
        let v = c
            .request("historic", Some("conv-notes"), query.clone())
            .await;
        assert_eq!(v["status"], "success", "{v}");
        let shown = v["data"]["messages"].as_array().unwrap();
        assert!(
            shown.iter().all(|m| m["direction"] != "NOTE"),
            "{query}: {v}"
        );
        assert_eq!(v["data"]["has_more"], false, "{query}: {v}");
    }
    let v = c.request("historic", Some("conv-notes"), json!({})).await;
    assert_eq!(seqs(&v["data"]["messages"]), [1, 3], "{v}");
    let v = c
        .request("historic", Some("conv-notes"), json!({"search": "refund"}))
        .await;
    assert_eq!(v["data"]["messages"], json!([]), "{v}");
    let v = c
        .request("join", Some("conv-notes"), json!({"since_seq": 0}))
        .await;
    assert_eq!(seqs(&v["data"]["missed"]), [1, 3], "{v}");
    let v = c
        .request(
            "read_receipt",
            Some("conv-notes"),
            json!({"message_id": note_id, "sender": "cust-1"}),
        )
        .await;
    assert_error(&v, "read_receipt_response", "NOT_FOUND");
    server.stop().await;
}

#[tokio::test]
async fn non_participant_agent_joining_a_team_room_is_forbidden() {
    let server = TestServer::start().await;
    let mut a = agent(&server, "alice").await;
    a.join("private").await;
    let mut b = agent(&server, "bob").await;
    let v = b.request("join", Some("private"), json!({})).await;
    assert_error(&v, "join_response", "FORBIDDEN");
    let v = b.chat("private", "let me in").await;
    assert_error(&v, "chat_response", "NOT_JOINED");
    let mut u = server.connect("ursula", TENANT, Role::User).await;
    let v = u.request("join", Some("private"), json!({})).await;
    assert_error(&v, "join_response", "FORBIDDEN");
    // A listed participant may.
    create_room(
        &server,
        &token("root", TENANT, Role::Admin),
        json!({"room_id": "team-2", "kind": "team", "participants": ["bob"]}),
    )
    .await;
    b.join("team-2").await;
    server.stop().await;
}

#[tokio::test]
async fn admin_joins_any_room_of_its_tenant() {
    let server = TestServer::start().await;
    let mut a = agent(&server, "alice").await;
    a.join("alices-room").await;
    support_room(&server, "conv-3", "cust-3").await;
    let mut admin = server.connect("root", TENANT, Role::Admin).await;
    admin.join("alices-room").await;
    admin.join("conv-3").await;
    server.stop().await;
}

#[tokio::test]
async fn pipelined_room_requests_are_answered_in_order() {
    let server = TestServer::start().await;
    let mut a = server.connect("alice", TENANT, Role::Admin).await;
    a.join("pipe").await;
    for i in 0..5 {
        a.chat("pipe", &format!("old {i}")).await;
    }
    let mut raw = RawClient::connect(server.addr, &token("bob", TENANT, Role::Admin)).await;
    assert_eq!(
        raw.recv_json(Duration::from_secs(5)).await.unwrap()["code"],
        "connected"
    );
    let frame = |code: &str, reference: &str, data: Value| {
        json!({"code": code, "user_id": "bob", "room_id": "pipe", "ref": reference, "data": data})
            .to_string()
    };
    let chat = json!({"message": "quick", "sender": "bob"});
    // All in one write: the join reply (which needs a history read) must not be overtaken or
    // dropped by what follows it.
    raw.send_texts(&[
        frame("join", "j1", json!({"since_seq": 0})),
        frame("chat", "c1", chat.clone()),
        frame("leave", "l1", json!({})),
        frame("chat", "c2", chat.clone()),
        frame("join", "j2", json!({})),
        frame("leave", "l2", json!({})),
    ])
    .await;
    let mut replies = Vec::new();
    while let Some(v) = raw.recv_json(Duration::from_millis(500)).await {
        replies.push(v);
    }
    let position = |reference: &str| {
        let found: Vec<usize> = replies
            .iter()
            .enumerate()
            .filter(|(_, v)| v["ref"] == reference)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(found.len(), 1, "{reference} answered once: {replies:#?}");
        found[0]
    };
    let [j1, c1, l1, c2, j2, l2] = ["j1", "c1", "l1", "c2", "j2", "l2"].map(position);
    assert_eq!(replies.len(), 6, "{replies:#?}");
    // The join reply comes first; the room requests after it keep their order. (The chat's
    // reply waits for the store, so it may come after later, synchronous replies.)
    assert_eq!(j1, 0, "{replies:#?}");
    assert!(j1 < c1 && l1 < c2 && c2 < j2 && j2 < l2, "{replies:#?}");
    for (i, code, status) in [
        (j1, "join_response", "success"),
        (c1, "chat_response", "success"),
        (l1, "leave_response", "success"),
        (c2, "chat_response", "error"),
        (j2, "join_response", "success"),
        (l2, "leave_response", "success"),
    ] {
        assert_eq!(replies[i]["code"], code, "{}", replies[i]);
        assert_eq!(replies[i]["status"], status, "{}", replies[i]);
    }
    assert_eq!(
        seqs(&replies[j1]["data"]["missed"]),
        (1..=5).collect::<Vec<_>>()
    );
    assert_eq!(replies[c1]["data"]["seq"], 6);
    assert_eq!(replies[c2]["data"]["error_code"], "NOT_JOINED");
    // alice saw the one accepted message.
    let chats: Vec<Value> = a
        .drain(QUIET)
        .await
        .into_iter()
        .filter(|v| v["code"] == "chat_response")
        .collect();
    assert_eq!(chats.len(), 1, "{chats:?}");
    assert_eq!(chats[0]["data"]["seq"], 6);
    server.stop().await;
}
