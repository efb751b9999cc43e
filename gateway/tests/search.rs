//! `historic` searches are bounded: each request reads at most `--search-scan-rows` rows of the
//! room and, when that budget ran out, says where the next request continues.

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

#[tokio::test]
async fn a_search_that_spent_its_row_budget_answers_with_a_continuation_cursor() {
    let server = TestServer::start_with(|config| config.search_scan_rows = 5).await;
    let mut alice = server.connect("alice", "acme", Role::Agent).await;
    alice.join("s").await;
    alice.chat("s", "a Needle here").await;
    for n in 2..=12 {
        alice.chat("s", &format!("hay {n}")).await;
    }

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
