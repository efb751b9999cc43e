//! The support queue: `escalate`, positions and estimates pushed to waiting customers, an
//! agent taking a conversation, and the queue across a restart. Runs on the embedded store and,
//! in `scripts/test`, again on a CQL node.

mod common;

use std::time::Duration;

use common::inbox::*;
use common::*;
use gateway::auth::Role;
use serde_json::{json, Value};

#[tokio::test]
async fn queue_positions_are_right_with_several_customers_waiting() {
    let server = TestServer::start().await;
    let mut watcher = subscribed(&server, "watcher").await;
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    let mut q1 = waiting_customer(&server, "q1").await;
    let mut q2 = waiting_customer(&server, "q2").await;
    let mut q3 = waiting_customer(&server, "q3").await;

    let escalated = q1.request("escalate", Some("q1"), json!({})).await;
    assert_eq!(escalated["status"], "success", "{escalated}");
    assert_eq!(escalated["code"], "escalate_response");
    assert_eq!(escalated["data"]["status"], "queued");
    assert!(escalated["data"].get("metrics").is_none(), "customer view");
    assert_eq!(queue_position(&mut q1).await, (1, 1, Value::Null));
    let event = loop {
        let event = event_about(&mut watcher, "q1").await;
        if event["data"]["change"] != "created" {
            break event;
        }
    };
    assert_eq!(event["data"]["change"], "escalated", "{event}");
    assert!(event["data"]["conversation"]["metrics"]["queued_at"].is_string());

    q2.request("escalate", Some("q2"), json!({})).await;
    assert_eq!(queue_position(&mut q2).await, (2, 2, Value::Null));
    assert_eq!(queue_position(&mut q1).await, (1, 2, Value::Null));
    let with_reason = q3
        .request("escalate", Some("q3"), json!({"reason": "wants a human"}))
        .await;
    assert_eq!(with_reason["status"], "success", "{with_reason}");
    assert_eq!(queue_position(&mut q3).await, (3, 3, Value::Null));
    assert_eq!(queue_position(&mut q1).await.0, 1);
    assert_eq!(queue_position(&mut q2).await.0, 2);
    let got = q3.request("conversation_get", Some("q3"), json!({})).await;
    assert_eq!(got["data"]["queue"]["position"], 3, "{got}");
    let got = alice
        .request("conversation_get", Some("q3"), json!({}))
        .await;
    assert_eq!(got["data"]["metrics"]["escalation_reason"], "wants a human");

    // Refused: twice, by a plain team-room user, with bad data.
    let twice = q2.request("escalate", Some("q2"), json!({})).await;
    assert_eq!(twice["data"]["error_code"], "BAD_REQUEST", "{twice}");
    assert!(twice["data"]["message"]
        .as_str()
        .unwrap()
        .contains("in the queue already"));
    let mut user = server.connect("u", TENANT, Role::User).await;
    let refused = user.request("escalate", Some("q1"), json!({})).await;
    assert_eq!(refused["data"]["error_code"], "FORBIDDEN", "{refused}");
    for (data, error_code) in [
        (json!({"reason": 5}), "BAD_REQUEST"),
        (json!({"why": "x"}), "BAD_REQUEST"),
        (json!({"reason": "x".repeat(501)}), "TOO_LARGE"),
    ] {
        let error = q1.request("escalate", Some("q1"), data).await;
        assert_eq!(error["data"]["error_code"], error_code, "{error}");
        assert!(error["data"]["message"].as_str().unwrap().contains("data."));
    }

    // alice takes the middle one: its customer hears an agent joined; q3 moves up.
    let taken = alice
        .request(
            "conversation_update",
            Some("q2"),
            json!({"assignee": "alice"}),
        )
        .await;
    assert_eq!(taken["data"]["status"], "agent", "{taken}");
    assert!(taken["data"]["metrics"]["agent_joined_at"].is_string());
    let joined = event_about(&mut q2, "q2").await;
    assert_eq!(joined["data"]["change"], "agent_joined", "{joined}");
    assert_eq!(joined["data"]["agent_id"], "alice");
    assert_eq!(joined["data"]["conversation"]["status"], "agent");
    assert_eq!(queue_position(&mut q3).await, (2, 2, Value::Null));
    assert_eq!(queue_position(&mut q1).await, (1, 2, Value::Null));
    let again = q2.request("escalate", Some("q2"), json!({})).await;
    assert!(
        again["data"]["message"]
            .as_str()
            .unwrap()
            .contains("an agent has"),
        "{again}"
    );

    // A second take: the estimate now follows how fast agents take conversations.
    alice
        .request(
            "conversation_update",
            Some("q1"),
            json!({"assignee": "alice"}),
        )
        .await;
    let (position, waiting, estimate) = queue_position(&mut q3).await;
    assert_eq!((position, waiting), (1, 1));
    assert!(estimate.is_u64(), "{estimate}");

    // Her agent hands q2 on: it waits again, at the back, for another agent.
    let handed = alice.request("escalate", Some("q2"), json!({})).await;
    assert_eq!(handed["data"]["status"], "escalated", "{handed}");
    assert!(handed["data"]["assignee"].is_null());
    assert_eq!(queue_position(&mut q2).await.0, 2);
    assert_eq!(queue_position(&mut q3).await.1, 2);

    // Ending q3 takes it out of the queue.
    let ended = q3.request("end", Some("q3"), json!({})).await;
    assert_eq!(ended["status"], "success", "{ended}");
    let (position, waiting, _) = queue_position(&mut q2).await;
    assert_eq!((position, waiting), (1, 1));
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("gateway_support_queue_waiting 1"),
        "{metrics}"
    );
    assert!(metrics.contains("gateway_conversation_queue_seconds_count 2"));

    // Taken and ended: handle time.
    alice
        .request(
            "conversation_update",
            Some("q2"),
            json!({"assignee": "alice"}),
        )
        .await;
    let ended = alice
        .request("end", Some("q2"), json!({"reason": "resolved"}))
        .await;
    let m = &ended["data"]["metrics"];
    assert!(m["handle_ms"].is_u64(), "{ended}");
    assert!(m["queue_ms"].is_u64());
    // Rated after its end: the handle time is not counted again.
    let mut q2_customer = server.connect("cust-q2", TENANT, Role::Customer).await;
    let rated = q2_customer
        .request("rate", Some("q2"), json!({"score": "good"}))
        .await;
    assert_eq!(rated["status"], "success", "{rated}");
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("gateway_support_queue_waiting 0"),
        "{metrics}"
    );
    assert!(metrics.contains("gateway_conversation_handle_seconds_count 1"));
    server.stop().await;
}

