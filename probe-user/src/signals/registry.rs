//! The signals a command runs, in one place: each attached as its descriptor says, each ring
//! handed to its signal's decoder, each signal's part of a [`Refresh`]. The pipeline drives
//! this without naming a signal; adding one means a folder, a [`Signal`] variant, an
//! [`Event`] variant, and the arms the compiler asks for here.

use std::time::Duration;

use anyhow::Context as _;

use super::{
    Event, Plan, Refresh, Signal,
    clone::{self, Enricher, node::NodeTasks},
    conntrack::{self, Classifier},
    dns::{self, DnsTracker},
    refusals::{Counter, RefusalWatch},
    tasks::{self, HeadroomWatch, TaskModel},
};
use probe_common::clone::CloneStats;

use crate::{
    attribution::cgroups::{CgroupFs, Hierarchy},
    attribution::netns::NetnsDirectory,
    attribution::pods::Attributor,
    kernel::loader::{EventRing, KernelArgs, Probes},
    kernel::rings::{Batch, Rings},
};

/// Where events go: the pipeline's sink.
pub type Emit<'a> = dyn FnMut(Event) -> anyhow::Result<()> + 'a;

/// The signals attached, with their userspace state.
pub struct Signals {
    clone: Option<Enricher>,
    tasks: Option<TaskModel>,
    dns: Option<DnsTracker>,
    conntrack: Option<Classifier>,
    headroom: Option<HeadroomWatch>,
    /// The kernel's refusal counters, cross-checked with the events.
    refusals: RefusalWatch,
    idle_cgroups: bool,
    /// Which signal each ring (by its index in [`Signals::attach`]'s list) belongs to.
    rings: Vec<Signal>,
}

/// Near-misses are polled at most this often (each poll reads every namespace's counters).
const CLASH_POLL_MIN: Duration = Duration::from_secs(1);

