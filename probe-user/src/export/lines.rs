//! The daemon's event lines (JSON, the `trace --output json` schema) to stdout or a file,
//! written by a thread of their own through a bounded queue: a slow or stalled reader (a log
//! agent behind, a full pipe) costs dropped lines, counted, never a stalled daemon; a closed
//! stdout ends the event lines, not the daemon. The events file is faultline's own
//! ([`open_events_file`]): created 0600, never reached through a symbolic link, never waited
//! on, and only ever a regular file. It is opened before the programs load ([`Destination`]:
//! a path that cannot be appended to is the user's mistake, said at once), the writer started
//! after. SIGHUP (`reopen`) makes the writer reopen the events file before its next line, as
//! log rotation expects; a reopen refused is said once, and lines are dropped and counted
//! until the path opens again (tried every second).

use std::{
    fs::{File, Metadata},
    io::{BufWriter, ErrorKind, Write},
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use prometheus::IntCounterVec;

use crate::signals::Line;

/// Lines waiting for the writer; past it, new lines are dropped.
const QUEUE: usize = 8192;
/// How often an idle writer looks for a reopen request.
const REOPEN_POLL: Duration = Duration::from_millis(250);
/// How often an events file that could not be reopened is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// How long shutdown waits for the writer to deliver what is queued.
const FLUSH_WAIT: Duration = Duration::from_secs(2);
/// The writer's buffer.
const BUFFER: usize = 64 * 1024;

/// Where event lines go, and what did not get there.
pub struct EventLines {
    tx: Option<SyncSender<Vec<u8>>>,
    dropped: Drops,
    done: Option<Receiver<()>>,
    reopen: Arc<AtomicBool>,
}

/// Why an event line was not written: the `reason` of `faultline_event_lines_dropped_total`.
#[derive(Clone, Copy, Debug)]
enum Dropped {
    /// The queue was full: the reader of stdout or the file is slow.
    QueueFull,
    /// stdout was closed.
    Closed,
    /// A write failed (a full disk).
    WriteError,
    /// The events file could not be reopened after SIGHUP.
    ReopenFailed,
}

impl Dropped {
    fn as_str(self) -> &'static str {
        match self {
            Dropped::QueueFull => "queue_full",
            Dropped::Closed => "closed",
            Dropped::WriteError => "write_error",
            Dropped::ReopenFailed => "reopen_failed",
        }
    }
}

/// `faultline_event_lines_dropped_total{reason}`.
#[derive(Clone)]
struct Drops(IntCounterVec);

impl Drops {
    fn add(&self, why: Dropped, lines: u64) {
        self.0.with_label_values(&[why.as_str()]).inc_by(lines);
    }
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

    fn open(&self) -> anyhow::Result<Box<dyn Write + Send>> {
        match self {
            Target::Stdout => Ok(Box::new(std::io::stdout())),
            Target::File(path) => {
                let file = open_events_file(path)
                    .with_context(|| format!("opening the events file {}", path.display()))?;
                Ok(Box::new(file))
            }
        }
    }
}

/// The events file, opened for appending as faultline's own:
/// - created 0600: its lines name pods, processes and cgroups;
/// - its last component never followed when it is a symbolic link, whoever owns it (in a
///   world-writable directory another user's link would have faultline append to any file
///   root can write, where `fs.protected_symlinks` is 0; telling a trusted link apart would
///   race with the link's replacement between the check and the open, and the operator can
///   always name the file itself); the directories on the way are the operator's path;
/// - opened without waiting (O_NONBLOCK: a FIFO without a reader would block for ever; it
///   changes nothing for a regular file), and never made the controlling terminal;
/// - kept only when it is a regular file: a FIFO, a socket or a device is refused.
fn open_events_file(path: &Path) -> anyhow::Result<File> {
    let opened = File::options()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let file = match opened {
        Ok(file) => file,
        // A refusal is said as what is at the path when that is not a regular file: a link
        // is refused as ELOOP (O_NOFOLLOW), or as EACCES when another user's sits in a sticky
        // world-writable directory; a FIFO without a reader or a socket as ENXIO (O_NONBLOCK).
        Err(e) => {
            let found = std::fs::symlink_metadata(path).ok();
            return Err(found.and_then(|m| not_regular(&m)).unwrap_or(e.into()));
        }
    };
    let found = file.metadata().context("reading what it is")?;
    match not_regular(&found) {
        Some(refused) => Err(refused),
        None => Ok(file),
    }
}

