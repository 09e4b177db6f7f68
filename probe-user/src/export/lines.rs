//! The daemon's event lines (JSON, the `trace --output json` schema) to stdout or a file,
//! written by a thread of their own through a bounded queue: a slow or stalled reader (a log
//! agent behind, a full pipe) costs dropped lines, counted, never a stalled daemon; a closed
//! stdout ends the event lines, not the daemon. The file is opened before the programs load
//! ([`Destination`]: a path that cannot be appended to is the user's mistake, said at once),
//! the writer started after. SIGHUP (`reopen`) makes the writer reopen the events file before
//! its next line, as log rotation expects.

use std::{
    fs::File,
    io::{ErrorKind, Write},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    },
    time::Duration,
};

use anyhow::Context as _;
use prometheus::IntCounterVec;

use crate::signals::Line;

/// Lines waiting for the writer; past it, new lines are dropped.
const QUEUE: usize = 8192;
/// How often an idle writer looks for a reopen request.
const REOPEN_POLL: Duration = Duration::from_millis(250);
/// How long shutdown waits for the writer to deliver what is queued.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Where event lines go, and what did not get there.
pub struct EventLines {
    tx: Option<SyncSender<Vec<u8>>>,
    /// `faultline_event_lines_dropped_total{reason}`: queue_full, closed, write_error.
    dropped: IntCounterVec,
    done: Option<Receiver<()>>,
    reopen: Arc<AtomicBool>,
}

/// Where the writer writes.
enum Target {
    Stdout,
    File(PathBuf),
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Stdout => "stdout",
            Target::File(_) => "the events file",
        }
    }

    fn open(&self) -> std::io::Result<Box<dyn Write + Send>> {
        match self {
            Target::Stdout => Ok(Box::new(std::io::stdout())),
            Target::File(path) => Ok(Box::new(
                File::options().create(true).append(true).open(path)?,
            )),
        }
    }
}

/// Where event lines will go, opened: before the programs load, so that an events file that
/// cannot be opened for appending is said at once; written to once the daemon runs.
pub struct Destination(Option<(Target, Box<dyn Write + Send>)>);

impl Destination {
    /// No event lines at all (`--no-events`).
    pub fn none() -> Self {
        Destination(None)
    }

    pub fn stdout() -> anyhow::Result<Self> {
        Self::open(Target::Stdout)
    }

    /// The events file, created if missing, appended to.
    pub fn file(path: &Path) -> anyhow::Result<Self> {
        Self::open(Target::File(path.to_owned()))
    }

    fn open(target: Target) -> anyhow::Result<Self> {
        let out = target.open().with_context(|| match &target {
            Target::File(path) => format!("opening the events file {}", path.display()),
            Target::Stdout => "opening stdout".to_owned(),
        })?;
        Ok(Destination(Some((target, out))))
    }
}

impl EventLines {
    /// Starts the writer of `destination` (none for no event lines).
    pub fn start(destination: Destination, dropped: IntCounterVec) -> anyhow::Result<Self> {
        let Some((target, out)) = destination.0 else {
            return Ok(EventLines {
                tx: None,
                dropped,
                done: None,
                reopen: Arc::default(),
            });
        };
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
        let (done_tx, done) = sync_channel(1);
        let counter = dropped.clone();
        let reopen = Arc::new(AtomicBool::new(false));
        let writer_reopen = reopen.clone();
        std::thread::Builder::new()
            .name("event-lines".to_owned())
            .spawn(move || {
                write_lines(rx, out, &target, &writer_reopen, counter);
                let _ = done_tx.send(());
            })
            .context("starting the event-line writer")?;
        Ok(EventLines {
            tx: Some(tx),
            dropped,
            done: Some(done),
            reopen,
        })
    }

    /// Whether lines are written at all (not `--no-events`, and the writer still runs).
    pub fn active(&self) -> bool {
        self.tx.is_some()
    }

    /// Asks the writer to reopen the events file before its next line (after a log rotation
    /// moved it away); nothing for stdout.
    pub fn reopen(&self) -> Reopen {
        Reopen(self.reopen.clone())
    }

    /// Queues one event (or a budget's summary) as a JSON line of the schema, with its
    /// version (not even encoded when event lines are off).
    pub fn send(&self, event: &impl serde::Serialize) {
        let Some(tx) = &self.tx else { return };
        let Ok(line) = crate::text::json_line(&Line::of(event)) else {
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

/// A handle that asks the event-line writer to reopen its file (SIGHUP).
#[derive(Clone)]
pub struct Reopen(Arc<AtomicBool>);

impl Reopen {
    pub fn request(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The writer thread: buffered writes, a flush whenever the queue runs dry. Lines of a batch
/// that failed are counted as dropped (`write_error`, or `closed` for a closed pipe).
fn write_lines(
    rx: Receiver<Vec<u8>>,
    out: Box<dyn Write + Send>,
    target: &Target,
    reopen: &AtomicBool,
    dropped: IntCounterVec,
) {
    let name = target.name();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut failures = 0u64;
    loop {
        // Idle, the writer still looks for a reopen now and then: the new file appears
        // without waiting for a line.
        let line = rx.recv_timeout(REOPEN_POLL);
        if reopen.swap(false, Ordering::Relaxed) && matches!(target, Target::File(_)) {
            // What was buffered belongs to the old file.
            let _ = out.flush();
            match target.open() {
                Ok(file) => out = std::io::BufWriter::with_capacity(64 * 1024, file),
                Err(e) => tracing::warn!("reopening {name}: {e}; still writing to the old one"),
            }
        }
        let line = match line {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
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
