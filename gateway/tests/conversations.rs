//! Conversations: contacts and inboxes over the HTTP API, opening (and reopening) conversations,
//! `conversation_update` / `conversation_get`, and the live inbox (`subscribe_inbox`).

mod common;

use std::time::Duration;

use common::inbox::*;
use common::*;
use gateway::auth::Role;
use serde_json::{json, Value};

async fn contact(server: &TestServer, id: &str, name: &str) {
    let (status, body) = post(
        server,
        "/api/contacts",
        &admin(),
        json!({"contact_id": id, "name": name, "phone": "+15550100"}),
    )
    .await;
    assert!(status == 201 || status == 200, "{status} {body}");
}

#[tokio::test]
async fn contacts_and_inboxes_are_created_replaced_and_validated() {
    let server = TestServer::start().await;
    let (status, first) = post(
        &server,
        "/api/contacts",
        &admin(),
        json!({"contact_id": "c-1", "name": "Ada", "email": "ada@example.com",
               "external_ids": {"crm": "42"}, "custom_attributes": {"plan": "pro"}}),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["created"], true);
    assert_eq!(first["external_ids"]["crm"], "42");
    let (status, again) = post(
        &server,
        "/api/contacts",
        &admin(),
        json!({"contact_id": "c-1", "name": "Ada Lovelace"}),
    )
    .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["name"], "Ada Lovelace");
    assert_eq!(
        again["created_at"], first["created_at"],
        "creation time kept"
    );

    for (body, names) in [
        (json!({"name": ""}), "name"),
        (
            json!({"contact_id": "x".repeat(129), "name": "A"}),
            "contact_id",
        ),
        (json!({"name": "A", "email": 5}), "body.email"),
        (json!({"name": "A", "nickname": "a"}), "nickname"),
    ] {
        let (status, error) = post(&server, "/api/contacts", &admin(), body).await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["code"], "BAD_REQUEST");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{message}");
    }
    let customer = token("cust", TENANT, Role::Customer);
    let (status, _) = post(&server, "/api/contacts", &customer, json!({"name": "A"})).await;
    assert_eq!(status, 403);

    for channel in [
        json!({"type": "web_widget", "widget_key": "wk-public-1", "brand_color": "#1f93ff",
               "authorized_domains": ["example.com"]}),
        json!({"type": "sms", "phone_number": "+15550101"}),
        json!({"type": "whatsapp", "phone_number": "+15550102"}),
        json!({"type": "email", "address": "help@example.com"}),
    ] {
        let kind = channel["type"].as_str().unwrap().to_owned();
        let (status, inbox) = post(
            &server,
            "/api/inboxes",
            &admin(),
            json!({"inbox_id": kind, "name": format!("{kind} inbox"), "channel": channel}),
        )
        .await;
        assert_eq!(status, 201, "{inbox}");
        assert_eq!(inbox["channel"], channel);
    }
    let (status, error) = post(
        &server,
        "/api/inboxes",
        &admin(),
        json!({"name": "x", "channel": {"type": "pigeon"}}),
    )
    .await;
    assert_eq!(status, 400, "{error}");
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("channel"));
    server.stop().await;
}

#[tokio::test]
async fn a_second_prospect_conversation_for_a_contact_reopens_the_first() {
    let server = TestServer::start().await;
    contact(&server, "c-7", "Grace Hopper").await;
    let mut inbox = subscribed(&server, "watcher").await;

    let (status, first) = open(
        &server,
        json!({"kind": "prospect", "contact_id": "c-7", "participants": ["alice"]}),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(
        (first["created"].clone(), first["reopened"].clone()),
        (json!(true), json!(false))
    );
    assert_eq!(first["title"], "Grace Hopper", "titled after the contact");
    assert_eq!(first["status"], "new");
    assert_eq!(first["is_open"], true);
    let room = first["room_id"].as_str().unwrap().to_owned();
    let created = event_about(&mut inbox, &room).await;
    assert_eq!(created["data"]["change"], "created");

    // An agent closes it.
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    let closed = alice
        .request(
            "conversation_update",
            Some(&room),
            json!({"is_open": false}),
        )
        .await;
    assert_eq!(closed["status"], "success", "{closed}");
    assert_eq!(closed["data"]["status"], "closed");

    // A second one for the same contact: the first, reopened, with bob added.
    let (status, second) = open(
        &server,
        json!({"kind": "prospect", "contact_id": "c-7", "participants": ["bob"]}),
    )
    .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["room_id"], room.as_str());
    assert_eq!(
        (second["created"].clone(), second["reopened"].clone()),
        (json!(false), json!(true))
    );
    assert_eq!(second["is_open"], true);
    assert_eq!(second["status"], "active");
    assert_eq!(second["participants"], json!(["alice", "bob"]));
    loop {
        let event = event_about(&mut inbox, &room).await;
        if event["data"]["change"] == "reopened" {
            assert_eq!(event["data"]["conversation"]["is_open"], true);
            break;
        }
    }

    let (status, error) = open(&server, json!({"kind": "prospect", "contact_id": "nobody"})).await;
    assert_eq!(status, 404, "{error}");
    assert_eq!(error["error"]["code"], "NOT_FOUND");
    let (status, error) = open(&server, json!({"kind": "support", "inbox_id": "nowhere"})).await;
    assert_eq!(status, 404, "{error}");
    let (status, _) = open(&server, json!({"kind": "team"})).await;
    assert_eq!(status, 400);
    server.stop().await;
}

