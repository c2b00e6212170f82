//! `referral-broker`: command line, configuration, tracing and signals around
//! [`yeongye_broker::run`], the operators' commands (`status`, `referral show`,
//! `dead-letters`, `consent show`, `purges`, `registry reload`, `audit verify|show`), and
//! onboarding (`init`, `agency add|remove|rotate-key`, `operator add|remove`; see
//! [`yeongye_broker::onboard`]).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use yeongye_broker::Config;
use yeongye_broker::audit_report;
use yeongye_broker::log_filter;
use yeongye_broker::onboard;
use yeongye_broker::operator::{self, Api};

#[derive(Parser)]
#[command(
    name = "referral-broker",
    version,
    about = "Validates, routes and tracks Yeongye referrals"
)]
struct Cli {
    /// Configuration file (TOML). REFERRAL_* environment variables override it.
    #[arg(long, short, global = true, env = "REFERRAL_CONFIG")]
    config: Option<PathBuf>,
    /// The running broker's HTTP API (default: http://<http_addr from the config>).
    #[arg(long, global = true, env = "REFERRAL_API")]
    api: Option<String>,
    /// The operator's bearer token file (`operator add` writes it; mode 0600). Needed for
    /// replay, discard and registry reload, and for reads when the API is beyond loopback.
    #[arg(long, global = true, env = "REFERRAL_OPERATOR_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker until SIGINT or SIGTERM.
    Run,
    /// Check the configuration and the registry, print the effective configuration, exit.
    CheckConfig,
    /// Per-agency queues: sent, awaiting receipt and acceptance, in progress, overdue, dead
    /// letters; the streams; this broker's role, the leader and the state log's position.
    Status,
    /// Hand leadership over (ask the broker given by --api, the leader): it finishes what it
    /// has in flight, gives the lease back and leaves it to a standby for a few seconds.
    StepDown,
    /// One referral's state and history (ids and states only).
    Referral {
        #[command(subcommand)]
        command: ReferralCommand,
    },
    /// Messages the broker could not apply.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// One consent: coverage, revocation, withdrawn referrals and purges.
    Consent {
        #[command(subcommand)]
        command: ConsentCommand,
    },
    /// Purge confirmations still outstanding: which agencies have not yet confirmed.
    Purges,
    /// The agency registry.
    Registry {
        #[command(subcommand)]
        command: RegistryCommand,
    },
    #[command(flatten)]
    Onboard(OnboardCommand),
    /// The hash-chained audit log. Reads the store directly (stop the broker first, or pass
    /// --api to ask a running one).
    Audit {
        /// The store directory (default: store_dir from the config).
        #[arg(long)]
        store: Option<PathBuf>,
        #[command(subcommand)]
        command: AuditCommand,
    },
}

/// Where onboarding reads and writes.
#[derive(clap::Args)]
struct OnboardFiles {
    /// The agency registry file (edited in place, comments kept).
    #[arg(long)]
    registry: PathBuf,
    /// The secrets directory: one private directory per identity.
    #[arg(long)]
    secrets: PathBuf,
    /// The generated NATS authorization config (an include file for nats-server).
    #[arg(long)]
    nats_conf: PathBuf,
}

impl OnboardFiles {
    fn paths(self) -> onboard::Paths {
        onboard::Paths {
            registry: self.registry,
            secrets: self.secrets,
            nats_conf: Some(self.nats_conf),
        }
    }
}

