//! `loadgen`: drives a gateway with real WebSocket clients and reports throughput, latency
//! percentiles, closes and memory. See `load-tests/README.md`.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use gateway::auth::Role;
use loadgen::client::Protocol;
use loadgen::report::{own_cpu, process_cpu, rss_kib, scrape, Report};
use loadgen::scenario::{self, open_many, Conn, InboxConversation, Plan, Target};
use loadgen::stats::Stats;
use tokio::time::Instant;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Load generator for the conversation gateway"
)]
struct Cli {
    /// Gateway address (host:port).
    #[arg(long, default_value = "127.0.0.1:8080", global = true)]
    server: SocketAddr,
    /// The gateway's HS256 secret, to mint tokens.
    #[arg(long, env = "GATEWAY_JWT_SECRET", global = true, default_value = "")]
    secret: String,
    /// Tenant of every simulated user (all are admins of it, so they may join any room).
    #[arg(long, default_value = "loadgen", global = true)]
    tenant: String,
    /// Measured seconds (after warm-up).
    #[arg(long, default_value_t = 10, global = true)]
    duration: u64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2, global = true)]
    warmup: u64,
    /// Seconds over which connections are opened.
    #[arg(long, default_value_t = 2, global = true)]
    ramp_up: u64,
    /// PID of the server, to report its RSS.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// Write the JSON report here.
    #[arg(long, global = true)]
    json: Option<std::path::PathBuf>,
    /// Framing: `ws` (one JSON envelope per text frame, path /ws) or `socketio` (Socket.IO v4
    /// over the websocket transport, path /socket.io/, events `42["message",{…}]`).
    #[arg(long, value_enum, default_value_t = Protocol::Ws, global = true)]
    protocol: Protocol,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Clone, serde::Serialize)]
