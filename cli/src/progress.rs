//! The one terminal progress bar of peerlink's command-line tools (indicatif, on stderr): the
//! reference client's file transfers and the load tester's runs draw the same bar. It is
//! hidden unless stderr is a terminal or the caller forces it (`--progress`), and never when
//! machine-readable output was asked for; a hidden bar costs nothing.

use std::io::IsTerminal;

/// What the bar counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Bytes, with a rate and an ETA (file transfers).
    Bytes,
    /// Steps of a run (e.g. benchmark rounds), with the elapsed time and an ETA.
    Steps,
}

/// Whether a bar should draw: stderr is a terminal, or `force` (an explicit `--progress`).
pub fn wanted(force: bool) -> bool {
    force || std::io::stderr().is_terminal()
}

/// A progress bar on stderr (cheap to clone: clones draw the same bar).
#[derive(Debug, Clone)]
pub struct Bar {
    bar: indicatif::ProgressBar,
    label: String,
}

impl Bar {
    /// A bar labelled `label` counting `unit`, drawn only if `visible`.
    pub fn new(label: &str, unit: Unit, visible: bool) -> Self {
        let bar = if visible && std::io::stderr().is_terminal() {
            indicatif::ProgressBar::with_draw_target(
                Some(0),
                indicatif::ProgressDrawTarget::stderr(),
            )
        } else if visible {
            // Forced onto a stderr that is no terminal (a log, a pipe): indicatif would hide
            // it, so it draws through a plain writer, a few times a second.
            indicatif::ProgressBar::with_draw_target(
                Some(0),
                indicatif::ProgressDrawTarget::term_like_with_hz(Box::new(PlainStderr), 2),
            )
        } else {
            indicatif::ProgressBar::hidden()
        };
        let template = match unit {
            Unit::Bytes => {
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}"
            }
            Unit::Steps => "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}",
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(label.to_string());
        Self {
            bar,
            label: label.to_owned(),
        }
    }

    /// A hidden bar (draws nothing).
    pub fn hidden() -> Self {
        Self::new("", Unit::Steps, false)
    }

    /// Whether the bar draws nothing.
    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }

    /// Set the total.
    pub fn set_length(&self, n: u64) {
        self.bar.set_length(n);
    }

    /// Set the position.
    pub fn set_position(&self, n: u64) {
        self.bar.set_position(n);
    }

    /// Advance by `n`.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// The current position.
    pub fn position(&self) -> u64 {
        self.bar.position()
    }

    /// Show `msg` after the label (e.g. the current round).
    pub fn set_message(&self, msg: impl Into<String>) {
        let msg = msg.into();
        if self.label.is_empty() {
            self.bar.set_message(msg);
        } else {
            self.bar.set_message(format!("{}: {msg}", self.label));
        }
    }

    /// Draw the final state and stop.
    pub fn finish(&self) {
        self.bar.finish();
    }
}

/// stderr as indicatif's terminal when it is not one: cursor moves and clears are ANSI
/// sequences, as on a terminal; the width is fixed.
#[derive(Debug)]
struct PlainStderr;

impl PlainStderr {
    fn put(&self, s: &str) -> std::io::Result<()> {
        use std::io::Write as _;
        std::io::stderr().write_all(s.as_bytes())
    }
}

impl indicatif::TermLike for PlainStderr {
    fn width(&self) -> u16 {
        100
    }
    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}A"))
        } else {
            Ok(())
        }
    }
    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}B"))
        } else {
            Ok(())
        }
    }
    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}C"))
        } else {
            Ok(())
        }
    }
    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}D"))
        } else {
            Ok(())
        }
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.put(s)?;
        self.put("\n")
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.put(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.put("\r\x1b[2K")
    }
    fn flush(&self) -> std::io::Result<()> {
        use std::io::Write as _;
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hidden_bar_still_counts() {
        let b = Bar::new("rounds", Unit::Steps, false);
        assert!(b.is_hidden());
        b.set_length(4);
        b.inc(1);
        b.inc(2);
        assert_eq!(b.position(), 3);
        b.finish();
        assert!(wanted(true));
    }
}
