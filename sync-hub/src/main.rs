//! `sync-hub`: the regional hub's command line. Parses arguments, calls the library's
//! [`sync_hub::cli::run`], maps errors to a one-line reason on stderr and a non-zero exit
//! status.

use clap::Parser;

/// mimalloc instead of glibc's malloc: the hub's actor allocates and frees a great deal per
/// record (automerge's operations, envelopes, index rows), and glibc's allocator took about a
/// sixth of the ingest's CPU (BENCHMARKS.md, issue 14; the region bench uses the same). Built
/// without transparent huge pages (the workspace's `no_thp`): with them, the actor was now and
/// then held 100-275 ms under the stall bench, against at most 44 ms without.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = sync_hub::cli::Cli::parse();
    host::logging::init("SYNC_HUB_LOG", cli.log_format);
    // mimalloc's `no_thp` only stops it asking for huge pages; a host whose kernel gives them
    // to every process ("always") would still stall the actor. Not fatal where refused.
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::debug!("cannot turn transparent huge pages off for the hub: {e}");
    }
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
