//! The signals a command runs, in one place: each attached as its descriptor says, each ring
//! handed to its signal's decoder, each signal's part of a [`Refresh`]. The pipeline drives
//! this without naming a signal; adding one means a folder, a [`Signal`] variant, an
//! [`Event`] variant, and the arms the compiler asks for here.

use std::time::Duration;

use anyhow::Context as _;

use super::{
    Event, Part, Plan, Refresh, Signal,
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
    /// In attach order ([`Signal::ALL`]'s).
    attached: Vec<Attached>,
    /// The kernel's refusal counters, cross-checked with the events.
    refusals: RefusalWatch,
    idle_cgroups: bool,
    /// Which signal each ring (by its index in [`Signals::attach`]'s list) belongs to.
    rings: Vec<Signal>,
}

/// One attached signal and its userspace state: each is matched exhaustively, so a new
/// signal's place in delivery, refresh and warnings is listed by the compiler.
enum Attached {
    Clone(Enricher),
    Tasks {
        model: TaskModel,
        headroom: Option<HeadroomWatch>,
    },
    Dns(DnsTracker),
    Conntrack(Classifier),
}

impl Attached {
    fn new(signal: Signal, plan: &Plan) -> Attached {
        match signal {
            Signal::Clone => Attached::Clone(Enricher::new()),
            Signal::Tasks => Attached::Tasks {
                model: TaskModel::default(),
                headroom: plan.headroom.map(HeadroomWatch::new),
            },
            Signal::Dns => Attached::Dns(DnsTracker::new(plan.dns.timeout, plan.dns.names)),
            Signal::Conntrack => Attached::Conntrack(Classifier::new(NetnsDirectory::new("/proc"))),
        }
    }

    fn signal(&self) -> Signal {
        match self {
            Attached::Clone(_) => Signal::Clone,
            Attached::Tasks { .. } => Signal::Tasks,
            Attached::Dns(_) => Signal::Dns,
            Attached::Conntrack(_) => Signal::Conntrack,
        }
    }
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
            attached: Vec::new(),
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
            signals.attached.push(Attached::new(signal, plan));
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
        self.attached.iter().any(|a| a.signal() == signal)
    }

    /// The capabilities reading these signals keeps after attaching.
    pub fn privileges_kept(&self) -> Vec<crate::kernel::privileges::Kept> {
        crate::kernel::privileges::after_attach(self.has(Signal::Conntrack))
    }

    /// Whether [`Signals::sweep`] has work: queries to time out.
    pub fn sweeps(&self) -> bool {
        self.has(Signal::Dns)
    }

    /// The conntrack classifier and the DNS tracker, each if attached: a drop names the query
    /// it cost.
    fn conntrack_and_dns(&mut self) -> (Option<&mut Classifier>, Option<&mut DnsTracker>) {
        let (mut classifier, mut tracker) = (None, None);
        for a in &mut self.attached {
            match a {
                Attached::Conntrack(c) => classifier = Some(c),
                Attached::Dns(t) => tracker = Some(t),
                Attached::Clone(_) | Attached::Tasks { .. } => {}
            }
        }
        (classifier, tracker)
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
            Some(Signal::Conntrack) => {
                // The queries waiting in the kernel first, so that a drop can name its query
                // (an unanswered query has no event of its own yet).
                self.sweep(probes, attributor, emit)?;
                match self.conntrack_and_dns() {
                    (Some(classifier), tracker) => {
                        conntrack::deliver(batch, classifier, attributor, tracker, emit)
                    }
                    (None, _) => Ok(()),
                }
            }
            Some(&signal) => match self.attached.iter_mut().find(|a| a.signal() == signal) {
                Some(Attached::Clone(enricher)) => {
                    clone::deliver(batch, enricher, attributor, emit)
                }
                Some(Attached::Dns(tracker)) => dns::deliver(batch, tracker, attributor, emit),
                // Conntrack's batches are delivered above; the tasks signal has no ring.
                Some(Attached::Conntrack(_) | Attached::Tasks { .. }) | None => Ok(()),
            },
            None => Ok(()),
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
        match self.conntrack_and_dns() {
            (_, Some(tracker)) => dns::sweep(probes, tracker, attributor, emit),
            (_, None) => Ok(()),
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
        if let (Some(classifier), _) = self.conntrack_and_dns() {
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
        let rings_of = &self.rings;
        let lost = |signal: Signal| {
            let index = rings_of.iter().position(|s| *s == signal);
            index.map_or(0, |i| rings.dropped(i))
        };
        let mut parts = Vec::with_capacity(self.attached.len());
        let mut refusal_inputs = Vec::new();
        for a in &mut self.attached {
            parts.push(match a {
                Attached::Clone(_) => {
                    let mut stats: CloneStats = probes.stats()?;
                    stats.lost += lost(Signal::Clone);
                    Part::Clone(stats)
                }
                Attached::Tasks { model, .. } => Part::Tasks(tasks::refresh(
                    model,
                    probes,
                    attributor,
                    self.idle_cgroups,
                )?),
                Attached::Dns(tracker) => Part::Dns(dns::refresh(
                    probes,
                    tracker,
                    lost(Signal::Dns),
                    attributor,
                )?),
                Attached::Conntrack(classifier) => {
                    let part = conntrack::refresh(classifier, probes, lost(Signal::Conntrack))?;
                    refusal_inputs = classifier.refusal_counts();
                    Part::Conntrack(part)
                }
            });
        }
        let refusals = self
            .refusals
            .refresh(attributor, &refusal_inputs, every.is_zero());
        Ok(Refresh {
            node: NodeTasks::read().context("reading the node's task counts")?,
            refusals,
            parts,
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
        let Some(t) = last.tasks() else {
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
        for a in &mut self.attached {
            match a {
                Attached::Tasks {
                    headroom: Some(watch),
                    ..
                } => {
                    for warning in watch.check(refresh.rows(), &refresh.estimates) {
                        emit(Event::HeadroomWarning(warning))?;
                    }
                }
                Attached::Tasks { headroom: None, .. }
                | Attached::Clone(_)
                | Attached::Dns(_)
                | Attached::Conntrack(_) => {}
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
