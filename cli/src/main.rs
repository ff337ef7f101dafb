//! The `brickbox` command line.

mod args;
mod commands;
mod format;
mod maintain;
mod mount_cmd;
mod progress;
mod remote;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;

/// Set by Ctrl-C / SIGTERM; operations stop cleanly when they see it.
pub static CANCEL: AtomicBool = AtomicBool::new(false);

/// Exit code when a command finished but with warnings.
pub const EXIT_WARNINGS: u8 = 3;

fn main() -> ExitCode {
    brickbox_platform::one_heap();
    let cli = args::Cli::parse();
    let _ = ctrlc::set_handler(|| {
        if CANCEL.swap(true, Ordering::SeqCst) {
            eprintln!("\nbrickbox: stopping now");
            std::process::exit(130);
        }
        eprintln!("\nbrickbox: interrupted, finishing what is in flight (press Ctrl-C again to abort at once)");
    });
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
