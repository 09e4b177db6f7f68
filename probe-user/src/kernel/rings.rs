//! The kernel's event rings, read on a thread of their own: the reader copies every record out
//! as soon as the kernel wakes it, into a queue the pipeline takes batches from. A slow HTTP
//! response, a refresh walking /proc or a stalled sink delays the pipeline, never the reading;
//! the queue is bounded in bytes (`MAX_QUEUED`), and a record that does not fit is dropped
//! and counted as the kernel counts a full ring (`faultline_events_lost_total`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{mpsc, oneshot},
};

/// A ring, by its place in the list [`Rings::start`] was given: the reader empties them in
/// that order on every wake.
pub type RingIndex = usize;

/// The most rings read.
const MAX_RINGS: usize = 8;

/// Bytes of records the pipeline has not taken yet, all rings together: a few times the
/// kernel's own rings (1 MiB each), a small share of the DaemonSet's 128 MiB.
const MAX_QUEUED: usize = 8 << 20;
/// A batch is handed over once it holds this much, so a long drain is delivered as it goes.
const BATCH_BYTES: usize = 64 << 10;
/// Every ring is also read this often: the DNS and clone programs submit without a wakeup
/// until 64 KiB wait (a wakeup per query or refusal would cost a context switch each, charged
/// to the pod whose event it is), so a quiet node's last events are read within this.
const POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// Records of one ring, copied out in the order the kernel wrote them.
pub struct Batch {
    pub ring: RingIndex,
    data: Vec<u8>,
    /// Where each record ends in `data`.
    ends: Vec<usize>,
}

impl Batch {
    fn new(ring: RingIndex) -> Batch {
        Batch {
            ring,
            data: Vec::new(),
            ends: Vec::new(),
        }
    }

    pub fn records(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(s, e)| &self.data[s..e])
    }

    fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

/// What the reader and the pipeline share.
#[derive(Default)]
struct Shared {
    /// Bytes sent and not yet taken.
    queued: AtomicUsize,
    /// Records dropped because the queue was full, by ring.
    dropped: [AtomicU64; MAX_RINGS],
}

/// The pipeline's end: batches as they are read, and the reader's thread.
pub struct Rings {
    batches: mpsc::UnboundedReceiver<Batch>,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    reader: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Rings {
    /// Starts the reader thread on these rings (none is fine: the reader then only waits
    /// for the stop).
    /// `rings`: each ring's name (for messages) and map, in the order to empty them.
    pub fn start(rings: Vec<(&'static str, RingBuf<MapData>)>) -> anyhow::Result<Rings> {
        if rings.len() > MAX_RINGS {
            anyhow::bail!("{} rings: at most {MAX_RINGS} are read", rings.len());
        }
        let (tx, batches) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel();
        let shared = Arc::new(Shared::default());
        let reader_shared = shared.clone();
        let reader = std::thread::Builder::new()
            .name("ring-reader".to_owned())
            .spawn(move || read(rings, &tx, &reader_shared, stopped))
            .context("starting the ring reader thread")?;
        Ok(Rings {
            batches,
            shared,
            stop: Some(stop),
            reader: Some(reader),
        })
    }

    /// The next batch; `None` once the reader has stopped and everything was taken.
    pub async fn next(&mut self) -> Option<Batch> {
        let batch = self.batches.recv().await?;
        self.taken(&batch);
        Some(batch)
    }

    /// The next batch already read, without waiting.
    pub fn try_next(&mut self) -> Option<Batch> {
        let batch = self.batches.try_recv().ok()?;
        self.taken(&batch);
        Some(batch)
    }

    fn taken(&self, batch: &Batch) {
        self.shared
            .queued
            .fetch_sub(batch.data.len(), Ordering::Relaxed);
    }

    /// Counts a batch's records as dropped instead of delivering them (a stop that cannot
    /// wait for a pipeline far behind).
    pub fn discard(&self, batch: Batch) {
        self.shared.dropped[batch.ring].fetch_add(batch.ends.len() as u64, Ordering::Relaxed);
    }

    /// Records of `ring` dropped because the pipeline was behind by `MAX_QUEUED`, or at a stop.
    pub fn dropped(&self, ring: RingIndex) -> u64 {
        self.shared
            .dropped
            .get(ring)
            .map_or(0, |d| d.load(Ordering::Relaxed))
    }

    /// Stops the reader after one last read of every ring; what it read stays to be taken
    /// with `try_next`. The reader's error, if it failed.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.reader.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(_)) => anyhow::bail!("the ring reader thread panicked"),
        }
    }