/// Why what was found at the events file's path is not appended to; none for a regular file.
fn not_regular(found: &Metadata) -> Option<anyhow::Error> {
    let kind = found.file_type();
    if kind.is_file() {
        return None;
    }
    if kind.is_symlink() {
        return Some(anyhow!(
            "a symbolic link (owned by uid {}), which faultline does not follow: name the file itself",
            found.uid()
        ));
    }
    let what = if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_dir() {
        "a directory"
    } else {
        "something else"
    };
    Some(anyhow!("{what}, not a regular file"))
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

    /// The events file, created if missing, appended to ([`open_events_file`]).
    pub fn file(path: &Path) -> anyhow::Result<Self> {
        Self::open(Target::File(path.to_owned()))
    }

    fn open(target: Target) -> anyhow::Result<Self> {
        let out = target.open()?;
        Ok(Destination(Some((target, out))))
    }
}

impl EventLines {
    /// Starts the writer of `destination` (none for no event lines).
    pub fn start(destination: Destination, dropped: IntCounterVec) -> anyhow::Result<Self> {
        let dropped = Drops(dropped);
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
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            target,
            out: Some(BufWriter::with_capacity(BUFFER, out)),
            retry_at: Instant::now(),
            dropped: dropped.clone(),
            failures: 0,
        };
        let writer_reopen = reopen.clone();
        std::thread::Builder::new()
            .name("event-lines".to_owned())
            .spawn(move || {
                writer.run(&rx, &writer_reopen);
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
            Err(TrySendError::Full(_)) => self.dropped.add(Dropped::QueueFull, 1),
            Err(TrySendError::Disconnected(_)) => self.dropped.add(Dropped::Closed, 1),
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
/// that failed are counted as dropped (`write_error`, or `closed` for a closed pipe), and so
/// are the lines that come while the events file cannot be reopened (`reopen_failed`).
struct Writer {
    target: Target,
    /// None while the events file cannot be reopened.
    out: Option<BufWriter<Box<dyn Write + Send>>>,
    /// When a refused reopen is tried again.
    retry_at: Instant,
    dropped: Drops,
    /// Failed writes, said now and then.
    failures: u64,
}

impl Writer {
    fn run(mut self, rx: &Receiver<Vec<u8>>, reopen: &AtomicBool) {
        loop {
            // Idle, the writer still looks for a reopen now and then: the new file appears
            // without waiting for a line.
            let line = rx.recv_timeout(REOPEN_POLL);
            let asked = reopen.swap(false, Ordering::Relaxed);
            if matches!(self.target, Target::File(_))
                && (asked || (self.out.is_none() && Instant::now() >= self.retry_at))
            {
                self.reopen();
            }
            let line = match line {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if !self.write(line, rx) {
                return;
            }
        }
    }

    /// Opens the events file anew: a refusal is said once, then tried every [`RETRY`].
    fn reopen(&mut self) {
        if let Some(out) = &mut self.out {
            // What was buffered belongs to the old file.
            let _ = out.flush();
        }
        match self.target.open() {
            Ok(file) => {
                if self.out.is_none() {
                    tracing::info!("writing event lines to {} again", self.target.name());
                }
                self.out = Some(BufWriter::with_capacity(BUFFER, file));
            }
            // The old file is let go all the same: rotation moved it away, and may delete
            // it; lines written there would be lost to whoever reads the path, uncounted.
            Err(e) => {
                if self.out.take().is_some() {
                    tracing::warn!(
                        "{e:#}; event lines are dropped, counted as reason=\"reopen_failed\", until it opens (tried every second)"
                    );
                }
                self.retry_at = Instant::now() + RETRY;
            }
        }
    }

    /// Writes `line` and everything queued after it in one go, then one flush; false once
    /// the reader closed its end.
    fn write(&mut self, line: Vec<u8>, rx: &Receiver<Vec<u8>>) -> bool {
        let name = self.target.name();
        let Some(out) = &mut self.out else {
            let queued = rx.try_iter().count() as u64;
            self.dropped.add(Dropped::ReopenFailed, 1 + queued);
            return true;
        };
        let mut batch = 1;
        let mut result = out.write_all(&line);
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
                self.dropped.add(Dropped::Closed, batch);
                tracing::warn!("{name} was closed: no more event lines; metrics go on");
                return false;
            }
            Err(e) => {
                // A full disk may drain: say so now and then, keep going.
                self.dropped.add(Dropped::WriteError, batch);
                self.failures += 1;
                if self.failures.is_power_of_two() {
                    tracing::warn!(
                        "writing event lines to {name}: {e} ({} failed writes)",
                        self.failures
                    );
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::{ffi::CString, os::unix::ffi::OsStrExt as _, os::unix::fs::PermissionsExt as _};

    use super::*;

    /// A directory of the test's own, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir =
                std::env::temp_dir().join(format!("faultline-unit-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    }

    fn refusal(path: &Path) -> String {
        match open_events_file(path) {
            Ok(_) => panic!("{} was opened", path.display()),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn the_events_file_is_created_0600_and_only_a_regular_file_is_taken() {
        let dir = Dir::new("events-open");
        let new = dir.0.join("events.jsonl");
        open_events_file(&new).unwrap();
        let mode = std::fs::metadata(&new).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");

        let link = dir.0.join("link.jsonl");
        std::os::unix::fs::symlink(&new, &link).unwrap();
        let dangling = dir.0.join("dangling.jsonl");
        std::os::unix::fs::symlink(dir.0.join("nowhere"), &dangling).unwrap();
        for l in [&link, &dangling] {
            let said = refusal(l);
            assert!(
                said.starts_with("a symbolic link (owned by uid ")
                    && said.ends_with("which faultline does not follow: name the file itself"),
                "{said}"
            );
        }
        assert!(!dir.0.join("nowhere").exists(), "created through the link");

        // A FIFO with no reader (it would block the open for ever), and with one.
        let fifo = dir.0.join("fifo.jsonl");
        mkfifo(&fifo);
        assert_eq!(refusal(&fifo), "a FIFO, not a regular file");
        let _reader = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        assert_eq!(refusal(&fifo), "a FIFO, not a regular file");
        assert_eq!(
            refusal(Path::new("/dev/null")),
            "a character device, not a regular file"
        );
    }

    /// After SIGHUP, a FIFO where the file was: said once, every line counted as dropped,
    /// and once a file can be made there again, lines go to it.
    #[test]
    fn a_refused_reopen_drops_lines_counted_until_the_file_opens_again() {
        let dir = Dir::new("events-reopen");
        let path = dir.0.join("events.jsonl");
        let counter =
            IntCounterVec::new(prometheus::Opts::new("dropped", "dropped"), &["reason"]).unwrap();
        let lines = EventLines::start(Destination::file(&path).unwrap(), counter.clone()).unwrap();
        std::fs::rename(&path, dir.0.join("events.jsonl.1")).unwrap();
        mkfifo(&path);
        lines.reopen().request();
        let dropped = || counter.with_label_values(&["reopen_failed"]).get();
        let deadline = Instant::now() + Duration::from_secs(10);
        while dropped() == 0 {
            assert!(Instant::now() < deadline, "no line counted as dropped");
            lines.send(&serde_json::json!({"kind": "while_refused"}));
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::remove_file(&path).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            lines.send(&serde_json::json!({"kind": "after"}));
            std::thread::sleep(Duration::from_millis(100));
            if std::fs::read_to_string(&path).is_ok_and(|t| t.contains("after")) {
                break;
            }
            assert!(Instant::now() < deadline, "no new events file");
        }
        lines.finish();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("while_refused"), "{text}");
        assert!(std::fs::metadata(&path).unwrap().is_file());
    }
}
