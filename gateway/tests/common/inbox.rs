//! Helpers of the inbox tests: the HTTP API as an admin, inbox subscribers, conversation
//! events and queue positions.

use serde_json::{json, Value};

use super::*;

pub const TENANT: &str = "acme";

pub fn admin() -> String {
    token("root", TENANT, Role::Admin)
}

pub async fn post(server: &TestServer, path: &str, bearer: &str, body: Value) -> (u16, Value) {
    let (status, text) = http_post(server.addr, path, Some(bearer), &body.to_string()).await;
    let value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status}: {text}"));
    (status, value)
}

pub async fn open(server: &TestServer, body: Value) -> (u16, Value) {
    post(server, "/api/conversations", &admin(), body).await
}

pub async fn subscribed(server: &TestServer, user: &str) -> Client {
    let mut client = server.connect(user, TENANT, Role::Agent).await;
    let reply = client.request("subscribe_inbox", None, json!({})).await;
    assert_eq!(reply["status"], "success", "{reply}");
    assert_eq!(reply["data"], json!({"tenant": TENANT, "subscribed": true}));
    client
}

/// The next `conversation_response` event about `room`.
pub async fn event_about(client: &mut Client, room: &str) -> Value {
    loop {
        let event = client.recv_code("conversation_response").await;
        if event["room_id"] == room {
            return event;
        }
    }
}

/// Opens support conversation `id` with customer `cust-<id>`, in `inbox` if given.
pub async fn conversation_with(server: &TestServer, id: &str, inbox: Option<&str>) {
    let mut body =
        json!({"room_id": id, "kind": "support", "participants": [format!("cust-{id}")]});
    if let Some(inbox) = inbox {
        body["inbox_id"] = json!(inbox);
    }
    let (status, reply) = open(server, body).await;
    assert_eq!(status, 201, "{reply}");
}

/// The next `queue_response` a client gets.
pub async fn queue_position(client: &mut Client) -> (u64, u64, Value) {
    let update = client.recv_code("queue_response").await;
    assert_eq!(update["user_id"], "system", "{update}");
    let data = &update["data"];
    (
        data["position"].as_u64().unwrap(),
        data["waiting"].as_u64().unwrap(),
        data["estimated_wait_seconds"].clone(),
    )
}

/// A customer connected to its conversation `id` (opened here).
pub async fn waiting_customer(server: &TestServer, id: &str) -> Client {
    conversation_with(server, id, None).await;
    let mut cust = server
        .connect(&format!("cust-{id}"), TENANT, Role::Customer)
        .await;
    cust.join(id).await;
    cust
}