    /// Why the reader stopped on its own (its error), once the queue ran dry.
    pub fn failure(&mut self) -> anyhow::Error {
        match self.stop() {
            Err(e) => e,
            Ok(()) => anyhow::anyhow!("the ring reader stopped"),
        }
    }
}

impl Drop for Rings {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The reader thread: waits on every ring at once, and on each wake empties all of them.
fn read(
    rings: Vec<(&'static str, RingBuf<MapData>)>,
    tx: &mpsc::UnboundedSender<Batch>,
    shared: &Shared,
    mut stopped: oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("starting the ring reader's event loop")?;
    runtime.block_on(async {
        let mut rings = rings
            .into_iter()
            .enumerate()
            .map(|(ring, (name, buf))| {
                // SAFETY: the AsyncFd owns the ring, so its fd stays open while registered.
                unsafe { AsyncFd::register_with_interest(buf, Interest::READABLE) }
                    .map_err(|e| e.into_parts().1)
                    .map(|fd| (ring, fd))
                    .with_context(|| format!("registering the {name} ring"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let woken = async {
                if rings.is_empty() {
                    return std::future::pending().await;
                }
                let waits = rings.iter().map(|(_, fd)| Box::pin(fd.readable()));
                let (ready, _, _) = futures_util::future::select_all(waits).await;
                // Cleared before reading: a record written after the read wakes us again.
                ready.map(|mut guard| guard.clear_ready())
            };
            tokio::select! {
                ready = woken => ready.context("waiting on the event rings")?,
                _ = poll.tick() => {}
                _ = &mut stopped => break,
            }
            empty(&mut rings, tx, shared);
        }
        empty(&mut rings, tx, shared);
        Ok(())
    })
}

/// Copies every record of every ring into batches.
fn empty(
    rings: &mut [(RingIndex, AsyncFd<RingBuf<MapData>>)],
    tx: &mpsc::UnboundedSender<Batch>,
    shared: &Shared,
) {
    for (ring, fd) in rings.iter_mut() {
        let mut batch = Batch::new(*ring);
        while let Some(item) = fd.get_mut().next() {
            let queued = shared.queued.load(Ordering::Relaxed) + batch.data.len();
            if queued + item.len() > MAX_QUEUED {
                shared.dropped[*ring].fetch_add(1, Ordering::Relaxed);
                continue;
            }
            batch.data.extend_from_slice(&item);
            batch.ends.push(batch.data.len());
            if batch.data.len() >= BATCH_BYTES {
                send(std::mem::replace(&mut batch, Batch::new(*ring)), tx, shared);
            }
        }
        if !batch.is_empty() {
            send(batch, tx, shared);
        }
    }
}

fn send(batch: Batch, tx: &mpsc::UnboundedSender<Batch>, shared: &Shared) {
    shared.queued.fetch_add(batch.data.len(), Ordering::Relaxed);
    // A closed channel: the pipeline is gone, and so is the need for records.
    let _ = tx.send(batch);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_gives_back_its_records_in_order() {
        let mut b = Batch::new(0);
        for r in [&b"one"[..], b"", b"three"] {
            b.data.extend_from_slice(r);
            b.ends.push(b.data.len());
        }
        let got: Vec<&[u8]> = b.records().collect();
        assert_eq!(got, vec![&b"one"[..], b"", b"three"]);
        assert!(Batch::new(1).records().next().is_none());
    }
}
