//! End to end over a real Apache Kafka broker (`scripts/kafka`, started by `scripts/test`;
//! `KAFKA_BROKERS`): the gateway with the `email-worker` and `push-worker` processes on the
//! Kafka bus, each against a real or stand-in provider: a real SMTP server (aiosmtpd,
//! `workers/tests/support/smtp.rs`) that contacts' mail is "sent" to, SendGrid's Inbound Parse
//! posts played by the test, and a stand-in for Google's OAuth2 and FCM
//! (`workers/tests/support/fcm.rs`). Kafka's console consumer reads the topics as an
//! independent client.
//!
//! Each test names its topics behind a prefix of its own (the gateway's `bus_topic_prefix`,
//! the worker's `BUS_TOPIC_PREFIX`) and gives its worker a state directory of its own, so tests
//! share the broker and nothing else.

mod common;
#[path = "../../workers/tests/support/fcm.rs"]
mod fcm;
#[path = "common/kafka.rs"]
mod kafka;
#[path = "../../workers/tests/support/smtp.rs"]
mod smtp;

use std::collections::BTreeSet;
use std::time::Duration;

use common::inbox::{admin, post, TENANT};
use common::*;
use gateway::auth::Role;
use kafka::{brokers, frame, gateway_on_kafka, prefix, read_topic, WorkerProcess};
use serde_json::{json, Value};
use smtp::SmtpServer;

/// The longest a Kafka hop may take (a consumer group joining takes a few seconds).
const WAIT: Duration = Duration::from_secs(30);

/// The right-hand side of the Message-IDs the email worker makes.
const DOMAIN: &str = "acme.example";
/// The email inbox's address.
const INBOX_ADDRESS: &str = "support@acme.example";
/// The inbound-parse webhook's secret.
const INBOUND_TOKEN: &str = "inbound-secret";

/// An agent's (or a customer's) message in a conversation over the HTTP API.
async fn send_as(server: &TestServer, user: &str, role: Role, room: &str, body: Value) -> Value {
    let bearer = token(user, TENANT, role);
    let path = format!("/api/v1/conversations/{room}/messages");
    let (status, sent) = post(server, &path, &bearer, body).await;
    assert_eq!(status, 201, "{sent}");
    sent
}