#[tokio::test]
async fn racing_prospect_conversations_for_one_contact_make_one_conversation() {
    let server = TestServer::start().await;
    contact(&server, "c-9", "Linus").await;
    let opens: Vec<_> = (0..6)
        .map(|n| {
            let addr = server.addr;
            let body = json!({"kind": "prospect", "contact_id": "c-9", "participants": [format!("agent{n}")]});
            tokio::spawn(async move {
                http_post(addr, "/api/conversations", Some(&admin()), &body.to_string()).await
            })
        })
        .collect();
    let mut rooms = Vec::new();
    let mut created = 0;
    for open in opens {
        let (status, text) = open.await.unwrap();
        assert!(status == 200 || status == 201, "{status} {text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        created += usize::from(body["created"] == true);
        rooms.push(body["room_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(created, 1, "{rooms:?}");
    rooms.dedup();
    assert_eq!(rooms.len(), 1, "{rooms:?}");
    // Every request's participant is in the one conversation.
    let mut admin_ws = server.connect("root", TENANT, Role::Admin).await;
    let got = admin_ws
        .request("conversation_get", Some(&rooms[0]), json!({}))
        .await;
    let mut participants: Vec<String> =
        serde_json::from_value(got["data"]["participants"].clone()).unwrap();
    participants.sort();
    assert_eq!(
        participants,
        (0..6).map(|n| format!("agent{n}")).collect::<Vec<_>>()
    );
    server.stop().await;
}

/// A support conversation `conv` with customer `cust`; returns its room id.
async fn support_conversation(server: &TestServer) -> String {
    let (status, body) = open(
        server,
        json!({"room_id": "conv", "kind": "support", "participants": ["cust"]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    "conv".to_owned()
}

#[tokio::test]
async fn conversation_updates_are_answered_and_announced_to_members_and_the_inbox() {
    let server = TestServer::start().await;
    let room = support_conversation(&server).await;
    let mut watcher = subscribed(&server, "watcher").await;
    let mut bob = server.connect("bob", TENANT, Role::Agent).await;
    bob.join(&room).await;
    let mut cust = server.connect("cust", TENANT, Role::Customer).await;
    cust.join(&room).await;
    for client in [&mut bob, &mut cust, &mut watcher] {
        client.drain(Duration::from_millis(200)).await;
    }

    let mut carol = server.connect("carol", TENANT, Role::Agent).await;
    let reply = carol
        .request(
            "conversation_update",
            Some(&room),
            json!({"priority": "high", "labels": ["vip", "billing"], "show_on_top": true,
                   "assignee": "bob", "title": "Order 42", "add_participants": ["carol"]}),
        )
        .await;
    assert_eq!(reply["status"], "success", "{reply}");
    assert_eq!(reply["code"], "conversation_update_response");
    let data = &reply["data"];
    assert_eq!(data["priority"], "high");
    assert_eq!(data["labels"], json!(["vip", "billing"]));
    assert_eq!(data["show_on_top"], true);
    assert_eq!(data["assignee"], "bob");
    assert_eq!(data["title"], "Order 42");
    assert_eq!(data["participants"], json!(["cust", "carol"]));

    for client in [&mut bob, &mut watcher] {
        let event = event_about(client, &room).await;
        assert_eq!(event["data"]["change"], "updated");
        assert_eq!(event["user_id"], "carol", "who changed it");
        assert_eq!(event["data"]["conversation"]["assignee"], "bob");
        assert_eq!(
            event["data"]["conversation"]["labels"],
            json!(["vip", "billing"])
        );
        assert!(event.get("ref").is_none());
    }
    // The customer hears of it without the team's fields.
    let event = event_about(&mut cust, &room).await;
    let seen = &event["data"]["conversation"];
    assert_eq!(seen["title"], "Order 42");
    for hidden in [
        "assignee",
        "labels",
        "priority",
        "metrics",
        "participants",
        "show_on_top",
    ] {
        assert!(seen.get(hidden).is_none(), "{hidden} in {event}");
    }
    // Nothing twice: the watcher is not a member, bob is not subscribed.
    watcher.expect_silence(Duration::from_millis(200)).await;
    bob.expect_silence(Duration::from_millis(100)).await;

    // Snooze, then close: closing ends the snooze.
    let until = "2099-01-01T00:00:00.000Z";
    let snoozed = carol
        .request(
            "conversation_update",
            Some(&room),
            json!({"snoozed_until": until}),
        )
        .await;
    assert_eq!(snoozed["data"]["snoozed_until"], until, "{snoozed}");
    let closed = carol
        .request(
            "conversation_update",
            Some(&room),
            json!({"is_open": false}),
        )
        .await;
    assert_eq!(closed["data"]["is_open"], false);
    assert!(closed["data"]["snoozed_until"].is_null(), "{closed}");

    // Refusals: the customer; bad fields, each named; a team room.
    let refused = cust
        .request("conversation_update", Some(&room), json!({"is_open": true}))
        .await;
    assert_eq!(refused["data"]["error_code"], "FORBIDDEN", "{refused}");
    for (data, names) in [
        (json!({}), "nothing to change"),
        (json!({"colour": "red"}), "colour"),
        (
            json!({"snoozed_until": "2001-01-01T00:00:00Z"}),
            "snoozed_until",
        ),
        (json!({"snoozed_until": "tomorrow"}), "snoozed_until"),
        (json!({"priority": "asap"}), "priority"),
        (json!({"labels": ["x".repeat(65)]}), "labels"),
        (json!({"title": ""}), "title"),
    ] {
        let error = carol
            .request("conversation_update", Some(&room), data)
            .await;
        assert_eq!(error["data"]["error_code"], "BAD_REQUEST", "{error}");
        let message = error["data"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{message}");
    }
    create_room(
        &server,
        &admin(),
        json!({"room_id": "team-1", "kind": "team", "participants": ["carol"]}),
    )
    .await;
    let error = carol
        .request(
            "conversation_update",
            Some("team-1"),
            json!({"is_open": false}),
        )
        .await;
    assert_eq!(error["data"]["error_code"], "NOT_FOUND", "{error}");
    server.stop().await;
}

#[tokio::test]
async fn messages_move_a_conversation_and_the_inbox_hears_of_it() {
    let server = TestServer::start().await;
    let room = support_conversation(&server).await;
    let mut watcher = subscribed(&server, "watcher").await;
    let mut cust = server.connect("cust", TENANT, Role::Customer).await;
    cust.join(&room).await;
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    alice.join(&room).await;

    cust.chat(&room, "where is my order?").await;
    let event = event_about(&mut watcher, &room).await;
    assert_eq!(event["data"]["change"], "activity");
    assert_eq!(event["user_id"], "cust", "whose message moved it");
    let c = &event["data"]["conversation"];
    assert_eq!(c["last_message"]["preview"], "where is my order?");
    assert_eq!(c["last_message"]["direction"], "INCOMING");
    let waiting = c["waiting_since"].clone();
    assert!(waiting.is_string(), "{event}");
    assert_eq!(c["last_activity_at"], c["last_message"]["created_at"]);

    let reply = alice.chat(&room, "on its way").await;
    let user = alice.user.clone();
    alice
        .request(
            "note",
            Some(&room),
            json!({"message": "checked the courier", "sender": user}),
        )
        .await;
    // Activity saves fold what arrives meanwhile: wait for the state after both.
    let settled = loop {
        let event = event_about(&mut watcher, &room).await;
        let c = event["data"]["conversation"].clone();
        if c["metrics"]["notes"] == 1 && c["metrics"]["messages"]["agent"] == 1 {
            break c;
        }
    };
    assert!(settled["waiting_since"].is_null(), "{settled}");
    assert_eq!(
        settled["metrics"]["first_reply_at"],
        reply["data"]["created_at"]
    );
    assert_eq!(settled["metrics"]["messages"]["customer"], 1);
    // First reply time: from the customer's message to alice's answer.
    let asked = storage::Timestamp::parse_rfc3339(waiting.as_str().unwrap()).unwrap();
    let answered =
        storage::Timestamp::parse_rfc3339(reply["data"]["created_at"].as_str().unwrap()).unwrap();
    assert_eq!(
        settled["metrics"]["first_reply_ms"],
        json!(answered.0 - asked.0),
        "{settled}"
    );
    // A note is not the conversation's last message (the customer never sees it).
    assert_eq!(settled["last_message"]["preview"], "on its way");

    // conversation_get: the team's view with the caller's unread count; the customer's view.
    let got = alice
        .request("conversation_get", Some(&room), json!({}))
        .await;
    assert_eq!(got["status"], "success", "{got}");
    assert_eq!(got["data"]["metrics"]["notes"], 1);
    assert_eq!(got["data"]["unread_count"], 1, "the customer's message");
    let got = cust
        .request("conversation_get", Some(&room), json!({}))
        .await;
    assert_eq!(
        got["data"]["unread_count"], 1,
        "alice's reply; the note is not counted"
    );
    assert!(got["data"].get("metrics").is_none(), "{got}");
    assert!(got["data"].get("last_message").is_none(), "{got}");
    server.stop().await;
}

#[tokio::test]
async fn another_tenants_inbox_and_conversations_stay_apart() {
    let server = TestServer::start().await;
    let room = support_conversation(&server).await;
    let mut outsider = server.connect("eve", "globex", Role::Agent).await;
    let reply = outsider.request("subscribe_inbox", None, json!({})).await;
    assert_eq!(reply["data"]["tenant"], "globex");
    for code in ["conversation_get", "conversation_update"] {
        let data = if code == "conversation_get" {
            json!({})
        } else {
            json!({"is_open": false})
        };
        let error = outsider.request(code, Some(&room), data).await;
        assert_eq!(error["data"]["error_code"], "NOT_FOUND", "{error}");
    }
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    alice
        .request(
            "conversation_update",
            Some(&room),
            json!({"priority": "urgent"}),
        )
        .await;
    outsider.expect_silence(Duration::from_millis(300)).await;

    // A customer may not follow the inbox; a subscription ends on request.
    let mut cust = server.connect("cust", TENANT, Role::Customer).await;
    let error = cust.request("subscribe_inbox", None, json!({})).await;
    assert_eq!(error["data"]["error_code"], "FORBIDDEN", "{error}");
    let mut watcher = subscribed(&server, "watcher").await;
    let off = watcher
        .request("subscribe_inbox", None, json!({"subscribed": false}))
        .await;
    assert_eq!(off["data"]["subscribed"], false);
    alice
        .request(
            "conversation_update",
            Some(&room),
            json!({"priority": "low"}),
        )
        .await;
    watcher.expect_silence(Duration::from_millis(300)).await;
    server.stop().await;
}

#[tokio::test]
async fn a_conversation_ends_once_and_its_customer_rates_it_once() {
    let server = TestServer::start().await;
    let room = support_conversation(&server).await;
    let mut watcher = subscribed(&server, "watcher").await;
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    alice.join(&room).await;
    let mut cust = server.connect("cust", TENANT, Role::Customer).await;
    cust.join(&room).await;

    let refused = cust
        .request("end", Some(&room), json!({"reason": "resolved"}))
        .await;
    assert_eq!(refused["data"]["error_code"], "FORBIDDEN", "{refused}");
    let ended = cust.request("end", Some(&room), json!({})).await;
    assert_eq!(ended["status"], "success", "{ended}");
    assert_eq!(ended["code"], "end_response");
    assert_eq!(ended["data"]["status"], "ended");
    assert_eq!(ended["data"]["is_open"], false);
    assert!(
        ended["data"].get("metrics").is_none(),
        "customer view: {ended}"
    );
    for client in [&mut alice, &mut watcher] {
        let event = event_about(client, &room).await;
        assert_eq!(event["data"]["change"], "ended", "{event}");
        assert_eq!(event["user_id"], "cust");
        let metrics = &event["data"]["conversation"]["metrics"];
        assert_eq!(metrics["end_reason"], "user_ended");
        assert!(metrics["ended_at"].is_string(), "{event}");
    }
    let again = alice
        .request("end", Some(&room), json!({"reason": "resolved"}))
        .await;
    assert_eq!(again["data"]["error_code"], "BAD_REQUEST", "{again}");
    assert!(again["data"]["message"]
        .as_str()
        .unwrap()
        .contains("ended already"));

    let refused = alice
        .request("rate", Some(&room), json!({"score": "good"}))
        .await;
    assert_eq!(refused["data"]["error_code"], "FORBIDDEN", "{refused}");
    for (data, error_code, names) in [
        (json!({"score": "meh"}), "BAD_REQUEST", "score"),
        (json!({}), "BAD_REQUEST", "score"),
        (
            json!({"score": "bad", "comment": "x".repeat(1001)}),
            "TOO_LARGE",
            "comment",
        ),
    ] {
        let error = cust.request("rate", Some(&room), data).await;
        assert_eq!(error["data"]["error_code"], error_code, "{error}");
        assert!(error["data"]["message"].as_str().unwrap().contains(names));
    }
    let rated = cust
        .request(
            "rate",
            Some(&room),
            json!({"score": "good", "comment": "quick, thanks"}),
        )
        .await;
    assert_eq!(rated["status"], "success", "{rated}");
    assert_eq!(rated["data"]["rating"]["score"], "good");
    assert_eq!(rated["data"]["rating"]["comment"], "quick, thanks");
    let event = event_about(&mut alice, &room).await;
    assert_eq!(event["data"]["change"], "rated");
    let twice = cust
        .request("rate", Some(&room), json!({"score": "bad"}))
        .await;
    assert_eq!(twice["data"]["error_code"], "BAD_REQUEST", "{twice}");
    assert!(twice["data"]["message"]
        .as_str()
        .unwrap()
        .contains("rated already"));
    let got = alice
        .request("conversation_get", Some(&room), json!({}))
        .await;
    assert_eq!(
        got["data"]["rating"]["score"], "good",
        "the first rating stands"
    );
    server.stop().await;
}

async fn list(client: &mut Client, data: Value) -> Value {
    let reply = client.request("conversation_list", None, data).await;
    assert_eq!(reply["code"], "conversation_list_response", "{reply}");
    reply
}

fn ids(reply: &Value) -> Vec<String> {
    reply["data"]["conversations"]
        .as_array()
        .unwrap_or_else(|| panic!("{reply}"))
        .iter()
        .map(|c| c["room_id"].as_str().unwrap().to_owned())
        .collect()
}

/// A customer of conversation `id` says something; returns once the inbox has seen it move.
async fn customer_says(server: &TestServer, watcher: &mut Client, id: &str) {
    let mut cust = server
        .connect(&format!("cust-{id}"), TENANT, Role::Customer)
        .await;
    cust.join(id).await;
    cust.chat(id, "hello?").await;
    loop {
        let event = event_about(watcher, id).await;
        if event["data"]["change"] == "activity" {
            return;
        }
    }
}

#[tokio::test]
async fn the_inbox_lists_conversations_by_activity_with_filters_and_unread_counts() {
    let server = TestServer::start().await;
    let (status, _) = post(
        &server,
        "/api/inboxes",
        &admin(),
        json!({"inbox_id": "web", "name": "Web", "channel": {"type": "web_widget", "widget_key": "web-widget-key"}}),
    )
    .await;
    assert_eq!(status, 201);
    for n in 1..=6 {
        let inbox = (n <= 3).then_some("web");
        conversation_with(&server, &format!("c{n}"), inbox).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let mut alice = subscribed(&server, "alice").await;
    for (id, change) in [
        ("c1", json!({"is_open": false})),
        ("c2", json!({"snoozed_until": "2099-01-01T00:00:00Z"})),
        ("c3", json!({"show_on_top": true, "priority": "high"})),
        ("c4", json!({"assignee": "alice", "labels": ["vip"]})),
        ("c5", json!({"priority": "low"})),
    ] {
        let reply = alice.request("conversation_update", Some(id), change).await;
        assert_eq!(reply["status"], "success", "{reply}");
    }
    customer_says(&server, &mut alice, "c4").await;
    customer_says(&server, &mut alice, "c6").await;

    let open = list(&mut alice, json!({})).await;
    assert_eq!(
        ids(&open),
        ["c6", "c4", "c5", "c3"],
        "open, newest activity first"
    );
    assert_eq!(open["data"]["next"], Value::Null);
    assert_eq!(open["data"]["has_more"], false);
    let first = &open["data"]["conversations"][0];
    assert_eq!(first["unread_count"], 1);
    assert_eq!(first["last_message"]["preview"], "hello?");
    assert_eq!(first["is_admin"], false);
    assert_eq!(
        open["data"]["conversations"][1]["is_admin"], true,
        "assigned to alice"
    );
    assert_eq!(open["data"]["conversations"][2]["unread_count"], 0);

    for (data, expected) in [
        (json!({"filter": "CLOSED"}), vec!["c1"]),
        (json!({"filter": "SNOOZED"}), vec!["c2"]),
        (json!({"filter": "ASSIGNED_TO_ME"}), vec!["c4"]),
        (json!({"filter": "PRIORITY"}), vec!["c3", "c5"]),
        (json!({"filter": "UNREAD"}), vec!["c6", "c4"]),
        (json!({"label": "vip"}), vec!["c4"]),
        (json!({"inbox_id": "web"}), vec!["c3"]),
        (json!({"sort": "OLDEST"}), vec!["c3", "c5", "c4", "c6"]),
        (
            json!({"filter": "ALL"}),
            vec!["c6", "c4", "c5", "c3", "c2", "c1"],
        ),
    ] {
        let reply = list(&mut alice, data.clone()).await;
        assert_eq!(ids(&reply), expected, "{data}");
    }

    // Paging, while a message moves a conversation not seen yet to the top: every one once.
    let page = list(&mut alice, json!({"filter": "ALL", "limit": 2})).await;
    let mut walked = ids(&page);
    let mut next = page["data"]["next"].clone();
    assert!(next.is_string(), "{page}");
    customer_says(&server, &mut alice, "c1").await;
    while let Some(cursor) = next.as_str() {
        let page = list(
            &mut alice,
            json!({"filter": "ALL", "limit": 2, "next": cursor}),
        )
        .await;
        walked.extend(ids(&page));
        next = page["data"]["next"].clone();
    }
    assert_eq!(walked, ["c6", "c4", "c5", "c3", "c2", "c1"]);
    let fresh = list(&mut alice, json!({"filter": "ALL", "limit": 1})).await;
    assert_eq!(ids(&fresh), ["c1"], "a new walk sees the move");

    // Refusals.
    let mut cust = server.connect("cust-c1", TENANT, Role::Customer).await;
    let error = list(&mut cust, json!({})).await;
    assert_eq!(error["data"]["error_code"], "FORBIDDEN", "{error}");
    for (data, names) in [
        (json!({"limit": 0}), "limit"),
        (json!({"limit": 101}), "limit"),
        (json!({"filter": "STARRED"}), "filter"),
        (json!({"sort": "RANDOM"}), "sort"),
        (json!({"next": "not-a-cursor"}), "next"),
        (json!({"page": 2}), "page"),
    ] {
        let error = list(&mut alice, data).await;
        assert_eq!(error["data"]["error_code"], "BAD_REQUEST", "{error}");
        let message = error["data"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{message}");
    }
    // Another tenant's inbox is its own.
    let mut eve = server.connect("eve", "globex", Role::Agent).await;
    let empty = list(&mut eve, json!({"filter": "ALL"})).await;
    assert_eq!(ids(&empty), Vec::<String>::new());
    server.stop().await;
}

/// Many conversations, customers writing all the while, an agent paging through five at a
/// time: each conversation is listed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_walks_the_whole_inbox_once_while_messages_keep_arriving() {
    let server = TestServer::start_with(|c| c.rate_burst = 1000).await;
    const CONVERSATIONS: usize = 30;
    for n in 0..CONVERSATIONS {
        conversation_with(&server, &format!("w{n:02}"), None).await;
    }
    let mut writers = Vec::new();
    for n in (0..CONVERSATIONS).step_by(3) {
        let id = format!("w{n:02}");
        let mut cust = server
            .connect(&format!("cust-{id}"), TENANT, Role::Customer)
            .await;
        cust.join(&id).await;
        writers.push((id, cust));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let chatter = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sent = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (id, cust) in &mut writers {
                    cust.chat(id, "still there?").await;
                    sent += 1;
                }
            }
            sent
        })
    };
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    let mut walked = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let mut data = json!({"filter": "ALL", "limit": 5});
        if let Some(cursor) = &next {
            data["next"] = json!(cursor);
        }
        let page = list(&mut alice, data).await;
        walked.extend(ids(&page));
        match page["data"]["next"].as_str() {
            Some(cursor) => next = Some(cursor.to_owned()),
            None => break,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = chatter.await.unwrap();
    assert!(sent > 10, "messages arrived during the walk: {sent}");
    let mut sorted = walked.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), walked.len(), "no duplicate: {walked:?}");
    assert_eq!(walked.len(), CONVERSATIONS, "no gap: {walked:?}");
    server.stop().await;
}

fn in_millis(millis: i64) -> String {
    storage::Timestamp(storage::Timestamp::now().0 + millis).to_rfc3339()
}

#[tokio::test]
async fn a_snoozed_conversation_wakes_by_itself_also_after_a_restart() {
    let server = TestServer::start().await;
    let room = support_conversation(&server).await;
    let mut watcher = subscribed(&server, "watcher").await;
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    let snoozed = alice
        .request(
            "conversation_update",
            Some(&room),
            json!({"snoozed_until": in_millis(1200)}),
        )
        .await;
    assert_eq!(snoozed["status"], "success", "{snoozed}");
    assert_eq!(
        ids(&list(&mut alice, json!({"filter": "SNOOZED"})).await),
        [room.as_str()]
    );
    let woke = loop {
        let event = tokio::time::timeout(Duration::from_secs(6), event_about(&mut watcher, &room))
            .await
            .expect("woken within a few seconds of its time");
        if event["data"]["change"] == "woke" {
            break event;
        }
    };
    assert_eq!(woke["user_id"], "system");
    assert!(
        woke["data"]["conversation"]["snoozed_until"].is_null(),
        "{woke}"
    );
    assert_eq!(
        ids(&list(&mut alice, json!({})).await),
        [room.as_str()],
        "open again"
    );
    assert_eq!(
        ids(&list(&mut alice, json!({"filter": "SNOOZED"})).await),
        Vec::<String>::new()
    );

    // Snoozed again, and the gateway is down when the time comes: it wakes after the start.
    let snoozed = alice
        .request(
            "conversation_update",
            Some(&room),
            json!({"snoozed_until": in_millis(800)}),
        )
        .await;
    assert_eq!(snoozed["status"], "success", "{snoozed}");
    drop((alice, watcher));
    let dir = server.stop().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let server = TestServer::start_in(dir, |_| {}).await;
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    loop {
        let got = alice
            .request("conversation_get", Some(&room), json!({}))
            .await;
        if got["data"]["snoozed_until"].is_null() {
            assert_eq!(got["data"]["is_open"], true);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still snoozed: {got}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn customers_see_is_mine_on_messages_and_the_team_does_not() {
    let server = TestServer::start().await;
    let room = support_conversation(&server).await;
    let mut cust = server.connect("cust", TENANT, Role::Customer).await;
    cust.join(&room).await;
    let mut cust_tab = server.connect("cust", TENANT, Role::Customer).await;
    cust_tab.join(&room).await;
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    alice.join(&room).await;

    let asked = cust.chat(&room, "where is my order?").await;
    assert_eq!(asked["data"]["is_mine"], true, "{asked}");
    let seen_by_tab = cust_tab.recv_code("chat_response").await;
    assert_eq!(
        seen_by_tab["data"]["is_mine"], true,
        "the same customer's other connection"
    );
    let seen_by_alice = alice.recv_code("chat_response").await;
    assert!(
        seen_by_alice["data"].get("is_mine").is_none(),
        "{seen_by_alice}"
    );
    let answer = alice.chat(&room, "on its way").await;
    assert!(answer["data"].get("is_mine").is_none(), "{answer}");
    let answered = cust.recv_code("chat_response").await;
    assert_eq!(answered["data"]["is_mine"], false, "{answered}");
    assert_eq!(answered["data"]["message"], "on its way");

    let mine = |reply: &Value, key: &str| -> Vec<Value> {
        reply["data"][key]
            .as_array()
            .unwrap_or_else(|| panic!("{reply}"))
            .iter()
            .map(|m| m["is_mine"].clone())
            .collect()
    };
    let page = cust.request("historic", Some(&room), json!({})).await;
    assert_eq!(mine(&page, "messages"), [json!(true), json!(false)]);
    let page = alice.request("historic", Some(&room), json!({})).await;
    assert_eq!(mine(&page, "messages"), [Value::Null, Value::Null]);
    let mut back = server.connect("cust", TENANT, Role::Customer).await;
    let rejoined = back
        .request("join", Some(&room), json!({"since_seq": 0}))
        .await;
    assert_eq!(mine(&rejoined, "missed"), [json!(true), json!(false)]);

    // Reads move the conversation's last-seen times; the inbox hears of them.
    let mut watcher = subscribed(&server, "watcher").await;
    let read = cust
        .request(
            "read_receipt",
            Some(&room),
            json!({"message_id": answer["data"]["message_id"], "sender": "cust"}),
        )
        .await;
    assert_eq!(read["status"], "success", "{read}");
    let seen = loop {
        let event = event_about(&mut watcher, &room).await;
        if event["data"]["change"] == "seen" {
            break event;
        }
    };
    assert_eq!(seen["user_id"], "cust");
    let c = &seen["data"]["conversation"];
    assert!(c["contact_last_seen_at"].is_string(), "{seen}");
    assert!(c["agent_last_seen_at"].is_null(), "{seen}");
    // The same receipt again moves no marker: nothing is saved, nobody is told.
    let again = cust
        .request(
            "read_receipt",
            Some(&room),
            json!({"message_id": answer["data"]["message_id"], "sender": "cust"}),
        )
        .await;
    assert_eq!(again["status"], "success", "{again}");
    watcher.expect_silence(Duration::from_millis(300)).await;
    alice
        .request(
            "read_receipt",
            Some(&room),
            json!({"message_id": asked["data"]["message_id"], "sender": "alice"}),
        )
        .await;
    let got = loop {
        let got = cust
            .request("conversation_get", Some(&room), json!({}))
            .await;
        if got["data"]["agent_last_seen_at"].is_string() {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        got["data"].get("contact_last_seen_at").is_none(),
        "customer view: {got}"
    );
    server.stop().await;
}

/// The next `dashboard_response` whose counters satisfy `wanted` (within a few seconds).
async fn counters_until(client: &mut Client, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let event = tokio::time::timeout(left, client.recv_code("dashboard_response"))
            .await
            .expect("the dashboard reached the expected counters");
        assert_eq!(event["data"]["dashboard_id"], "overview", "{event}");
        if wanted(&event["data"]["counters"]) {
            return event["data"]["counters"].clone();
        }
    }
}

#[tokio::test]
async fn the_dashboard_follows_the_tenant_live_and_analytics_reach_their_files() {
    let server = TestServer::start().await;
    conversation_with(&server, "d1", None).await;
    conversation_with(&server, "d2", None).await;
    let mut root = server.connect("root", TENANT, Role::Admin).await;
    root.request("conversation_update", Some("d2"), json!({"is_open": false}))
        .await;
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    let subscribed = alice.request("subscribe_dashboard", None, json!({})).await;
    assert_eq!(subscribed["status"], "success", "{subscribed}");
    let data = &subscribed["data"];
    assert_eq!(data["dashboard_id"], "overview");
    assert_eq!(data["tenant"], TENANT);
    assert_eq!(
        data["counters"]["agents_online"], 2,
        "alice and root: {subscribed}"
    );
    assert_eq!(data["counters"]["conversations_queued"], 0);
    // The open conversations are counted right after the subscription.
    counters_until(&mut alice, |c| c["conversations_open"] == 1).await;

    let mut cust = server.connect("cust-d1", TENANT, Role::Customer).await;
    cust.join("d1").await;
    cust.request("escalate", Some("d1"), json!({})).await;
    counters_until(&mut alice, |c| c["conversations_queued"] == 1).await;
    for (code, data) in [
        (
            "page_view",
            json!({"page": "https://shop.example/pricing", "referrer": "https://search.example/"}),
        ),
        (
            "track_activity",
            json!({"activity": "clicked_buy", "data": {"plan": "pro"}}),
        ),
    ] {
        cust.send(json!({"code": code, "user_id": "cust-d1", "room_id": "d1", "data": data}))
            .await;
    }
    let counters = counters_until(&mut alice, |c| {
        c["page_views_1m"] == 1 && c["activities_1m"] == 1
    })
    .await;
    assert_eq!(
        counters["agents_online"], 2,
        "customers are not agents: {counters}"
    );
    drop(root);
    counters_until(&mut alice, |c| c["agents_online"] == 1).await;

    // Refused: bad events, a customer subscribing, an unknown dashboard.
    for (code, data, error_code, names) in [
        ("page_view", json!({}), "BAD_REQUEST", "page"),
        (
            "page_view",
            json!({"page": "x".repeat(2049)}),
            "TOO_LARGE",
            "data.page",
        ),
        (
            "track_activity",
            json!({"activity": ""}),
            "BAD_REQUEST",
            "data.activity",
        ),
        (
            "track_activity",
            json!({"activity": "a", "mood": 1}),
            "BAD_REQUEST",
            "mood",
        ),
        (
            "subscribe_dashboard",
            json!({}),
            "FORBIDDEN",
            "agents and admins",
        ),
    ] {
        let error = cust.request(code, None, data).await;
        assert_eq!(error["data"]["error_code"], error_code, "{code}: {error}");
        assert!(
            error["data"]["message"].as_str().unwrap().contains(names),
            "{error}"
        );
    }
    let unknown = alice
        .request(
            "subscribe_dashboard",
            None,
            json!({"dashboard_id": "sales"}),
        )
        .await;
    assert_eq!(unknown["data"]["error_code"], "NOT_FOUND", "{unknown}");

    // Both events are in the day's file, one JSON object a line.
    let dir = server.dir.path().join("analytics");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let lines: Vec<Value> = loop {
        let text: String = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= 2 || tokio::time::Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["kind"], "page_view");
    assert_eq!(lines[0]["page"], "https://shop.example/pricing");
    assert_eq!(lines[0]["tenant_id"], TENANT);
    assert_eq!(lines[0]["user_id"], "cust-d1");
    assert_eq!(lines[0]["room_id"], "d1");
    assert_eq!(lines[1]["kind"], "activity");
    assert_eq!(lines[1]["data"]["plan"], "pro");
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("gateway_analytics_events_total{outcome=\"written\"} 2"),
        "{metrics}"
    );
    server.stop().await;
}
