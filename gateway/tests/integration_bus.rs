//! The gateway on the integration bus (the in-process bus, the default): what it publishes for
//! stored messages (outbound SMS and email, conversation events, pushes; never a note), and
//! what it does with inbound messages, delivery states and payloads that do not parse.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::inbox::{admin, post, TENANT};
use common::*;
use gateway::auth::Role;
use integrations::{Bus, Consumer};
use serde_json::{json, Value};

fn bus(server: &TestServer) -> Arc<dyn Bus> {
    server
        .gateway
        .as_ref()
        .unwrap()
        .shared()
        .integration
        .bus
        .clone()
}

/// The next record of a consumer, as JSON, within a few seconds.
async fn next(consumer: &mut Box<dyn Consumer>) -> Value {
    let record = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("a record within 5 s")
        .expect("the bus is open");
    consumer.commit(&record);
    serde_json::from_slice(&record.payload).unwrap()
}

/// No record within a short while.
async fn nothing(consumer: &mut Box<dyn Consumer>) {
    let got = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await;
    if let Ok(Some(record)) = got {
        panic!(
            "unexpected record: {:?}",
            String::from_utf8_lossy(&record.payload)
        );
    }
}

async fn publish(bus: &Arc<dyn Bus>, topic: &str, payload: Value) {
    bus.publish(topic, "k", payload.to_string().into())
        .await
        .unwrap();
}

async fn sms_inbox(server: &TestServer) {
    let body = json!({"inbox_id": "sms", "name": "SMS", "channel": {"type": "sms", "phone_number": "+15550100"}});
    let (status, reply) = post(server, "/api/v1/inboxes", &admin(), body).await;
    assert_eq!(status, 201, "{reply}");
}

/// An SMS conversation with contact `k1` (+15550199).
async fn sms_conversation(server: &TestServer, room: &str) {
    sms_inbox(server).await;
    let contact = json!({"contact_id": "k1", "name": "Kim", "phone": "+15550199"});
    let (status, _) = post(server, "/api/v1/contacts", &admin(), contact).await;
    assert!(status == 201 || status == 200);
    let body = json!({"room_id": room, "kind": "prospect", "contact_id": "k1", "inbox_id": "sms",
                      "participants": ["k1"]});
    let (status, reply) = post(server, "/api/v1/conversations", &admin(), body).await;
    assert!(status == 201 || status == 200, "{reply}");
}

async fn send(server: &TestServer, room: &str, body: Value) -> Value {
    let agent = token("agent-1", TENANT, Role::Agent);
    let (status, sent) = post(
        server,
        &format!("/api/v1/conversations/{room}/messages"),
        &agent,
        body,
    )
    .await;
    assert_eq!(status, 201, "{sent}");
    sent
}

#[tokio::test]
async fn an_agents_reply_in_an_sms_conversation_goes_out_once_and_a_note_never_does() {
    let server = TestServer::start().await;
    let bus = bus(&server);
    let mut sms = bus.subscribe("outbound.sms", "test");
    let mut events = bus.subscribe("conversation.events", "test");
    sms_conversation(&server, "p1").await;

    let sent = send(
        &server,
        "p1",
        json!({"message": "Your table is ready", "message_id": "m-1"}),
    )
    .await;
    let out = next(&mut sms).await;
    assert_eq!(out["v"], 1);
    assert_eq!(out["channel"], "sms");
    assert_eq!(
        (out["from"].as_str(), out["to"].as_str()),
        (Some("+15550100"), Some("+15550199"))
    );
    assert_eq!(out["body"], "Your table is ready");
    assert_eq!(out["message_id"], "m-1");
    assert_eq!(out["room_id"], "p1");
    // The conversation's events: its opening, then the message.
    loop {
        let event = next(&mut events).await;
        if event["type"] == "message.created" {
            assert_eq!(event["message"]["seq"], sent["seq"]);
            break;
        }
        assert_eq!(event["type"], "conversation.changed", "{event}");
    }
    // A retry stores nothing twice and sends nothing twice.
    send(
        &server,
        "p1",
        json!({"message": "Your table is ready", "message_id": "m-1"}),
    )
    .await;
    send(
        &server,
        "p1",
        json!({"type": "note", "message": "VIP, comp the drinks"}),
    )
    .await;
    nothing(&mut sms).await;
    while let Ok(Some(record)) =
        tokio::time::timeout(Duration::from_millis(300), events.next()).await
    {
        let text = String::from_utf8_lossy(&record.payload).into_owned();
        assert!(
            !text.contains("comp the drinks"),
            "a note reached a topic: {text}"
        );
        assert!(!text.contains("\"NOTE\""), "{text}");
        events.commit(&record);
    }
    server.stop().await;
}

