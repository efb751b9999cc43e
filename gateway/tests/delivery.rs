//! A conversation's messages carry their delivery state (`sent`, `delivered`, `read`): live,
//! in a join's `missed`, in `historic` and over HTTP, after a restart too, and only forward.

mod common;

use std::time::Duration;

use common::inbox::*;
use common::*;
use gateway::auth::Role;
use serde_json::{json, Value};

/// `(message, delivery)` of each message of a page.
fn states(messages: &Value) -> Vec<(String, String)> {
    messages
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {messages}"))
        .iter()
        .map(|m| {
            (
                m["message"].as_str().unwrap().to_owned(),
                m["delivery"].as_str().unwrap_or("none").to_owned(),
            )
        })
        .collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(m, d)| (m.to_string(), d.to_string()))
        .collect()
}

async fn history_over_http(server: &TestServer, room: &str, bearer: &str) -> Value {
    let url = format!(
        "http://{}/api/v1/conversations/{room}/messages",
        server.addr
    );
    let reply = reqwest::Client::new()
        .get(url)
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    reply.json().await.unwrap()
}

#[tokio::test]
async fn a_message_goes_from_sent_to_delivered_to_read_and_never_back() {
    let server = TestServer::start().await;
    conversation_with(&server, "d1", None).await;
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    alice.join("d1").await;

    // Nobody of the customer's side is connected: stored, not delivered.
    let first = alice.chat("d1", "hello?").await;
    assert_eq!(first["data"]["delivery"], "sent", "{first}");
    let second = alice.chat("d1", "are you there?").await;
    assert_eq!(second["data"]["delivery"], "sent");
    let second_seq = second["data"]["seq"].as_u64().unwrap();
    // A note is for the team: alice's own connection is not "the team has it".
    let note = alice
        .request(
            "note",
            Some("d1"),
            json!({"message": "customer is quiet", "sender": "alice"}),
        )
        .await;
    assert_eq!(note["data"]["delivery"], "sent", "{note}");

    // The customer comes back and recovers them: delivered, and alice hears it.
    let mut customer = server.connect("cust-d1", TENANT, Role::Customer).await;
    let joined = customer
        .request("join", Some("d1"), json!({"since_seq": 0}))
        .await;
    assert_eq!(
        states(&joined["data"]["missed"]),
        pairs(&[("hello?", "delivered"), ("are you there?", "delivered")]),
        "{joined}"
    );
    let told = alice.recv_code("delivery_response").await;
    assert_eq!(told["user_id"], "system");
    assert_eq!(told["data"]["status"], "delivered", "{told}");
    assert_eq!(told["data"]["side"], "contact");
    assert!(told["data"]["through_seq"].as_u64().unwrap() >= second_seq);
    // A second recovery moves nothing: nobody hears it again.
    customer
        .request("join", Some("d1"), json!({"since_seq": 0}))
        .await;

    // Live both ways: delivered at once.
    let answer = customer.chat("d1", "yes, here").await;
    assert_eq!(answer["data"]["delivery"], "delivered", "{answer}");
    assert_eq!(answer["data"]["is_mine"], true);
    let heard = alice.recv_code("chat_response").await;
    assert_eq!(heard["data"]["delivery"], "delivered", "{heard}");
    let reply = alice.chat("d1", "great").await;
    assert_eq!(reply["data"]["delivery"], "delivered", "{reply}");
    let heard = customer.recv_code("chat_response").await;
    assert_eq!(heard["data"]["delivery"], "delivered");
    assert_eq!(heard["data"]["is_mine"], false);

    // The customer reads up to alice's second message: those are read, "great" is not.
    let second_id = second["data"]["message_id"].as_str().unwrap();
    let receipt = customer
        .request(
            "read_receipt",
            Some("d1"),
            json!({"message_id": second_id, "sender": "cust-d1"}),
        )
        .await;
    assert_eq!(receipt["status"], "success", "{receipt}");
    let read_told = alice.recv_code("read_receipt_response").await;
    assert_eq!(read_told["data"]["seq"], second_seq);
    let expected_team = pairs(&[
        ("hello?", "read"),
        ("are you there?", "read"),
        ("customer is quiet", "sent"),
        ("yes, here", "delivered"),
        ("great", "delivered"),
    ]);
    let page = alice.request("historic", Some("d1"), json!({})).await;
    // The page itself hands alice's side the note.
    let mut expected_now = expected_team.clone();
    expected_now[2].1 = "delivered".into();
    assert_eq!(states(&page["data"]["messages"]), expected_now, "{page}");
    // The customer never sees the note, and sees her own message as the team has it.
    let page = customer.request("historic", Some("d1"), json!({})).await;
    assert_eq!(
        states(&page["data"]["messages"]),
        pairs(&[
            ("hello?", "read"),
            ("are you there?", "read"),
            ("yes, here", "delivered"),
            ("great", "delivered"),
        ]),
        "{page}"
    );
    // The team reads the customer's answer: read for her.
    let answer_id = answer["data"]["message_id"].as_str().unwrap();
    alice
        .request(
            "read_receipt",
            Some("d1"),
            json!({"message_id": answer_id, "sender": "alice"}),
        )
        .await;
    let over_http =
        history_over_http(&server, "d1", &token("cust-d1", TENANT, Role::Customer)).await;
    assert_eq!(
        states(&over_http["messages"]),
        pairs(&[
            ("hello?", "read"),
            ("are you there?", "read"),
            ("yes, here", "read"),
            ("great", "delivered"),
        ]),
        "{over_http}"
    );

    // The marks are saved with the conversation: a restart keeps every state.
    drop((alice, customer));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |_| {}).await;
    let mut bob = server.connect("bob", TENANT, Role::Admin).await;
    let page = bob.request("historic", Some("d1"), json!({})).await;
    assert_eq!(
        states(&page["data"]["messages"]),
        pairs(&[
            ("hello?", "read"),
            ("are you there?", "read"),
            // The team read past it.
            ("customer is quiet", "read"),
            ("yes, here", "read"),
            ("great", "delivered"),
        ]),
        "{page}"
    );
    server.stop().await;
}

