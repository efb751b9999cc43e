//! The shard numbers each room's messages and the store only fences: when a seq goes unused
//! (a duplicate, a failed write) while later chats are already on their way, the store refuses
//! those and the shard renumbers them. Clients see one answer per chat and a gap-free room.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use gateway::auth::Role;
use serde_json::{json, Value};

const TENANT: &str = "acme";

fn chat_frame(room: &str, text: &str, message_id: &str, reference: &str) -> String {
    json!({
        "code": "chat", "user_id": "alice", "room_id": room, "ref": reference,
        "data": {"message": text, "sender": "alice", "message_id": message_id}
    })
    .to_string()
}

/// Reads frames until every `ref` in `refs` has its direct reply.
async fn replies(client: &mut RawClient, refs: &[&str]) -> HashMap<String, Value> {
    let mut got = HashMap::new();
    while got.len() < refs.len() {
        let v = client
            .recv_json(Duration::from_secs(10))
            .await
            .expect("a reply for every pipelined chat");
        if let Some(reference) = v["ref"].as_str().filter(|r| refs.contains(r)) {
            got.insert(reference.to_owned(), v);
        }
    }
    got
}

/// Alice, connected and joined to room `r`.
async fn alice_in_room(server: &TestServer) -> RawClient {
    let mut alice = RawClient::connect(server.addr, &token("alice", TENANT, Role::Agent)).await;
    join(&mut alice, "alice").await;
    alice
}

/// Joins `user` to room `r` and waits for the join's reply.
async fn join(client: &mut RawClient, user: &str) {
    let join = json!({"code": "join", "user_id": user, "room_id": "r", "ref": "join", "data": {}});
    client.send_text(&join.to_string()).await;
    let joined = replies(client, &["join"]).await.remove("join").unwrap();
    assert_eq!(joined["status"], "success", "{joined}");
}

/// A server (configured by `tweak`, on one shard) whose room `r` holds alice's message `id-1`
/// ("first") at seq 1, stored before the server restarted: the shard does not remember the id,
/// so a retry of it is numbered and found only by the store. Alice is joined to `r`.
async fn alice_with_one_message(
    tweak: fn(&mut gateway::config::Config),
) -> (TestServer, RawClient) {
    let configure = move |c: &mut gateway::config::Config| {
        c.shards = 1;
        tweak(c);
    };
    let server = TestServer::start_with(configure).await;
    let mut alice = alice_in_room(&server).await;
    alice
        .send_text(&chat_frame("r", "first", "id-1", "c0"))
        .await;
    let first = replies(&mut alice, &["c0"]).await.remove("c0").unwrap();
    assert_eq!(first["data"]["seq"], 1, "{first}");
    drop(alice);
    let server = TestServer::start_in(server.stop().await, configure).await;
    let alice = alice_in_room(&server).await;
    (server, alice)
}

/// An open write transaction on the gateway's embedded database: the store's writer waits
/// (within its busy timeout) until it is dropped. `None` when the test runs on a database server.
struct EmbeddedWriteLock(rusqlite::Connection);

impl EmbeddedWriteLock {
    fn take(server: &TestServer) -> Option<EmbeddedWriteLock> {
        if test_store_url(server.dir.path()).is_some() {
            return None;
        }
        let conn = rusqlite::Connection::open(server.dir.path().join("gateway.db")).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        Some(EmbeddedWriteLock(conn))
    }
}

impl Drop for EmbeddedWriteLock {
    fn drop(&mut self) {
        self.0.execute_batch("ROLLBACK").unwrap();
    }
}