impl Signals {
    /// Attaches the signals the plan asks for. Each one's outcome is handed to `attached` (a
    /// refused one with the kernel's reason), which decides whether the command can go on
    /// without it. Returns the rings to read, DNS before conntrack: the reader empties them
    /// in this order, so that a drop finds its query already delivered.
    pub fn attach(
        probes: &mut Probes,
        kernel: &KernelArgs,
        cgroups: &CgroupFs,
        plan: &Plan,
        attached: &mut dyn FnMut(Signal, anyhow::Result<()>) -> anyhow::Result<()>,
    ) -> anyhow::Result<(Signals, Vec<(&'static str, EventRing)>)> {
        let mut signals = Signals {
            clone: None,
            tasks: None,
            dns: None,
            conntrack: None,
            headroom: None,
            refusals: RefusalWatch::default(),
            idle_cgroups: plan.idle_cgroups,
            rings: Vec::new(),
        };
        let mut rings = Vec::new();
        for &signal in Signal::ALL {
            if !plan.has(signal) {
                continue;
            }
            let ring = match Self::attach_one(probes, kernel, cgroups, signal) {
                Ok(ring) => {
                    attached(signal, Ok(()))?;
                    ring
                }
                Err(e) => {
                    attached(signal, Err(e))?;
                    continue;
                }
            };
            if let Some(ring) = ring {
                rings.push((signal.as_str(), ring));
                signals.rings.push(signal);
            }
            match signal {
                Signal::Clone => signals.clone = Some(Enricher::new()),
                Signal::Tasks => {
                    signals.tasks = Some(TaskModel::default());
                    signals.headroom = plan.headroom.map(HeadroomWatch::new);
                }
                Signal::Dns => {
                    signals.dns = Some(DnsTracker::new(plan.dns.timeout, plan.dns.names));
                }
                Signal::Conntrack => {
                    signals.conntrack = Some(Classifier::new(NetnsDirectory::new("/proc")));
                }
            }
        }
        // The reader empties the rings in this order.
        let order = |s: &Signal| match s {
            Signal::Dns => 0,
            Signal::Clone => 1,
            Signal::Conntrack | Signal::Tasks => 2,
        };
        let mut paired: Vec<_> = signals.rings.drain(..).zip(rings).collect();
        paired.sort_by_key(|(s, _)| order(s));
        let (order, rings): (Vec<_>, Vec<_>) = paired.into_iter().unzip();
        signals.rings = order;
        Ok((signals, rings))
    }

    /// Attaches one signal's programs; its ring, if it has one.
    fn attach_one(
        probes: &mut Probes,
        kernel: &KernelArgs,
        cgroups: &CgroupFs,
        signal: Signal,
    ) -> anyhow::Result<Option<EventRing>> {
        match signal {
            Signal::Clone => clone::open(probes, kernel.clone_hook).map(Some),
            Signal::Tasks => probes.attach(&tasks::PROGRAMS).map(|()| None),
            Signal::Dns => dns::open(probes, cgroups).map(Some),
            Signal::Conntrack => conntrack::open(probes).map(Some),
        }
    }

    pub fn has(&self, signal: Signal) -> bool {
        match signal {
            Signal::Clone => self.clone.is_some(),
            Signal::Tasks => self.tasks.is_some(),
            Signal::Dns => self.dns.is_some(),
            Signal::Conntrack => self.conntrack.is_some(),
        }
    }

    /// The capabilities reading these signals keeps after attaching.
    pub fn privileges_kept(&self) -> Vec<crate::kernel::privileges::Kept> {
        crate::kernel::privileges::after_attach(self.conntrack.is_some())
    }

    /// Whether [`Signals::sweep`] has work: queries to time out.
    pub fn sweeps(&self) -> bool {
        self.dns.is_some()
    }

    /// One batch, to the signal its ring belongs to.
    pub fn deliver(
        &mut self,
        batch: &Batch,
        probes: &mut Probes,
        attributor: &mut Attributor,
        emit: &mut Emit<'_>,
    ) -> anyhow::Result<()> {
        // Each event that accounts for a refusal counter's increase, for the cross-check.
        let mut explained: Vec<Counter> = Vec::new();
        let mut emit = |e: Event| {
            explained.extend(Counter::explained_by(&e));
            emit(e)
        };
        let emit = &mut emit;
        let delivered = match self.rings.get(batch.ring) {
            Some(Signal::Clone) => match self.clone.as_mut() {
                Some(enricher) => clone::deliver(batch, enricher, attributor, emit),
                None => Ok(()),
            },
            Some(Signal::Dns) => match self.dns.as_mut() {
                Some(tracker) => dns::deliver(batch, tracker, attributor, emit),
                None => Ok(()),
            },
            Some(Signal::Conntrack) => {
                // The queries waiting in the kernel first, so that a drop can name its query
                // (an unanswered query has no event of its own yet).
                self.sweep(probes, attributor, emit)?;
                match self.conntrack.as_mut() {
                    Some(classifier) => {
                        conntrack::deliver(batch, classifier, attributor, self.dns.as_mut(), emit)
                    }
                    None => Ok(()),
                }
            }
            Some(Signal::Tasks) | None => Ok(()),
        };
        for counter in explained {
            self.refusals.event(counter);
        }
        delivered
    }

    /// The queries past their timeout, from the kernel's map (an answered query is no longer
    /// in it, even while its answer waits in the queue).
    pub fn sweep(
        &mut self,
        probes: &mut Probes,
        attributor: &mut Attributor,
        emit: &mut Emit<'_>,
    ) -> anyhow::Result<()> {
        match self.dns.as_mut() {
            Some(tracker) => dns::sweep(probes, tracker, attributor, emit),
            None => Ok(()),
        }
    }

    /// Events of the tick (near-misses), then every signal's counters as one refresh, with
    /// its estimates; then the headroom warnings they call for. `every` is zero for a last
    /// refresh: every counter is read then, whenever it was last.
    pub fn refresh(
        &mut self,
        every: Duration,
        probes: &Probes,
        rings: &Rings,
        attributor: &mut Attributor,
        emit: &mut Emit<'_>,
    ) -> anyhow::Result<Refresh> {
        if let Some(classifier) = self.conntrack.as_mut() {
            // A last refresh polls whenever the last poll was.
            let min = if every.is_zero() {
                Duration::ZERO
            } else {
                every.max(CLASH_POLL_MIN)
            };
            for clashes in classifier.poll_clashes(min, attributor) {
                emit(Event::ClashesResolved(clashes))?;
            }
        }
        let lost = |signal: Signal| {
            let index = self.rings.iter().position(|s| *s == signal);
            index.map_or(0, |i| rings.dropped(i))
        };
        let clone = match self.clone {
            Some(_) => {
                let mut stats: CloneStats = probes.stats()?;
                stats.lost += lost(Signal::Clone);
                Some(stats)
            }
            None => None,
        };
        let dns = match self.dns.as_ref() {
            Some(tracker) => Some(dns::refresh(
                probes,
                tracker,
                lost(Signal::Dns),
                attributor,
            )?),
            None => None,
        };
        let conntrack = match self.conntrack.as_mut() {
            Some(classifier) => Some(conntrack::refresh(
                classifier,
                probes,
                lost(Signal::Conntrack),
            )?),
            None => None,
        };
        let tasks = match self.tasks.as_mut() {
            Some(model) => Some(tasks::refresh(
                model,
                probes,
                attributor,
                self.idle_cgroups,
            )?),
            None => None,
        };
        let ct = self
            .conntrack
            .as_ref()
            .map(Classifier::refusal_counts)
            .unwrap_or_default();
        let refusals = self.refusals.refresh(attributor, &ct, every.is_zero());
        Ok(Refresh {
            node: NodeTasks::read().context("reading the node's task counts")?,
            refusals,
            clone,
            tasks,
            dns,
            conntrack,
            cgroup_events_lost: attributor.cgroups.events_lost(),
            kube_api_errors: attributor.kube_api_errors(),
            estimates: Vec::new(),
        })
    }

    /// The use of the hot limits (`trend::LimitWatch::hot`) this signal set can read between
    /// refreshes (the tasks signal's: pids limits, uids' RLIMIT_NPROC, the node's task
    /// limits), `last` the last refresh.
    pub fn sample(
        &self,
        probes: &Probes,
        attributor: &Attributor,
        last: &Refresh,
        hot: &[(crate::trend::Limit, String)],
    ) -> Vec<crate::trend::Sample> {
        let Some(t) = &last.tasks else {
            return Vec::new();
        };
        let pids = attributor
            .cgroups
            .mount(Hierarchy::Pids)
            .map(|m| m.path.as_path());
        tasks::sample(pids, probes, &t.users, hot)
    }

    /// Warnings for the pids limits about to refuse tasks (with `--headroom-warn`).
    pub fn warn(&mut self, refresh: &Refresh, emit: &mut Emit<'_>) -> anyhow::Result<()> {
        if let Some(watch) = self.headroom.as_mut() {
            for warning in watch.check(refresh.rows(), &refresh.estimates) {
                emit(Event::HeadroomWarning(warning))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use probe_common::{
        Counters, cgroups, clone::CloneStats, conntrack::ConntrackStats, dns::DnsStats,
        tasks::TaskStats,
    };

    use super::*;
    use crate::kernel::inventory::object_programs;

    /// Every map and program a signal names is in the embedded object: the names live once
    /// in probe-common (maps) and in each signal's folder (programs), and the kernel side's
    /// statics and functions must carry them.
    #[test]
    fn every_name_a_signal_uses_is_in_the_object() {
        let object = aya_obj::Object::parse(crate::kernel::inventory::OBJECT).expect("test");
        let maps = [
            probe_common::clone::EVENTS,
            CloneStats::MAP,
            probe_common::tasks::COUNTS,
            probe_common::tasks::UIDS,
            TaskStats::MAP,
            probe_common::dns::EVENTS,
            probe_common::dns::PENDING,
            probe_common::dns::PENDING_BY_CGROUP,
            probe_common::dns::TCP,
            DnsStats::MAP,
            probe_common::conntrack::EVENTS,
            ConntrackStats::MAP,
            cgroups::EVENTS,
            cgroups::STATS,
        ];
        for name in maps {
            assert!(
                object.maps.contains_key(name),
                "map {name} is not in the object"
            );
        }
        let programs: Vec<String> = object_programs()
            .expect("test")
            .into_iter()
            .map(|p| p.name)
            .collect();
        let attachments = clone::PROGRAMS
            .iter()
            .chain(&clone::RAW_PROGRAMS)
            .chain(&tasks::PROGRAMS)
            .chain(&dns::PROGRAMS)
            .chain(&conntrack::PROGRAMS)
            .chain(&crate::attribution::cgroups::PROGRAMS);
        for a in attachments {
            assert!(
                programs.iter().any(|p| p == a.program),
                "program {} is not in the object",
                a.program
            );
        }
    }
}