#[tokio::test]
async fn an_inbound_sms_reaches_the_inbox_once_even_when_delivered_twice() {
    let server = TestServer::start().await;
    let bus = bus(&server);
    sms_inbox(&server).await;
    let mut inbox = common::inbox::subscribed(&server, "agent-1").await;
    let inbound = json!({"v": 1, "channel": "sms", "from": "+15550123", "to": "+15550100",
                         "provider_id": "SM0001", "text": "Is the shop open?", "carrier": "x"});
    publish(&bus, "inbound.messages", inbound.clone()).await;
    let created = inbox.recv_code("conversation_response").await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    assert_eq!(
        created["data"]["conversation"]["kind"], "prospect",
        "{created}"
    );

    let mut agent = server.connect("agent-2", TENANT, Role::Agent).await;
    agent.join(&room).await;
    // Delivered again (a worker restarted before committing): nothing new.
    publish(&bus, "inbound.messages", inbound).await;
    let second = json!({"v": 1, "channel": "sms", "from": "+15550123", "to": "+15550100",
                        "provider_id": "SM0002", "text": "Hello?"});
    publish(&bus, "inbound.messages", second).await;
    // The first message may still be on its way to the room when the agent joins.
    loop {
        let event = agent.recv_code("chat_response").await;
        assert_eq!(event["data"]["direction"], "INCOMING");
        if event["data"]["message"] == "Hello?" {
            break;
        }
    }
    let page = agent.request("historic", Some(&room), json!({})).await;
    let messages = page["data"]["messages"].as_array().unwrap();
    let texts: Vec<&str> = messages
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["Is the shop open?", "Hello?"], "{page}");
    assert_eq!(messages[0]["message_id"], "SM0001");
    assert_eq!(messages[0]["metadata"]["inbound"]["from"], "+15550123");
    server.stop().await;
}

