//! Tenant isolation end to end: room ids are unique within a tenant only, another tenant's room
//! behaves exactly like one that does not exist (no existence oracle), and no tenant can take an
//! id from another (DESIGN.md "Tenants", PROTOCOL.md §3 `join`).

mod common;

use std::time::Duration;

use common::*;
use gateway::auth::Role;
use serde_json::{json, Value};

const ACME: &str = "acme";
const GLOBEX: &str = "globex";
const QUIET: Duration = Duration::from_millis(300);

fn assert_error(v: &Value, code: &str, error_code: &str) {
    assert_eq!(v["status"], "error", "{v}");
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["data"]["error_code"], error_code, "{v}");
}

fn texts(messages: &Value) -> Vec<String> {
    messages
        .as_array()
        .unwrap_or_else(|| panic!("expected an array, got {messages}"))
        .iter()
        .map(|m| m["message"].as_str().unwrap().to_owned())
        .collect()
}

/// The parts of a join reply that could tell one room from another, with the room id left out.
fn join_shape(v: &Value) -> Value {
    assert_eq!(v["status"], "success", "{v}");
    let room = &v["data"]["room"];
    json!({
        "kind": room["kind"],
        "status": room["status"],
        "title_is_id": room["title"] == room["room_id"],
        "last_seq": room["last_seq"],
        "presence": v["data"]["presence"],
        "missed": v["data"]["missed"],
        "has_more": v["data"]["has_more"],
    })
}

/// Team rooms `rooms` of tenant acme, each with one chat, and a support conversation `conv`
/// with a customer; returns the acme member joined to the team rooms.
async fn acme_rooms(server: &TestServer, rooms: &[&str], conv: &str) -> Client {
    let mut alice = server.connect("alice", ACME, Role::Agent).await;
    for room in rooms {
        alice.join(room).await;
        assert_eq!(alice.chat(room, "acme secret").await["data"]["seq"], 1);
    }
    create_room(
        server,
        &token("root", ACME, Role::Admin),
        json!({"room_id": conv, "kind": "support", "participants": ["cust-1"]}),
    )
    .await;
    alice
}

#[tokio::test]
async fn another_tenants_room_answers_exactly_like_an_unknown_one() {
    let server = TestServer::start().await;
    let mut alice = acme_rooms(&server, &["x", "x3"], "acme-conv").await;

    // Before anyone of globex joined: historic, and a customer's join, are NOT_FOUND for both.
    let mut cust = server.connect("cust-1", GLOBEX, Role::Customer).await;
    for room in ["x", "x3", "acme-conv", "nowhere-1"] {
        let v = cust.request("join", Some(room), json!({})).await;
        assert_error(&v, "join_response", "NOT_FOUND");
        let v = cust.request("historic", Some(room), json!({})).await;
        assert_error(&v, "historic_response", "NOT_FOUND");
    }

    // A team member of globex gets its own new room for an id acme uses, just as for an id
    // nobody uses: the same reply, nothing of acme's room in it.
    for (n, role) in [Role::Admin, Role::Agent, Role::User]
        .into_iter()
        .enumerate()
    {
        let user = format!("mallory-{n}");
        let mut m = server.connect(&user, GLOBEX, role).await;
        let existing = ["x", "acme-conv", "x3"][n];
        let unknown = format!("nowhere-{}", n + 10);
        let since = json!({"since_seq": 0});
        let taken = m.request("join", Some(existing), since.clone()).await;
        let fresh = m.request("join", Some(&unknown), since).await;
        assert_eq!(join_shape(&taken), join_shape(&fresh), "{taken} vs {fresh}");
        // The globex join created globex's room: empty, this user alone in it.
        assert_eq!(taken["data"]["room"]["last_seq"], 0, "{taken}");
        assert_eq!(taken["data"]["room"]["kind"], "team", "{taken}");
        assert_eq!(taken["data"]["presence"][0]["user_id"], user.as_str());
        assert_eq!(texts(&taken["data"]["missed"]), Vec::<String>::new());
        let v = m.request("historic", Some(existing), json!({})).await;
        assert_eq!(v["status"], "success", "{v}");
        assert!(!texts(&v["data"]["messages"]).contains(&"acme secret".to_owned()));
    }

    // Nothing globex did reached acme's member (no presence, no events), and acme's room is as
    // it was.
    alice.expect_silence(QUIET).await;
    let v = alice.request("historic", Some("x"), json!({})).await;
    assert_eq!(texts(&v["data"]["messages"]), ["acme secret"]);
    server.stop().await;
}

