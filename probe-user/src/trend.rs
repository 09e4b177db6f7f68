//! Time to exhaustion: for every limit faultline watches (a cgroup's pids limit, the node's
//! `pid_max` and `threads-max`, each network namespace's conntrack table), the use sampled on
//! every refresh over a recent window, its growth as a Theil-Sen slope (the median of the
//! slopes between every two samples: one spike or one dip does not move it), and the seconds
//! left until the limit at that growth. The first estimate comes from the first three
//! refreshes of a growing use (a fast leak is caught seconds after it starts) and firms up as
//! the window fills; `samples` says how many it stands on. No estimate while use is flat or
//! shrinking; a limit already reached is 0 s away.

use std::{
    collections::{HashMap, VecDeque},
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
    pub pod: Option<PodRef>,
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
    pub pod: Option<PodRef>,
    /// The workloads sharing the limit (RLIMIT_NPROC: every pod running as the uid).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_by: Vec<String>,
}

struct Series {
    reading: Reading,
    samples: VecDeque<(Instant, f64)>,
    /// The slope of `samples`, computed once per update.
    growth: Option<f64>,
}

/// The samples of every limit seen at the last refresh; a limit not seen (its cgroup or
/// namespace gone) is forgotten, so the watch is as large as the node's limits.
pub struct LimitWatch {
    window: Duration,
    series: HashMap<(Limit, String), Series>,
}

impl LimitWatch {
    pub fn new(window: Duration) -> Self {
        LimitWatch {
            window: window.max(Duration::from_secs(1)),
            series: HashMap::new(),
        }
    }

    /// Takes one refresh's readings.
    pub fn update(&mut self, now: Instant, readings: impl IntoIterator<Item = Reading>) {
        let mut next = HashMap::with_capacity(self.series.len());
        for reading in readings {
            let key = (reading.limit, reading.resource.clone());
            let mut samples = self
                .series
                .remove(&key)
                .map(|s| s.samples)
                .unwrap_or_default();
            samples.push_back((now, reading.current as f64));
            while samples
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > self.window)
            {
                samples.pop_front();
            }
            while samples.len() > MAX_SAMPLES {
                thin(&mut samples);
            }
            let growth = slope(&samples, MIN_SPAN.as_secs_f64());
            next.insert(
                key,
                Series {
                    reading,
                    samples,
                    growth,
                },
            );
        }
        self.series = next;
    }

    /// Every limit's estimate, by limit and resource.
    pub fn estimates(&self) -> Vec<Estimate> {
        let mut out: Vec<Estimate> = self.series.values().map(Series::estimate).collect();
        out.sort_by(|a, b| (a.limit, &a.resource).cmp(&(b.limit, &b.resource)));
        out
    }

    /// The estimate of one limit.
    pub fn get(&self, limit: Limit, resource: &str) -> Option<Estimate> {
        self.series
            .get(&(limit, resource.to_owned()))
            .map(Series::estimate)
    }
}

impl Series {
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

/// The Theil-Sen slope (per second) of the samples: the median of the slopes between every
/// two of them. None with fewer than MIN_SAMPLES or a span under `min_span` seconds. A flat
/// series (most limits, most of the time) is 0 without the pairs.
fn slope(samples: &VecDeque<(Instant, f64)>, min_span: f64) -> Option<f64> {
    let (first, last) = (samples.front()?, samples.back()?);
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
        // Thinned, not cut: the window's span is kept.
        let span = s.samples.back().unwrap().0 - s.samples.front().unwrap().0;
        assert!(span > Duration::from_secs(25), "{span:?}");
        let growth = w.get(Limit::Pids, "/leak").unwrap().growth_per_s.unwrap();
        assert!((growth - 10.0).abs() < 1e-6, "{growth}");
        w.update(t0 + Duration::from_secs(200), []);
        assert!(w.series.is_empty());
    }
}