#[tokio::test]
async fn delivery_states_only_move_forward_and_reach_the_team_only() {
    let server = TestServer::start().await;
    let bus = bus(&server);
    let mut sms = bus.subscribe("outbound.sms", "test");
    sms_conversation(&server, "d1").await;
    let mut agent = server.connect("agent-2", TENANT, Role::Agent).await;
    agent.join("d1").await;
    let mut contact = server.connect("k1", TENANT, Role::Customer).await;
    contact.join("d1").await;
    send(
        &server,
        "d1",
        json!({"message": "On our way", "message_id": "m-9"}),
    )
    .await;
    next(&mut sms).await;
    agent.recv_code("chat_response").await;
    contact.recv_code("chat_response").await;

    let status = |state: &str| {
        json!({"v": 1, "tenant_id": TENANT, "room_id": "d1", "message_id": "m-9",
               "status": state, "provider_id": "SM9"})
    };
    for state in ["sent", "delivered", "sent", "failed"] {
        publish(&bus, "delivery.status", status(state)).await;
    }
    let first = agent.recv_code("delivery_response").await;
    assert_eq!(
        first["data"],
        json!({"message_id": "m-9", "status": "sent", "provider_id": "SM9"})
    );
    let second = agent.recv_code("delivery_response").await;
    assert_eq!(second["data"]["status"], "delivered");
    // The late `sent` and `failed` moved nothing.
    let late = agent.drain(Duration::from_millis(300)).await;
    assert!(
        late.iter().all(|f| f["code"] != "delivery_response"),
        "{late:?}"
    );
    let frames = contact.drain(Duration::from_millis(100)).await;
    assert!(
        frames.iter().all(|f| f["code"] != "delivery_response"),
        "{frames:?}"
    );

    // With the contact's socket gone, a refused message is `failed` in the message itself.
    drop(contact);
    tokio::time::sleep(Duration::from_millis(100)).await;
    send(
        &server,
        "d1",
        json!({"message": "Are you there?", "message_id": "m-10"}),
    )
    .await;
    next(&mut sms).await;
    let failed = json!({"v": 1, "tenant_id": TENANT, "room_id": "d1", "message_id": "m-10",
                        "status": "undelivered", "error_code": "30003"});
    publish(&bus, "delivery.status", failed).await;
    loop {
        let told = agent.recv_code("delivery_response").await;
        if told["data"]["message_id"] == "m-10" {
            assert_eq!(told["data"]["status"], "undelivered", "{told}");
            break;
        }
    }
    let page = agent.request("historic", Some("d1"), json!({})).await;
    let states: Vec<(&str, &str)> = page["data"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["message_id"].as_str().unwrap(),
                m["delivery"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(states, [("m-9", "delivered"), ("m-10", "failed")], "{page}");
    server.stop().await;
}

#[tokio::test]
async fn a_payload_that_does_not_parse_goes_to_the_dead_letters_and_reading_goes_on() {
    let server = TestServer::start().await;
    let bus = bus(&server);
    let mut dead = bus.subscribe("dead.letters", "test");
    sms_inbox(&server).await;
    bus.publish("inbound.messages", "k", "not json".into())
        .await
        .unwrap();
    publish(&bus, "delivery.status", json!({"v": 1, "status": "sent"})).await;
    publish(&bus, "inbound.messages", json!({"v": 7})).await;
    let unknown_inbox = json!({"v": 1, "channel": "sms", "from": "+1", "to": "+19999",
                               "provider_id": "SMx", "text": "hi"});
    publish(&bus, "inbound.messages", unknown_inbox).await;
    let mut letters = Vec::new();
    for _ in 0..4 {
        letters.push(next(&mut dead).await);
    }
    let reasons: Vec<String> = letters
        .iter()
        .map(|l| format!("{} {}", l["topic"], l["reason"]))
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("inbound.messages") && r.contains("not JSON")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("delivery.status") && r.contains("missing field")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("unsupported version 7")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("no inbox receives")),
        "{reasons:?}"
    );
    assert_eq!(letters[0]["payload"], "not json");
    // Still reading.
    let mut inbox = common::inbox::subscribed(&server, "agent-1").await;
    let ok = json!({"v": 1, "channel": "sms", "from": "+15550123", "to": "+15550100",
                    "provider_id": "SM1", "text": "hi"});
    publish(&bus, "inbound.messages", ok).await;
    inbox.recv_code("conversation_response").await;
    server.stop().await;
}

#[tokio::test]
async fn an_offline_participant_gets_a_push_and_a_mention_never_quotes_the_note() {
    let server = TestServer::start().await;
    let bus = bus(&server);
    let mut pushes = bus.subscribe("notifications.push", "test");
    for user in ["agent-7", "agent-8"] {
        let device = json!({"token": format!("fcm-{user}"), "platform": "android"});
        let (status, reply) = post(
            &server,
            "/api/v1/devices",
            &token(user, TENANT, Role::Agent),
            device,
        )
        .await;
        assert_eq!(status, 201, "{reply}");
    }
    let body = json!({"room_id": "s1", "kind": "support", "participants": ["cust-1", "agent-7"],
                      "title": "Order 1042"});
    let (status, reply) = post(&server, "/api/v1/conversations", &admin(), body).await;
    assert_eq!(status, 201, "{reply}");
    // agent-7 is online: no push for it.
    let mut online = server.connect("agent-7", TENANT, Role::Agent).await;
    online.join("s1").await;
    let customer = token("cust-1", TENANT, Role::Customer);
    let (status, _) = post(
        &server,
        "/api/v1/conversations/s1/messages",
        &customer,
        json!({"message": "My order never came"}),
    )
    .await;
    assert_eq!(status, 201);
    nothing(&mut pushes).await;
    drop(online);
    tokio::time::sleep(Duration::from_millis(200)).await;
    post(
        &server,
        "/api/v1/conversations/s1/messages",
        &customer,
        json!({"message": "Anyone there?"}),
    )
    .await;
    let push = next(&mut pushes).await;
    assert_eq!(
        (push["user_id"].as_str(), push["reason"].as_str()),
        (Some("agent-7"), Some("message"))
    );
    assert_eq!(push["body"], "Anyone there?");
    // Titled by the conversation, not its id.
    assert_eq!(push["title"], "Order 1042", "{push}");
    assert_eq!(push["device_tokens"], json!(["fcm-agent-7"]));
    send(
        &server,
        "s1",
        json!({"type": "note", "message": "refund in secret", "mentions": ["agent-8"]}),
    )
    .await;
    let mention = next(&mut pushes).await;
    assert_eq!(mention["user_id"], "agent-8");
    assert_eq!(mention["reason"], "mention");
    assert_eq!(mention["title"], "Order 1042");
    assert!(
        !mention.to_string().contains("refund in secret"),
        "{mention}"
    );
    // A user without a registered device gets no push at all.
    send(
        &server,
        "s1",
        json!({"type": "note", "message": "fyi", "mentions": ["agent-9"]}),
    )
    .await;
    nothing(&mut pushes).await;
    server.stop().await;
}

