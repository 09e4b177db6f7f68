//! The one flow every command drives: load the programs -> attach the signals asked for ->
//! (optionally) give up the privileges only loading needed -> read their ring buffers on a
//! thread of their own (`kernel::rings`) -> decode and enrich each batch of events (cause,
//! cgroup, pod) and refresh on ticks -> hand them to a [`Sink`]. `trace` (lines and a summary)
//! and `run` (metrics, event lines, OTLP) are sinks; neither repeats the flow. Events are born
//! in the kernel programs (`probe-ebpf`), decoded and enriched by the signal modules (`clone`,
//! `dns`, `conntrack`, `tasks`), and exported by the sink.

use std::{future::Future, time::Duration};

use anyhow::Context as _;

use crate::{
    attribution::cgroups::CgroupFs,
    attribution::netns::NetnsDirectory,
    attribution::pods::{Attributor, PodArgs},
    kernel::loader::{
        ClonePath, CloneStats, ConntrackStats, Degraded, DnsStats, KernelArgs, KernelLog,
        KernelLogger, Probes, TASK_PROGRAMS,
    },
    kernel::privileges,
    kernel::rings::{Batch, Ring, Rings},
    signals::clone::{self, CloneFailure, Enricher},
    signals::conntrack::{self, ClashesResolved, Classifier, ConntrackDrop, CtTable},
    signals::dns::{self, DnsQuery, DnsTracker, Names},
    signals::tasks::TaskModel,
};

/// The signals a command asks for.
#[derive(Clone, Copy, Debug)]
pub struct Want {
    pub clone: bool,
    /// DNS queries, with their timeout and how names are shown. The DNS programs also record
    /// who sent each flow, which conntrack drops are attributed by: ask for both.
    pub dns: Option<(Duration, Names)>,
    pub conntrack: bool,
    pub tasks: bool,
    /// Once everything is attached, keep only the capabilities reading needs (the daemon).
    pub drop_privileges: bool,
}

/// A signal of the pipeline, as named in messages and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Clone,
    Tasks,
    Dns,
    Conntrack,
}

impl Signal {
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Clone => "clone",
            Signal::Tasks => "tasks",
            Signal::Dns => "dns",
            Signal::Conntrack => "conntrack",
        }
    }
}

/// What a sink receives: each event as it is enriched, and a refresh on every tick.
pub trait Sink {
    fn clone_failure(&mut self, f: CloneFailure) -> anyhow::Result<()>;
    fn dns_query(&mut self, q: DnsQuery) -> anyhow::Result<()>;
    fn conntrack_drop(&mut self, d: ConntrackDrop) -> anyhow::Result<()>;
    fn clashes_resolved(&mut self, c: ClashesResolved) -> anyhow::Result<()>;
    /// Every tick, after the task model took the kernel's counts.
    fn refresh(&mut self, state: State<'_>) -> anyhow::Result<()>;
    /// A refresh that failed (a counter or /proc read): fatal unless the sink says otherwise.
    fn refresh_failed(&mut self, e: anyhow::Error) -> anyhow::Result<()> {
        Err(e)
    }
    /// After each batch of events.
    fn flush(&mut self) -> anyhow::Result<()>;
}

/// The pipeline's state, lent to a sink on refresh and read by commands at the end.
pub struct State<'a> {
    pub probes: &'a Probes,
    /// Records read from the kernel but dropped because the pipeline was behind.
    pub rings: &'a Rings,
    pub attributor: &'a mut Attributor,
    pub tasks: Option<&'a TaskModel>,
    pub dns: Option<&'a DnsTracker>,
    pub conntrack: Option<&'a mut Classifier>,
}

impl State<'_> {
    /// The clone programs' counts; `lost` also counts what the reader's queue dropped.
    pub fn clone_stats(&self) -> anyhow::Result<CloneStats> {
        let mut stats = self.probes.clone_stats()?;
        stats.lost += self.rings.dropped(Ring::Clone);
        Ok(stats)
    }

    /// The DNS programs' counts; `lost` also counts what the reader's queue dropped.
    pub fn dns_stats(&self) -> anyhow::Result<DnsStats> {
        let mut stats = self.probes.dns_stats()?;
        stats.lost += self.rings.dropped(Ring::Dns);
        Ok(stats)
    }

    /// The conntrack program's counts; `lost` also counts what the reader's queue dropped.
    pub fn conntrack_stats(&self) -> anyhow::Result<ConntrackStats> {
        let mut stats = self.probes.conntrack_stats()?;
        stats.lost += self.rings.dropped(Ring::Conntrack);
        Ok(stats)
    }

    /// Every network namespace's conntrack table at the last poll (none without conntrack).
    pub fn conntrack_tables(&self) -> &[CtTable] {
        self.conntrack
            .as_deref()
            .map_or(&[], |c| c.tables.as_slice())
    }
}

