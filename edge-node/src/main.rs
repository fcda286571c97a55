//! `edge-node`: one entrance device's command line. Parses arguments, calls the library's
//! [`edge_node::cli::run`], maps errors to a one-line reason on stderr and a non-zero exit
//! status.

use clap::Parser;

fn main() {
    let cli = edge_node::cli::Cli::parse();
    host::logging::init("EDGE_NODE_LOG", cli.log_format);
    match edge_node::cli::run(cli) {
        Ok(exit) => std::process::exit(exit.code()),
        Err(e) => {
            eprintln!("edge-node: {}", one_line(&e));
            std::process::exit(1);
        }
    }
}

fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ")
}
