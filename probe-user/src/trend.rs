//! Time to exhaustion: for every limit faultline watches (a cgroup's pids limit, the node's
//! `pid_max` and `threads-max`, each network namespace's conntrack table), the use sampled on
//! every refresh over a recent window, its growth as a Theil-Sen slope (the median of the
//! slopes between every two samples: one spike or one dip does not move it) since the use
//! last stood at its lowest (so a leak that starts after a quiet stretch is measured from its
//! start), and the seconds left until the limit at that growth. The limits that are growing or near their maximum
//! ("hot", [`LimitWatch::hot`]) are also sampled between refreshes, so a fast leak gets its
//! first estimate from three samples a second or two after the refresh that saw it grow, at
//! any refresh interval; `samples` says how many an estimate stands on.
//!
//! No estimate while use is flat or shrinking: a use that fell from its peak in the window
//! (tasks exited: a recovery) starts its samples again from the fall, and a use that stopped
//! rising for as long as two steps of its growth would take is flat. A limit already reached
//! is 0 s away.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::attribution::pods::PodRef;

/// Samples kept per limit (Theil-Sen costs the square of it, per limit, per refresh): every
/// refresh's while they fit; past it, the older half is thinned evenly, so a new leak is
/// sampled densely and the window keeps its span.
const MAX_SAMPLES: usize = 48;
/// Fewest samples, and shortest span, before a slope is trusted.
const MIN_SAMPLES: usize = 3;
const MIN_SPAN: Duration = Duration::from_secs(2);
/// Estimates further away than this are not estimates (a week).
const MAX_ETA: Duration = Duration::from_secs(7 * 24 * 3600);

/// A limit that refuses new tasks or connections when reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// A cgroup's `pids.max` (the tightest among the cgroup and its ancestors).
    Pids,
    /// RLIMIT_NPROC: one uid's tasks node-wide against its processes' soft limit.
    RlimitNproc,
    /// The node's `kernel.pid_max`.
    PidMax,
    /// The node's `kernel.threads-max`.
    ThreadsMax,
    /// A network namespace's conntrack entries against `nf_conntrack_max`.
    Conntrack,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Pids => "pids",
            Limit::RlimitNproc => "rlimit_nproc",
            Limit::PidMax => "pid_max",
            Limit::ThreadsMax => "threads_max",
            Limit::Conntrack => "conntrack",
        }
    }
}

/// One limit's use, as read at a refresh.
#[derive(Clone, Debug)]
pub struct Reading {
    pub limit: Limit,
    /// Which one: the pids cgroup's path, `node`, or `netns:<inode>`.
    pub resource: String,
    pub workload: String,
    pub pod: Option<Arc<PodRef>>,
    pub current: u64,
    pub max: u64,
    /// The workloads sharing the limit (RLIMIT_NPROC: every pod running as the uid).
    pub shared_by: Vec<String>,
}

/// A limit's use, its growth and the time left, for people and for metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub limit: Limit,
    pub resource: String,
    pub workload: String,
    pub current: u64,
    pub max: u64,
    /// Growth over the window, per second (Theil-Sen); none before enough samples.
    pub growth_per_s: Option<f64>,
    /// Seconds until `current` reaches `max` at that growth: 0 when already there; none when
    /// flat or shrinking, or further than a week.
    pub eta_s: Option<f64>,
    /// The samples the growth stands on (3 for a first estimate; more as the window fills).
    #[serde(default)]
    pub samples: usize,
    #[serde(skip)]
    pub pod: Option<Arc<PodRef>>,
    /// The workloads sharing the limit (RLIMIT_NPROC: every pod running as the uid).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_by: Vec<String>,
}

struct Series {
    reading: Reading,
    samples: VecDeque<(Instant, f64)>,
    /// The slope of `samples`, computed once per sample.
    growth: Option<f64>,
    /// When the use last rose from one sample to the next.
    last_rise: Option<Instant>,
}

/// One limit's use read between refreshes (the rest of its reading is the last refresh's).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub limit: Limit,
    pub resource: String,
    pub current: u64,
    pub max: u64,
}

