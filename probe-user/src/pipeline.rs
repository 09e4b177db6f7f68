//! The one flow every command drives: load the programs -> attach the signals asked for
//! (`signals::Signals`) -> (optionally) give up the privileges only loading needed -> read
//! their ring buffers on a thread of their own (`kernel::rings`) -> decode and enrich each
//! batch into [`Event`]s (cause, cgroup, pod) -> on every tick, one [`Refresh`] of the
//! counters with the limits' times to exhaustion -> hand both to a [`Sink`]. `trace`, `run`,
//! `explain` and `top` are sinks; none repeats the flow. Events are born in the kernel
//! programs (`probe-ebpf`), decoded and enriched in their signal's folder (`signals`), and
//! exported by the sink.

use std::{future::Future, time::Duration};

use anyhow::Context as _;

use crate::{
    attribution::cgroups::CgroupFs,
    attribution::pods::{Attributor, PodArgs},
    kernel::loader::{Degraded, KernelArgs, KernelLog, KernelLogger, Probes},
    kernel::privileges,
    kernel::rings::{Batch, Rings},
    memory,
    signals::{Event, Plan, Refresh, Signal, Signals, dns},
    trend::{self, LimitWatch},
};

/// What a sink receives: each event as it is enriched, and a refresh on every tick.
pub trait Sink {
    fn event(&mut self, event: &Event) -> anyhow::Result<()>;
    /// Every tick, after the events of the tick.
    fn refresh(&mut self, refresh: &Refresh) -> anyhow::Result<()>;
    /// Between two refreshes: the last refresh again with its hot limits sampled anew (their
    /// use and every limit's estimate; the counters as they were), when any was sampled.
    fn limits(&mut self, _refresh: &Refresh) -> anyhow::Result<()> {
        Ok(())
    }
    /// A refresh that failed (a counter or /proc read): fatal unless the sink says otherwise.
    fn refresh_failed(&mut self, e: anyhow::Error) -> anyhow::Result<()> {
        Err(e)
    }
    /// After each batch of events.
    fn flush(&mut self) -> anyhow::Result<()>;
}

pub struct Pipeline {
    probes: Probes,
    attributor: Attributor,
    rings: Rings,
    signals: Signals,
    /// The limits' use over the trend window (none: no estimates asked for).
    trend: Option<LimitWatch>,
    /// The last refresh, for the samples between refreshes to update.
    last: Option<Refresh>,
    kernel_log: Option<KernelLogger>,
    /// The heap's freed pages, handed back after the refreshes that free much.
    release: memory::Release,
}

/// How long a stop spends delivering the events already read.
const FINAL_DELIVERY: Duration = Duration::from_secs(2);

impl Pipeline {
    /// Loads the programs and attaches the signals asked for. Each signal's outcome is handed
    /// to `attached` (a refused one with the kernel's reason), which decides whether the
    /// command can go on without it.
    pub async fn open(
        kernel: &KernelArgs,
        kernel_log: KernelLog,
        pods: &PodArgs,
        plan: &Plan,
        mut attached: impl FnMut(Signal, anyhow::Result<()>) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        memory::tune();
        let mut probes = Probes::open(kernel, kernel_log)?;
        let cgroups = CgroupFs::open(&mut probes)?;
        let (signals, rings) = Signals::attach(&mut probes, kernel, &cgroups, plan, &mut attached)?;
        let kernel_log = probes.kernel_logger();
        if plan.drop_privileges {
            // Before any other thread exists: capabilities are per thread, and threads made
            // later inherit the reduced sets. What needs one of those dropped (`run` binding
            // a port below 1024) is done before `open`.
            privileges::keep_only(&signals.privileges_kept())?;
        }
        Ok(Pipeline {
            attributor: Attributor::new(cgroups, pods).await,
            rings: Rings::start(rings)?,
            probes,
            signals,
            trend: plan.trend.map(LimitWatch::new),
            last: None,
            kernel_log,
            release: memory::Release::default(),
        })
    }

