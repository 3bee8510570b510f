//! Progress of the long-running commands on stderr: a bar with an ETA on a terminal, and
//! otherwise (logs, CI, pipes) a plain line at every tenth of the work, so a run of minutes is
//! never silent.

use std::cell::Cell;
use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// A unit counter shown as a bar or as periodic lines.
pub struct Progress {
    label: String,
    bar: ProgressBar,
    tty: bool,
    start: Instant,
    /// The next count at which a plain line is printed.
    next_line: Cell<u64>,
}

impl Progress {
    /// `total` units of work named `label` (e.g. "bench", "generations").
    pub fn new(label: &str, total: usize) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = if tty {
            ProgressBar::new(total as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_length(total as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} [{elapsed}<{eta}]")
                .expect("valid template"),
        );
        bar.set_prefix(label.to_string());
        Self {
            label: label.into(),
            bar,
            tty,
            start: Instant::now(),
            next_line: Cell::new(1),
        }
    }

    /// One unit done.
    pub fn inc(&self) {
        self.bar.inc(1);
        let (done, total) = (self.bar.position(), self.bar.length().unwrap_or(0));
        if self.tty || done < self.next_line.get() {
            return;
        }
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = elapsed / done as f64 * total.saturating_sub(done) as f64;
        eprintln!(
            "{}: {done}/{total} ({:.0}%), {elapsed:.0} s elapsed, about {eta:.0} s left",
            self.label,
            100.0 * done as f64 / total.max(1) as f64
        );
        // The next line at the next tenth of the work.
        let step = total.div_ceil(10).max(1);
        self.next_line.set((done / step + 1) * step);
    }

    /// Prints a line to stderr without breaking the bar.
    pub fn println(&self, line: &str) {
        self.bar.suspend(|| eprintln!("{line}"));
    }

    /// Runs `f` (which prints) with the bar hidden.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
