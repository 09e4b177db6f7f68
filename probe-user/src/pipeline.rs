//! The one flow every command drives: load the programs -> attach the signals asked for ->
//! wait on their ring buffers and on ticks -> decode and enrich each event (cause, cgroup,
//! pod) -> hand it to a [`Sink`]. `trace` (lines and a summary) and `run` (metrics, event
//! lines, OTLP) are sinks; neither repeats the flow. Events are born in the kernel programs
//! (`probe-ebpf`), decoded and enriched by the signal modules (`clone`, `dns`, `conntrack`,
//! `tasks`), and exported by the sink.

use std::{future::Future, time::Duration};

use anyhow::Context as _;

use crate::{
    attribution::cgroups::CgroupFs,
    attribution::netns::NetnsDirectory,
    attribution::pods::{Attributor, PodArgs},
    kernel::loader::{
        ClonePath, Degraded, EventRing, KernelArgs, KernelLog, KernelLogger, Probes, TASK_PROGRAMS,
    },
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
    pub attributor: &'a mut Attributor,
    pub tasks: Option<&'a TaskModel>,
    pub dns: Option<&'a DnsTracker>,
    pub conntrack: Option<&'a mut Classifier>,
}

impl State<'_> {
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
    clone: Option<(EventRing, Enricher)>,
    dns: Option<(EventRing, DnsTracker)>,
    conntrack: Option<(EventRing, Classifier)>,
    tasks: Option<TaskModel>,
    kernel_log: Option<KernelLogger>,
}

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
        let cgroups = CgroupFs::discover()?;
        let dns = match want.dns {
            Some((timeout, names)) => match probes.dns_events(&cgroups) {
                Ok(ring) => {
                    attached(Signal::Dns, Ok(()))?;
                    Some((ring, DnsTracker::new(timeout, names)))
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
                    Some((ring, Classifier::new(NetnsDirectory::new("/proc"))))
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
            Some((probes.clone_events()?, Enricher::new()))
        } else {
            None
        };
        let kernel_log = probes.kernel_logger();
        Ok(Pipeline {
            attributor: Attributor::new(cgroups, pods).await,
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
        let clash_every = every.max(CLASH_POLL_MIN);
        loop {
            tokio::select! {
                guard = async { self.clone.as_mut().expect("polled with clone").0.readable_mut().await }, if self.clone.is_some() => {
                    guard.context("waiting on the clone ring buffer")?.clear_ready();
                    self.drain_clone(sink)?;
                }
                guard = async { self.dns.as_mut().expect("polled with DNS").0.readable_mut().await }, if self.dns.is_some() => {
                    guard.context("waiting on the DNS ring buffer")?.clear_ready();
                    self.drain_dns(sink)?;
                }
                guard = async { self.conntrack.as_mut().expect("polled with conntrack").0.readable_mut().await }, if self.conntrack.is_some() => {
                    guard.context("waiting on the conntrack ring buffer")?.clear_ready();
                    // The waiting queries first, so that a drop can name its query.
                    self.catch_up_dns(sink)?;
                    self.drain_conntrack(sink)?;
                }
                _ = sweep.tick(), if self.dns.is_some() => {
                    // The kernel wakes us for DNS events in batches: collect the rest, and the
                    // queries past their timeout.
                    self.catch_up_dns(sink)?;
                }
                _ = refresh.tick() => self.refresh(sink, clash_every)?,
                guard = async { self.kernel_log.as_mut().expect("polled with --kernel-log").readable_mut().await }, if self.kernel_log.is_some() => {
                    let mut guard = guard.context("waiting on the programs' log ring")?;
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                () = &mut stop => break,
            }
        }
        if let Some(log) = self.kernel_log.as_mut() {
            log.get_mut().flush();
        }
        // Events submitted just before the stop are still in the rings.
        self.drain_conntrack(sink)?;
        self.drain_clone(sink)?;
        self.drain_dns(sink)
    }

    /// The state, for a command's closing summary.
    pub fn state(&mut self) -> State<'_> {
        State {
            probes: &self.probes,
            attributor: &mut self.attributor,
            tasks: self.tasks.as_ref(),
            dns: self.dns.as_ref().map(|(_, t)| t),
            conntrack: self.conntrack.as_mut().map(|(_, c)| c),
        }
    }

    fn drain_clone(&mut self, sink: &mut impl Sink) -> anyhow::Result<()> {
        if let Some((ring, enricher)) = self.clone.as_mut() {
            clone::drain(ring.get_mut(), enricher, &mut self.attributor, |f| {
                sink.clone_failure(f)
            })?;
            sink.flush()?;
        }
        Ok(())
    }

    fn drain_dns(&mut self, sink: &mut impl Sink) -> anyhow::Result<()> {
        if let Some((ring, tracker)) = self.dns.as_mut() {
            dns::drain(ring.get_mut(), tracker, &mut self.attributor, |q| {
                sink.dns_query(q)
            })?;
            sink.flush()?;
        }
        Ok(())
    }

    fn catch_up_dns(&mut self, sink: &mut impl Sink) -> anyhow::Result<()> {
        if let Some((ring, tracker)) = self.dns.as_mut() {
            dns::catch_up(
                ring.get_mut(),
                &mut self.probes,
                tracker,
                &mut self.attributor,
                |q| sink.dns_query(q),
            )?;
            sink.flush()?;
        }
        Ok(())
    }

    fn drain_conntrack(&mut self, sink: &mut impl Sink) -> anyhow::Result<()> {
        if let Some((ring, classifier)) = self.conntrack.as_mut() {
            let tracker = self.dns.as_mut().map(|(_, t)| t);
            conntrack::drain(
                ring.get_mut(),
                classifier,
                &mut self.attributor,
                tracker,
                |d| sink.conntrack_drop(d),
            )?;
            sink.flush()?;
        }
        Ok(())
    }

    /// Near-misses, the task counts, then the sink's own refresh.
    fn refresh(&mut self, sink: &mut impl Sink, clash_every: Duration) -> anyhow::Result<()> {
        if let Some((_, classifier)) = self.conntrack.as_mut() {
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
