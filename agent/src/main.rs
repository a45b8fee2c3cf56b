use std::process::ExitCode;

use agent::{
    cli::{self, Cli, Command},
    loader,
};
use clap::Parser as _;

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .format_target(false)
        .init();
    let result = match &cli.command {
        Command::Daemon(args) => cli::daemon::run(args),
        Command::Stats(args) => cli::stats::run(args),
        Command::Top(args) => cli::top::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("agent: {err:#}");
            // Status 2 means "nothing to read": no daemon is running.
            let no_daemon = err
                .chain()
                .any(|cause| matches!(cause.downcast_ref(), Some(loader::Error::NoDaemon { .. })));
            ExitCode::from(if no_daemon { 2 } else { 1 })
        }
    }
}