/// `GET path` with a bearer token, as JSON.
async fn get_json(server: &TestServer, path: &str, bearer: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(format!("http://{}{path}", server.addr))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Reads several topics at once with Kafka's console consumer (each read waits out its idle
/// timeout: together, the wait is paid once).
fn read_topics(brokers: &str, topics: &[String]) -> Vec<Vec<Value>> {
    std::thread::scope(|scope| {
        let readers: Vec<_> = topics
            .iter()
            .map(|topic| scope.spawn(move || read_topic(brokers, topic)))
            .collect();
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

// ---------------------------------------------------------------------------------------------
// Email

/// The `email-worker` process, sending through `smtp` (with its AUTH credentials).
async fn email_worker(
    brokers: &str,
    prefix: &str,
    smtp: &SmtpServer,
    state: &std::path::Path,
) -> WorkerProcess {
    let relay = format!("smtp://relay-user:p%40ss%20word@127.0.0.1:{}", smtp.port);
    WorkerProcess::start(
        "email-worker",
        brokers,
        prefix,
        state,
        "EMAIL_LISTEN",
        &[
            ("EMAIL_SMTP_URL", relay),
            ("EMAIL_DOMAIN", DOMAIN.to_owned()),
            ("EMAIL_INBOUND_TOKEN", INBOUND_TOKEN.to_owned()),
            ("EMAIL_SMTP_TIMEOUT_SECS", "5".to_owned()),
        ],
    )
    .await
}

/// A mail from Kim Lee to the inbox, as SendGrid's Inbound Parse posts it: its `Message-ID`,
/// the mail it answers (`In-Reply-To`, and `References` when given), its subject and text.
fn inbound_form(
    message_id: &str,
    in_reply_to: Option<&str>,
    references: &[&str],
    subject: &str,
    text: &str,
) -> reqwest::multipart::Form {
    let mut headers = format!(
        "Received: by mx.sendgrid.net\r\nFrom: Kim Lee <Kim@Example.com>\r\nTo: {INBOX_ADDRESS}\r\n\
         Subject: {subject}\r\nMessage-ID: {message_id}\r\n"
    );
    if let Some(parent) = in_reply_to {
        headers.push_str(&format!("In-Reply-To: {parent}\r\n"));
    }
    if !references.is_empty() {
        headers.push_str(&format!("References: {}\r\n", references.join(" ")));
    }
    reqwest::multipart::Form::new()
        .text("headers", headers)
        .text("dkim", "{@example.com : pass}")
        .text("to", INBOX_ADDRESS)
        .text("from", "Kim Lee <Kim@Example.com>")
        .text("text", text.to_owned())
        .text("sender_ip", "192.0.2.1")
        .text(
            "envelope",
            format!(r#"{{"to":["{INBOX_ADDRESS}"],"from":"kim@example.com"}}"#),
        )
        .text("subject", subject.to_owned())
        .text(
            "charsets",
            r#"{"to":"UTF-8","subject":"UTF-8","from":"UTF-8","text":"UTF-8"}"#,
        )
        .text("SPF", "pass")
}

/// Posts a mail to the worker's `/inbound` (with the webhook's secret as SendGrid's basic auth
/// password); the worker's answer, `accepted` or `duplicate`.
async fn post_inbound(worker: &WorkerProcess, form: reqwest::multipart::Form) -> String {
    let response = reqwest::Client::new()
        .post(worker.url("/inbound"))
        .basic_auth("sendgrid", Some(INBOUND_TOKEN))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    body["status"].as_str().unwrap().to_owned()
}

/// The next `chat_response` with `text`, skipping other frames; every `conversation_response`
/// on the way must be about `room` (no other conversation was opened).
async fn chat_with_text(agent: &mut Client, room: &str, text: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(frame) = agent.recv_within(left).await else {
            panic!("no chat_response {text:?} within {WAIT:?}");
        };
        if frame["code"] == "conversation_response" {
            assert_eq!(frame["room_id"], room, "another conversation: {frame}");
        }
        if frame["code"] == "chat_response" && frame["data"]["message"] == text {
            return frame;
        }
    }
}

/// The next `delivery_response` about `message_id` with `status`.
async fn delivery(agent: &mut Client, message_id: &str, status: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let state = frame(agent, "delivery_response", left).await;
        if state["data"]["message_id"] == message_id && state["data"]["status"] == status {
            return state;
        }
    }
}

/// The room's messages (notes left out) as `(direction, message_id, text)`.
async fn history(agent: &mut Client, room: &str) -> Vec<(String, String, String)> {
    let history = agent.request("historic", Some(room), json!({})).await;
    assert_eq!(history["status"], "success", "{history}");
    history["data"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["direction"] != "NOTE")
        .map(|m| {
            (
                m["direction"].as_str().unwrap_or("").to_owned(),
                m["message_id"].as_str().unwrap_or("").to_owned(),
                m["message"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn own_id(message_id: &str) -> String {
    format!("<{message_id}@{DOMAIN}>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_comes_in_the_reply_goes_out_threaded_once_and_the_answer_threads_back() {
    let Some(brokers) = brokers() else { return };
    let prefix = prefix();
    let smtp = SmtpServer::start(&[("SMTP_USER", "relay-user"), ("SMTP_PASSWORD", "p@ss word")]);
    let server = gateway_on_kafka(&brokers, &prefix).await;
    let state = tempfile::tempdir().unwrap();
    let worker = email_worker(&brokers, &prefix, &smtp, state.path()).await;
    let inbox = json!({"inbox_id": "mail", "name": "Acme Support",
                       "channel": {"type": "email", "address": INBOX_ADDRESS}});
    let (status, reply) = post(&server, "/api/v1/inboxes", &admin(), inbox).await;
    assert_eq!(status, 201, "{reply}");
    let mut agent = common::inbox::subscribed(&server, "agent-1").await;

    // Kim writes in: the inbound parse → `inbound.messages` → a new conversation, announced to
    // the agent following the inbox.
    let first = "Where is my order? I ordered it a week ago.";
    let kim_1 = "<kim-1@mail.example.com>";
    let form = || inbound_form(kim_1, None, &[], "Where is my order?", first);
    assert_eq!(post_inbound(&worker, form()).await, "accepted");
    let opened = frame(&mut agent, "conversation_response", WAIT).await;
    let room = opened["room_id"].as_str().unwrap().to_owned();
    agent.join(&room).await;
    // SendGrid posts again when it had no answer: taken, published no more.
    assert_eq!(post_inbound(&worker, form()).await, "duplicate");
    // The mail is the contact's message in the conversation (stored under its Message-ID).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let messages = history(&mut agent, &room).await;
        if !messages.is_empty() {
            assert_eq!(
                messages,
                [("INCOMING".into(), kim_1.into(), first.into())],
                "the mail, once"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no message in {room}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The agent answers over the HTTP API: one mail, from the inbox to Kim, threaded under
    // Kim's mail, through the relay with its credentials.
    let answer = "It ships tomorrow.\nTracking: 42";
    send_as(
        &server,
        "agent-1",
        Role::Agent,
        &room,
        json!({"message": answer, "message_id": "r-1"}),
    )
    .await;
    let mails = smtp.wait_for_within(1, WAIT).await;
    assert_eq!(mails.len(), 1, "{mails:#?}");
    let mail = &mails[0];
    assert!(mail.authenticated, "the relay's credentials were not used");
    assert_eq!(mail.mail_from, INBOX_ADDRESS);
    assert_eq!(mail.rcpt_tos, ["kim@example.com"]);
    // The inbox's name is the sender's.
    assert_eq!(
        mail.header("From"),
        Some(format!("Acme Support <{INBOX_ADDRESS}>"))
    );
    assert_eq!(mail.header("To").as_deref(), Some("kim@example.com"));
    // `Re: ` and the conversation's title: the subject of the mail that opened it.
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("Re: Where is my order?")
    );
    assert_eq!(mail.header("Message-ID"), Some(own_id("r-1")), "{mail:#?}");
    assert_eq!(mail.header("In-Reply-To").as_deref(), Some(kim_1));
    assert_eq!(mail.header("References").as_deref(), Some(kim_1));
    assert_eq!(mail.body.replace("\r\n", "\n").trim_end(), answer);

    // `sent`, under the mail's Message-ID, reaches the agent in the room.
    let sent = delivery(&mut agent, "r-1", "sent").await;
    assert_eq!(
        sent["data"],
        json!({"message_id": "r-1", "status": "sent", "provider_id": own_id("r-1")})
    );
    assert_eq!(sent["room_id"], room.as_str());

    // Kim answers that mail (quoting it): the answer lands in the same conversation, without
    // the quote.
    let kim_2 = "<kim-2@mail.example.com>";
    let r_1 = own_id("r-1");
    let answered = "Great, thanks! Can I pick it up instead?";
    let quoted = format!(
        "{answered}\r\n\r\nOn Tue, 3 Dec 2026 at 08:00, {INBOX_ADDRESS} wrote:\r\n\
         > It ships tomorrow.\r\n> Tracking: 42\r\n"
    );
    let form = inbound_form(
        kim_2,
        Some(&r_1),
        &[kim_1, &r_1],
        "Re: Where is my order?",
        &quoted,
    );
    assert_eq!(post_inbound(&worker, form).await, "accepted");
    let chat = chat_with_text(&mut agent, &room, answered).await;
    assert_eq!(chat["room_id"], room.as_str(), "{chat}");
    assert_eq!(chat["data"]["direction"], "INCOMING", "{chat}");

    // A note in the conversation sends no mail; the agent's next answer goes under the whole
    // thread, answering Kim's last mail.
    let secret = "VIP customer: refund without asking";
    send_as(
        &server,
        "agent-1",
        Role::Agent,
        &room,
        json!({"type": "note", "message": secret, "message_id": "n-1"}),
    )
    .await;
    let pickup = "Of course: the shop is open until 6pm.";
    send_as(
        &server,
        "agent-1",
        Role::Agent,
        &room,
        json!({"message": pickup, "message_id": "r-2"}),
    )
    .await;
    let mails = smtp.wait_for_within(2, WAIT).await;
    let mail = &mails[1];
    assert_eq!(mail.header("Message-ID"), Some(own_id("r-2")));
    assert_eq!(mail.header("In-Reply-To").as_deref(), Some(kim_2));
    assert_eq!(
        mail.header("References"),
        Some(format!("{kim_1} {r_1} {kim_2}"))
    );
    assert_eq!(mail.body.replace("\r\n", "\n").trim_end(), pickup);
    // r-2's `sent` comes after everything before it in the room's partition: nothing more
    // is coming.
    delivery(&mut agent, "r-2", "sent").await;
    let mails = smtp.mails();
    assert_eq!(mails.len(), 2, "{mails:#?}");
    assert!(
        mails.iter().all(|m| !format!("{m:?}").contains(secret)),
        "a note went out: {mails:#?}"
    );
    let messages = history(&mut agent, &room).await;
    assert_eq!(
        messages,
        [
            ("INCOMING".into(), kim_1.into(), first.into()),
            ("OUTGOING".into(), "r-1".into(), answer.into()),
            ("INCOMING".into(), kim_2.into(), answered.into()),
            ("OUTGOING".into(), "r-2".into(), pickup.into()),
        ]
    );

    // On the wire (an independent client): the two answers, once each, and never the note.
    let outbound = read_topic(&brokers, &format!("{prefix}outbound.email"));
    let ids: Vec<&str> = outbound
        .iter()
        .map(|r| r["message_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ids, ["r-1", "r-2"], "{outbound:?}");
    assert!(
        outbound.iter().all(|r| r["room_id"] == room.as_str()
            && r["to"] == "kim@example.com"
            && r["from"] == INBOX_ADDRESS),
        "{outbound:?}"
    );
    assert!(
        outbound.iter().all(|r| !r.to_string().contains(secret)),
        "{outbound:?}"
    );

    // A graceful stop exits 0.
    let stopped = worker.terminate(Duration::from_secs(20)).await;
    assert!(stopped.success(), "{stopped:?}");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Push

/// Registers a push device for `user`.
async fn register_device(server: &TestServer, user: &str, device: &str) {
    let body = json!({"token": device, "platform": "android"});
    let bearer = token(user, TENANT, Role::Agent);
    let (status, reply) = post(server, "/api/v1/devices", &bearer, body).await;
    assert_eq!(status, 201, "{reply}");
}

/// The tokens of `user`'s devices.
async fn devices(server: &TestServer, user: &str) -> Vec<String> {
    let bearer = token(user, TENANT, Role::Agent);
    let (status, body) = get_json(server, "/api/v1/devices", &bearer).await;
    assert_eq!(status, 200, "{body}");
    body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["token"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_agent_is_pushed_once_a_dead_token_is_forgotten_and_a_mention_keeps_the_note() {
    let Some(brokers) = brokers() else { return };
    let prefix = prefix();
    let keys = tempfile::tempdir().unwrap();
    let (fcm, credentials) = fcm::start_with_account(keys.path()).await;
    let server = gateway_on_kafka(&brokers, &prefix).await;
    let state = tempfile::tempdir().unwrap();
    let worker = WorkerProcess::start(
        "push-worker",
        &brokers,
        &prefix,
        state.path(),
        "PUSH_LISTEN",
        &[
            ("FCM_CREDENTIALS", credentials.display().to_string()),
            ("FCM_BASE_URL", fcm.base_url()),
        ],
    )
    .await;
    register_device(&server, "agent-7", "tok-a7").await;
    register_device(&server, "agent-8", "tok-a8").await;
    let body = json!({"room_id": "s1", "kind": "support",
                      "participants": ["cust-1", "agent-7", "agent-8"]});
    let (status, reply) = post(&server, "/api/v1/conversations", &admin(), body).await;
    assert_eq!(status, 201, "{reply}");
    // agent-8 has a live socket: no push for it. agent-7 has none.
    let mut online = server.connect("agent-8", TENANT, Role::Agent).await;
    online.join("s1").await;

    // The customer writes: one send to agent-7's device, with the message as its body.
    send_as(
        &server,
        "cust-1",
        Role::Customer,
        "s1",
        json!({"message": "My order never came", "message_id": "c-1"}),
    )
    .await;
    let attempts = fcm.wait_attempts(1, WAIT).await;
    assert_eq!(attempts[0].status, 200);
    assert_eq!(
        attempts[0].body,
        json!({"message": {
            "token": "tok-a7",
            "notification": {"title": "s1", "body": "My order never came"},
            "data": {"room_id": "s1", "message_id": "c-1", "tenant_id": TENANT,
                     "reason": "message"},
        }})
    );

    // A second device of agent-7's that FCM no longer knows: UNREGISTERED → `device.tokens`
    // → the gateway forgets it; the other device still gets the push.
    register_device(&server, "agent-7", "tok-gone").await;
    send_as(
        &server,
        "cust-1",
        Role::Customer,
        "s1",
        json!({"message": "Anyone there?", "message_id": "c-2"}),
    )
    .await;
    let attempts = fcm.wait_attempts(3, WAIT).await;
    let second: BTreeSet<(String, String, u16)> = attempts[1..]
        .iter()
        .map(|a| (a.token.clone(), a.message_id.clone(), a.status))
        .collect();
    assert_eq!(
        second,
        BTreeSet::from([
            ("tok-a7".to_owned(), "c-2".to_owned(), 200),
            ("tok-gone".to_owned(), "c-2".to_owned(), 404),
        ]),
        "{attempts:#?}"
    );
    assert_eq!(
        attempts[1].body["message"]["notification"]["body"],
        "Anyone there?"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let tokens = devices(&server, "agent-7").await;
        if tokens == ["tok-a7"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tok-gone not forgotten within {WAIT:?}: {tokens:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A mention in a note pushes agent-7 (its remaining device only), without the note's text.
    let secret = "refund in secret";
    send_as(
        &server,
        "agent-1",
        Role::Agent,
        "s1",
        json!({"type": "note", "message": secret, "mentions": ["agent-7"], "message_id": "n-1"}),
    )
    .await;
    let attempts = fcm.wait_attempts(4, WAIT).await;
    assert_eq!(attempts[3].status, 200);
    assert_eq!(
        attempts[3].body,
        json!({"message": {
            "token": "tok-a7",
            "notification": {"title": "s1", "body": "agent-1 mentioned you"},
            "data": {"room_id": "s1", "message_id": "n-1", "tenant_id": TENANT,
                     "reason": "mention"},
        }})
    );

    // The notifications share the room's partition: with the mention's send made, everything
    // before it was handled. Each send once, none to the online agent, the access token
    // fetched once and every request well formed and authorized.
    let attempts = fcm.all_attempts();
    assert_eq!(attempts.len(), 4, "{attempts:#?}");
    assert!(
        attempts.iter().all(|a| a.token != "tok-a8"),
        "{attempts:#?}"
    );
    assert!(
        attempts
            .iter()
            .all(|a| !a.body.to_string().contains(secret)),
        "{attempts:#?}"
    );
    {
        let seen = fcm.seen();
        assert!(seen.refused.is_empty(), "{:?}", seen.refused);
        assert_eq!(seen.token_requests, 1, "the access token is cached");
    }

    // On the wire (an independent client): three notifications, never the note's text, and the
    // token FCM gave up on.
    let read = read_topics(
        &brokers,
        &[
            format!("{prefix}notifications.push"),
            format!("{prefix}device.tokens"),
        ],
    );
    let (pushes, gone) = (&read[0], &read[1]);
    let ids: Vec<(&str, &str)> = pushes
        .iter()
        .map(|p| {
            (
                p["user_id"].as_str().unwrap_or(""),
                p["message_id"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        ids,
        [("agent-7", "c-1"), ("agent-7", "c-2"), ("agent-7", "n-1")],
        "{pushes:?}"
    );
    assert!(
        pushes.iter().all(|p| !p.to_string().contains(secret)),
        "{pushes:?}"
    );
    assert_eq!(
        gone.as_slice(),
        [
            json!({"v": 1, "tenant_id": TENANT, "user_id": "agent-7", "token": "tok-gone",
                "reason": "UNREGISTERED"})
        ],
        "{gone:?}"
    );

    let stopped = worker.terminate(Duration::from_secs(20)).await;
    assert!(stopped.success(), "{stopped:?}");
    drop(online);
    server.stop().await;
}
