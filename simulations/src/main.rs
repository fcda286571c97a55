//! `simulations`: run a named scenario of the regional simulation and report.
//!
//! Parses arguments, runs, prints the human summary and the JSON line (or only the JSON line
//! with `--json`), writes the SVG chart if asked, and exits 1 when an invariant failed,
//! after printing the seed and the command that reproduces the run.

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use simulations::{Config, Scale, Scenario, run, svg_chart};
use std::io::IsTerminal;
use std::process::ExitCode;

/// Seeded discrete-event simulation of the visitor log at regional scale.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// outdoor-hotspot, regional-outage, long-offline, storm or hub-failover.
    #[arg(long)]
    scenario: Scenario,
    /// Seed of every random decision.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Facilities (default: the scenario's).
    #[arg(long)]
    facilities: Option<u32>,
    /// Devices per facility (default: the scenario's).
    #[arg(long)]
    devices: Option<u32>,
    /// Simulated days of visits (default: the scenario's).
    #[arg(long)]
    days: Option<u32>,
    /// Visits per facility per day; for storm, the backlog per facility.
    #[arg(long)]
    visits: Option<u32>,
    /// Chance (0 to 1) that a hub session gets a storage fault injected at one of its effects
    /// (a failing persist or sync-state write, a quota refusing a partition).
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    store_faults: f64,
    /// Chance (0 to 1) that a session or a scan gets a process kill injected just before or
    /// just after one of its commits (on either side of a session).
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    crash_faults: f64,
    /// Chance (0 to 1) that a session's link drops at a random frame.
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    torn_sessions: f64,
    /// Chance (0 to 1) per node and simulated hour that its disk is full for 10 minutes to
    /// 6 hours.
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    disk_full: f64,
    /// Chance (0 to 1) per device and simulated hour that its clock jumps by 5 minutes to 3
    /// days, either way, for 1 hour to 2 days.
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    clock_jumps: f64,
    /// Print only the JSON summary line.
    #[arg(long)]
    json: bool,
    /// Write a chart of backlog and delivered visits over simulated time to this SVG file.
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
}

fn fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<bool> {
    let args = Args::parse();
    let defaults = args.scenario.default_scale();
    let scale = Scale {
        facilities: args.facilities.unwrap_or(defaults.facilities).max(1),
        devices: args.devices.unwrap_or(defaults.devices).max(1),
        days: args.days.unwrap_or(defaults.days).max(1),
        visits: args.visits.unwrap_or(defaults.visits),
    };
    let mut config = Config::new(args.scenario, args.seed);
    config.scale = scale;
    let per_mille = |v: f64| (v * 1000.0).round() as u32;
    config.store_faults_per_mille = per_mille(args.store_faults);
    config.crash_faults_per_mille = per_mille(args.crash_faults);
    config.torn_sessions_per_mille = per_mille(args.torn_sessions);
    config.disk_full_per_mille = per_mille(args.disk_full);
    config.clock_jumps_per_mille = per_mille(args.clock_jumps);

    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(1);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} {msg}")
                .context("the progress bar template is invalid")?,
        );
        bar.set_message(if args.scenario == Scenario::Storm {
            "facilities"
        } else {
            "simulated hours"
        });
        bar
    } else {
        ProgressBar::hidden()
    };
    let summary = run(&config, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();

    if !args.json {
        print!("{}", summary.human(&config));
    }
    println!("{}", summary.json_line());
    if let Some(path) = &args.svg {
        let unit = if args.scenario == Scenario::Storm {
            "seconds after the outage"
        } else {
            "hours"
        };
        let title = format!(
            "{} seed {}: backlog at devices (red) and delivered at hub (blue)",
            args.scenario, args.seed
        );
        std::fs::write(path, svg_chart(&title, unit, &summary.series))
            .with_context(|| format!("could not write the chart to {}", path.display()))?;
    }
    if !summary.passed() {
        eprintln!(
            "invariants failed; reproduce with seed {}: {}",
            config.seed,
            config.command()
        );
    }
    Ok(summary.passed())
}
