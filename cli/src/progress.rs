//! Progress bars on a terminal (none when not a TTY, with --json or -q).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar fed from atomic counters by a background thread.
pub struct Bar {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Whether to draw bars.
pub fn wanted(json: bool, quiet: bool) -> bool {
    !json && !quiet && std::io::stderr().is_terminal()
}

impl Bar {
    /// Shows `(files, bytes)` from `counters` as they grow; `total` may be filled in later by a scanner.
    pub fn start(
        counters: impl Fn() -> (u64, u64) + Send + 'static,
        total: Arc<AtomicU64>,
        verb: &'static str,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let pb = ProgressBar::new(0);
            pb.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            while !s.load(Ordering::Relaxed) {
                let t = total.load(Ordering::Relaxed);
                let (files, b) = counters();
                pb.set_length(t.max(b));
                pb.set_position(b);
                pb.set_message(format!("{verb} {} files", files));
                std::thread::sleep(Duration::from_millis(100));
            }
            pb.finish_and_clear();
        });
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sums the sizes of regular files below `sources` in the background, for the ETA.
pub fn scan_total(sources: Vec<PathBuf>, total: Arc<AtomicU64>) {
    std::thread::spawn(move || {
        let mut stack = sources;
        let mut sum = 0u64;
        while let Some(p) = stack.pop() {
            let Ok(m) = std::fs::symlink_metadata(&p) else { continue };
            if m.is_dir() {
                if let Ok(rd) = std::fs::read_dir(&p) {
                    stack.extend(rd.flatten().map(|e| e.path()));
                }
            } else if m.is_file() {
                sum += m.len();
            }
        }
        total.store(sum, Ordering::Relaxed);
    });
}