#[tokio::test]
async fn an_id_used_by_another_tenant_stays_free_for_its_owner() {
    let server = TestServer::start().await;
    let mut bob = server.connect("bob", GLOBEX, Role::Agent).await;
    bob.join("y").await;
    assert_eq!(bob.chat("y", "globex first").await["data"]["seq"], 1);

    // acme creates its own `y` afterwards: created (201), acme's, empty.
    let (status, body) = http_post(
        server.addr,
        "/api/rooms",
        Some(&token("root", ACME, Role::Admin)),
        &json!({"room_id": "y", "kind": "team", "participants": ["alice"]}).to_string(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["tenant_id"], ACME);
    assert_eq!(body["created"], true);
    assert_eq!(body["last_seq"], 0);
    assert_eq!(body["participants"], json!(["alice"]));

    let mut alice = server.connect("alice", ACME, Role::Agent).await;
    let v = alice.join("y").await;
    assert_eq!(v["data"]["room"]["last_seq"], 0, "{v}");
    let users: Vec<_> = v["data"]["presence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["alice"], "{v}");
    bob.expect_silence(QUIET).await;

    // Each chats in its own `y` with its own seq, and hears nothing of the other.
    assert_eq!(alice.chat("y", "acme first").await["data"]["seq"], 1);
    assert_eq!(bob.chat("y", "globex second").await["data"]["seq"], 2);
    assert_eq!(alice.chat("y", "acme second").await["data"]["seq"], 2);
    // A presence change reaches the rooms of one's own tenant only.
    bob.send(
        json!({"code": "presence", "user_id": "bob", "data": {"status": "away", "sender": "bob"}}),
    )
    .await;
    alice.expect_silence(QUIET).await;
    bob.expect_silence(QUIET).await;

    // A second acme member sees acme's messages only.
    let mut carol = server.connect("carol", ACME, Role::Admin).await;
    let v = carol
        .request("join", Some("y"), json!({"since_seq": 0}))
        .await;
    assert_eq!(texts(&v["data"]["missed"]), ["acme first", "acme second"]);
    let v = bob.request("historic", Some("y"), json!({})).await;
    assert_eq!(
        texts(&v["data"]["messages"]),
        ["globex first", "globex second"]
    );

    // Creating it again answers 200 with acme's room, not globex's.
    let v = create_room(
        &server,
        &token("root", ACME, Role::Admin),
        json!({"room_id": "y", "kind": "team", "participants": []}),
    )
    .await;
    assert_eq!(
        (v["tenant_id"].as_str(), v["last_seq"].as_u64()),
        (Some(ACME), Some(2))
    );
    server.stop().await;
}

#[tokio::test]
async fn historic_and_read_receipts_never_cross_tenants() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice", ACME, Role::Agent).await;
    alice.join("z").await;
    let acme_message = alice.chat("z", "acme only words").await;
    let acme_id = acme_message["data"]["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut bob = server.connect("bob", GLOBEX, Role::Agent).await;
    bob.join("z").await;
    let globex_message = bob.chat("z", "globex words").await;
    let globex_id = globex_message["data"]["message_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // A message id of the other tenant's `z` is not found in one's own `z`.
    let v = bob
        .request(
            "read_receipt",
            Some("z"),
            json!({"message_id": acme_id, "sender": "bob"}),
        )
        .await;
    assert_error(&v, "read_receipt_response", "NOT_FOUND");
    let v = alice
        .request(
            "read_receipt",
            Some("z"),
            json!({"message_id": globex_id, "sender": "alice"}),
        )
        .await;
    assert_error(&v, "read_receipt_response", "NOT_FOUND");

    // A receipt in one's own room moves one's own marker and tells one's own room only.
    let v = bob
        .request(
            "read_receipt",
            Some("z"),
            json!({"message_id": globex_id, "sender": "bob"}),
        )
        .await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(v["data"]["read_seq"], 1, "{v}");
    alice.expect_silence(QUIET).await;

    // History and search see one's own tenant's messages only.
    let v = bob.request("historic", Some("z"), json!({})).await;
    assert_eq!(texts(&v["data"]["messages"]), ["globex words"]);
    let v = bob
        .request("historic", Some("z"), json!({"search": "acme"}))
        .await;
    assert_eq!(texts(&v["data"]["messages"]), Vec::<String>::new());
    let v = bob
        .request("historic", Some("z"), json!({"after_seq": 0}))
        .await;
    assert_eq!(texts(&v["data"]["messages"]), ["globex words"]);
    let v = alice
        .request("historic", Some("z"), json!({"search": "words"}))
        .await;
    assert_eq!(texts(&v["data"]["messages"]), ["acme only words"]);
    server.stop().await;
}