/// The samples of every limit seen at the last refresh; a limit not seen (its cgroup or
/// namespace gone) is forgotten, so the watch is as large as the node's limits. A node may
/// have tens of thousands (a conntrack table per network namespace): each series is boxed, so
/// that the table's spare slots cost a pointer each, not a reading, and its samples' room is
/// allocated once, at their most.
pub struct LimitWatch {
    window: Duration,
    series: HashMap<(Limit, String), Box<Series>>,
}

/// How often the hot limits are sampled between refreshes (the pipeline's tick).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Most limits sampled between two refreshes' ticks.
pub const MAX_HOT: usize = 64;
/// A limit is hot while its use is at least this share of its maximum (or while growing).
const HOT_SHARE: f64 = 0.5;

impl LimitWatch {
    pub fn new(window: Duration) -> Self {
        LimitWatch {
            window: window.max(Duration::from_secs(1)),
            series: HashMap::new(),
        }
    }

    /// Takes one refresh's readings: every limit's.
    pub fn update(&mut self, now: Instant, readings: impl IntoIterator<Item = Reading>) {
        let mut next = HashMap::with_capacity(self.series.len());
        for reading in readings {
            let key = (reading.limit, reading.resource.clone());
            let mut series = self.series.remove(&key).unwrap_or_else(|| {
                Box::new(Series {
                    reading: reading.clone(),
                    // Room for the most it keeps, and the one pushed before thinning.
                    samples: VecDeque::with_capacity(MAX_SAMPLES + 1),
                    growth: None,
                    last_rise: None,
                })
            });
            series.push(now, reading.current, self.window);
            series.reading = reading;
            next.insert(key, series);
        }
        self.series = next;
    }

    /// Takes samples of some limits between refreshes (a limit the last refresh did not
    /// read is ignored: its attribution is unknown).
    pub fn sample(&mut self, now: Instant, samples: impl IntoIterator<Item = Sample>) {
        for s in samples {
            if let Some(series) = self.series.get_mut(&(s.limit, s.resource)) {
                series.reading.current = s.current;
                series.reading.max = s.max;
                series.push(now, s.current, self.window);
            }
        }
    }

    /// The limits worth sampling between refreshes, at most `most`, soonest first: those
    /// growing (an estimate, or a rise at the last sample) and those at least half used.
    pub fn hot(&self, most: usize) -> Vec<(Limit, String)> {
        let mut hot: Vec<(f64, Limit, &String)> = self
            .series
            .iter()
            .filter(|(_, s)| s.is_hot())
            .map(|((limit, resource), s)| {
                let eta = s.estimate().eta_s.unwrap_or(f64::INFINITY);
                (eta, *limit, resource)
            })
            .collect();
        hot.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.2.cmp(b.2)));
        hot.into_iter()
            .take(most)
            .map(|(_, limit, resource)| (limit, resource.clone()))
            .collect()
    }

    /// Every limit's estimate, by limit and resource.
    pub fn estimates(&self) -> Vec<Estimate> {
        let mut out: Vec<Estimate> = self.series.values().map(|s| s.estimate()).collect();
        out.sort_by(|a, b| (a.limit, &a.resource).cmp(&(b.limit, &b.resource)));
        out
    }

    /// The estimate of one limit.
    pub fn get(&self, limit: Limit, resource: &str) -> Option<Estimate> {
        self.series
            .get(&(limit, resource.to_owned()))
            .map(|s| s.estimate())
    }
}

