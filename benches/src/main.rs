//! `phalanx-bench`: Phalanx's benchmarks. Each prints a table and, with
//! `--json FILE`, writes the raw figures and a `summary` object.

mod kernels;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Benchmarks for Phalanx. Figures are medians of repeated samples taken in
/// one run, and targets are ratios against a baseline measured in the same
/// run, so a noisy shared machine moves both sides together.
#[derive(Parser, Debug)]
#[command(name = "phalanx-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Reduction-kernel bandwidth: the scalar and SIMD f32 sum-reduce
    /// (`acc += src`) against `memcpy` of the same size, at 64 KiB, 1 MiB,
    /// 16 MiB and 64 MiB. GB/s counts the buffer size once per pass, as the
    /// peers' memcpy_bench.c does.
    Kernels {
        /// Write the figures and the summary as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Samples per size; the median is reported.
        #[arg(long, default_value_t = 7)]
        samples: usize,
        /// Bytes moved per sample (more is steadier, slower).
        #[arg(long, default_value_t = 2 << 30)]
        bytes_per_sample: u64,
        /// A short run for CI: 3 samples of 128 MiB each.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Kernels {
            json,
            samples,
            bytes_per_sample,
            quick,
        } => {
            let (samples, bytes) = if quick {
                (3, 128 << 20)
            } else {
                (samples, bytes_per_sample)
            };
            kernels::run(samples.max(1), bytes, json.as_deref())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