async fn renumbered(server: &TestServer) -> u64 {
    let text = server.metrics().await;
    text.lines()
        .find_map(|l| l.strip_prefix("gateway_renumbered_appends_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A retried chat (its id already stored) pipelined ahead of new chats leaves its seq unused;
/// the chats behind it are renumbered, not refused, and the room stays gap-free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_pipelined_behind_a_duplicate_are_renumbered_not_refused() {
    let (server, mut alice) = alice_with_one_message(|_| {}).await;

    // The retry of id-1 and three new chats, all numbered by the shard before the store answers
    // any of them: the new ones get 3, 4, 5 while the retry holds 2 and then gives it back.
    // On the embedded store the test holds the database's write lock until the shard has
    // numbered all four, so the store cannot answer the retry before the others are numbered.
    let write_lock = EmbeddedWriteLock::take(&server);
    let frames = [
        chat_frame("r", "first again", "id-1", "dup"),
        chat_frame("r", "a", "id-a", "a"),
        chat_frame("r", "b", "id-b", "b"),
        chat_frame("r", "c", "id-c", "c"),
        // Answered by the same shard after it has handled (and numbered) the four chats; a
        // read, so the write lock does not hold it up.
        json!({"code": "historic", "user_id": "alice", "room_id": "elsewhere", "ref": "fence", "data": {}})
            .to_string(),
    ];
    alice.send_texts(&frames).await;
    if let Some(lock) = write_lock {
        let fence = replies(&mut alice, &["fence"])
            .await
            .remove("fence")
            .unwrap();
        assert_eq!(fence["data"]["error_code"], "NOT_FOUND", "{fence}");
        drop(lock);
    }
    let got = replies(&mut alice, &["dup", "a", "b", "c"]).await;
    for (reference, v) in &got {
        assert_eq!(v["status"], "success", "{reference}: {v}");
    }
    assert_eq!(got["dup"]["data"]["seq"], 1);
    assert_eq!(got["dup"]["data"]["message"], "first");
    let seqs: Vec<u64> = ["a", "b", "c"]
        .iter()
        .map(|r| got[*r]["data"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        [2, 3, 4],
        "in the order they were sent, after the original"
    );
    if test_store_url(server.dir.path()).is_none() {
        // All three new chats were numbered behind the retry, so all three were renumbered.
        assert_eq!(renumbered(&server).await, 3);
    }

    // The stored room: 1 … 4, each once, and the next chat continues at 5.
    alice
        .send_text(&json!({"code": "historic", "user_id": "alice", "room_id": "r", "ref": "h", "data": {}}).to_string())
        .await;
    let page = replies(&mut alice, &["h"]).await.remove("h").unwrap();
    let stored: Vec<(u64, String)> = page["data"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().unwrap(),
                m["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        stored,
        [(1, "first"), (2, "a"), (3, "b"), (4, "c")].map(|(s, t)| (s, t.to_owned()))
    );
    alice.send_text(&chat_frame("r", "d", "id-d", "d")).await;
    let next = replies(&mut alice, &["d"]).await.remove("d").unwrap();
    assert_eq!(next["data"]["seq"], 5, "{next}");
    server.stop().await;
}

/// Adds a retry of `id-1` (ref `dup<n>`) and a new chat `new <n>` (ref `n<n>`).
fn retry_then_new(n: usize, frames: &mut Vec<String>, refs: &mut Vec<String>) {
    frames.push(chat_frame("r", "again", "id-1", &format!("dup{n}")));
    frames.push(chat_frame(
        "r",
        &format!("new {n}"),
        &format!("id-n{n}"),
        &format!("n{n}"),
    ));
    refs.push(format!("dup{n}"));
    refs.push(format!("n{n}"));
}

/// A client that keeps retrying a stored id between other chats leaves a seq unused each time;
/// the chats between them are still renumbered into place, never refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_duplicates_never_starve_the_chats_between_them() {
    let (server, mut alice) = alice_with_one_message(|_| {}).await;

    let mut frames = Vec::new();
    let mut refs = Vec::new();
    for n in 0..12 {
        retry_then_new(n, &mut frames, &mut refs);
    }
    alice.send_texts(&frames).await;
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    let got = replies(&mut alice, &refs).await;
    for (reference, v) in &got {
        assert_eq!(v["status"], "success", "{reference}: {v}");
    }
    let seqs: Vec<u64> = (0..12)
        .map(|n| got[&format!("n{n}")]["data"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (2..=13).collect::<Vec<_>>());
    // Renumbering converges: a chat is sent again at most twice, never in a loop.
    let renumbered = renumbered(&server).await;
    assert!(
        renumbered <= 2 * 12,
        "{renumbered} renumberings for 12 chats"
    );
    server.stop().await;
}

/// Chats that arrive while earlier ones are being renumbered are stored after them: the room
/// keeps the order in which its chats arrived, however the writes are split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_arriving_while_the_room_renumbers_keep_their_order() {
    let (server, mut alice) = alice_with_one_message(|c| c.rate_burst = 1000).await;

    let mut refs = Vec::new();
    const WAVES: usize = 40;
    for wave in 0..WAVES {
        let mut frames = Vec::new();
        for n in wave * 4..wave * 4 + 4 {
            retry_then_new(n, &mut frames, &mut refs);
        }
        // Separate writes at uneven intervals, so that some arrive while the store answers
        // (and the shard renumbers) earlier ones.
        alice.send_texts(&frames).await;
        tokio::time::sleep(Duration::from_micros([0, 50, 150, 400, 1000][wave % 5])).await;
    }
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    let got = replies(&mut alice, &refs).await;
    for (reference, v) in &got {
        assert_eq!(v["status"], "success", "{reference}: {v}");
    }
    let seqs: Vec<u64> = (0..WAVES as u64 * 4)
        .map(|n| got[&format!("n{n}")]["data"]["seq"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = (2..2 + WAVES as u64 * 4).collect();
    assert_eq!(seqs, expected, "stored in arrival order");
    server.stop().await;
}

/// Copies of a chat pipelined right behind it (a client resending before the answer came)
/// take no seq: the shard remembers the room's recent ids and sends a copy without one, so
/// neither the copy nor anyone else's chat in flight is renumbered or refused, however many
/// copies race with the room's other chats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_pipelined_behind_a_chat_take_no_seq() {
    let server = TestServer::start_with(|c| {
        c.shards = 1;
        c.rate_burst = 1000;
    })
    .await;
    let mut alice = alice_in_room(&server).await;
    // Alice's second device, sending chats of its own into the same room meanwhile.
    let mut other = alice_in_room(&server).await;

    const CHATS: usize = 60;
    let mut alice_frames = Vec::new();
    let mut alice_refs = Vec::new();
    let mut other_frames = Vec::new();
    let mut other_refs = Vec::new();
    for n in 0..CHATS {
        for copy in ["a", "b"] {
            alice_frames.push(chat_frame(
                "r",
                &format!("alice {n}"),
                &format!("a{n}"),
                &format!("a{n}{copy}"),
            ));
            alice_refs.push(format!("a{n}{copy}"));
        }
        other_frames.push(chat_frame(
            "r",
            &format!("other {n}"),
            &format!("b{n}"),
            &format!("b{n}"),
        ));
        other_refs.push(format!("b{n}"));
    }
    tokio::join!(
        alice.send_texts(&alice_frames),
        other.send_texts(&other_frames)
    );
    let alice_refs: Vec<&str> = alice_refs.iter().map(String::as_str).collect();
    let other_refs: Vec<&str> = other_refs.iter().map(String::as_str).collect();
    let (alice_got, other_got) = tokio::join!(
        replies(&mut alice, &alice_refs),
        replies(&mut other, &other_refs)
    );
    for (reference, v) in alice_got.iter().chain(&other_got) {
        assert_eq!(v["status"], "success", "{reference}: {v}");
    }
    let mut seqs = Vec::new();
    for n in 0..CHATS {
        let (first, copy) = (&alice_got[&format!("a{n}a")], &alice_got[&format!("a{n}b")]);
        assert_eq!(
            first["data"]["seq"], copy["data"]["seq"],
            "a copy gets the original"
        );
        assert_eq!(copy["data"]["message"], format!("alice {n}"));
        seqs.push(first["data"]["seq"].as_u64().unwrap());
        seqs.push(other_got[&format!("b{n}")]["data"]["seq"].as_u64().unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=2 * CHATS as u64).collect::<Vec<_>>(),
        "each chat once, no gap"
    );
    assert_eq!(renumbered(&server).await, 0, "no copy left a seq unused");
    server.stop().await;
}