/// Identities: `init` and `agency ...`. They need no broker configuration.
#[derive(Subcommand)]
enum OnboardCommand {
    /// Creates the broker's own identity (signing key, NATS user `broker`) in the registry
    /// (created if absent) and writes the NATS authorization config. Runs once.
    Init {
        #[command(flatten)]
        files: OnboardFiles,
        /// The NATS server's certificate (PEM): the generated config then requires TLS.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The NATS server's private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Onboarding: an agency's signing key and NATS credentials, its registry entry, and the
    /// NATS authorization config.
    Agency {
        #[command(subcommand)]
        command: AgencyCommand,
    },
    /// The operators of the HTTP API: who may replay, discard and reload the registry.
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Makes an operator: a random token in <secrets>/operators/<name>.token (0600, never
    /// overwritten) and its SHA-256 in the operators file (the broker's operators_file).
    Add {
        /// The operator's name (recorded as `who`): 1-64 of a-z, 0-9, '-', '.', '_'.
        name: String,
        /// The operators file (created if absent).
        #[arg(long)]
        operators: PathBuf,
        /// The secrets directory.
        #[arg(long)]
        secrets: PathBuf,
    },
    /// Removes an operator: its token is refused from the next request on.
    Remove {
        name: String,
        #[arg(long)]
        operators: PathBuf,
        /// The secrets directory: the token file there is deleted too.
        #[arg(long)]
        secrets: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AgencyCommand {
    /// Registers an agency: generates its signing key, sealing key and NATS credentials (files
    /// 0600, never overwritten), adds it to the registry and regenerates the NATS config.
    Add {
        /// The agency id: 1-64 of a-z, 0-9 and '-'.
        id: String,
        /// Its display name (Korean).
        #[arg(long)]
        name: String,
        /// Its kind (e.g. community_service_centre; see deploy/agencies.toml).
        #[arg(long)]
        kind: String,
        #[command(flatten)]
        files: OnboardFiles,
    },
    /// Removes an agency from the registry and the NATS config (its secrets are left).
    Remove {
        id: String,
        #[command(flatten)]
        files: OnboardFiles,
    },
    /// Gives an agency (or `broker`) a new signing key, accepted at once; the old one is
    /// accepted for the grace period more. An agency also gets a new sealing key, sealed to
    /// from now on; it keeps the old one for the grace period (dropped at a later rotation).
    RotateKey {
        id: String,
        /// How long the old key is still accepted (and an old sealing key kept), seconds.
        #[arg(long, default_value_t = onboard::DEFAULT_GRACE.as_secs())]
        grace_secs: u64,
        /// The agency registry file.
        #[arg(long)]
        registry: PathBuf,
        /// The secrets directory.
        #[arg(long)]
        secrets: PathBuf,
        /// The generated NATS config, regenerated if given.
        #[arg(long)]
        nats_conf: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ReferralCommand {
    Show { id: String },
}

#[derive(Subcommand)]
enum ConsentCommand {
    Show { id: String },
}

#[derive(Subcommand)]
enum RegistryCommand {
    /// Read the registry file again (after adding an agency) without a restart.
    Reload,
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    List,
    Show {
        seq: u64,
    },
    /// Apply it again, after its cause is fixed. Recorded with the operator of --token-file.
    Replay {
        seq: u64,
        /// Why (recorded).
        #[arg(long)]
        why: String,
    },
    /// Give up on it (recorded with the operator of --token-file).
    Discard {
        seq: u64,
        #[arg(long)]
        why: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the whole chain; names the first broken entry and exits 1 if it does not hold.
    Verify,
    /// One referral's audit entries.
    Show { referral_id: String },
}

/// mimalloc, freed memory returned at once during bulk reads of the store (`yeongye-alloc`).
#[global_allocator]
static ALLOCATOR: yeongye_alloc::MiMalloc = yeongye_alloc::MiMalloc;

fn main() -> ExitCode {
    // RUST_LOG governs; the NATS client is capped (see log_filter).
    let (filter, warning) = log_filter::filter(std::env::var("RUST_LOG").ok().as_deref());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("referral-broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

fn show(json_mode: bool, v: &Value, human: impl FnOnce(&Value) -> String) -> anyhow::Result<()> {
    if json_mode {
        out(&format!("{}\n", serde_json::to_string_pretty(v)?))
    } else {
        out(&human(v))
    }
}

/// Runs an onboarding command (they need no broker configuration).
fn onboarding(json_mode: bool, command: OnboardCommand) -> anyhow::Result<ExitCode> {
    let report = match command {
        OnboardCommand::Init {
            files,
            tls_cert,
            tls_key,
        } => {
            let tls = match (tls_cert, tls_key) {
                (Some(cert_file), Some(key_file)) => Some(onboard::ServerTls {
                    cert_file,
                    key_file,
                }),
                _ => None,
            };
            onboard::init(&files.paths(), tls)?
        }
        OnboardCommand::Agency { command } => match command {
            AgencyCommand::Add {
                id,
                name,
                kind,
                files,
            } => onboard::add_agency(&files.paths(), &id, &name, &kind)?,
            AgencyCommand::Remove { id, files } => onboard::remove_agency(&files.paths(), &id)?,
            AgencyCommand::RotateKey {
                id,
                grace_secs,
                registry,
                secrets,
                nats_conf,
            } => {
                let paths = onboard::Paths {
                    registry,
                    secrets,
                    nats_conf,
                };
                let grace = std::time::Duration::from_secs(grace_secs);
                onboard::rotate_key(&paths, &id, grace, yeongye_broker::clock::now_ms())?
            }
        },
        OnboardCommand::Operator { command } => match command {
            OperatorCommand::Add {
                name,
                operators,
                secrets,
            } => onboard::add_operator(&operators, &secrets, &name)?,
            OperatorCommand::Remove {
                name,
                operators,
                secrets,
            } => onboard::remove_operator(&operators, secrets.as_deref(), &name)?,
        },
    };
    if json_mode {
        out(&format!(
            "{}\n",
            serde_json::to_string_pretty(&json!({ "ok": true, "report": report.lines }))?
        ))?;
    } else {
        out(&report.to_string())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Onboard(command) = cli.command {
        return onboarding(cli.json, command);
    }
    let cfg = Config::load(cli.config.as_deref())?;
    // Only the API's clients read the token (the broker itself never does).
    let token = match &cli.token_file {
        Some(path) if !matches!(cli.command, Command::Run | Command::CheckConfig) => {
            Some(operator::load_token_file(path)?)
        }
        _ => None,
    };
    let api = || {
        Api::new(
            &cli.api
                .clone()
                .unwrap_or_else(|| format!("http://{}", cfg.http_addr)),
        )
        .with_token(token.clone())
    };
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    match cli.command {
        Command::Onboard(command) => return onboarding(cli.json, command),
        Command::CheckConfig => {
            let registry = yeongye_broker::registry::Registry::load(&cfg.registry)?;
            // Every key, credentials and TLS file it names, read as a start would.
            let files = cfg.check_files()?;
            tracing::info!(config = ?cfg, agencies = registry.len(), ?files, "configuration is valid");
        }
        Command::Run => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(yeongye_broker::run(cfg, shutdown_signal()))?;
        }
        Command::Status => show(
            cli.json,
            &api().get("/api/v1/queues")?,
            operator::render_queues,
        )?,
        Command::Referral {
            command: ReferralCommand::Show { id },
        } => {
            let v = api().get(&format!("/api/v1/referrals/{}", Api::segment(&id)))?;
            show(cli.json, &v, operator::render_referral)?;
        }
        Command::DeadLetters { command } => match command {
            DeadLetterCommand::List => show(
                cli.json,
                &api().get("/api/v1/dead-letters")?,
                operator::render_dead_letters,
            )?,
            DeadLetterCommand::Show { seq } => {
                out(&pretty(&api().get(&format!("/api/v1/dead-letters/{seq}"))?))?
            }
            DeadLetterCommand::Replay { seq, why } => {
                let v = api().post(
                    &format!("/api/v1/dead-letters/{seq}/replay"),
                    &json!({"why": why}),
                )?;
                out(&pretty(&v))?;
            }
            DeadLetterCommand::Discard { seq, why } => {
                let v = api().post(
                    &format!("/api/v1/dead-letters/{seq}/discard"),
                    &json!({"why": why}),
                )?;
                out(&pretty(&v))?;
            }
        },
        Command::Consent {
            command: ConsentCommand::Show { id },
        } => {
            out(&pretty(
                &api().get(&format!("/api/v1/consents/{}", Api::segment(&id)))?,
            ))?;
        }
        Command::Purges => out(&pretty(&api().get("/api/v1/purges")?))?,
        Command::Registry {
            command: RegistryCommand::Reload,
        } => out(&pretty(&api().post("/api/v1/registry/reload", &json!({}))?))?,
        Command::StepDown => out(&pretty(&api().post("/api/v1/step-down", &json!({}))?))?,
        Command::Audit { store, command } => {
            let api = cli
                .api
                .as_deref()
                .map(|url| Api::new(url).with_token(token.clone()));
            return audit(api, cli.json, &cfg, store, command);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn audit(
    api: Option<Api>,
    json_mode: bool,
    cfg: &Config,
    store: Option<PathBuf>,
    command: AuditCommand,
) -> anyhow::Result<ExitCode> {
    let (verdict, entries) = match api {
        Some(api) => {
            match &command {
                AuditCommand::Verify => match api.get("/api/v1/audit/verify") {
                    Ok(v) => (Some(v), None),
                    // 409 carries the verdict too, but as an error: ask for the detail.
                    Err(e) => anyhow::bail!("{e}"),
                },
                AuditCommand::Show { referral_id } => {
                    let v = api.get(&format!(
                        "/api/v1/audit/referrals/{}",
                        Api::segment(referral_id)
                    ))?;
                    (None, Some(v.as_array().cloned().unwrap_or_default()))
                }
            }
        }
        None => {
            let dir = store.unwrap_or_else(|| cfg.store_dir.clone());
            let s = yeongye_broker::store::SledStore::open(&dir).with_context(|| {
                format!(
                    "opening the store {} (if the broker is running, stop it or pass --api)",
                    dir.display()
                )
            })?;
            match &command {
                AuditCommand::Verify => (Some(audit_report::verify_audit(&s)?), None),
                AuditCommand::Show { referral_id } => {
                    (None, Some(audit_report::audit_entries(&s, referral_id)?))
                }
            }
        }
    };
    if let Some(v) = verdict {
        let ok = v.get("ok").and_then(Value::as_bool) == Some(true);
        if json_mode {
            out(&format!("{}\n", serde_json::to_string_pretty(&v)?))?;
        } else if ok {
            out(&format!(
                "audit log ok: {} entries, chain intact\n",
                v.get("entries").cloned().unwrap_or(Value::Null)
            ))?;
        } else {
            out(&format!(
                "audit log BROKEN at entry {}: {}\n",
                v.get("broken_at").cloned().unwrap_or(Value::Null),
                v.get("why").and_then(Value::as_str).unwrap_or("")
            ))?;
        }
        return Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let entries = entries.unwrap_or_default();
    if json_mode {
        out(&format!("{}\n", serde_json::to_string_pretty(&entries)?))?;
    } else {
        out(&operator::render_audit(&entries))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(cause = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(cause = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
