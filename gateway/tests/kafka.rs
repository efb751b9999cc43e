//! End to end over a real Apache Kafka broker (`scripts/kafka`, started by `scripts/test`;
//! `KAFKA_BROKERS`): the gateway and the `sms-worker` process on the Kafka bus, a Twilio
//! stand-in, and Kafka's own console tools as an independent client.
//!
//! Each test names its topics behind a prefix of its own, so tests share the broker and not
//! their records.

mod common;
#[path = "common/kafka.rs"]
mod kafka;
#[path = "common/twilio.rs"]
mod twilio;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::inbox::{admin, post, TENANT};
use common::*;
use gateway::auth::Role;
use kafka::{brokers, frame, gateway_on_kafka, prefix, produce, read_topic, worker_binary};
use serde_json::{json, Value};
use twilio::{post_webhook, Scripted, Twilio, ACCOUNT_SID, AUTH_TOKEN};

/// The `sms-worker` process.
struct SmsWorker {
    child: Child,
    addr: SocketAddr,
}

impl SmsWorker {
    fn start(brokers: &str, prefix: &str, twilio: &Twilio, state: &Path, port: u16) -> SmsWorker {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(worker_binary("sms-worker"))
            .env("KAFKA_BROKERS", brokers)
            .env("BUS_TOPIC_PREFIX", prefix)
            .env("WORKER_STATE_DIR", state)
            .env("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
            .env("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
            .env("TWILIO_BASE_URL", twilio.base_url())
            .env("SMS_LISTEN", addr.to_string())
            .env("RUST_LOG", "info,librdkafka=warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let worker = SmsWorker { child, addr };
        worker.wait_healthy();
        worker
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(self.addr).is_err() {
            assert!(Instant::now() < deadline, "sms-worker did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// SIGKILL: no graceful anything.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, and its exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        // The workspace forbids unsafe code: the `kill` command sends the signal.
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for SmsWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn inbox(server: &TestServer, id: &str, kind: &str, number: &str) {
    let body =
        json!({"inbox_id": id, "name": id, "channel": {"type": kind, "phone_number": number}});
    let (status, reply) = post(server, "/api/v1/inboxes", &admin(), body).await;
    assert_eq!(status, 201, "{reply}");
}

async fn reply(server: &TestServer, room: &str, body: Value) -> Value {
    let agent = token("agent-1", TENANT, Role::Agent);
    let path = format!("/api/v1/conversations/{room}/messages");
    let (status, sent) = post(server, &path, &agent, body).await;
    assert_eq!(status, 201, "{sent}");
    sent
}

/// One test's world: a gateway and an `sms-worker` on Kafka behind a prefix of their own, a
/// Twilio stand-in, an inbox (`kind`, `number`) and an agent watching the inbox.
struct World {
    brokers: String,
    prefix: String,
    twilio: Twilio,
    server: TestServer,
    state: tempfile::TempDir,
    worker: SmsWorker,
    watcher: Client,
}

impl World {
    /// `None` when no broker is configured (outside CI).
    async fn start(inbox_id: &str, kind: &str, number: &str) -> Option<World> {
        let brokers = brokers()?;
        let prefix = prefix();
        let twilio = Twilio::start().await;
        let server = gateway_on_kafka(&brokers, &prefix).await;
        let state = tempfile::tempdir().unwrap();
        let worker = SmsWorker::start(&brokers, &prefix, &twilio, state.path(), free_port());
        inbox(&server, inbox_id, kind, number).await;
        let watcher = common::inbox::subscribed(&server, "agent-1").await;
        Some(World {
            brokers,
            prefix,
            twilio,
            server,
            state,
            worker,
            watcher,
        })
    }
}

const WAIT: Duration = Duration::from_secs(30);

/// A contact's message in: the signed webhook → `inbound.messages` → the agent's socket.
async fn inbound(
    worker: &SmsWorker,
    agent: &mut Client,
    from: &str,
    to: &str,
    sid: &str,
    text: &str,
) -> String {
    let params = [
        ("MessageSid", sid),
        ("AccountSid", ACCOUNT_SID),
        ("From", from),
        ("To", to),
        ("Body", text),
        ("NumMedia", "0"),
    ];
    let (status, body) = post_webhook(&worker.url("/twilio/inbound"), &params, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<Response></Response>"), "{body}");
    let created = frame(agent, "conversation_response", WAIT).await;
    created["room_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sms_goes_in_and_out_over_kafka_once_with_its_delivery_state_and_notes_stay_in() {
    let Some(world) = World::start("sms", "sms", "+15550100").await else {
        return;
    };
    let World {
        brokers,
        prefix,
        twilio,
        server,
        worker,
        mut watcher,
        ..
    } = world;

    // Signatures: a tampered parameter, another URL, no header: 403, and nothing goes on.
    let params = [
        ("MessageSid", "SMx"),
        ("From", "+15550123"),
        ("To", "+15550100"),
        ("Body", "hi"),
    ];
    let url = worker.url("/twilio/inbound");
    let forged = [
        ("MessageSid", "SMx"),
        ("From", "+15550123"),
        ("To", "+15550100"),
        ("Body", "HI"),
    ];
    let signed_other = workers::sms::signature(
        AUTH_TOKEN,
        &url,
        &forged.map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let other_url = workers::sms::signature(
        AUTH_TOKEN,
        &worker.url("/twilio/inbound?x=1"),
        &params.map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    for signature in [Some(signed_other), Some(other_url), None] {
        let (status, body) = post_webhook(&url, &params, Some(signature)).await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("FORBIDDEN"), "{body}");
    }

    let room = inbound(
        &worker,
        &mut watcher,
        "+15550123",
        "+15550100",
        "SMin1",
        "Is the shop open?",
    )
    .await;
    let mut agent = server.connect("agent-2", TENANT, Role::Agent).await;
    agent.join(&room).await;
    // Twilio retries a webhook it got no answer to: the same MessageSid stores nothing new.
    let again = [
        ("MessageSid", "SMin1"),
        ("From", "+15550123"),
        ("To", "+15550100"),
        ("Body", "Is the shop open?"),
    ];
    assert_eq!(post_webhook(&url, &again, None).await.0, 200);

    // Twilio asks to wait once: the worker honours Retry-After and sends once.
    twilio.script([Scripted::TooManyRequests { retry_after_s: 1 }]);
    let asked = Instant::now();
    reply(
        &server,
        &room,
        json!({"message": "Yes, until 6pm", "message_id": "r-1"}),
    )
    .await;
    let sent = twilio.wait_sent(1, WAIT).await;
    assert!(
        asked.elapsed() >= Duration::from_secs(1),
        "Retry-After not honoured"
    );
    assert_eq!(
        (
            sent[0].to.as_str(),
            sent[0].from.as_str(),
            sent[0].body.as_str()
        ),
        ("+15550123", "+15550100", "Yes, until 6pm")
    );
    assert_eq!(
        sent[0].status_callback.as_deref(),
        Some(worker.url("/twilio/status").as_str())
    );
    let queued = frame(&mut agent, "delivery_response", WAIT).await;
    assert_eq!(queued["data"]["status"], "sent", "{queued}");
    assert_eq!(queued["data"]["provider_id"], sent[0].sid.as_str());

    // Twilio's status callback: delivered, told to the agents in the room.
    let callback = [
        ("MessageSid", sent[0].sid.as_str()),
        ("MessageStatus", "delivered"),
        ("AccountSid", ACCOUNT_SID),
        ("To", "+15550123"),
        ("From", "+15550100"),
    ];
    let (status, _) = post_webhook(&worker.url("/twilio/status"), &callback, None).await;
    assert_eq!(status, 200);
    let delivered = frame(&mut agent, "delivery_response", WAIT).await;
    assert_eq!(
        delivered["data"],
        json!({"message_id": "r-1", "status": "delivered", "provider_id": sent[0].sid})
    );

    // A note never leaves: no send, and no record on a topic a worker reads.
    reply(
        &server,
        &room,
        json!({"message": "VIP, be quick", "message_id": "n-1", "type": "note"}),
    )
    .await;
    // An independent client's inbound message (Kafka's console producer) is taken too.
    let independent = json!({"v": 1, "channel": "sms", "from": "+15550123", "to": "+15550100",
                             "provider_id": "SMtool1", "text": "Sent by another client"});
    produce(
        &brokers,
        &format!("{prefix}inbound.messages"),
        "+15550123",
        &independent.to_string(),
    );
    loop {
        let chat = frame(&mut agent, "chat_response", WAIT).await;
        if chat["data"]["message"] == "Sent by another client" {
            assert_eq!(chat["data"]["direction"], "INCOMING");
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(twilio.sent().len(), 1, "{:?}", twilio.sent());

    let outbound = read_topic(&brokers, &format!("{prefix}outbound.sms"));
    assert_eq!(outbound.len(), 1, "{outbound:?}");
    assert_eq!(outbound[0]["message_id"], "r-1");
    let events = read_topic(&brokers, &format!("{prefix}conversation.events"));
    assert!(
        events.iter().any(|e| e["message"]["message_id"] == "r-1"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .all(|e| !e.to_string().contains("VIP, be quick")),
        "a note reached conversation.events: {events:?}"
    );
    let history = agent.request("historic", Some(&room), json!({})).await;
    let texts: Vec<&str> = history["data"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["direction"] != "NOTE")
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        [
            "Is the shop open?",
            "Yes, until 6pm",
            "Sent by another client"
        ],
        "{history}"
    );
    // A graceful stop exits 0.
    assert!(worker.terminate().success());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whatsapp_conversation_goes_both_ways_over_kafka() {
    let Some(world) = World::start("wa", "whatsapp", "+15550101").await else {
        return;
    };
    let World {
        twilio,
        server,
        worker,
        mut watcher,
        ..
    } = world;
    let room = inbound(
        &worker,
        &mut watcher,
        "whatsapp:+15550124",
        "whatsapp:+15550101",
        "SMwa1",
        "Hola",
    )
    .await;
    let mut agent = server.connect("agent-2", TENANT, Role::Agent).await;
    agent.join(&room).await;
    reply(
        &server,
        &room,
        json!({"message": "Hola, ¿en qué te ayudo?", "message_id": "wa-r1"}),
    )
    .await;
    let sent = twilio.wait_sent(1, WAIT).await;
    assert_eq!(
        (
            sent[0].to.as_str(),
            sent[0].from.as_str(),
            sent[0].body.as_str()
        ),
        (
            "whatsapp:+15550124",
            "whatsapp:+15550101",
            "Hola, ¿en qué te ayudo?"
        )
    );
    let callback = [
        ("MessageSid", sent[0].sid.as_str()),
        ("MessageStatus", "read"),
    ];
    assert_eq!(
        post_webhook(&worker.url("/twilio/status"), &callback, None)
            .await
            .0,
        200
    );
    loop {
        let state = frame(&mut agent, "delivery_response", WAIT).await;
        if state["data"]["status"] == "read" {
            break;
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_sends_every_message_once_after_its_restart() {
    let Some(world) = World::start("sms", "sms", "+15550100").await else {
        return;
    };
    let World {
        brokers,
        prefix,
        twilio,
        server,
        state,
        mut worker,
        mut watcher,
    } = world;
    // A slow provider: the kill lands while sends are under way.
    twilio.delay(Duration::from_millis(150));
    let port = worker.addr.port();
    let room = inbound(
        &worker,
        &mut watcher,
        "+15550125",
        "+15550100",
        "SMk1",
        "Hello",
    )
    .await;
    const BATCH: usize = 12;
    for i in 0..BATCH {
        reply(
            &server,
            &room,
            json!({"message": format!("reply {i}"), "message_id": format!("k-{i}")}),
        )
        .await;
    }
    twilio.wait_sent(3, WAIT).await;
    worker.kill();
    let before_restart = twilio.sent().len();
    assert!(
        before_restart < BATCH,
        "the kill came too late to test anything"
    );
    let worker = SmsWorker::start(&brokers, &prefix, &twilio, state.path(), port);
    let sent = twilio.wait_sent(BATCH, Duration::from_secs(60)).await;
    // Give a duplicate time to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent_after = twilio.sent();
    assert_eq!(sent_after.len(), BATCH, "{sent_after:?}");
    let mut bodies: Vec<&str> = sent.iter().map(|s| s.body.as_str()).collect();
    bodies.sort();
    let mut expected: Vec<String> = (0..BATCH).map(|i| format!("reply {i}")).collect();
    expected.sort();
    assert_eq!(bodies, expected, "each message once, none lost");
    eprintln!(
        "killed after {before_restart} sends; requests {}, resends the provider dropped by key {}",
        twilio.requests(),
        twilio.duplicates()
    );
    drop(worker);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_on_every_consumed_topic_is_dead_lettered_and_reading_goes_on() {
    let Some(world) = World::start("sms", "sms", "+15550100").await else {
        return;
    };
    let World {
        brokers,
        prefix,
        twilio,
        server,
        worker,
        mut watcher,
        ..
    } = world;
    for topic in ["inbound.messages", "delivery.status", "outbound.sms"] {
        produce(&brokers, &format!("{prefix}{topic}"), "poison", "{not json");
    }
    // Each reader goes on past its poison record.
    let room = inbound(
        &worker,
        &mut watcher,
        "+15550126",
        "+15550100",
        "SMp1",
        "After the poison",
    )
    .await;
    let good = json!({"v": 1, "tenant_id": TENANT, "room_id": room, "message_id": "p-1",
                      "channel": "sms", "from": "+15550100", "to": "+15550126", "body": "Direct"});
    produce(
        &brokers,
        &format!("{prefix}outbound.sms"),
        &room,
        &good.to_string(),
    );
    let sent = twilio.wait_sent(1, WAIT).await;
    assert_eq!(sent[0].body, "Direct");
    let mut letters = Vec::new();
    let deadline = Instant::now() + WAIT;
    while letters.len() < 3 {
        assert!(Instant::now() < deadline, "dead letters: {letters:?}");
        letters = read_topic(&brokers, &format!("{prefix}dead.letters"));
    }
    let mut topics: Vec<String> = letters
        .iter()
        .map(|l| {
            l["topic"]
                .as_str()
                .unwrap()
                .trim_start_matches(&prefix)
                .to_owned()
        })
        .collect();
    topics.sort();
    assert_eq!(
        topics,
        ["delivery.status", "inbound.messages", "outbound.sms"]
    );
    for letter in &letters {
        assert_eq!(letter["payload"], "{not json");
        assert!(!letter["reason"].as_str().unwrap().is_empty(), "{letter}");
    }
    drop(worker);
    server.stop().await;
}
