//! `agency-adapter`: the command-line adapter of one agency.
//!
//! ```text
//! agency-adapter --config adapter.toml send <FILE|->
//! agency-adapter --config adapter.toml update <REFERRAL_ID> <STATUS> [--note TEXT]
//! agency-adapter --config adapter.toml status [REFERRAL_ID]
//! agency-adapter --config adapter.toml run [--inbox DIR]
//! agency-adapter --config adapter.toml serve
//! agency-adapter --config adapter.toml consent grant <FILE|->
//! agency-adapter --config adapter.toml consent revoke <CONSENT_ID> [--at-ms N]
//! agency-adapter --config adapter.toml consent show <CONSENT_ID>
//! agency-adapter --config adapter.toml purge-confirm <REFERRAL_ID> <CONSENT_ID>
//! agency-adapter --config adapter.toml check-config
//! ```
//!
//! Results go to stdout as JSON; logs go to stderr (filter with `RUST_LOG`). Exit codes: 0 done,
//! 1 failed (NATS, broker, or a status reply carrying an error), 2 bad arguments, configuration
//! or input (nothing was sent).

// A crate root's modules resolve next to it (src/bin/), hence the explicit paths.
#[path = "agency-adapter/commands.rs"]
mod commands;
#[path = "agency-adapter/consent.rs"]
mod consent;
#[path = "agency-adapter/run.rs"]
mod run;
#[path = "agency-adapter/serve.rs"]
mod serve;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use yeongye_adapter::{AdapterConfig, log_filter, v1};

#[derive(Debug, Parser)]
#[command(name = "agency-adapter", version, about = "Yeongye agency adapter")]
struct Cli {
    /// The adapter's configuration (TOML). YEONGYE_AGENCY, YEONGYE_NATS_URLS and
    /// YEONGYE_STATE_DIR override its fields.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send a referral given as proto3 JSON in FILE (or on stdin with `-`); prints
    /// `{"referral_id", "message_id", "status"}`: "stored" once JetStream stored it, "queued"
    /// when the hub did not answer in time and it waits in the outbox (forwarded later).
    Send {
        #[arg(value_name = "FILE|-")]
        file: PathBuf,
    },
    /// Report a referral's progress to the broker; prints the message id.
    Update {
        referral_id: String,
        status: StatusArg,
        /// A note for the referral's history (no personal data).
        #[arg(long)]
        note: Option<String>,
    },
    /// Print a referral's state and history (exit 1 if the broker answers with an error);
    /// without REFERRAL_ID, the outbox: messages waiting for the hub, the oldest's age.
    Status { referral_id: Option<String> },
    /// Receive deliveries, notifications, rejections, escalations and withdrawals until
    /// SIGINT/SIGTERM, printing one JSON line per item.
    Run {
        /// Also hand every item over as a file in DIR/{referrals,notifications,rejections,
        /// escalations,withdrawals}; a withdrawal purges the referral's file and is confirmed.
        #[arg(long, value_name = "DIR")]
        inbox: Option<PathBuf>,
    },
    /// Serve the local HTTP/JSON API (the configuration's `http` section) and deliver incoming
    /// items by webhook or to the pull inbox, until SIGINT/SIGTERM.
    Serve,
    /// Record, revoke or look up a client's consent.
    Consent {
        #[command(subcommand)]
        command: ConsentCommand,
    },
    /// Confirm to the broker that a withdrawn referral's data is purged; prints the message id.
    PurgeConfirm {
        referral_id: String,
        consent_id: String,
    },
    /// Check the configuration and read every file it names (credentials, signing key,
    /// registry, TLS CA, HTTP token, webhook secret) as a start would; connects to nothing.
    /// Exit 2 if any is missing, malformed or readable by others than its owner.
    CheckConfig,
}

