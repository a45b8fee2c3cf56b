//! `agent events`: follow the daemon's denial events as JSON lines.

use std::{path::PathBuf, time::SystemTime};

use anyhow::Context as _;
use clap::Args;

use crate::events::{self, Request};

/// Print denial events as JSON lines, as the daemon sees them.
///
/// Follows new events until interrupted; --since also prints the daemon's
/// recent ones (it keeps the last 4096) from that moment on. Every event is
/// also in the daemon's audit log.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Also print the recent events since this long ago (`10m`, `1h`) or
    /// this time (RFC 3339).
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,

    /// Print what --since asks for and stop, instead of following.
    #[arg(long)]
    pub no_follow: bool,

    /// The daemon's events socket.
    #[arg(long, value_name = "PATH", default_value = events::DEFAULT_SOCKET)]
    pub events_socket: PathBuf,
}

/// `10m` ago or an RFC 3339 time, as ms since the Unix epoch.
fn since_unix_ms(text: &str) -> anyhow::Result<u64> {
    let at = match humantime::parse_duration(text) {
        Ok(ago) => SystemTime::now() - ago,
        Err(_) => humantime::parse_rfc3339_weak(text)
            .map_err(|_| anyhow::anyhow!("--since {text:?} is neither a duration such as 10m nor a time such as 2026-11-30T12:00:00Z"))?,
    };
    Ok(at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0)))
}

pub fn run(args: &EventsArgs) -> anyhow::Result<()> {
    let request = Request {
        since_unix_ms: args.since.as_deref().map(since_unix_ms).transpose()?,
        follow: !args.no_follow,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime failed")?;
    runtime.block_on(async {
        tokio::select! {
            result = events::follow(&args.events_socket, request, std::io::stdout()) => result.map_err(anyhow::Error::from),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}
