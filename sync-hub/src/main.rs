//! `sync-hub`: the regional hub's command line. Parses arguments, calls the library's
//! [`sync_hub::cli::run`], maps errors to a one-line reason on stderr and a non-zero exit
//! status.

use clap::Parser;

fn main() {
    let cli = sync_hub::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SYNC_HUB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if let Err(e) = sync_hub::cli::run(cli) {
        eprintln!("sync-hub: {}", one_line(&e));
        std::process::exit(1);
    }
}

fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ")
}