#[derive(Debug, Subcommand)]
enum ConsentCommand {
    /// Record a consent given as a proto3 JSON ConsentGrant in FILE (or on stdin with `-`);
    /// prints `{"consent_id": ..., "message_id": ...}` once it is stored.
    Grant {
        #[arg(value_name = "FILE|-")]
        file: PathBuf,
    },
    /// Record that the client withdrew a consent; prints `{"message_id": ...}`.
    Revoke {
        consent_id: String,
        /// When the client withdrew it, Unix ms (default: when the broker records it).
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        at_ms: Option<i64>,
    },
    /// Print a consent, its revocation and outstanding purges (exit 1 if the broker answers
    /// with an error).
    Show { consent_id: String },
}

/// The statuses an agency may report.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum StatusArg {
    Received,
    Accepted,
    Declined,
    InProgress,
    Completed,
    Cancelled,
}

impl From<StatusArg> for v1::Status {
    fn from(s: StatusArg) -> v1::Status {
        match s {
            StatusArg::Received => v1::Status::Received,
            StatusArg::Accepted => v1::Status::Accepted,
            StatusArg::Declined => v1::Status::Declined,
            StatusArg::InProgress => v1::Status::InProgress,
            StatusArg::Completed => v1::Status::Completed,
            StatusArg::Cancelled => v1::Status::Cancelled,
        }
    }
}

/// An error in what the user gave us (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// The broker's allocator: glibc's malloc and free were ~10% of a busy adapter's CPU
/// (`perf` under the bench's load); mimalloc's thread-local pages make them cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // clap prints its own message and exits with 2 on bad arguments (0 for --help).
    let cli = Cli::parse();
    // RUST_LOG governs; the NATS client is capped (see log_filter).
    let (filter, warning) = log_filter::filter(std::env::var("RUST_LOG").ok().as_deref());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .init();
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(exit_code(&err))
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let cfg = AdapterConfig::load(&cli.config)?;
    match cli.command {
        Command::Send { file } => commands::send(cfg, &file).await,
        Command::Update {
            referral_id,
            status,
            note,
        } => {
            commands::update(
                cfg,
                &referral_id,
                status.into(),
                note.as_deref().unwrap_or(""),
            )
            .await
        }
        Command::Status {
            referral_id: Some(referral_id),
        } => commands::status(cfg, &referral_id).await,
        Command::Status { referral_id: None } => commands::outbox_status(cfg).await,
        Command::Run { inbox } => run::run(cfg, inbox).await,
        Command::Serve => serve::serve(cfg).await,
        Command::Consent { command } => match command {
            ConsentCommand::Grant { file } => consent::grant(cfg, &file).await,
            ConsentCommand::Revoke { consent_id, at_ms } => {
                consent::revoke(cfg, &consent_id, at_ms).await
            }
            ConsentCommand::Show { consent_id } => consent::show(cfg, &consent_id).await,
        },
        Command::PurgeConfirm {
            referral_id,
            consent_id,
        } => consent::purge_confirm(cfg, &referral_id, &consent_id).await,
        Command::CheckConfig => {
            let files = cfg.check_files()?;
            print_json(
                &serde_json::json!({ "valid": true, "agency": cfg.agency, "files": files }),
                true,
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// 2 when the input was at fault (nothing was sent), 1 otherwise.
fn exit_code(err: &anyhow::Error) -> u8 {
    let input_fault = err.chain().any(|cause| {
        cause.downcast_ref::<UsageError>().is_some()
            || cause
                .downcast_ref::<yeongye_adapter::Error>()
                .is_some_and(yeongye_adapter::Error::is_input_error)
    });
    if input_fault { 2 } else { 1 }
}

/// Writes one result to stdout and flushes it (a closed stdout is an error, not a panic).
fn print_json(value: &impl serde::Serialize, pretty: bool) -> anyhow::Result<()> {
    let text = if pretty {
        serde_json::to_string_pretty(value)
    } else {
        serde_json::to_string(value)
    }
    .context("cannot render the result as JSON")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}