#[serde(tag = "scenario", rename_all = "lowercase")]
enum Scenario {
    /// R rooms × M members; S senders per room at a target rate each.
    Fanout {
        #[arg(long, default_value_t = 10)]
        rooms: usize,
        #[arg(long, default_value_t = 100)]
        members: usize,
        #[arg(long, default_value_t = 1)]
        senders: usize,
        /// Messages per second per sender.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Message text size in bytes.
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
    /// N idle connections kept alive (heartbeats answered).
    Connections {
        #[arg(long, default_value_t = 10_000)]
        count: usize,
    },
    /// connect → join → chat → leave → disconnect loops.
    Churn {
        #[arg(long, default_value_t = 50)]
        workers: usize,
    },
    /// `historic` and `join`+`since_seq` reads under write load.
    History {
        #[arg(long, default_value_t = 10)]
        rooms: usize,
        #[arg(long, default_value_t = 2)]
        writers: usize,
        #[arg(long, default_value_t = 4)]
        readers: usize,
        /// Messages per second per writer.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
    },
    /// An inbox: C support conversations (a customer each) shared among A agents, every agent
    /// subscribed to the tenant's inbox; per conversation 4 customer chats : 3 agent answers :
    /// 1 note with a mention : 2 read receipts.
    Inbox {
        #[arg(long, default_value_t = 200)]
        conversations: usize,
        #[arg(long, default_value_t = 10)]
        agents: usize,
        /// Actions per second per conversation.
        #[arg(long, default_value_t = 2.0)]
        rate: f64,
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
    /// Typing, read receipts and presence alongside chat (4 chats : 12 typing : 3 receipts :
    /// 1 presence change).
    Mixed {
        #[arg(long, default_value_t = 100)]
        rooms: usize,
        #[arg(long, default_value_t = 5)]
        members: usize,
        /// Actions per second per member.
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Fanout { .. } => "fanout",
            Scenario::Connections { .. } => "connections",
            Scenario::Churn { .. } => "churn",
            Scenario::History { .. } => "history",
            Scenario::Mixed { .. } => "mixed",
            Scenario::Inbox { .. } => "inbox",
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the runtime");
    let local = tokio::task::LocalSet::new();
    let report = local.block_on(&runtime, run(&cli));
    print!("{}", report.table());
    let json = serde_json::to_string_pretty(&report).expect("report serializes");
    match &cli.json {
        Some(path) => std::fs::write(path, json).expect("writing the json report"),
        None => println!("{json}"),
    }
    // Connections are torn down with the process.
    std::process::exit(0);
}

async fn run(cli: &Cli) -> Report {
    let stats = Rc::new(Stats::new());
    let target = Rc::new(Target::new(
        cli.server,
        &cli.secret,
        &cli.tenant,
        cli.protocol,
    ));
    let ramp = Duration::from_secs(cli.ramp_up);
    let metrics_before = scrape(cli.server).await;
    let rss_before = cli.server_pid.and_then(rss_kib);
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut inbox: Vec<InboxConversation> = Vec::new();

    // Set-up: connections and joins.
    match &cli.scenario {
        Scenario::Fanout { rooms, members, .. } | Scenario::Mixed { rooms, members, .. } => {
            conns = open_many(&target, &stats, rooms * members, ramp, |i| {
                format!("u{}-{}", i / members, i % members)
            })
            .await;
            for (i, conn) in conns.iter().enumerate() {
                if let Some(conn) = conn {
                    conn.join(&target.room(&(i / members).to_string()), "join");
                }
            }
        }
        Scenario::History {
            rooms,
            writers,
            readers,
            ..
        } => {
            let per_room = writers + readers;
            conns = open_many(&target, &stats, rooms * per_room, ramp, |i| {
                format!("h{}-{}", i / per_room, i % per_room)
            })
            .await;
            for (i, conn) in conns.iter().enumerate() {
                if let Some(conn) = conn {
                    conn.join(&target.room(&format!("h{}", i / per_room)), "join");
                }
            }
        }
        Scenario::Connections { count } => {
            conns = open_many(&target, &stats, *count, ramp, |i| format!("idle-{i}")).await;
        }
        Scenario::Churn { .. } => {}
        Scenario::Inbox {
            conversations,
            agents,
            ..
        } => {
            inbox = open_inbox(&target, &stats, *conversations, *agents).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Load: warm-up, then the measured window.
    let warmup = Duration::from_secs(cli.warmup);
    let measured = Duration::from_secs(cli.duration);
    let until = Instant::now() + warmup + measured;
    match &cli.scenario {
        Scenario::Fanout {
            members,
            senders,
            rate,
            size,
            ..
        } => {
            for (i, conn) in conns.iter().enumerate() {
                if let (Some(conn), true) = (conn, i % members < *senders) {
                    let room = target.room(&(i / members).to_string());
                    // Spread senders' phases so they do not fire in lock-step.
                    let offset =
                        Duration::from_secs_f64((i as f64 * 0.618).fract() / rate.max(0.001));
                    scenario::spawn_chat_sender(
                        conn.clone(),
                        Plan {
                            room,
                            rate: *rate,
                            size: *size,
                            until,
                            offset,
                        },
                        stats.clone(),
                    );
                }
            }
        }
        Scenario::Mixed {
            members,
            rate,
            size,
            ..
        } => {
            for (i, conn) in conns.iter().enumerate() {
                if let Some(conn) = conn {
                    let room = target.room(&(i / members).to_string());
                    let offset =
                        Duration::from_secs_f64((i as f64 * 0.618).fract() / rate.max(0.001));
                    scenario::spawn_mixed_member(
                        conn.clone(),
                        Plan {
                            room,
                            rate: *rate,
                            size: *size,
                            until,
                            offset,
                        },
                        stats.clone(),
                        i,
                    );
                }
            }
        }
        Scenario::History {
            writers,
            readers,
            rate,
            ..
        } => {
            let per_room = writers + readers;
            for (i, conn) in conns.iter().enumerate() {
                let Some(conn) = conn else { continue };
                let room = target.room(&format!("h{}", i / per_room));
                if i % per_room < *writers {
                    let offset =
                        Duration::from_secs_f64((i as f64 * 0.618).fract() / rate.max(0.001));
                    scenario::spawn_chat_sender(
                        conn.clone(),
                        Plan {
                            room,
                            rate: *rate,
                            size: 100,
                            until,
                            offset,
                        },
                        stats.clone(),
                    );
                } else {
                    scenario::spawn_history_reader(conn.clone(), room, stats.clone(), until);
                }
            }
        }
        Scenario::Churn { workers } => {
            for w in 0..*workers {
                scenario::spawn_churn_worker(target.clone(), w, stats.clone(), until);
            }
        }
        Scenario::Connections { .. } => {}
        Scenario::Inbox { rate, size, .. } => {
            for (i, conversation) in inbox.drain(..).enumerate() {
                let offset = Duration::from_secs_f64((i as f64 * 0.618).fract() / rate.max(0.001));
                let plan = Plan {
                    room: conversation.room.clone(),
                    rate: *rate,
                    size: *size,
                    until,
                    offset,
                };
                scenario::spawn_inbox_conversation(conversation, plan, stats.clone());
            }
        }
    }

    tokio::time::sleep(warmup).await;
    stats.recording.set(true);
    let cpu_start = own_cpu();
    let server_cpu_start = cli.server_pid.and_then(process_cpu);
    let started = Instant::now();
    let mut last = (0u64, 0u64);
    while started.elapsed() < measured {
        tokio::time::sleep(Duration::from_secs(1).min(measured.saturating_sub(started.elapsed())))
            .await;
        let (sent, delivered) = (stats.sent.get(), stats.delivered.get());
        eprintln!(
            "[{:>5.1}s] sent/s {:>9} delivered/s {:>10} acked {:>9} errors {:>6} connections {}",
            started.elapsed().as_secs_f64(),
            sent - last.0,
            delivered - last.1,
            stats.acked.get(),
            stats.errors.get(),
            stats.connected.get(),
        );
        last = (sent, delivered);
    }
    stats.recording.set(false);
    let elapsed = started.elapsed();
    let cpu = (own_cpu() - cpu_start).as_secs_f64() / elapsed.as_secs_f64();
    let server_cpu = server_cpu_start
        .zip(cli.server_pid.and_then(process_cpu))
        .map(|(start, end)| end.saturating_sub(start).as_secs_f64() / elapsed.as_secs_f64());
    let rss_after = cli.server_pid.and_then(rss_kib);
    let metrics_after = scrape(cli.server).await;
    let parameters = serde_json::to_value(&cli.scenario).unwrap_or_default();
    drop(conns);
    Report::build(
        cli.scenario.name(),
        parameters,
        &stats,
        elapsed,
        cpu,
        server_cpu,
        (rss_before, rss_after),
        &metrics_before,
        &metrics_after,
    )
}

/// `inbox` set-up: opens the conversations over the HTTP API, connects the agents (each
/// subscribed to the inbox and joined to its share of the conversations) and the customers
/// (each joined to its own).
async fn open_inbox(
    target: &Rc<Target>,
    stats: &Rc<Stats>,
    conversations: usize,
    agents: usize,
) -> Vec<InboxConversation> {
    let agents = agents.max(1);
    let rooms: Vec<String> = (0..conversations)
        .map(|i| target.room(&format!("inbox-{i}")))
        .collect();
    let customer_of = |i: usize| format!("cust-{}-{i}", target.run_id);
    let mut refused = 0;
    for (i, room) in rooms.iter().enumerate() {
        match target.open_conversation(room, &customer_of(i)).await {
            Ok(201) => {}
            other => {
                refused += 1;
                if refused == 1 {
                    eprintln!("opening conversation {room}: {other:?}");
                }
            }
        }
    }
    if refused > 0 {
        eprintln!("{refused} of {conversations} conversations were not opened");
    }
    let mut agent_conns = Vec::with_capacity(agents);
    for a in 0..agents {
        let user = format!("agent-{a}");
        match Conn::open_as(target, a, &user, Role::Agent, stats.clone()).await {
            Ok(conn) => {
                conn.send(&format!(
                    r#"{{"code":"subscribe_inbox","user_id":"{user}","data":{{}}}}"#
                ));
                agent_conns.push(conn);
            }
            Err(e) => eprintln!("connecting {user}: {e}"),
        }
    }
    if agent_conns.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(conversations);
    for (i, room) in rooms.into_iter().enumerate() {
        let user = customer_of(i);
        let Ok(customer) =
            Conn::open_as(target, agents + i, &user, Role::Customer, stats.clone()).await
        else {
            continue;
        };
        customer.join(&room, "join");
        let agent = agent_conns[i % agent_conns.len()].clone();
        agent.join(&room, "join");
        let colleague = agent_conns[(i + 1) % agent_conns.len()].user.clone();
        out.push(InboxConversation {
            room,
            customer,
            agent,
            colleague,
        });
    }
    out
}
