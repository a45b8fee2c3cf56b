use std::process::ExitCode;

use agent::{
    cli::{self, Cli, Command},
    loader,
};
use clap::{CommandFactory as _, FromArgMatches as _};

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    if let (Command::Run(args), Some(("run", run))) = (&mut cli.command, matches.subcommand()) {
        args.order_net_rules(run);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .format_target(false)
        .init();
    // One handle per cgroup file is kept open by the collector.
    agent::cgroupfs::raise_open_files_limit();
    let done = |result: anyhow::Result<()>| result.map(|()| 0);
    let result = match &cli.command {
        Command::Daemon(args) => done(cli::daemon::run(args)),
        Command::Stats(args) => done(cli::stats::run(args)),
        Command::Top(args) => done(cli::top::run(args)),
        Command::Run(args) => cli::run::run(args),
        Command::Ps(args) => done(cli::ps::run(args)),
        Command::Pause(target) => done(cli::control::pause(target)),
        Command::Resume(target) => done(cli::control::resume(target)),
        Command::Stop(args) => done(cli::control::stop(args)),
        Command::Policy(args) => done(cli::policy::run(args)),
        Command::Events(args) => done(cli::events::run(args)),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(err) => {
            eprintln!("agent: {err:#}");
            ExitCode::from(exit_status(&err))
        }
    }
}

/// 2 means "nothing to read" (no daemon is running); `agent run` failures
/// carry their own status; anything else is 1.
fn exit_status(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(failure) = cause.downcast_ref::<cli::run::Failure>() {
            return failure.status;
        }
        if matches!(cause.downcast_ref(), Some(loader::Error::NoDaemon { .. }))
            || matches!(
                cause.downcast_ref(),
                Some(agent::events::Error::NoDaemon { .. })
            )
        {
            return 2;
        }
    }
    1
}