pub struct Pipeline {
    probes: Probes,
    attributor: Attributor,
    rings: Rings,
    clone: Option<Enricher>,
    dns: Option<DnsTracker>,
    conntrack: Option<Classifier>,
    tasks: Option<TaskModel>,
    kernel_log: Option<KernelLogger>,
}

/// How long a stop spends delivering the events already read.
const FINAL_DELIVERY: Duration = Duration::from_secs(2);

/// Near-misses are polled at most this often (each poll reads every namespace's counters).
const CLASH_POLL_MIN: Duration = Duration::from_secs(1);

impl Pipeline {
    /// Loads the programs and attaches the signals asked for. Each signal's outcome is handed
    /// to `attached` (a refused one with the kernel's reason), which decides whether the
    /// command can go on without it.
    pub async fn open(
        kernel: &KernelArgs,
        kernel_log: KernelLog,
        pods: &PodArgs,
        want: Want,
        mut attached: impl FnMut(Signal, anyhow::Result<()>) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        let mut probes = Probes::open(kernel, kernel_log)?;
        let clone = if want.clone {
            let r = probes.attach_clone(kernel.clone_hook).map(|path| {
                if path == ClonePath::RawSysExit {
                    tracing::info!("note: failed task creation is traced {}", path.describe());
                }
            });
            let ok = r.is_ok();
            attached(Signal::Clone, r)?;
            ok
        } else {
            false
        };
        let tasks = if want.tasks {
            let r = probes.attach(&TASK_PROGRAMS);
            let ok = r.is_ok();
            attached(Signal::Tasks, r)?;
            ok.then(TaskModel::default)
        } else {
            None
        };
        let cgroups = CgroupFs::open(&mut probes)?;
        let mut rings = Vec::new();
        let dns = match want.dns {
            Some((timeout, names)) => match probes.dns_events(&cgroups) {
                Ok(ring) => {
                    attached(Signal::Dns, Ok(()))?;
                    rings.push((Ring::Dns, ring));
                    Some(DnsTracker::new(timeout, names))
                }
                Err(e) => {
                    attached(Signal::Dns, Err(e))?;
                    None
                }
            },
            None => None,
        };
        let conntrack = if want.conntrack {
            match probes.conntrack_events() {
                Ok(ring) => {
                    attached(Signal::Conntrack, Ok(()))?;
                    rings.push((Ring::Conntrack, ring));
                    Some(Classifier::new(NetnsDirectory::new("/proc")))
                }
                Err(e) => {
                    attached(Signal::Conntrack, Err(e))?;
                    None
                }
            }
        } else {
            None
        };
        let clone = if clone {
            rings.push((Ring::Clone, probes.clone_events()?));
            Some(Enricher::new())
        } else {
            None
        };
        let kernel_log = probes.kernel_logger();
        if want.drop_privileges {
            // Before any other thread exists: capabilities are per thread, and threads made
            // later inherit the reduced sets.
            privileges::keep_only(&privileges::after_attach(conntrack.is_some()))?;
        }
        Ok(Pipeline {
            attributor: Attributor::new(cgroups, pods).await,
            rings: Rings::start(rings)?,
            probes,
            clone,
            dns,
            conntrack,
            tasks,
            kernel_log,
        })
    }

    /// Evidence the attached probes lack here for want of a privilege.
    pub fn degraded(&self) -> &[Degraded] {
        &self.probes.degraded
    }

    pub fn has(&self, signal: Signal) -> bool {
        match signal {
            Signal::Clone => self.clone.is_some(),
            Signal::Tasks => self.tasks.is_some(),
            Signal::Dns => self.dns.is_some(),
            Signal::Conntrack => self.conntrack.is_some(),
        }
    }

