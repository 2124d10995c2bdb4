//! The command line: the one source of truth for parsing, `--help`, the man
//! pages and the shell completions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use falcon::bench::BenchArgs;
use falcon::inspect::LogInspectArgs;
use falcon::output::ColorChoice;

const ABOUT: &str =
    "Keep an unmodified server program, or a QEMU virtual machine, running when its host dies";

const LONG_ABOUT: &str = "\
falcon runs the same program on 3 to 9 replicas and puts every input it receives into one total \
order with a Multi-Paxos engine. An input reaches the program only after a majority of replicas \
has it on disk, so nothing a client saw acknowledged is lost when a host dies.";

const EXAMPLES: &str = "\
Examples:
  falcon log-inspect data/1/log             summary of a replica's log
  falcon log-inspect data/1/log --verify    check every checksum (exit 1 if corrupt)
  falcon bench --log                        the log against the raw disk
  falcon failover status                    the cluster's replicas, as a table

Exit status:
  0  success
  1  failure (the command ran and found or hit a problem; see the message)
  2  usage error (bad arguments)";

/// falcon's command line.
#[derive(Debug, Parser)]
#[command(name = "falcon", version, about = ABOUT, long_about = LONG_ABOUT, after_help = EXAMPLES)]
#[command(propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// Machine-readable output (JSON; JSON Lines for record streams).
    #[arg(long, global = true)]
    pub json: bool,

    /// More detail on standard error (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Only errors on standard error.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// When to use colour.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto, global = true, value_name = "WHEN")]
    pub color: ColorChoice,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a server program as one replica of a cluster
    Replicate(falcon::node::ReplicateArgs),

    /// Replicate a QEMU virtual machine by ordering its inbound frames
    TapAttach(falcon::node::TapAttachArgs),

    /// Measure the log, round trips and consensus, beside their baselines
    Bench(BenchArgs),

    /// Read, verify, follow and export a replica's log
    LogInspect(LogInspectArgs),

    /// Cluster status, planned leadership transfer, failure drills
    #[command(after_help = FAILOVER_EXAMPLES)]
    Failover(falcon::failover::FailoverArgs),

    /// Write the man pages and shell completions (for packagers)
    #[command(hide = true)]
    Generate(GenerateArgs),

    /// Write the fixture logs under fixtures/ (for falcon's own tests)
    #[command(hide = true)]
    MakeFixtures(GenerateArgs),
}

/// Where to write generated files.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Output directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

const FAILOVER_EXAMPLES: &str = "\
Examples:
  falcon failover status --config cluster.toml      the replicas, as a table
  falcon failover status --watch                    refreshed every second
  falcon failover transfer --to 2                   move the leadership to replica 2
  falcon failover drill --rounds 50                 kill leaders under load, measure
  falcon failover drill --config cluster.toml --kill random --rounds 10

Every replica answers on admin.sock in its data directory (JSON lines; only
its user or root may connect).";
