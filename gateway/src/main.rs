//! The `gateway` binary: `gateway` (or `gateway serve`) runs the server; `gateway token` mints
//! a token with the configured secret.

use clap::Parser;
use gateway::auth::{now_secs, Audience, Claims, Role};
use gateway::config::{Cli, CliCommand, TokenArgs};
use gateway::server::Gateway;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.config.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Some(CliCommand::Token(args)) => mint(&cli.config, args),
        Some(CliCommand::Serve) | None => serve(cli.config),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn mint(config: &gateway::config::Config, args: TokenArgs) -> Result<(), String> {
    if config.jwt_secret.is_none() {
        return Err("minting needs --jwt-secret (or GATEWAY_JWT_SECRET)".into());
    }
    let role = Role::parse(&args.role).ok_or_else(|| {
        format!(
            "unknown role {:?} (admin, agent, user, customer, service)",
            args.role
        )
    })?;
    let (verifier, _) = gateway::verifier_from_config(config).map_err(|e| e.to_string())?;
    let claims = Claims {
        sub: args.sub,
        tenant: args.tenant,
        role,
        exp: now_secs() + args.ttl_secs,
        name: args.name,
        aud: config.jwt_audience.first().cloned().map(Audience::One),
        iss: config.jwt_issuer.first().cloned(),
    };
    println!("{}", verifier.mint(&claims).map_err(|e| e.to_string())?);
    Ok(())
}

fn serve(config: gateway::config::Config) -> Result<(), String> {
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
        if let Some(secret) = &dev_secret {
            let token = verifier
                .mint(&Claims {
                    sub: "dev-admin".into(),
                    tenant: "dev".into(),
                    role: Role::Admin,
                    exp: now_secs() + 86_400,
                    name: Some("Developer".into()),
                    aud: config.jwt_audience.first().cloned().map(Audience::One),
                    iss: config.jwt_issuer.first().cloned(),
                })
                .map_err(|e| e.to_string())?;
            eprintln!(
                "\n  ********************************************************************\n  \
                 DEVELOPMENT MODE: no --jwt-secret configured, using a random secret.\n  \
                 Tokens die with this process. Do not run like this in production.\n  \
                 secret: {secret}\n  \
                 token (dev-admin, tenant dev, 24h):\n  {token}\n  \
                 connect:  npx wscat -c 'ws://{addr}/ws?token={token}'\n  \
                 ********************************************************************\n"
            );
        }
        let gateway = Gateway::start(config, verifier, listener)
            .await
            .map_err(|e| e.to_string())?;
        wait_for_signal().await;
        tracing::info!("shutting down");
        gateway.shutdown().await.map_err(|e| e.to_string())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
