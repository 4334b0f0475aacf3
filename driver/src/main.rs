//! The `knd` binary: the node daemon and its command-line tools. All the work is in the library.
use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    let cli = knd::cli::Cli::parse();
    knd::cli::init_tracing(cli.log_level.as_deref());
    knd::cli::run(cli)?;
    Ok(())
}