    /// Delivers events to `sink` until `stop` completes, refreshing every `every`; then
    /// delivers what the kernel already handed over.
    pub async fn run(
        &mut self,
        sink: &mut impl Sink,
        every: Duration,
        stop: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(stop);
        let mut refresh = tokio::time::interval(every);
        let mut sweep = tokio::time::interval(dns::SWEEP_INTERVAL);
        // Behind (a long batch), a tick comes once, not once for every one missed.
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let clash_every = every.max(CLASH_POLL_MIN);
        loop {
            tokio::select! {
                // In this order: a stop and the ticks are never starved by a backlog.
                biased;
                () = &mut stop => break,
                _ = refresh.tick() => self.refresh(sink, clash_every)?,
                // The queries past their timeout, from the kernel's map (an answered query is
                // no longer in it, even while its answer waits in the queue).
                _ = sweep.tick(), if self.dns.is_some() => self.sweep_dns(sink)?,
                guard = async { self.kernel_log.as_mut().expect("polled with --kernel-log").readable_mut().await }, if self.kernel_log.is_some() => {
                    let mut guard = guard.context("waiting on the programs' log ring")?;
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                batch = self.rings.next() => match batch {
                    Some(batch) => {
                        self.deliver(&batch, sink)?;
                        sink.flush()?;
                        // A backlog is always ready: give the runtime its turn (signals, the
                        // SIGHUP task) between batches.
                        tokio::task::yield_now().await;
                    }
                    None => return Err(self.rings.failure()),
                },
            }
        }
        if let Some(log) = self.kernel_log.as_mut() {
            log.get_mut().flush();
        }
        // Events submitted just before the stop: the reader reads every ring once more, and
        // what the pipeline can deliver within FINAL_DELIVERY is delivered; the rest of a
        // storm's backlog is counted as lost, so that a stop takes seconds, not minutes.
        self.rings.stop()?;
        let deadline = std::time::Instant::now() + FINAL_DELIVERY;
        while let Some(batch) = self.rings.try_next() {
            if std::time::Instant::now() < deadline {
                self.deliver(&batch, sink)?;
            } else {
                self.rings.discard(batch);
            }
        }
        sink.flush()
    }

    /// The state, for a command's closing summary.
    pub fn state(&mut self) -> State<'_> {
        State {
            probes: &self.probes,
            rings: &self.rings,
            attributor: &mut self.attributor,
            tasks: self.tasks.as_ref(),
            dns: self.dns.as_ref(),
            conntrack: self.conntrack.as_mut(),
        }
    }

    /// One batch, to the signal its ring belongs to.
    fn deliver(&mut self, batch: &Batch, sink: &mut impl Sink) -> anyhow::Result<()> {
        // New cgroups first: an event from one made a moment ago finds its name.
        self.attributor.cgroups.catch_up();
        let attributor = &mut self.attributor;
        match batch.ring {
            Ring::Clone => match self.clone.as_mut() {
                Some(enricher) => {
                    clone::deliver(batch, enricher, attributor, |f| sink.clone_failure(f))
                }
                None => Ok(()),
            },
            Ring::Dns => match self.dns.as_mut() {
                Some(tracker) => dns::deliver(batch, tracker, attributor, |q| sink.dns_query(q)),
                None => Ok(()),
            },
            Ring::Conntrack => {
                // The queries waiting in the kernel first, so that a drop can name its query
                // (an unanswered query has no event of its own yet).
                if self.conntrack.is_some() {
                    self.sweep_dns(sink)?;
                }
                let Some(classifier) = self.conntrack.as_mut() else {
                    return Ok(());
                };
                conntrack::deliver(
                    batch,
                    classifier,
                    &mut self.attributor,
                    self.dns.as_mut(),
                    |d| sink.conntrack_drop(d),
                )
            }
        }
    }

    fn sweep_dns(&mut self, sink: &mut impl Sink) -> anyhow::Result<()> {
        if let Some(tracker) = self.dns.as_mut() {
            dns::sweep(&mut self.probes, tracker, &mut self.attributor, |q| {
                sink.dns_query(q)
            })?;
            sink.flush()?;
        }
        Ok(())
    }

    /// Near-misses, the task counts, then the sink's own refresh.
    fn refresh(&mut self, sink: &mut impl Sink, clash_every: Duration) -> anyhow::Result<()> {
        // Also when no other event comes: the cgroup ring must not fill up meanwhile.
        self.attributor.cgroups.catch_up();
        if let Some(classifier) = self.conntrack.as_mut() {
            for clashes in classifier.poll_clashes(clash_every, &mut self.attributor) {
                sink.clashes_resolved(clashes)?;
            }
        }
        let counted = match self.tasks.as_mut() {
            Some(model) => self
                .probes
                .task_counts()
                .map(|counts| model.update(std::time::Instant::now(), counts)),
            None => Ok(()),
        };
        // A failed read is the sink's to judge (the daemon counts it and goes on).
        if let Err(e) = counted.and_then(|()| sink.refresh(self.state())) {
            sink.refresh_failed(e)?;
        }
        sink.flush()
    }
}
