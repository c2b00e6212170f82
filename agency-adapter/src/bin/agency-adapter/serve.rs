//! `serve`: the local HTTP/JSON API of `yeongye_adapter::http`, until SIGINT or SIGTERM. Checks
//! the `[http]` section and reads the token and webhook secret before connecting, so a bad
//! configuration fails at once with exit code 2.

use std::process::ExitCode;

use tracing::info;
use yeongye_adapter::{Adapter, AdapterConfig, Error};

use crate::run::shutdown_signal;

pub(crate) async fn serve(cfg: AdapterConfig) -> anyhow::Result<ExitCode> {
    let Some(http) = cfg.http.as_ref() else {
        return Err(Error::Config(
            "serve needs an [http] section (at least token_file); see agency-adapter/README.md"
                .into(),
        )
        .into());
    };
    http.load_token()?;
    http.load_webhook_secret()?;
    info!(config = ?cfg, "starting");
    let adapter = Adapter::builder(cfg)
        .retry_on_initial_connect(true)
        .connect()
        .await?;
    yeongye_adapter::http::serve(adapter, async {
        let signal = shutdown_signal().await;
        info!(signal, "signal received");
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}
