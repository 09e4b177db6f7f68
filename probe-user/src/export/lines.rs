//! The daemon's event lines (JSON, the `trace --output json` schema) to stdout or a file,
//! written by a thread of their own through a bounded queue: a slow or stalled reader (a log
//! agent behind, a full pipe) costs dropped lines, counted, never a stalled daemon; a closed
//! stdout ends the event lines, not the daemon.

use std::{
    io::{ErrorKind, Write},
    path::Path,
    sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    time::Duration,
};

use anyhow::Context as _;
use prometheus::IntCounterVec;

/// Lines waiting for the writer; past it, new lines are dropped.
const QUEUE: usize = 8192;
/// How long shutdown waits for the writer to deliver what is queued.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Where event lines go, and what did not get there.
pub struct EventLines {
    tx: Option<SyncSender<Vec<u8>>>,
    /// `faultline_event_lines_dropped_total{reason}`: queue_full, closed, write_error.
    dropped: IntCounterVec,
    done: Option<Receiver<()>>,
}

impl EventLines {
    /// No event lines at all.
    pub fn none(dropped: IntCounterVec) -> Self {
        EventLines {
            tx: None,
            dropped,
            done: None,
        }
    }

    pub fn stdout(dropped: IntCounterVec) -> anyhow::Result<Self> {
        Self::spawn(Box::new(std::io::stdout()), "stdout", dropped)
    }

    pub fn file(path: &Path, dropped: IntCounterVec) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Self::spawn(Box::new(file), "the events file", dropped)
    }

    fn spawn(
        out: Box<dyn Write + Send>,
        name: &'static str,
        dropped: IntCounterVec,
    ) -> anyhow::Result<Self> {
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
        let (done_tx, done) = sync_channel(1);
        let counter = dropped.clone();
        std::thread::Builder::new()
            .name("event-lines".to_owned())
            .spawn(move || {
                write_lines(rx, out, name, counter);
                let _ = done_tx.send(());
            })
            .context("starting the event-line writer")?;
        Ok(EventLines {
            tx: Some(tx),
            dropped,
            done: Some(done),
        })
    }

    /// Queues one event as a JSON line (not even encoded when event lines are off).
    pub fn send(&self, event: &impl serde::Serialize) {
        let Some(tx) = &self.tx else { return };
        let Ok(line) = crate::text::json_line(event) else {
            return;
        };
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.dropped.with_label_values(&["queue_full"]).inc(),
            Err(TrySendError::Disconnected(_)) => self.dropped.with_label_values(&["closed"]).inc(),
        }
    }

    /// Closes the queue and gives the writer a moment to deliver it.
    pub fn finish(mut self) {
        self.tx = None;
        if let Some(done) = self.done.take() {
            let _ = done.recv_timeout(FLUSH_WAIT);
        }
    }
}

/// The writer thread: buffered writes, a flush whenever the queue runs dry. Lines of a batch
/// that failed are counted as dropped (`write_error`, or `closed` for a closed pipe).
fn write_lines(rx: Receiver<Vec<u8>>, out: Box<dyn Write>, name: &str, dropped: IntCounterVec) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut failures = 0u64;
    while let Ok(line) = rx.recv() {
        let mut batch = 1;
        let mut result = out.write_all(&line);
        // Everything queued so far in one go, then one flush.
        while result.is_ok() {
            match rx.try_recv() {
                Ok(line) => {
                    batch += 1;
                    result = out.write_all(&line);
                }
                Err(_) => break,
            }
        }
        if result.is_ok() {
            result = out.flush();
        }
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::BrokenPipe => {
                dropped.with_label_values(&["closed"]).inc_by(batch);
                tracing::warn!("{name} was closed: no more event lines; metrics go on");
                return;
            }
            Err(e) => {
                // A full disk may drain: say so now and then, keep going.
                dropped.with_label_values(&["write_error"]).inc_by(batch);
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!("writing event lines to {name}: {e} ({failures} failed writes)");
                }
            }
        }
    }
}
