//! The HTTP API (`/api/v1`) with a real HTTP client (`reqwest`), and WebSocket clients on the
//! same conversations: messages sent over HTTP reach the room's sockets exactly once, notes
//! never reach a customer, widget sessions, files, broadcasts, and every error status.

mod common;

use std::time::Duration;

use common::inbox::{admin, TENANT};
use common::*;
use gateway::auth::Role;
use reqwest::{Client as Http, Method, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpStream;

const SILENCE: Duration = Duration::from_millis(300);

struct Api {
    http: Http,
    base: String,
}

impl Api {
    fn of(server: &TestServer) -> Api {
        Api {
            http: Http::new(),
            base: format!("http://{}/api/v1", server.addr),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    async fn post(&self, path: &str, bearer: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(bearer), Some(body))
            .await
    }

    async fn get(&self, path: &str, bearer: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(bearer), None).await
    }
}

fn agent() -> String {
    token("agent-1", TENANT, Role::Agent)
}

fn customer(id: &str) -> String {
    token(id, TENANT, Role::Customer)
}

/// Opens support conversation `room` with customer `cust-<room>`.
async fn conversation(api: &Api, room: &str) {
    let body =
        json!({"room_id": room, "kind": "support", "participants": [format!("cust-{room}")]});
    let (status, reply) = api.post("/conversations", &admin(), body).await;
    assert_eq!(status, StatusCode::CREATED, "{reply}");
}

fn code_of(error: &Value) -> &str {
    error["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn a_message_sent_over_http_reaches_the_rooms_sockets_once_and_a_retry_is_idempotent() {
    let server = TestServer::start().await;
    let api = Api::of(&server);
    conversation(&api, "c1").await;
    let mut agent_socket = server.connect("agent-2", TENANT, Role::Agent).await;
    agent_socket.join("c1").await;
    let mut customer_socket = server.connect("cust-c1", TENANT, Role::Customer).await;
    customer_socket.join("c1").await;

    let body = json!({"message": "Hello from the CRM", "message_id": "crm-1"});
    let (status, sent) = api
        .post("/conversations/c1/messages", &agent(), body.clone())
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sent}");
    assert_eq!(sent["message"], "Hello from the CRM");
    assert_eq!(sent["sender"], "agent-1");
    assert_eq!(sent["direction"], "OUTGOING");
    let seq = sent["seq"].as_u64().unwrap();

    let event = agent_socket.recv_code("chat_response").await;
    assert_eq!(event["data"]["message_id"], "crm-1");
    assert!(event["data"].get("is_mine").is_none(), "{event}");
    let event = customer_socket.recv_code("chat_response").await;
    assert_eq!(event["data"]["message_id"], "crm-1");
    assert_eq!(event["data"]["is_mine"], false);

    // The retry answers the stored message and reaches nobody again.
    let (status, again) = api.post("/conversations/c1/messages", &agent(), body).await;
    assert_eq!(status, StatusCode::CREATED, "{again}");
    assert_eq!(again["seq"].as_u64(), Some(seq));
    agent_socket.expect_silence(SILENCE).await;
    customer_socket.expect_silence(SILENCE).await;

    // The customer writes over HTTP too: `is_mine` in its answer, INCOMING for the team.
    let (status, mine) = api
        .post(
            "/conversations/c1/messages",
            &customer("cust-c1"),
            json!({"message": "Thanks"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{mine}");
    assert_eq!(mine["is_mine"], true);
    assert_eq!(mine["direction"], "INCOMING");
    let event = agent_socket.recv_code("chat_response").await;
    assert_eq!(event["data"]["message"], "Thanks");
    let event = customer_socket.recv_code("chat_response").await;
    assert_eq!(event["data"]["is_mine"], true);

    // Another customer's conversation does not exist for this one.
    conversation(&api, "c2").await;
    let (status, error) = api
        .post(
            "/conversations/c2/messages",
            &customer("cust-c1"),
            json!({"message": "hi"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{error}");
    server.stop().await;
}

#[tokio::test]
async fn notes_reach_the_team_only_and_a_customers_history_never_holds_one() {
    let server = TestServer::start().await;
    let api = Api::of(&server);
    conversation(&api, "n1").await;
    let mut customer_socket = server.connect("cust-n1", TENANT, Role::Customer).await;
    customer_socket.join("n1").await;
    let mut agent_socket = server.connect("agent-2", TENANT, Role::Agent).await;
    agent_socket.join("n1").await;
    for i in 0..5 {
        let body = json!({"message": format!("visible {i} shipping")});
        let (status, _) = api.post("/conversations/n1/messages", &agent(), body).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let note = json!({"type": "note", "message": "refund approved", "mentions": ["agent-2"]});
    let (status, stored) = api.post("/conversations/n1/messages", &agent(), note).await;
    assert_eq!(status, StatusCode::CREATED, "{stored}");
    assert_eq!(stored["direction"], "NOTE");
    assert_eq!(stored["mentions"], json!(["agent-2"]));
    // The team sees it; the customer's socket never does.
    loop {
        let frame = agent_socket.recv().await;
        if frame["code"] == "note_response" {
            assert_eq!(frame["data"]["message"], "refund approved");
            break;
        }
    }
    let frames = customer_socket.drain(SILENCE).await;
    let chats = frames
        .iter()
        .filter(|f| f["code"] == "chat_response")
        .count();
    assert_eq!(chats, 5, "{frames:?}");
    assert!(frames
        .iter()
        .all(|f| f["code"] != "note_response" && f["data"]["direction"] != "NOTE"));

    // A customer may not write one.
    let (status, error) = api
        .post(
            "/conversations/n1/messages",
            &customer("cust-n1"),
            json!({"type": "note", "message": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{error}");
    // Mentions belong to notes.
    let (status, error) = api
        .post(
            "/conversations/n1/messages",
            &agent(),
            json!({"message": "x", "mentions": ["a"]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");

    let (status, page) = api
        .get("/conversations/n1/messages", &customer("cust-n1"))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 5);
    assert!(messages
        .iter()
        .all(|m| m["direction"] != "NOTE" && m["is_mine"] == false));
    let (_, page) = api.get("/conversations/n1/messages", &agent()).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 6);
    assert_eq!(page["messages"][5]["direction"], "NOTE");

    // Cursors and limits: the newest two, then the two before them, then two after the first.
    let (_, newest) = api
        .get("/conversations/n1/messages?limit=2", &customer("cust-n1"))
        .await;
    let seqs: Vec<u64> = newest["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [4, 5]);
    assert_eq!(newest["has_more"], true);
    let (_, older) = api
        .get(
            "/conversations/n1/messages?limit=2&before=4",
            &customer("cust-n1"),
        )
        .await;
    assert_eq!(older["messages"][0]["seq"], 2);
    let (_, newer) = api
        .get("/conversations/n1/messages?after=1&limit=2", &agent())
        .await;
    assert_eq!(newer["messages"][0]["seq"], 2);
    // Search never finds a note for a customer.
    let (_, found) = api
        .get("/conversations/n1/messages?search=refund", &agent())
        .await;
    assert_eq!(found["messages"].as_array().unwrap().len(), 1, "{found}");
    let (_, found) = api
        .get(
            "/conversations/n1/messages?search=refund",
            &customer("cust-n1"),
        )
        .await;
    assert_eq!(found["messages"].as_array().unwrap().len(), 0, "{found}");
    let (_, found) = api
        .get(
            "/conversations/n1/messages?search=shipping&limit=3",
            &customer("cust-n1"),
        )
        .await;
    assert_eq!(found["messages"].as_array().unwrap().len(), 3, "{found}");

    for bad in [
        "limit=0",
        "limit=201",
        "before=-1",
        "after=x",
        "limit=2&limit=3",
        "colour=red",
    ] {
        let (status, error) = api
            .get(&format!("/conversations/n1/messages?{bad}"), &agent())
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {error}");
        assert_eq!(code_of(&error), "BAD_REQUEST");
    }
    server.stop().await;
}

#[tokio::test]
async fn every_error_has_its_status_and_the_documented_body() {
    let server = TestServer::start().await;
    let api = Api::of(&server);
    conversation(&api, "e1").await;
    let send = "/conversations/e1/messages";

    let (status, error) = api
        .call(Method::POST, send, None, Some(json!({"message": "x"})))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{error}");
    assert_eq!(code_of(&error), "UNAUTHORIZED");
    let (status, _) = api.post(send, "not-a-token", json!({"message": "x"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Another tenant's room answers exactly like one that does not exist.
    let other = token("agent-1", "globex", Role::Agent);
    let (status, error) = api.post(send, &other, json!({"message": "x"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{error}");
    let (status, unknown) = api
        .post(
            "/conversations/nope/messages",
            &agent(),
            json!({"message": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error, unknown);

    let (status, error) = api
        .post(send, &agent(), json!({"message": "x", "colour": 1}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("colour"),
        "{error}"
    );
    let (status, error) = api.post(send, &agent(), json!({"message": ""})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    let (status, error) = api
        .post(
            send,
            &agent(),
            json!({"message": "x".repeat(16 * 1024 + 1)}),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{error}");
    assert_eq!(code_of(&error), "TOO_LARGE");
    let huge = json!({"message": "x", "metadata": {"blob": "y".repeat(70 * 1024)}});
    let (status, _) = api.post(send, &agent(), huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    let response = api
        .http
        .post(format!("{}{send}", api.base))
        .bearer_auth(agent())
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let (status, error) = api.call(Method::DELETE, send, Some(&agent()), None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{error}");
    let response = api
        .http
        .delete(format!("{}{send}", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["allow"], "GET, POST");
    let (status, error) = api.get("/nothing/here", &agent()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(code_of(&error), "NOT_FOUND");

    // Roles: customers manage nothing; only admins write inboxes.
    let (status, _) = api
        .post("/contacts", &customer("cust-e1"), json!({"name": "A"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let inbox = json!({"name": "SMS", "channel": {"type": "sms", "phone_number": "+15550100"}});
    let (status, _) = api.post("/inboxes", &agent(), inbox).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = api.get("/contacts/nobody", &agent()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn conversations_are_read_listed_and_updated_with_the_socket_codes_rules() {
    let server = TestServer::start().await;
    let api = Api::of(&server);
    let (status, contact) = api
        .post(
            "/contacts",
            &admin(),
            json!({"contact_id": "k1", "name": "Kim", "email": "kim@example.com"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{contact}");
    let (status, read) = api.get("/contacts/k1", &agent()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read["email"], "kim@example.com");
    let body = json!({"room_id": "p1", "kind": "prospect", "contact_id": "k1"});
    let (status, opened) = api.post("/conversations", &admin(), body.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{opened}");
    assert_eq!(opened["title"], "Kim");
    let mut inbox_socket = common::inbox::subscribed(&server, "agent-3").await;

    let patch = json!({"assignee": "agent-1", "labels": ["vip"], "priority": "high"});
    let response = api
        .http
        .patch(format!("{}/conversations/p1", api.base))
        .bearer_auth(agent())
        .json(&patch)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let updated: Value = response.json().await.unwrap();
    assert_eq!(updated["assignee"], "agent-1", "{updated}");
    let event = common::inbox::event_about(&mut inbox_socket, "p1").await;
    assert_eq!(
        event["data"]["conversation"]["assignee"], "agent-1",
        "{event}"
    );

    let (status, got) = api.get("/conversations/p1", &agent()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["labels"], json!(["vip"]));
    let (status, page) = api
        .get("/conversations?filter=ASSIGNED_TO_ME", &agent())
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["conversations"][0]["room_id"], "p1");
    let (status, page) = api.get("/conversations?limit=1&filter=ALL", &admin()).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["conversations"].as_array().unwrap().len(), 1);
    let (status, error) = api.get("/conversations?filter=SOMETIMES", &agent()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");

    // Customers neither list nor manage.
    let (status, _) = api.get("/conversations", &customer("k1")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let response = api
        .http
        .patch(format!("{}/conversations/p1", api.base))
        .bearer_auth(customer("k1"))
        .json(&json!({"is_open": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    // A second prospect conversation for the contact reopens the first.
    let (status, again) = api.post("/conversations", &admin(), body).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["reopened"], true);
    server.stop().await;
}

#[tokio::test]
async fn a_broadcast_reaches_every_room_once_within_its_bound() {
    let server = TestServer::start().await;
    let api = Api::of(&server);
    let service = token("crm", TENANT, Role::Service);
    conversation(&api, "b1").await;
    conversation(&api, "b2").await;
    let mut b1 = server.connect("agent-2", TENANT, Role::Agent).await;
    b1.join("b1").await;
    let mut b2 = server.connect("cust-b2", TENANT, Role::Customer).await;
    b2.join("b2").await;

    let body = json!({"room_ids": ["b1", "missing", "b2"], "message": "We are back online",
                      "message_id": "status-7"});
    let (status, reply) = api.post("/broadcast", &service, body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["sent"], 2);
    assert_eq!(reply["failed"], 1);
    assert_eq!(reply["results"][1]["room_id"], "missing");
    assert_eq!(reply["results"][1]["status"], 404);
    assert_eq!(reply["results"][0]["message"]["message_id"], "status-7");
    assert_eq!(
        b1.recv_code("chat_response").await["data"]["message"],
        "We are back online"
    );
    assert_eq!(
        b2.recv_code("chat_response").await["data"]["is_mine"],
        false
    );

    // Retried: stored once per room, delivered once.
    let (status, again) = api.post("/broadcast", &service, body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        again["results"][2]["message"]["seq"],
        reply["results"][2]["message"]["seq"]
    );
    b1.expect_silence(SILENCE).await;
    b2.expect_silence(SILENCE).await;

    let (status, _) = api
        .post(
            "/broadcast",
            &agent(),
            json!({"room_ids": ["b1"], "message": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let many: Vec<String> = (0..101).map(|i| format!("r{i}")).collect();
    let (status, error) = api
        .post(
            "/broadcast",
            &service,
            json!({"room_ids": many, "message": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    let (status, _) = api
        .post(
            "/broadcast",
            &service,
            json!({"room_ids": ["b1", "b1"], "message": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    server.stop().await;
}

async fn widget_session(api: &Api, origin: Option<&str>, body: Value) -> (StatusCode, Value) {
    let mut request = api
        .http
        .post(format!("{}/widget/sessions", api.base))
        .json(&body);
    if let Some(origin) = origin {
        request = request.header("origin", origin);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn widget_sessions_check_the_key_the_origin_and_the_rate() {
    let server = TestServer::start_with(|config| config.widget_sessions_per_ip_minute = 6).await;
    let api = Api::of(&server);
    let inbox = json!({"inbox_id": "web", "name": "Website", "channel": {
        "type": "web_widget", "widget_key": "pk_live_acme_123", "authorized_domains": ["shop.example.com"]}});
    let (status, reply) = api.post("/inboxes", &admin(), inbox.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{reply}");
    // Another tenant cannot take the key.
    let globex = token("root", "globex", Role::Admin);
    let (status, error) = api.post("/inboxes", &globex, inbox).await;
    assert_eq!(status, StatusCode::CONFLICT, "{error}");

    let shop = Some("https://shop.example.com");
    let (status, error) = widget_session(&api, shop, json!({"widget_key": "pk_wrong_key"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{error}");
    let key = json!({"widget_key": "pk_live_acme_123"});
    let (status, error) = widget_session(&api, Some("https://evil.example.net"), key.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{error}");
    let (status, error) = widget_session(&api, None, key.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{error}");

    let first =
        json!({"widget_key": "pk_live_acme_123", "name": "Ana", "email": "ana@example.com"});
    let (status, session) = widget_session(&api, shop, first).await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    assert_eq!(session["created"], true);
    let room = session["room_id"].as_str().unwrap().to_owned();
    let device = session["device_id"].as_str().unwrap().to_owned();
    assert!(
        session["conversation"].get("assignee").is_none(),
        "{session}"
    );
    // The token is a customer's, on the socket and over HTTP, for its conversation only.
    let token = session["token"].as_str().unwrap().to_owned();
    let mut socket =
        Client::connect(&server.url(&token), session["contact_id"].as_str().unwrap()).await;
    let joined = socket.join(&room).await;
    assert_eq!(joined["status"], "success", "{joined}");
    let (status, sent) = api
        .post(
            &format!("/conversations/{room}/messages"),
            &token,
            json!({"message": "Hi!"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sent}");
    let (status, _) = api.get("/conversations", &token).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, contact) = api
        .get(&format!("/contacts/visitor-{device}"), &admin())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(contact["email"], "ana@example.com");

    // The same device resumes the same conversation.
    let again = json!({"widget_key": "pk_live_acme_123", "device_id": device});
    let (status, resumed) = widget_session(&api, shop, again).await;
    assert_eq!(status, StatusCode::CREATED, "{resumed}");
    assert_eq!(resumed["room_id"], room.as_str());
    assert_eq!(resumed["created"], false);
    let bad = json!({"widget_key": "pk_live_acme_123", "device_id": "short"});
    let (status, _) = widget_session(&api, shop, bad).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Six sessions a minute from this address, counting the refused ones: the next is 429.
    let (status, error) = widget_session(&api, shop, key).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{error}");
    assert_eq!(code_of(&error), "RATE_LIMITED");
    server.stop().await;
}

fn png(bytes: usize) -> Vec<u8> {
    let mut data = b"\x89PNG\r\n\x1a\n".to_vec();
    data.extend((0..bytes).map(|i| (i % 251) as u8));
    data
}

async fn upload(
    api: &Api,
    bearer: &str,
    data: Vec<u8>,
    content_type: &str,
    room: Option<&str>,
) -> (StatusCode, Value) {
    let part = reqwest::multipart::Part::bytes(data)
        .file_name("screen shot é.png")
        .mime_str(content_type)
        .unwrap();
    let mut form = reqwest::multipart::Form::new().part("file", part);
    if let Some(room) = room {
        form = form.text("room_id", room.to_owned());
    }
    let response = api
        .http
        .post(format!("{}/files", api.base))
        .bearer_auth(bearer)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn files_are_uploaded_checked_and_read_back_with_ranges() {
    let server = TestServer::start_with(|config| config.max_file_bytes = 4096).await;
    let api = Api::of(&server);
    conversation(&api, "f1").await;
    conversation(&api, "f2").await;
    let data = png(3000);
    let (status, file) = upload(
        &api,
        &customer("cust-f1"),
        data.clone(),
        "image/png",
        Some("f1"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{file}");
    assert_eq!(file["size"], data.len());
    assert_eq!(file["content_type"], "image/png");
    let id = file["file_id"].as_str().unwrap().to_owned();
    let url = format!("{}/files/{id}", api.base);

    let response = api
        .http
        .get(&url)
        .bearer_auth(agent())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "image/png");
    let disposition = response.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        disposition.starts_with("inline; filename=\"screen shot _.png\""),
        "{disposition}"
    );
    assert!(
        disposition.contains("filename*=UTF-8''screen%20shot%20%C3%A9.png"),
        "{disposition}"
    );
    assert_eq!(response.bytes().await.unwrap().as_ref(), data.as_slice());

    let response = api
        .http
        .get(&url)
        .bearer_auth(customer("cust-f1"))
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        response.headers()["content-range"],
        format!("bytes 10-19/{}", data.len())
    );
    assert_eq!(response.bytes().await.unwrap().as_ref(), &data[10..20]);
    let response = api
        .http
        .get(&url)
        .bearer_auth(agent())
        .header("range", "bytes=5000-")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::RANGE_NOT_SATISFIABLE);

    // Another customer, another tenant: no such file.
    for bearer in [customer("cust-f2"), token("agent-1", "globex", Role::Agent)] {
        let response = api.http.get(&url).bearer_auth(bearer).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
    let (status, error) =
        upload(&api, &customer("cust-f1"), png(10), "image/png", Some("f2")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{error}");
    let (status, error) = upload(&api, &agent(), png(5000), "image/png", None).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{error}");
    let (status, error) = upload(&api, &agent(), b"<script>".to_vec(), "text/html", None).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{error}");
    let (status, error) = upload(&api, &customer("cust-f1"), png(10), "image/png", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");

    // The id goes into a message.
    let body = json!({"message": "", "type": "image", "attached_files": [id]});
    let (status, sent) = api
        .post("/conversations/f1/messages", &customer("cust-f1"), body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sent}");
    server.stop().await;
}

#[tokio::test]
async fn the_openapi_document_and_its_page_are_served() {
    let server = TestServer::start().await;
    let api = Api::of(&server);
    let response = api
        .http
        .get(format!("{}/openapi.json", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let doc: Value = response.json().await.unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let operations = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum::<usize>();
    assert!(operations >= 15, "{operations}");
    let page = api
        .http
        .get(format!("{}/docs", api.base))
        .send()
        .await
        .unwrap();
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(html.contains("/api/v1/conversations/{room_id}/messages"));
    server.stop().await;
}

#[tokio::test]
async fn a_tenant_sets_its_own_upload_limits_within_the_gateways() {
    let server = TestServer::start_with(|config| config.max_file_bytes = 4096).await;
    let api = Api::of(&server);
    let (status, limits) = api.get("/settings/files", &agent()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(limits["max_file_bytes"], 4096);
    let put = |bearer: String, body: Value| {
        let request = api
            .http
            .put(format!("{}/settings/files", api.base))
            .bearer_auth(bearer)
            .json(&body);
        async move {
            let response = request.send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    };
    let (status, _) = put(agent(), json!({"max_file_bytes": 100})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    for bad in [
        json!({"max_file_bytes": 5000}),
        json!({"max_file_bytes": 0}),
        json!({"file_types": ["png"]}),
        json!({"file_types": ["image/png; q=1"]}),
    ] {
        let (status, error) = put(admin(), bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {error}");
    }
    let (status, limits) = put(
        admin(),
        json!({"max_file_bytes": 100, "file_types": ["image/png"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{limits}");
    assert_eq!(
        limits,
        json!({"max_file_bytes": 100, "file_types": ["image/png"]})
    );
    let (status, _) = upload(&api, &agent(), png(200), "image/png", None).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = upload(&api, &agent(), png(10), "image/jpeg", None).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (status, _) = upload(&api, &agent(), png(10), "image/png", None).await;
    assert_eq!(status, StatusCode::CREATED);
    // Another tenant keeps the gateway's limits.
    let globex = token("g", "globex", Role::Agent);
    let (status, _) = upload(&api, &globex, png(200), "image/jpeg", None).await;
    assert_eq!(status, StatusCode::CREATED);
    server.stop().await;
}

#[tokio::test]
async fn contacts_and_inboxes_are_listed_newest_first_page_by_page_per_tenant() {
    let server = TestServer::start().await;
    let api = Api::of(&server);
    for i in 0..5 {
        let body = json!({"contact_id": format!("k{i}"), "name": format!("Contact {i}")});
        let (status, _) = api.post("/contacts", &admin(), body).await;
        assert_eq!(status, StatusCode::CREATED);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let globex = token("root", "globex", Role::Admin);
    let (status, _) = api
        .post(
            "/contacts",
            &globex,
            json!({"contact_id": "g1", "name": "Other"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);

    let mut seen = Vec::new();
    let mut path = "/contacts?limit=2".to_owned();
    loop {
        let (status, page) = api.get(&path, &agent()).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for item in page["items"].as_array().unwrap() {
            seen.push(item["contact_id"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(next) => path = format!("/contacts?limit=2&next={next}"),
            None => break,
        }
        // A contact saved while walking is not listed twice nor skipped in between.
        if seen.len() == 2 {
            let body = json!({"contact_id": "late", "name": "Late"});
            api.post("/contacts", &admin(), body).await;
        }
    }
    assert_eq!(seen, ["k4", "k3", "k2", "k1", "k0"]);
    for bad in ["limit=0", "limit=201", "next=garbage", "sort=up"] {
        let (status, _) = api.get(&format!("/contacts?{bad}"), &agent()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let (status, _) = api.get("/contacts", &customer("k1")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let inbox = json!({"inbox_id": "sms", "name": "SMS", "channel": {"type": "sms", "phone_number": "+15550100"}});
    let (status, _) = api.post("/inboxes", &admin(), inbox).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, page) = api.get("/inboxes", &agent()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["items"][0]["channel"]["phone_number"], "+15550100");
    assert_eq!(page["next"], Value::Null);
    server.stop().await;
}

/// Starts an upload of `length` declared bytes for `tenant`, sends its first bytes and stalls.
async fn stalled_upload(addr: std::net::SocketAddr, tenant: &str, length: usize) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let bearer = token("mallory", tenant, Role::Agent);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bearer}\r\n\
         Content-Type: multipart/form-data; boundary=XYZ\r\nContent-Length: {length}\r\n\r\n\
         --XYZ\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// Reads the status code of the answer to a request sent on `stream`.
async fn response_status(stream: &mut TcpStream, wait: Duration) -> u16 {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(wait, async {
        while !got.windows(2).any(|w| w == b"\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed without an answer");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("an answer in time");
    String::from_utf8_lossy(&got)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap()
}

/// Uploads that stall hold at most half of the process's upload budget per tenant, and give
/// it back with `408` once they have sent nothing for 10 s: another tenant's uploads go
/// through meanwhile.
#[tokio::test]
async fn stalled_uploads_of_one_tenant_do_not_keep_another_tenants_out() {
    let server = TestServer::start_with(|config| {
        config.max_file_bytes = 4 << 20;
        config.uploads_in_flight_mib = 1;
    })
    .await;
    let api = Api::of(&server);
    // Two uploads of 400 KiB that stall: together they would hold 800 of the 1024 KiB, but the
    // second is past the tenant's half and refused (answered once its body ends or stalls).
    let mut first = stalled_upload(server.addr, "evil", 400 << 10).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut second = stalled_upload(server.addr, "evil", 400 << 10).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let (status, _) = upload(&api, &agent(), png(500 << 10), "image/png", None).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "the other tenant's upload fits"
    );
    assert_eq!(
        response_status(&mut second, Duration::from_secs(15)).await,
        503
    );
    // The stalled one is answered when it has sent nothing for 10 s, and gives its share back.
    assert_eq!(
        response_status(&mut first, Duration::from_secs(15)).await,
        408
    );
    assert!(started.elapsed() < Duration::from_secs(11));
    let evil = token("mallory", "evil", Role::Agent);
    let (status, _) = upload(&api, &evil, png(500 << 10), "image/png", None).await;
    assert_eq!(status, StatusCode::CREATED);
    server.stop().await;
}

/// A JSON body that never arrives is answered `408` after 10 s instead of holding the
/// connection and its task.
#[tokio::test]
async fn a_json_body_that_never_arrives_times_out() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start().await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/contacts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\"",
        agent()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    assert_eq!(
        response_status(&mut stream, Duration::from_secs(15)).await,
        408
    );
    assert!(started.elapsed() >= Duration::from_secs(9));
    server.stop().await;
}

#[tokio::test]
async fn uploads_in_flight_are_bounded_in_bytes() {
    let server = TestServer::start_with(|config| {
        config.max_file_bytes = 4 << 20;
        config.uploads_in_flight_mib = 1;
    })
    .await;
    let api = Api::of(&server);
    // Larger than all the process may hold at once: refused before it is read, retry later.
    let part = reqwest::multipart::Part::bytes(png(2 << 20))
        .file_name("big.png")
        .mime_str("image/png")
        .unwrap();
    let response = api
        .http
        .post(format!("{}/files", api.base))
        .bearer_auth(agent())
        .multipart(reqwest::multipart::Form::new().part("file", part))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    let error: Value = response.json().await.unwrap();
    assert_eq!(code_of(&error), "UNAVAILABLE");
    // What fits goes through, and gives its share back.
    for _ in 0..3 {
        let (status, _) = upload(&api, &agent(), png(600 << 10), "image/png", None).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    server.stop().await;
}