impl Series {
    /// One sample: a fall from the window's peak starts the samples again from it (the use
    /// recovered: its growth before says nothing of now); the window's span is kept, thinned.
    /// The peak is the second highest sample, so that one spike is not a peak to fall from.
    fn push(&mut self, now: Instant, current: u64, window: Duration) {
        let value = current as f64;
        let last = self.samples.back().map(|(_, v)| *v);
        if fell(second_highest(&self.samples), value) {
            self.samples.clear();
            self.last_rise = None;
        } else if last.is_some_and(|l| value > l) {
            self.last_rise = Some(now);
        }
        self.samples.push_back((now, value));
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > window)
        {
            self.samples.pop_front();
        }
        while self.samples.len() > MAX_SAMPLES {
            thin(&mut self.samples);
        }
        self.growth = growth(self.samples.make_contiguous()).map(|g| {
            // Flat now: no rise for as long as two steps at this growth would take.
            let quiet = self
                .samples
                .back()
                .zip(self.last_rise)
                .map(|((at, _), rise)| at.duration_since(rise).as_secs_f64());
            match quiet {
                Some(q) if g > 0.0 && q > (2.0 / g).max(MIN_SPAN.as_secs_f64()) => 0.0,
                None if g > 0.0 => 0.0,
                _ => g,
            }
        });
    }

    fn is_hot(&self) -> bool {
        let r = &self.reading;
        let rising = {
            let mut last_two = self.samples.iter().rev().take(2).map(|(_, v)| *v);
            matches!((last_two.next(), last_two.next()), (Some(a), Some(b)) if a > b)
        };
        rising
            || self.growth.is_some_and(|g| g > 0.0)
            || (r.max > 0 && r.current as f64 >= HOT_SHARE * r.max as f64)
    }

    fn estimate(&self) -> Estimate {
        let r = &self.reading;
        let growth = self.growth;
        Estimate {
            limit: r.limit,
            resource: r.resource.clone(),
            workload: r.workload.clone(),
            pod: r.pod.clone(),
            current: r.current,
            max: r.max,
            growth_per_s: growth,
            // At the limit, use stops growing (it is refused): reached, not "no estimate".
            eta_s: if r.max > 0 && r.current >= r.max {
                Some(0.0)
            } else {
                growth.and_then(|g| eta(r.current, r.max, g))
            },
            samples: self.samples.len(),
            shared_by: r.shared_by.clone(),
        }
    }
}

/// Whether `value` fell from `peak` by more than noise: two tasks, or a tenth of the peak.
fn fell(peak: Option<f64>, value: f64) -> bool {
    peak.is_some_and(|peak| peak - value > (peak * 0.1).max(2.0))
}

/// The second highest value of the samples (none with fewer than two).
fn second_highest(samples: &VecDeque<(Instant, f64)>) -> Option<f64> {
    let mut top = [f64::MIN; 2];
    for (_, v) in samples {
        if *v > top[0] {
            top = [*v, top[0]];
        } else if *v > top[1] {
            top[1] = *v;
        }
    }
    (samples.len() >= 2).then_some(top[1])
}

/// Seconds from `current` to `max` at `growth` per second.
pub fn eta(current: u64, max: u64, growth: f64) -> Option<f64> {
    if growth <= 0.0 || !growth.is_finite() {
        return None;
    }
    let left = max.saturating_sub(current) as f64;
    let secs = left / growth;
    (secs <= MAX_ETA.as_secs_f64()).then_some(secs)
}

/// Removes the sample of the older half (never the oldest) whose neighbours are closest
/// together: the older half ends up evenly spread over the window, the newer half keeps every
/// refresh.
fn thin(samples: &mut VecDeque<(Instant, f64)>) {
    let half = samples.len() / 2;
    let closest = (1..half.min(samples.len().saturating_sub(1)))
        .min_by_key(|&i| samples[i + 1].0.duration_since(samples[i - 1].0));
    if let Some(i) = closest {
        samples.remove(i);
    }
}

/// The growth of the samples: their Theil-Sen slope since the use last stood at its lowest,
/// when it has risen since by more than it varied before (a leak that starts after a flat
/// or noisy stretch is measured from its start, not diluted by what came before); else
/// over the whole window (a use that only varies has no growth to dilute).
fn growth(samples: &[(Instant, f64)]) -> Option<f64> {
    let min = samples
        .iter()
        .map(|(_, v)| *v)
        .fold(f64::INFINITY, f64::min);
    let last_min = samples.iter().rposition(|(_, v)| *v == min)?;
    let (before, since) = samples.split_at(last_min);
    let noise = before
        .iter()
        .map(|(_, v)| *v)
        .fold(f64::NEG_INFINITY, f64::max)
        - before.iter().map(|(_, v)| *v).fold(f64::INFINITY, f64::min);
    let rise = samples.last()?.1 - min;
    if !before.is_empty()
        && rise > noise.max(0.0)
        && let Some(g) = slope(since, MIN_SPAN.as_secs_f64())
    {
        return Some(g);
    }
    slope(samples, MIN_SPAN.as_secs_f64())
}

