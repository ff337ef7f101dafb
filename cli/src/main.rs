//! The `brickbox` command line.
// A lock guard held through a loop or a match deadlocks when the body locks it again.
#![warn(clippy::significant_drop_in_scrutinee)]

mod args;
mod commands;
mod format;
mod maintain;
mod mount_cmd;
mod progress;
mod remote;
mod repo_config;

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
    quiet_when_output_closes();
    let _ = ctrlc::set_handler(|| {
        if CANCEL.swap(true, Ordering::SeqCst) {
            eprintln!("\nbrickbox: stopping now");
            std::process::exit(130);
        }
        eprintln!("\nbrickbox: interrupted, finishing what is in flight (press Ctrl-C again to abort at once)");
    });
    // Unwinding from a print into a closed pipe releases what the command holds (its lock
    // on the box) on the way out.
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| commands::run(cli)));
    let ran = match ran {
        Ok(ran) => ran,
        Err(_) if OUTPUT_CLOSED.load(Ordering::SeqCst) => return ExitCode::from(141),
        Err(panic) => std::panic::resume_unwind(panic),
    };
    match ran {
        Ok(code) => ExitCode::from(code),
        // The reader of the output went away (`| head`): quietly, as other tools end then
        // (128 + SIGPIPE).
        Err(e) if is_broken_pipe(&e) && brickbox_platform::stdout_reader_gone() => ExitCode::from(141),
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            if let Some(h) = e.chain().find_map(|c| c.downcast_ref::<brickbox_core::Error>()).and_then(|e| e.hint()) {
                eprintln!("hint: {h}");
            }
            ExitCode::from(1)
        }
    }
}

/// Set when `println!` failed because the reader of the output went away.
static OUTPUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Output printed with `println!` into a pipe whose reader went away ends the command as an
/// error from writing it does (see `main`), not with a panic message and its backtrace.
fn quiet_when_output_closes() {
    let earlier = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let text =
            payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied());
        if text.is_some_and(|t| t.starts_with("failed printing to stdout")) && brickbox_platform::stdout_reader_gone() {
            OUTPUT_CLOSED.store(true, Ordering::SeqCst);
            return;
        }
        earlier(info);
    }));
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let kind = match c.downcast_ref::<std::io::Error>() {
            Some(io) => Some(io.kind()),
            None => c.downcast_ref::<serde_json::Error>().and_then(serde_json::Error::io_error_kind),
        };
        kind == Some(std::io::ErrorKind::BrokenPipe)
    })
}

/// An error and its causes, each cause only where the text so far does not already hold it
/// (errors that show their source would otherwise print it twice).
fn describe(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}
