//! `historic` searches are bounded: each request examines at most `--search-scan-rows` messages
//! of the room (the embedded store: hits of its word index; a CQL store: rows it scans) and,
//! when that budget ran out, says where the next request continues.

mod common;

use common::*;
use gateway::auth::Role;
use serde_json::{json, Value};

fn seqs(v: &Value) -> Vec<u64> {
    v["data"]["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {v}"))
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

/// A server with a search budget of five messages and a room `s` holding one needle and eleven
/// messages of hay after it, when the test store has a word index as `indexed` says; `None`
/// (the server stopped) otherwise: the other store's test covers it.
async fn needle_then_hay(indexed: bool) -> Option<(TestServer, Client)> {
    let server = TestServer::start_with(|config| config.search_scan_rows = 5).await;
    // A CQL store has no index and scans; the embedded store has one.
    if test_store_url(server.dir.path()).is_none() != indexed {
        server.stop().await.close().unwrap();
        return None;
    }
    let mut alice = server.connect("alice", "acme", Role::Agent).await;
    alice.join("s").await;
    alice.chat("s", "a Needle here").await;
    for n in 2..=12 {
        alice.chat("s", &format!("hay {n}")).await;
    }
    Some((server, alice))
}

/// The embedded store finds a rare word through its index in one request, however much hay
/// lies between; its budget counts hits, so many hits page with a cursor.
#[tokio::test]
async fn an_indexed_search_finds_a_rare_word_at_once_and_pages_many_hits() {
    let Some((server, mut alice)) = needle_then_hay(true).await else {
        return;
    };
    let v = alice
        .request(
            "historic",
            Some("s"),
            json!({"search": "needle", "limit": 10}),
        )
        .await;
    assert_eq!(seqs(&v), [1], "{v}");
    assert_eq!(v["data"]["has_more"], false, "{v}");
    assert!(v["data"].get("next_before_seq").is_none(), "{v}");

    for n in 13..=24 {
        alice.chat("s", &format!("needle {n}")).await;
    }
    let mut pages = Vec::new();
    let mut before: Option<u64> = None;
    loop {
        let mut data = json!({"search": "NEEDLE", "limit": 10});
        if let Some(before) = before {
            data["before_seq"] = json!(before);
        }
        let v = alice.request("historic", Some("s"), data).await;
        pages.push(seqs(&v));
        match v["data"]["next_before_seq"].as_u64() {
            Some(next) => {
                assert_eq!(v["data"]["has_more"], true, "{v}");
                before = Some(next);
            }
            None => break,
        }
    }
    assert_eq!(
        pages,
        [
            vec![20, 21, 22, 23, 24],
            vec![15, 16, 17, 18, 19],
            vec![1, 13, 14]
        ],
        "five hits examined per request"
    );
    server.stop().await;
}

/// A CQL store scans: a request examines at most the budget of rows.
#[tokio::test]
async fn a_search_that_spent_its_row_budget_answers_with_a_continuation_cursor() {
    let Some((server, mut alice)) = needle_then_hay(false).await else {
        return;
    };

    // Backwards: 12..8, then 7..3, then 2..1 where the hit is.
    let search = |cursor: Value| {
        let mut data = json!({"search": "needle", "limit": 10});
        if let Some(before) = cursor.as_u64() {
            data["before_seq"] = json!(before);
        }
        data
    };
    let v = alice
        .request("historic", Some("s"), search(Value::Null))
        .await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(seqs(&v), Vec::<u64>::new());
    assert_eq!(v["data"]["has_more"], true, "{v}");
    assert_eq!(v["data"]["next_before_seq"], 8, "{v}");
    assert!(v["data"].get("next_after_seq").is_none(), "{v}");
    let v = alice.request("historic", Some("s"), search(json!(8))).await;
    assert_eq!(seqs(&v), Vec::<u64>::new());
    assert_eq!(v["data"]["next_before_seq"], 3, "{v}");
    let v = alice.request("historic", Some("s"), search(json!(3))).await;
    assert_eq!(seqs(&v), [1]);
    assert_eq!(v["data"]["has_more"], false, "{v}");
    assert!(v["data"].get("next_before_seq").is_none(), "{v}");

    // Forwards: the hit is among the first five rows; more rows remain after them.
    let v = alice
        .request(
            "historic",
            Some("s"),
            json!({"search": "NEEDLE", "after_seq": 0}),
        )
        .await;
    assert_eq!(seqs(&v), [1]);
    assert_eq!(v["data"]["has_more"], true, "{v}");
    assert_eq!(v["data"]["next_after_seq"], 5, "{v}");
    assert!(v["data"].get("next_before_seq").is_none(), "{v}");

    // Plain history is not budgeted and carries no cursor.
    let v = alice
        .request("historic", Some("s"), json!({"limit": 3}))
        .await;
    assert_eq!(seqs(&v), [10, 11, 12]);
    assert_eq!(
        v["data"].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["has_more", "messages"]
    );
    server.stop().await;
}