#[tokio::test]
async fn the_queue_outlives_a_restart() {
    let server = TestServer::start().await;
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    for id in ["r1", "r2", "r3"] {
        let mut cust = waiting_customer(&server, id).await;
        let reply = cust.request("escalate", Some(id), json!({})).await;
        assert_eq!(reply["status"], "success", "{reply}");
    }
    // r2 leaves the queue before the restart; its entry must not come back.
    alice
        .request("conversation_update", Some("r2"), json!({"is_open": false}))
        .await;
    drop(alice);
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |_| {}).await;
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    loop {
        let got = alice
            .request("conversation_get", Some("r3"), json!({}))
            .await;
        if got["data"]["queue"].is_object() {
            assert_eq!(got["data"]["queue"]["position"], 2, "{got}");
            assert_eq!(got["data"]["queue"]["waiting"], 2, "{got}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not restored: {got}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut r3 = server.connect("cust-r3", TENANT, Role::Customer).await;
    r3.join("r3").await;
    alice
        .request(
            "conversation_update",
            Some("r1"),
            json!({"assignee": "alice"}),
        )
        .await;
    assert_eq!(queue_position(&mut r3).await, (1, 1, Value::Null));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_racing_to_take_one_conversation_make_one_agent_joined() {
    let server = TestServer::start().await;
    let mut watcher = subscribed(&server, "watcher").await;
    let mut cust = waiting_customer(&server, "race").await;
    let queued = cust.request("escalate", Some("race"), json!({})).await;
    assert_eq!(queued["status"], "success", "{queued}");
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    let mut bob = server.connect("bob", TENANT, Role::Agent).await;
    // Both sent before either answer is read.
    for (client, user) in [(&mut alice, "alice"), (&mut bob, "bob")] {
        client
            .send(
                json!({"code": "conversation_update", "user_id": user, "room_id": "race",
                         "ref": format!("take-{user}"), "data": {"assignee": user}}),
            )
            .await;
    }
    let a = alice.recv_code("conversation_update_response").await;
    let b = bob.recv_code("conversation_update_response").await;
    assert_eq!(a["status"], "success", "{a}");
    assert_eq!(b["status"], "success", "{b}");
    // The conversation left the queue once: one agent_joined, naming the first taker; the
    // second assignment is an update.
    let mut joined = Vec::new();
    let mut updated = 0;
    while let Some(event) = watcher.recv_within(Duration::from_millis(500)).await {
        if event["code"] != "conversation_response" || event["room_id"] != "race" {
            continue;
        }
        match event["data"]["change"].as_str() {
            Some("agent_joined") => joined.push(event["data"]["agent_id"].clone()),
            Some("updated") => updated += 1,
            _ => {}
        }
    }
    assert_eq!(joined.len(), 1, "{joined:?}");
    assert_eq!(updated, 1);
    let got = alice
        .request("conversation_get", Some("race"), json!({}))
        .await;
    assert_eq!(got["data"]["status"], "agent");
    assert!(got["data"].get("queue").is_none(), "{got}");
    let last = got["data"]["assignee"].clone();
    assert!(last == "alice" || last == "bob", "{got}");
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("gateway_support_queue_waiting 0"),
        "{metrics}"
    );
    assert!(metrics.contains("gateway_conversation_queue_seconds_count 1"));
    server.stop().await;
}

#[tokio::test]
async fn a_conditional_take_lets_one_of_two_racing_agents_win() {
    let server = TestServer::start().await;
    let mut watcher = subscribed(&server, "watcher").await;
    let mut cust = waiting_customer(&server, "race2").await;
    let queued = cust.request("escalate", Some("race2"), json!({})).await;
    assert_eq!(queued["status"], "success", "{queued}");
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    let mut bob = server.connect("bob", TENANT, Role::Agent).await;
    for (client, user) in [(&mut alice, "alice"), (&mut bob, "bob")] {
        client
            .send(
                json!({"code": "conversation_update", "user_id": user, "room_id": "race2",
                         "ref": format!("take-{user}"),
                         "data": {"assignee": user, "if_assignee": null}}),
            )
            .await;
    }
    let a = alice.recv_code("conversation_update_response").await;
    let b = bob.recv_code("conversation_update_response").await;
    let (won, lost, winner) = match (a["status"].as_str(), b["status"].as_str()) {
        (Some("success"), Some("error")) => (a, b, "alice"),
        (Some("error"), Some("success")) => (b, a, "bob"),
        other => panic!("exactly one take must win: {other:?} {a} {b}"),
    };
    assert_eq!(won["data"]["assignee"], winner, "{won}");
    assert_eq!(lost["data"]["error_code"], "BAD_REQUEST");
    let message = lost["data"]["message"].as_str().unwrap();
    assert_eq!(message, format!("data.if_assignee: {winner} has it now"));
    // One event: the winner joined; the refused take changed nothing.
    let mut changes = Vec::new();
    while let Some(event) = watcher.recv_within(Duration::from_millis(500)).await {
        if event["code"] == "conversation_response" && event["room_id"] == "race2" {
            changes.push(event["data"]["change"].clone());
        }
    }
    let joined = changes.iter().filter(|c| **c == "agent_joined").count();
    let updated = changes.iter().filter(|c| **c == "updated").count();
    assert_eq!((joined, updated), (1, 0), "{changes:?}");
    // A precondition alone changes nothing.
    let nothing = alice
        .request(
            "conversation_update",
            Some("race2"),
            json!({"if_assignee": winner}),
        )
        .await;
    assert_eq!(nothing["data"]["error_code"], "BAD_REQUEST", "{nothing}");
    server.stop().await;
}