/// The Theil-Sen slope (per second) of the samples: the median of the slopes between every
/// two of them. None with fewer than MIN_SAMPLES or a span under `min_span` seconds. A flat
/// series (most limits, most of the time) is 0 without the pairs.
fn slope(samples: &[(Instant, f64)], min_span: f64) -> Option<f64> {
    let (first, last) = (samples.first()?, samples.last()?);
    if samples.len() < MIN_SAMPLES || last.0.duration_since(first.0).as_secs_f64() < min_span {
        return None;
    }
    if samples.iter().all(|(_, v)| *v == first.1) {
        return Some(0.0);
    }
    let mut slopes = Vec::with_capacity(samples.len() * (samples.len() - 1) / 2);
    for (i, (ti, vi)) in samples.iter().enumerate() {
        for (tj, vj) in samples.iter().skip(i + 1) {
            let dt = tj.duration_since(*ti).as_secs_f64();
            if dt > 0.0 {
                slopes.push((vj - vi) / dt);
            }
        }
    }
    if slopes.is_empty() {
        return None;
    }
    slopes.sort_by(f64::total_cmp);
    let mid = slopes.len() / 2;
    Some(if slopes.len() % 2 == 1 {
        slopes[mid]
    } else {
        (slopes[mid - 1] + slopes[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(current: u64) -> Reading {
        Reading {
            limit: Limit::Pids,
            resource: "/leak".into(),
            workload: "leak".into(),
            pod: None,
            current,
            max: 100,
            shared_by: Vec::new(),
        }
    }

    fn feed(watch: &mut LimitWatch, values: &[u64]) -> Option<Estimate> {
        let t0 = Instant::now();
        for (i, v) in values.iter().enumerate() {
            watch.update(t0 + Duration::from_secs(i as u64), [reading(*v)]);
        }
        watch.get(Limit::Pids, "/leak")
    }

    #[test]
    fn a_steady_leak_gets_its_eta() {
        let mut w = LimitWatch::new(Duration::from_secs(30));
        let e = feed(&mut w, &[10, 12, 14, 16, 18, 20]).unwrap();
        assert_eq!(e.growth_per_s, Some(2.0));
        assert_eq!(e.eta_s, Some(40.0));
    }

    #[test]
    fn one_spike_does_not_move_the_slope() {
        let mut w = LimitWatch::new(Duration::from_secs(30));
        let e = feed(&mut w, &[10, 11, 12, 90, 14, 15, 16]).unwrap();
        assert_eq!(e.growth_per_s, Some(1.0));
        assert_eq!(e.eta_s, Some(84.0));
    }

    #[test]
    fn flat_or_shrinking_use_has_no_eta() {
        let mut w = LimitWatch::new(Duration::from_secs(30));
        assert_eq!(feed(&mut w, &[50, 50, 50, 50, 50]).unwrap().eta_s, None);
        let mut w = LimitWatch::new(Duration::from_secs(30));
        assert_eq!(feed(&mut w, &[50, 45, 40, 35, 30]).unwrap().eta_s, None);
    }

    #[test]
    fn too_few_samples_have_no_slope() {
        let mut w = LimitWatch::new(Duration::from_secs(30));
        assert_eq!(feed(&mut w, &[10, 20]).unwrap().growth_per_s, None);
    }

    #[test]
    fn a_fast_leak_has_its_estimate_from_three_refreshes() {
        let mut w = LimitWatch::new(Duration::from_secs(300));
        let e = feed(&mut w, &[10, 12, 14]).unwrap();
        assert_eq!(
            (e.growth_per_s, e.eta_s, e.samples),
            (Some(2.0), Some(43.0), 3)
        );
    }

    #[test]
    fn a_reached_limit_is_zero_away_while_flat() {
        let mut w = LimitWatch::new(Duration::from_secs(30));
        let e = feed(&mut w, &[100, 100, 100, 100]).unwrap();
        assert_eq!((e.growth_per_s, e.eta_s), (Some(0.0), Some(0.0)));
    }

    #[test]
    fn at_the_limit_while_growing_is_zero() {
        assert_eq!(eta(100, 100, 1.0), Some(0.0));
        assert_eq!(eta(0, u64::MAX, 1e-9), None);
    }

    #[test]
    fn samples_stay_bounded_and_gone_limits_are_forgotten() {
        let mut w = LimitWatch::new(Duration::from_secs(30));
        let t0 = Instant::now();
        for i in 0..1000u64 {
            w.update(t0 + Duration::from_millis(i * 100), [reading(i)]);
        }
        let s = w.series.values().next().unwrap();
        assert!(s.samples.len() <= MAX_SAMPLES, "{}", s.samples.len());
        // In the room allocated for them at first: a limit costs the same from its first
        // refresh to its last.
        assert_eq!(s.samples.capacity(), MAX_SAMPLES + 1);
        // Thinned, not cut: the window's span is kept.
        let span = s.samples.back().unwrap().0 - s.samples.front().unwrap().0;
        assert!(span > Duration::from_secs(25), "{span:?}");
        let growth = w.get(Limit::Pids, "/leak").unwrap().growth_per_s.unwrap();
        assert!((growth - 10.0).abs() < 1e-6, "{growth}");
        w.update(t0 + Duration::from_secs(200), []);
        assert!(w.series.is_empty());
    }

    /// A leak as the daemon sees it at its shipped cadence: every refresh reads every limit,
    /// and every [`SAMPLE_INTERVAL`] between them the hot ones. The use is `base` until the
    /// leak starts at 0 s, then grows at `rate` until `max`; the refreshes fall `phase`
    /// seconds after whole multiples of `refresh`. Returns (time, ETA) of every estimate
    /// from the leak's start on.
    fn watch_leak(base: f64, rate: f64, max: u64, refresh: f64, phase: f64) -> Vec<(f64, f64)> {
        let use_at = |t: f64| (base + rate * t.max(0.0)).floor().min(max as f64) as u64;
        let t0 = Instant::now();
        let at = |t: f64| t0 + Duration::from_secs_f64(t + 1000.0);
        let mut w = LimitWatch::new(Duration::from_secs(300));
        let end = (max as f64 - base) / rate;
        let mut out = Vec::new();
        let mut next_refresh = phase - 600.0;
        let mut t = next_refresh;
        while t < end {
            if t >= next_refresh - 1e-9 {
                let mut r = reading(use_at(t));
                r.max = max;
                w.update(at(t), [r]);
                next_refresh += refresh;
            } else {
                let hot = w.hot(MAX_HOT);
                w.sample(
                    at(t),
                    hot.into_iter().map(|(limit, resource)| Sample {
                        limit,
                        resource,
                        current: use_at(t),
                        max,
                    }),
                );
            }
            if t >= 0.0
                && let Some(eta) = w.get(Limit::Pids, "/leak").and_then(|e| e.eta_s)
            {
                out.push((t, eta));
            }
            t = (t + SAMPLE_INTERVAL.as_secs_f64()).min(next_refresh);
        }
        out
    }

    /// The first estimate's time, and the time left at the first estimate within 25% of the
    /// truth.
    fn timeliness(estimates: &[(f64, f64)], end: f64) -> (f64, f64) {
        let first = estimates.first().expect("an estimate").0;
        let accurate = estimates
            .iter()
            .find(|(t, eta)| ((t + eta) - end).abs() <= 0.25 * (end - t))
            .expect("an accurate estimate");
        (first, end - accurate.0)
    }

    #[test]
    fn a_20s_leak_is_forecast_early_at_the_shipped_refresh() {
        for phase in [0.0, 1.3, 2.5, 4.9] {
            let estimates = watch_leak(5.0, 10.0, 200, 5.0, phase);
            let (first, left) = timeliness(&estimates, 19.5);
            // Within the refresh that sees it grow and two samples after it.
            assert!(first <= 7.0, "phase {phase}: first estimate at {first} s");
            assert!(left >= 10.0, "phase {phase}: accurate only {left} s before");
        }
    }

    #[test]
    fn a_5min_leak_is_forecast_within_seconds() {
        for phase in [0.0, 2.5] {
            let estimates = watch_leak(20.0, 0.6, 200, 5.0, phase);
            let (first, left) = timeliness(&estimates, 300.0);
            assert!(first <= 10.0, "phase {phase}: first estimate at {first} s");
            assert!(
                left >= 270.0,
                "phase {phase}: accurate only {left} s before"
            );
        }
    }

    #[test]
    fn a_50min_leak_is_forecast_within_its_first_minutes() {
        let estimates = watch_leak(20.0, 0.06, 200, 5.0, 1.0);
        let (first, left) = timeliness(&estimates, 3000.0);
        assert!(first <= 60.0, "first estimate at {first} s");
        assert!(left >= 2700.0, "accurate only {left} s before");
    }

    #[test]
    fn a_recovered_use_has_no_estimate_after_the_fall() {
        let mut w = LimitWatch::new(Duration::from_secs(300));
        let t0 = Instant::now();
        let values = [0, 10, 20, 30, 40, 40, 40, 30, 10, 0, 0, 0, 0];
        for (i, v) in values.iter().enumerate() {
            let mut r = reading(*v);
            r.max = 40;
            w.update(t0 + Duration::from_secs(i as u64), [r]);
            let e = w.get(Limit::Pids, "/leak").unwrap();
            if i == 7 {
                assert_eq!(e.eta_s, None, "at the first sample below the limit");
            }
            if i > 7 {
                assert_eq!(e.eta_s, None, "{i}: {e:?}");
                assert_ne!(e.growth_per_s.map(|g| g > 0.0), Some(true), "{i}: {e:?}");
            }
        }
    }

    #[test]
    fn a_leak_that_stops_has_no_estimate_once_flat() {
        let mut w = LimitWatch::new(Duration::from_secs(300));
        let t0 = Instant::now();
        let mut last = None;
        for i in 0..60u64 {
            let v = (i * 2).min(60);
            w.update(t0 + Duration::from_secs(i), [reading(v)]);
            last = w.get(Limit::Pids, "/leak").map(|e| (i, e.eta_s));
        }
        // Rising until 30 s, flat since: within a few seconds of the stop, no estimate.
        assert_eq!(last, Some((59, None)));
        let mut w = LimitWatch::new(Duration::from_secs(300));
        let mut stopped_at = None;
        for i in 0..60u64 {
            let v = (i * 2).min(60);
            w.update(t0 + Duration::from_secs(i), [reading(v)]);
            if i > 30
                && stopped_at.is_none()
                && w.get(Limit::Pids, "/leak").unwrap().eta_s.is_none()
            {
                stopped_at = Some(i);
            }
        }
        assert!(stopped_at.is_some_and(|s| s <= 33), "{stopped_at:?}");
    }

    #[test]
    fn only_growing_or_half_used_limits_are_hot() {
        let mut w = LimitWatch::new(Duration::from_secs(300));
        let t0 = Instant::now();
        let read = |resource: &str, current| Reading {
            resource: resource.into(),
            ..reading(current)
        };
        w.update(
            t0,
            [read("/flat", 10), read("/grow", 10), read("/full", 60)],
        );
        w.update(
            t0 + Duration::from_secs(5),
            [read("/flat", 10), read("/grow", 30), read("/full", 60)],
        );
        let hot = w.hot(MAX_HOT);
        assert_eq!(
            hot,
            [(Limit::Pids, "/full".into()), (Limit::Pids, "/grow".into())]
        );
        assert_eq!(w.hot(1).len(), 1);
    }
}
