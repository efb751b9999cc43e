//! The `gateway` binary: `gateway` (or `gateway serve`) runs the server; `gateway token` mints
//! a token with the configured secret.

use std::io::IsTerminal;

use clap::Parser;
use gateway::auth::{now_secs, Audience, Claims, KeySource, Role, Verifier};
use gateway::config::{Cli, CliCommand, Config, MigrateArgs, TokenArgs};
use gateway::server::Gateway;
use storage::{NewRoom, RoomKind, Store, Timestamp};

// Each chat allocates a handful of small buffers (the frame, the message, the store's row) on
// the shard and frees them on another thread: glibc's malloc took about 13 % of the server's
// CPU in the chat-heavy run; see bench/FINDINGS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The room development mode prepares, with both printed users in it.
const DEV_ROOM: &str = "lobby";
const DEV_TENANT: &str = "dev";

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().into_command() {
        CliCommand::Token(args) => mint(args),
        CliCommand::Serve(config) => serve(config),
        CliCommand::Migrate(args) => migrate(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn migrate(args: MigrateArgs) -> Result<(), String> {
    let url = args.store_url();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let version = runtime
        .block_on(storage::migrate(&url, &args.credentials.options()))
        .map_err(|e| e.to_string())?;
    println!("store schema is at version {version}");
    Ok(())
}

fn mint(args: TokenArgs) -> Result<(), String> {
    let Some(secret) = args.jwt_secret else {
        return Err("minting needs --jwt-secret (or GATEWAY_JWT_SECRET)".into());
    };
    let role = Role::parse(&args.role).ok_or_else(|| {
        format!(
            "unknown role {:?} (admin, agent, user, customer, service)",
            args.role
        )
    })?;
    let verifier = Verifier::new(KeySource::Secret(secret.as_bytes()), &[], &[], 0)
        .map_err(|e| e.to_string())?;
    let claims = Claims {
        sub: args.sub,
        tenant: args.tenant,
        role,
        exp: now_secs() + args.ttl_secs,
        name: args.name,
        aud: args.jwt_audience.into_iter().next().map(Audience::One),
        iss: args.jwt_issuer.into_iter().next(),
    };
    println!("{}", verifier.mint(&claims).map_err(|e| e.to_string())?);
    Ok(())
}

fn serve(config: Config) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes are noise in a file or a log collector.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("gateway-accept")
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let (verifier, dev_secret) =
            gateway::verifier_from_config(&config).map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let dev = match &dev_secret {
            Some(_) => Some(dev_tokens(&verifier, &config)?),
            None => None,
        };
        let gateway = Gateway::start(config, verifier, listener)
            .await
            .map_err(|e| e.to_string())?;
        if let (Some(secret), Some(users)) = (&dev_secret, &dev) {
            // Nobody holds a token of the random secret before the banner, so the room is in
            // place before anyone can join it.
            dev_lobby(&gateway, users).await?;
            print_banner(secret, &addr.to_string(), users);
        }
        wait_for_signal().await;
        tracing::info!("shutting down");
        gateway.shutdown().await.map_err(|e| e.to_string())
    })
}

/// A development-mode user and its token.
struct DevUser {
    sub: &'static str,
    role: Role,
    token: String,
}

/// Two users of the dev tenant, so two people can talk from the first minute: an admin and an
/// agent, the team roles a console usually has.
fn dev_tokens(verifier: &Verifier, config: &Config) -> Result<[DevUser; 2], String> {
    let user = |sub: &'static str, name: &str, role: Role| -> Result<DevUser, String> {
        let token = verifier
            .mint(&Claims {
                sub: sub.into(),
                tenant: DEV_TENANT.into(),
                role,
                exp: now_secs() + 86_400,
                name: Some(name.into()),
                aud: config.jwt_audience.first().cloned().map(Audience::One),
                iss: config.jwt_issuer.first().cloned(),
            })
            .map_err(|e| e.to_string())?;
        Ok(DevUser { sub, role, token })
    };
    Ok([
        user("dev-admin", "Developer", Role::Admin)?,
        user("dev-agent", "Second Developer", Role::Agent)?,
    ])
}

/// Creates the dev tenant's `lobby` team room with both dev users as participants (an agent
/// may join only the team rooms it takes part in).
async fn dev_lobby(gateway: &Gateway, users: &[DevUser]) -> Result<(), String> {
    let store = &gateway.shared().store;
    let participants: Vec<String> = users.iter().map(|u| u.sub.to_owned()).collect();
    let (room, _) = store
        .create_room(NewRoom {
            room_id: DEV_ROOM.into(),
            tenant_id: DEV_TENANT.into(),
            kind: RoomKind::Team,
            title: "Lobby".into(),
            status: "active".into(),
            participants: participants.clone(),
            created_at: Timestamp::now(),
        })
        .await
        .map_err(|e| format!("cannot create the {DEV_ROOM} room: {e}"))?;
    // The room may come from an earlier run on the same data directory.
    for user in participants
        .iter()
        .filter(|p| !room.participants.contains(p))
    {
        store
            .add_participant(&room.key(), user)
            .await
            .map_err(|e| format!("cannot add {user} to the {DEV_ROOM} room: {e}"))?;
    }
    Ok(())
}

fn print_banner(secret: &str, addr: &str, users: &[DevUser]) {
    let mut tokens = String::new();
    let mut connect = String::new();
    for user in users {
        tokens.push_str(&format!(
            "  token ({}, {}, tenant {DEV_TENANT}, 24h):\n  {}\n",
            user.sub,
            user.role.as_str(),
            user.token
        ));
        connect.push_str(&format!(
            "  connect:  npx --yes wscat -c 'ws://{addr}/ws?token={}'\n",
            user.token
        ));
    }
    eprintln!(
        "\n  ********************************************************************\n  \
         DEVELOPMENT MODE: no --jwt-secret configured, using a random secret.\n  \
         Tokens die with this process. Do not run like this in production.\n  \
         secret: {secret}\n\
         {tokens}  \
         Both users take part in the team room {DEV_ROOM:?}; talk from two terminals:\n\
         {connect}  \
         ********************************************************************\n"
    );
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