    /// Evidence the attached probes lack here for plan of a privilege.
    pub fn degraded(&self) -> &[Degraded] {
        &self.probes.degraded
    }

    pub fn has(&self, signal: Signal) -> bool {
        self.signals.has(signal)
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
        let mut sample = tokio::time::interval(trend::SAMPLE_INTERVAL);
        // Behind (a long batch), a tick comes once, not once for every one missed.
        for tick in [&mut refresh, &mut sweep, &mut sample] {
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        // Refreshing at least as often as sampling: every limit is read at each refresh.
        let samples = self.trend.is_some() && every > trend::SAMPLE_INTERVAL;
        loop {
            tokio::select! {
                // In this order: a stop and the ticks are never starved by a backlog.
                biased;
                () = &mut stop => break,
                _ = refresh.tick() => self.refresh(sink, every)?,
                _ = sweep.tick(), if self.signals.sweeps() => self.sweep(sink)?,
                _ = sample.tick(), if samples => self.sample(sink)?,
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

    /// One more refresh, after [`Pipeline::run`]: a closing summary's counts, with every
    /// event delivered.
    pub fn refresh_once(&mut self, sink: &mut impl Sink) -> anyhow::Result<()> {
        self.refresh(sink, Duration::ZERO)
    }

    /// One batch, to its signal.
    fn deliver(&mut self, batch: &Batch, sink: &mut impl Sink) -> anyhow::Result<()> {
        // New cgroups first: an event from one made a moment ago finds its name.
        self.attributor.cgroups.catch_up();
        self.signals
            .deliver(batch, &mut self.probes, &mut self.attributor, &mut |e| {
                sink.event(&e)
            })
    }

    fn sweep(&mut self, sink: &mut impl Sink) -> anyhow::Result<()> {
        self.signals
            .sweep(&mut self.probes, &mut self.attributor, &mut |e| {
                sink.event(&e)
            })?;
        sink.flush()
    }

    /// The hot limits sampled between refreshes: their use into the trend and the last
    /// refresh, then the warnings they call for and the sink's `limits`.
    fn sample(&mut self, sink: &mut impl Sink) -> anyhow::Result<()> {
        let (Some(trend), Some(last)) = (self.trend.as_mut(), self.last.as_mut()) else {
            return Ok(());
        };
        let hot = trend.hot(trend::MAX_HOT);
        if hot.is_empty() {
            return Ok(());
        }
        let samples = self
            .signals
            .sample(&self.probes, &self.attributor, last, &hot);
        if samples.is_empty() {
            return Ok(());
        }
        trend.sample(std::time::Instant::now(), samples.iter().cloned());
        last.sample(&samples);
        last.estimates = trend.estimates();
        self.signals.warn(last, &mut |e| sink.event(&e))?;
        sink.limits(last)?;
        sink.flush()
    }

    /// The tick's events, one refresh with its estimates, the warnings it calls for, then
    /// the sink's refresh.
    fn refresh(&mut self, sink: &mut impl Sink, every: Duration) -> anyhow::Result<()> {
        // Also when no other event comes: the cgroup ring must not fill up meanwhile.
        self.attributor.cgroups.catch_up();
        // The attribution cache keeps the last second's cgroups, not every one seen.
        self.attributor.expire();
        let refreshed = self.signals.refresh(
            every,
            &self.probes,
            &self.rings,
            &mut self.attributor,
            &mut |e| sink.event(&e),
        );
        let result = refreshed.and_then(|mut refresh| {
            if let Some(trend) = self.trend.as_mut() {
                trend.update(std::time::Instant::now(), refresh.readings());
                refresh.estimates = trend.estimates();
            }
            self.signals.warn(&refresh, &mut |e| sink.event(&e))?;
            sink.refresh(&refresh)?;
            self.last = Some(refresh);
            Ok(())
        });
        // A failed read is the sink's to judge (the daemon counts it and goes on).
        if let Err(e) = result {
            sink.refresh_failed(e)?;
        }
        sink.flush()?;
        // What the refresh let go of (series of pods gone, expired state) is returned.
        self.release.tick();
        Ok(())
    }
}
