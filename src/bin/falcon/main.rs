//! The `falcon` binary: parse the command line, call one function of the
//! library per subcommand, turn the outcome into an exit status.

mod cli;
mod generate;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::Parser;
use cli::{Cli, Command};
use falcon::output::{Status, Ui};

/// An error that is the caller's (exit status 2).
#[derive(Debug)]
struct Usage(String);
impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Usage {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ui = Ui::new(cli.json, cli.color, cli.quiet, cli.verbose);
    match run(cli, &ui) {
        Ok(Status::Success) => ExitCode::SUCCESS,
        Ok(Status::Failure) => ExitCode::from(1),
        Err(err) => {
            // A closed pipe (`falcon log-inspect … | head`) is not an error.
            if err.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            // Each cause once: an error whose text already ends with its
            // source's (`{context}: {source}`) does not repeat it.
            let mut msg = String::new();
            for cause in err.chain() {
                let text = cause.to_string();
                if msg.is_empty() {
                    msg = text;
                } else if !msg.ends_with(&text) {
                    msg = format!("{msg}: {text}");
                }
            }
            ui.error(&msg);
            if err.chain().any(|c| c.downcast_ref::<Usage>().is_some()) {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// A replica's messages are log lines (timestamp, level, node id; JSON
/// lines with --json).
fn logs(ui: &Ui, replica: bool) -> Ui {
    let mut ui = ui.clone();
    if replica {
        ui.install_logs(ui.json);
    }
    ui
}

/// Runs a replica (`replicate`, `tap-attach`) until Ctrl-C or SIGTERM.
fn run_replica(
    f: impl FnOnce(Arc<AtomicBool>) -> Result<falcon::output::Status, falcon::node::ReplicateError>,
) -> anyhow::Result<falcon::output::Status> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || s.store(true, Ordering::Relaxed))
        .context("installing the Ctrl-C handler")?;
    match f(stop) {
        Err(falcon::node::ReplicateError::Usage(m)) => Err(Usage(m).into()),
        other => other.map_err(anyhow::Error::from),
    }
}

fn run(cli: Cli, ui: &Ui) -> anyhow::Result<Status> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let status = match cli.command {
        Command::Replicate(args) => {
            let ui = &logs(ui, args.new_key.is_none());
            run_replica(|stop| falcon::node::replicate(&args, ui, stop))
        }
        Command::TapAttach(args) => {
            let ui = &logs(ui, true);
            run_replica(|stop| falcon::node::tap_attach(&args, ui, stop))
        }
        Command::Failover(args) => {
            let stop = Arc::new(AtomicBool::new(false));
            let s = stop.clone();
            ctrlc::set_handler(move || s.store(true, Ordering::Relaxed))
                .context("installing the Ctrl-C handler")?;
            match falcon::failover::run(&args, ui, &mut out, &stop) {
                Err(falcon::failover::FailoverError::Usage(m)) => Err(Usage(m).into()),
                other => other.context("failover"),
            }
        }
        Command::LogInspect(args) => {
            let stop = Arc::new(AtomicBool::new(false));
            if args.follow {
                let s = stop.clone();
                ctrlc::set_handler(move || s.store(true, Ordering::Relaxed))
                    .context("installing the Ctrl-C handler")?;
            }
            // Errors name the file (and offset) themselves.
            falcon::inspect::run(&args, ui, &mut out, &stop).map_err(anyhow::Error::from)
        }
        Command::Bench(args) => {
            let stop = Arc::new(AtomicBool::new(false));
            if args.serve.is_some() || args.consensus {
                let s = stop.clone();
                ctrlc::set_handler(move || s.store(true, Ordering::Relaxed))
                    .context("installing the Ctrl-C handler")?;
            }
            match falcon::bench::run(&args, ui, &mut out, &stop) {
                Err(
                    falcon::bench::BenchError::NotBuilt(msg)
                    | falcon::bench::BenchError::Usage(msg),
                ) => Err(Usage(msg).into()),
                other => other.context("bench"),
            }
        }
        Command::Generate(args) => generate::write_all(&args.out).map(|_| Status::Success),
        Command::MakeFixtures(args) => falcon::log::fixtures::write_all(&args.out)
            .with_context(|| format!("writing fixtures to {}", args.out.display()))
            .map(|written| {
                for p in written {
                    ui.detail(&format!("wrote {}", p.display()));
                }
                Status::Success
            }),
    };
    out.flush()?;
    status
}