#[tokio::test]
async fn devices_are_registered_listed_and_forgotten_when_the_push_service_says_so() {
    let server = TestServer::start().await;
    let bus = bus(&server);
    let agent = token("agent-3", TENANT, Role::Agent);
    let other_tenant = token("agent-3", "other-tenant", Role::Agent);
    let register = |token: &str, platform: &str| json!({"token": token, "platform": platform});
    // Bad input: a clear 400 each, nothing stored.
    for bad in [
        register("", "android"),
        register("has space", "android"),
        register("tok", "blackberry"),
        json!({"token": "tok"}),
        json!({"token": "tok", "platform": "ios", "extra": 1}),
    ] {
        let (status, reply) = post(&server, "/api/v1/devices", &agent, bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {reply}");
        assert_eq!(reply["error"]["code"], "BAD_REQUEST", "{reply}");
    }
    let long = "x".repeat(4097);
    let (status, _) = post(&server, "/api/v1/devices", &agent, register(&long, "web")).await;
    assert_eq!(status, 400);
    for i in 0..12 {
        let (status, reply) = post(
            &server,
            "/api/v1/devices",
            &agent,
            register(&format!("tok:{i}"), "ios"),
        )
        .await;
        assert_eq!(status, 201, "{reply}");
        assert_eq!(reply["token"], format!("tok:{i}"));
    }
    // Registered again: it moves to the newest place.
    post(&server, "/api/v1/devices", &agent, register("tok:5", "ios")).await;
    let (status, body) = http_get_bearer(&server, "/api/v1/devices", &agent).await;
    assert_eq!(status, 200, "{body}");
    let tokens: Vec<String> = body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["token"].as_str().unwrap().to_owned())
        .collect();
    // At most 10, the oldest gone first.
    let mut expected: Vec<String> = (2..12)
        .filter(|i| *i != 5)
        .map(|i| format!("tok:{i}"))
        .collect();
    expected.push("tok:5".into());
    assert_eq!(tokens, expected);
    // Another tenant's user of the same id has none.
    let (_, theirs) = http_get_bearer(&server, "/api/v1/devices", &other_tenant).await;
    assert_eq!(theirs["devices"], json!([]));

    // The push worker reports a token gone; a poison record does not stop the reading.
    publish(&bus, "device.tokens", json!({"v": 1})).await;
    let gone = json!({"v": 1, "tenant_id": TENANT, "user_id": "agent-3", "token": "tok:7",
                      "reason": "UNREGISTERED"});
    publish(&bus, "device.tokens", gone).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = http_get_bearer(&server, "/api/v1/devices", &agent).await;
        if !body.to_string().contains("tok:7") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tok:7 not forgotten: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Removed by its user: 204, then 404; `:` and `+` survive the path.
    let (status, _) = http_delete_bearer(&server, "/api/v1/devices/tok%3A8", &agent).await;
    assert_eq!(status, 204);
    let (status, body) = http_delete_bearer(&server, "/api/v1/devices/tok:8", &agent).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "NOT_FOUND");
    server.stop().await;
}

async fn http_get_bearer(server: &TestServer, path: &str, bearer: &str) -> (u16, Value) {
    bearer_request(server, "GET", path, bearer).await
}

async fn http_delete_bearer(server: &TestServer, path: &str, bearer: &str) -> (u16, Value) {
    bearer_request(server, "DELETE", path, bearer).await
}

async fn bearer_request(
    server: &TestServer,
    method: &str,
    path: &str,
    bearer: &str,
) -> (u16, Value) {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {bearer}\r\n\r\n"
    );
    let (status, text) = http_request(server.addr, &raw).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}