#[tokio::test]
async fn team_rooms_carry_no_delivery_state() {
    let server = TestServer::start().await;
    let mut user = server.connect("u1", "t1", Role::User).await;
    user.join("lobby").await;
    let sent = user.chat("lobby", "hi").await;
    assert_eq!(sent["status"], "success", "{sent}");
    assert!(sent["data"].get("delivery").is_none(), "{sent}");
    let page = user.request("historic", Some("lobby"), json!({})).await;
    assert!(
        page["data"]["messages"][0].get("delivery").is_none(),
        "{page}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_search_moves_no_marks() {
    let server = TestServer::start().await;
    conversation_with(&server, "d2", None).await;
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    alice.join("d2").await;
    alice.chat("d2", "your invoice is ready").await;
    alice.chat("d2", "anything else?").await;
    let mut customer = server.connect("cust-d2", TENANT, Role::Customer).await;
    let found = customer
        .request("historic", Some("d2"), json!({"search": "invoice"}))
        .await;
    assert_eq!(
        states(&found["data"]["messages"]),
        pairs(&[("your invoice is ready", "sent")]),
        "{found}"
    );
    // Scattered hits say nothing about the messages between them: nobody is told.
    let frames = alice.drain(Duration::from_millis(300)).await;
    assert!(
        frames.iter().all(|f| f["code"] != "delivery_response"),
        "{frames:?}"
    );
    // A page does.
    let page = customer.request("historic", Some("d2"), json!({})).await;
    assert_eq!(
        states(&page["data"]["messages"]),
        pairs(&[
            ("your invoice is ready", "delivered"),
            ("anything else?", "delivered")
        ])
    );
    let told = alice.recv_code("delivery_response").await;
    assert_eq!(told["data"]["through_seq"], 2, "{told}");
    server.stop().await;
}
