//! When storage cannot take a write, the sender gets UNAVAILABLE, nothing is stored or
//! broadcast, and a retry with the same message_id succeeds once storage recovers.

mod common;

use std::time::Duration;

use common::*;
use gateway::auth::Role;
use serde_json::{json, Value};

/// Makes the gateway's own database refuse inserts of messages whose text starts with `fail`,
/// the way a full disk or an I/O error would fail the commit.
fn break_storage(db: &std::path::Path) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER fail_writes BEFORE INSERT ON messages WHEN NEW.message LIKE 'fail%'
         BEGIN SELECT RAISE(ABORT, 'simulated disk failure'); END;",
    )
    .unwrap();
}

fn repair_storage(db: &std::path::Path) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch("DROP TRIGGER fail_writes;").unwrap();
}

#[tokio::test]
async fn failed_commit_is_unavailable_and_a_retry_with_the_same_message_id_succeeds() {
    let server = TestServer::start().await;
    let db = server.dir.path().join("gateway.db");
    let mut alice = server.connect("alice", "acme", Role::Admin).await;
    let mut bob = server.connect("bob", "acme", Role::Admin).await;
    alice.join("room-u").await;
    bob.join("room-u").await;
    let first = alice.chat("room-u", "before the failure").await;
    assert_eq!(first["data"]["seq"], 1);
    bob.recv_code("chat_response").await;

    break_storage(&db);
    let failed = alice
        .request(
            "chat",
            Some("room-u"),
            json!({"message": "fail: not stored", "sender": "alice", "message_id": "m-retry"}),
        )
        .await;
    assert_eq!(failed["status"], "error", "{failed}");
    assert_eq!(failed["code"], "chat_response");
    assert_eq!(failed["data"]["error_code"], "UNAVAILABLE");
    // Nothing was broadcast and nothing was stored.
    bob.expect_silence(Duration::from_millis(300)).await;
    let history = alice.request("historic", Some("room-u"), json!({})).await;
    assert_eq!(history["data"]["messages"].as_array().unwrap().len(), 1);

    // The connection and the room keep working for writes that can be stored.
    let other = alice.chat("room-u", "unaffected").await;
    assert_eq!(
        other["data"]["seq"], 2,
        "no seq was burnt by the failed write"
    );
    bob.recv_code("chat_response").await;

    repair_storage(&db);
    let retried = alice
        .request(
            "chat",
            Some("room-u"),
            json!({"message": "fail: not stored", "sender": "alice", "message_id": "m-retry"}),
        )
        .await;
    assert_eq!(retried["status"], "success", "{retried}");
    assert_eq!(retried["data"]["seq"], 3);
    assert_eq!(retried["data"]["message_id"], "m-retry");
    let event = bob.recv_code("chat_response").await;
    assert_eq!(event["data"]["seq"], 3);
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("gateway_errors_total{error_code=\"UNAVAILABLE\"} 1"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_refused_chat_without_message_id_returns_the_id_to_retry_with() {
    let server = TestServer::start().await;
    let db = server.dir.path().join("gateway.db");
    let mut alice = server.connect("alice", "acme", Role::Admin).await;
    alice.join("room-id").await;
    break_storage(&db);
    let failed = alice
        .request(
            "chat",
            Some("room-id"),
            json!({"message": "fail: no id given", "sender": "alice"}),
        )
        .await;
    assert_eq!(failed["data"]["error_code"], "UNAVAILABLE", "{failed}");
    let message_id = failed["data"]["message_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no message_id to retry with: {failed}"))
        .to_owned();
    repair_storage(&db);
    let retried = alice
        .request(
            "chat",
            Some("room-id"),
            json!({"message": "fail: no id given", "sender": "alice", "message_id": message_id}),
        )
        .await;
    assert_eq!(retried["status"], "success", "{retried}");
    assert_eq!(retried["data"]["message_id"], message_id.as_str());
    assert_eq!(retried["data"]["seq"], 1);
    server.stop().await;
}

#[tokio::test]
async fn a_join_that_fails_to_read_missed_messages_leaves_the_connection_not_joined() {
    let server = TestServer::start().await;
    let db = server.dir.path().join("gateway.db");
    let mut owner = server.connect("owner", "acme", Role::Admin).await;
    owner.join("room-j").await;
    owner.chat("room-j", "one").await;

    // Reads of messages fail while the table is away, as on a damaged disk.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch("ALTER TABLE messages RENAME TO messages_away;")
        .unwrap();
    let mut alice = server.connect("alice", "acme", Role::Admin).await;
    let failed = alice
        .request("join", Some("room-j"), json!({"since_seq": 0}))
        .await;
    assert_eq!(failed["data"]["error_code"], "UNAVAILABLE", "{failed}");
    conn.execute_batch("ALTER TABLE messages_away RENAME TO messages;")
        .unwrap();
    drop(conn);

    // Not joined: a chat is refused and the owner hears nothing from alice.
    let v = alice.chat("room-j", "am I in?").await;
    assert_eq!(v["data"]["error_code"], "NOT_JOINED", "{v}");
    owner.drain(Duration::from_millis(200)).await;
    // Joining again works.
    let v = alice
        .request("join", Some("room-j"), json!({"since_seq": 0}))
        .await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(alice.chat("room-j", "now I am").await["data"]["seq"], 2);
    server.stop().await;
}

#[tokio::test]
async fn room_creation_that_storage_refuses_is_503_with_a_generic_message() {
    let server = TestServer::start().await;
    let conn = rusqlite::Connection::open(server.dir.path().join("gateway.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER fail_rooms BEFORE INSERT ON rooms
         BEGIN SELECT RAISE(ABORT, 'simulated disk failure'); END;",
    )
    .unwrap();
    let bearer = token("alice", "acme", Role::Admin);
    let body = json!({"room_id": "r-api", "kind": "team"}).to_string();
    let (status, text) = http_post(server.addr, "/api/rooms", Some(&bearer), &body).await;
    assert_eq!(status, 503, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(
        v,
        json!({"error": {"code": "UNAVAILABLE", "message": "storage unavailable, retry later"}})
    );
    // What the backend said stays in the server's log.
    assert!(!text.contains("simulated"), "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_whose_write_outlived_its_deadline_reaches_the_room_when_the_retry_finds_it() {
    let server = TestServer::start_with(|c| c.store_timeout_ms = 300).await;
    let db = server.dir.path().join("gateway.db");
    let mut alice = server.connect("alice", "acme", Role::Admin).await;
    let mut bob = server.connect("bob", "acme", Role::Admin).await;
    alice.join("room-late").await;
    bob.join("room-late").await;

    // Another process holds the write lock past the store's deadline: the write's outcome is
    // unknown to the gateway, yet it commits once the lock is gone.
    let locker = rusqlite::Connection::open(&db).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE;").unwrap();
    let failed = alice
        .request(
            "chat",
            Some("room-late"),
            json!({"message": "slow one", "sender": "alice", "message_id": "m-late"}),
        )
        .await;
    assert_eq!(failed["data"]["error_code"], "UNAVAILABLE", "{failed}");
    locker.execute_batch("COMMIT;").unwrap();
    drop(locker);
    tokio::time::sleep(Duration::from_millis(300)).await;
    bob.expect_silence(Duration::from_millis(200)).await;

    // The retry finds it stored: the sender gets the original, and the room hears of it once.
    let retried = alice
        .request(
            "chat",
            Some("room-late"),
            json!({"message": "slow one", "sender": "alice", "message_id": "m-late"}),
        )
        .await;
    assert_eq!(retried["status"], "success", "{retried}");
    assert_eq!(retried["data"]["seq"], 1);
    let event = bob.recv_code("chat_response").await;
    assert_eq!(event["data"]["message_id"], "m-late");
    // A second retry is an ordinary duplicate: nothing more for the room.
    alice
        .request(
            "chat",
            Some("room-late"),
            json!({"message": "slow one", "sender": "alice", "message_id": "m-late"}),
        )
        .await;
    bob.expect_silence(Duration::from_millis(300)).await;
    server.stop().await;
}
