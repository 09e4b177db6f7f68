//! Task creation per cgroup, for real: exact created counts, live counts, pids headroom
//! shrinking under a leak with a warning before the first failure, and a model that stays
//! bounded under cgroup churn. Root only.
#![allow(clippy::unwrap_used)] // a test fails by panicking: helpers outside #[test] fns unwrap too

mod common;

use std::time::Duration;

use common::*;
use probe_user::attribution::cgroups::Hierarchy;
use serde_json::Value;

/// A cgroup v2 directory and, on hybrid hosts, the pids cgroup of the same name; the lab
/// joins both.
struct TestCgroup {
    name: String,
    unified: TempCgroup,
    pids: Option<TempCgroup>,
}

impl TestCgroup {
    fn new(tag: &str, pids_max: Option<u32>) -> TestCgroup {
        let name = unique(tag);
        let (unified_mount, _) =
            mount(Hierarchy::Unified).expect("the task counters need a cgroup v2 mount");
        let unified = TempCgroup::new(&unified_mount, &name);
        let pids = match mount(Hierarchy::Pids) {
            Some((m, _)) if m == unified_mount => None,
            Some((m, _)) => Some(TempCgroup::new(&m, &name)),
            None => None,
        };
        if let Some(max) = pids_max {
            pids.as_ref()
                .unwrap_or(&unified)
                .write("pids.max", &max.to_string());
        }
        TestCgroup {
            name,
            unified,
            pids,
        }
    }

    fn path(&self) -> String {
        format!("/{}", self.name)
    }
}

impl InCgroups for TestCgroup {
    fn dirs(&self) -> Vec<&std::path::Path> {
        let mut dirs = vec![self.unified.dir.as_path()];
        dirs.extend(self.pids.iter().map(|p| p.dir.as_path()));
        dirs
    }
}

fn row<'a>(snapshot: &'a Value, cgroup: &str) -> Option<&'a Value> {
    snapshot["cgroups"]
        .as_array()?
        .iter()
        .find(|r| r["cgroup"] == cgroup)
}

#[test]
fn exact_created_counts_and_live_tasks() {
    let cg = TestCgroup::new("counts", Some(100));
    let path = cg.path();
    let top = Trace::start_top(&["--cgroup", &path, "--interval", "200ms"]);
    let mut threads = cg.spawn(&["threads", "7", "--comm", "fl-cnt-thr", "--hold-ms", "3000"]);
    let mut forks = cg.spawn(&["forks", "4", "--comm", "fl-cnt-fork", "--hold-ms", "3000"]);
    assert_eq!(threads.report().created, 7);
    assert_eq!(forks.report().created, 4);

    // While both hold their tasks: 7 threads and 4 processes created in the cgroup (the labs
    // themselves were created outside it and moved in), 1+7 and 1+4 tasks alive.
    // A sample reads the kernel's counters and the cgroup's live count a moment apart: wait
    // until both have caught up, then require them exact (no task counted twice).
    let count = |r: &Value, k: &str| r[k].as_u64().unwrap_or(0);
    let held = top.wait_for(
        Duration::from_secs(10),
        "13 live tasks, 7 + 4 created",
        |s| {
            row(s, &path).is_some_and(|r| {
                r["live"] == 13
                    && count(r, "threads_created") >= 7
                    && count(r, "processes_created") >= 4
            })
        },
    );
    let r = row(&held, &path).unwrap();
    assert_eq!(
        (
            r["threads_created"].as_u64(),
            r["processes_created"].as_u64()
        ),
        (Some(7), Some(4)),
        "{r}"
    );
    assert_eq!(r["pids_limit"]["max"], 100, "{r}");
    assert_eq!(r["pids_limit"]["current"], 13, "{r}");
    assert_eq!(r["pids_limit"]["headroom"], 87, "{r}");
    threads.wait();
    forks.wait();

    // After they exit: back to the empty baseline; every task that lived there exited.
    let after = top.wait_for(Duration::from_secs(10), "0 live tasks, 13 exited", |s| {
        row(s, &path).is_some_and(|r| r["live"] == 0 && count(r, "exited") >= 13)
    });
    let r = row(&after, &path).unwrap();
    assert_eq!(
        (
            r["threads_created"].as_u64(),
            r["processes_created"].as_u64()
        ),
        (Some(7), Some(4)),
        "{r}"
    );
    assert_eq!(r["exited"], 13, "{r}");
    assert_eq!(after["untracked_events"], 0);
    drop(top);
}

#[test]
fn a_leak_shrinks_headroom_and_warns_before_the_first_failure() {
    let cg = TestCgroup::new("leak", Some(40));
    let path = cg.path();
    // The headroom threshold alone (the ETA warning, on by default, is tested in explain.rs).
    let trace = Trace::start(&[
        "--cgroup",
        &path,
        "--headroom-warn",
        "10%",
        "--eta-warn",
        "1ms",
    ]);
    // One thread every 150 ms until the limit refuses: about 6 s (slower in an emulated VM,
    // where each `top --once` below takes seconds too).
    let interval = (150 * pace()).to_string();
    let mut leak = cg.spawn(&[
        "threads",
        "100",
        "--comm",
        "fl-leak",
        "--interval-ms",
        &interval,
        "--max-failures",
        "2",
        // Keep the threads after the failures, until the test ends (the lab is
        // killed then): in an emulated VM the leak can be over before the second
        // `top --once` below has sampled, and an emptied cgroup is no longer listed.
        "--hold-ms",
        "25000",
    ]);

    // Two samples this far apart: the leak creates a thread or two in between.
    let window = format!("{}ms", 300 * pace());
    let once = |tag: &str| -> Value {
        let out = common::faultline()
            .args([
                "top",
                "--once",
                "--output",
                "json",
                "--cgroup",
                &path,
                "--interval",
                &window,
            ])
            .output()
            .expect("running top --once");
        assert!(
            out.status.success(),
            "{tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("{tag}: not JSON ({e}): {line}"))
    };
    let first = once("first");
    std::thread::sleep(Duration::from_millis(1000));
    let second = once("second");
    let (a, b) = (
        row(&first, &path).expect("cgroup in first snapshot"),
        row(&second, &path).expect("cgroup in second snapshot"),
    );
    assert!(
        b["live"].as_u64() > a["live"].as_u64(),
        "live did not grow: {a} then {b}"
    );
    assert!(
        b["pids_limit"]["headroom"].as_i64() < a["pids_limit"]["headroom"].as_i64(),
        "headroom did not shrink: {a} then {b}"
    );

    let report = leak.report();
    assert_eq!((report.created, report.failures), (39, 2), "{report:?}");
    drop(leak);
    let (events, summary) = trace.stop_json();
    let warning = events
        .iter()
        .position(|e| e["kind"] == "headroom_warning")
        .expect("no headroom warning");
    let failure = events
        .iter()
        .position(|e| e["kind"] == "clone_failure")
        .expect("no clone failure");
    assert!(
        warning < failure,
        "the warning came after the first failure: {events:#?}"
    );
    let w = &events[warning];
    assert_eq!(w["pids_max"], 40, "{w}");
    assert!(
        w["headroom"].as_i64().is_some_and(|h| (0..4).contains(&h)),
        "{w}"
    );
    assert!(
        w["time"].as_str() <= events[failure]["time"].as_str(),
        "{w}"
    );
    assert_eq!(summary["headroom_warnings"], 1);
    assert_eq!(summary["by_cause"]["pids_limit"], 2);
}

#[test]
fn cgroup_churn_keeps_the_model_bounded() {
    let root = TestCgroup::new("churn", None);
    let path = root.path();
    let top = Trace::start_top(&["--interval", "200ms"]);
    let report = lab(&[
        "churn",
        "2000",
        "--comm",
        "fl-churn",
        "--churn-root",
        &root.unified.dir.display().to_string(),
    ]);
    assert_eq!(report.created, 2000, "{report:?}");
    // The kernel dropped each removed cgroup's counters and the model followed: what is left
    // is the node's live cgroups, not 2,000 dead ones.
    // Other cgroups may come and go on the node meanwhile: wait for a snapshot after ours.
    let ours = format!("{path}/churn-");
    let s = top.wait_for(Duration::from_secs(10), "the churn counted and gone", |s| {
        s["cgroups_removed"].as_u64().is_some_and(|n| n >= 2000)
            && s["cgroups"].as_array().is_some_and(|rows| {
                rows.iter()
                    .all(|r| !r["cgroup"].as_str().unwrap_or("").starts_with(&ours))
            })
    });
    let tracked = s["tracked_cgroups"].as_u64().expect("tracked_cgroups");
    let live_cgroups = count_dirs(&mount(Hierarchy::Unified).unwrap().0);
    assert!(
        tracked <= live_cgroups,
        "{tracked} cgroups tracked, {live_cgroups} exist"
    );
    assert_eq!(s["untracked_events"], 0);
    assert!(
        s["cgroups"].as_array().unwrap().iter().all(|r| !r["cgroup"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("{path}/churn-"))),
        "{s}"
    );
    drop(top);
}

fn count_dirs(dir: &std::path::Path) -> u64 {
    1 + std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| count_dirs(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

/// A cgroup that holds tasks but creates none shows at once in `top`, with its live count:
/// 42 threads and the lab itself, all created before faultline started.
#[test]
fn top_lists_an_idle_cgroup_that_holds_tasks() {
    let cg = TestCgroup::new("idle", None);
    let path = cg.path();
    // Held until `top` has answered (then ended), within the lab's 60 s: under emulation `top
    // --once` takes 15-30 s to load and attach, more than any fixed hold that fits the pace.
    let mut held = cg.spawn(&["threads", "42", "--comm", "fl-idle", "--hold-ms", "50000"]);
    let report = held.report();
    assert_eq!((report.created, report.failures), (42, 0), "{report:?}");
    let out = common::faultline()
        .args([
            "top", "--once", "-o", "json", "--sort", "live", "--cgroup", &path,
        ])
        .output()
        .expect("running top --once");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snapshot: Value = serde_json::from_slice(&out.stdout).expect("one JSON snapshot");
    let r = row(&snapshot, &path).unwrap_or_else(|| panic!("{path} missing: {snapshot}"));
    assert_eq!(r["live"], 43, "{r}");
    assert_eq!(r["threads_created"], 0, "{r}");
    // SAFETY: killing the lab this test started (its `timeout` parent then reaps it).
    unsafe { libc::kill(report.pid as i32, libc::SIGKILL) };
    drop(held);
}

/// A cgroup that held tasks before `top` started and goes on leaking threads shows its rate in
/// `--once` (it was first shown idle, then counted: its rate counts from the first sample).
#[test]
fn top_once_rates_a_leak_that_began_before_it() {
    let cg = TestCgroup::new("prior", None);
    let path = cg.path();
    let interval = (100 * pace()).to_string();
    let _leak = cg.spawn(&[
        "threads",
        "500",
        "--comm",
        "fl-prior",
        "--interval-ms",
        &interval,
    ]);
    // The leak holds threads before top loads.
    std::thread::sleep(Duration::from_millis(500 * pace()));
    let window = format!("{}ms", 1000 * pace());
    let once = |output: &str| {
        let out = common::faultline()
            .args([
                "top",
                "--once",
                "-o",
                output,
                "--cgroup",
                &path,
                "--interval",
                &window,
            ])
            .output()
            .expect("running top --once");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let json = once("json");
    let snapshot: Value = serde_json::from_str(json.trim()).expect("one JSON snapshot");
    let r = row(&snapshot, &path).unwrap_or_else(|| panic!("{path} missing: {snapshot}"));
    assert!(r["threads_per_s"].as_f64() > Some(0.0), "{r}");
    // The table: the cgroup's row (its path's end) has a THR/s above 0.
    let table = once("table");
    let tail = &cg.name[cg.name.len().saturating_sub(20)..];
    let line = table
        .lines()
        .find(|l| l.contains(tail))
        .unwrap_or_else(|| panic!("no row for {path}:\n{table}"));
    let columns: Vec<&str> = line.split_whitespace().collect();
    let rate: f64 = columns[columns.len() - 7].parse().expect("THR/s");
    assert!(rate > 0.0, "{line}");
}

/// A cgroup whose name is not UTF-8 (`caf\xe9`), one made before `top` started (walked) and
/// one after (named from the kernel's record): each keeps its live count and pids limit (read
/// through the name's bytes) and is shown escaped.
#[test]
fn attribution_by_id_keeps_a_non_utf8_cgroup_accounted() {
    use std::os::unix::ffi::OsStrExt as _;
    let (unified, _) = mount(Hierarchy::Unified).expect("cgroup v2 mount");
    let pids_mount = mount(Hierarchy::Pids)
        .map(|(m, _)| m)
        .filter(|m| *m != unified);
    let odd = |tag: &str| -> (Vec<u8>, String) {
        let name = unique(tag);
        (
            [name.as_bytes(), b"-caf\xe9"].concat(),
            format!("/{name}-caf\\xe9"),
        )
    };
    let make = |bytes: &[u8]| {
        let name = std::ffi::OsStr::from_bytes(bytes);
        let v2 = TempCgroup::named(&unified, name);
        let pids = pids_mount.as_ref().map(|m| TempCgroup::named(m, name));
        pids.as_ref().unwrap_or(&v2).write("pids.max", "50");
        let mut args: Vec<std::ffi::OsString> =
            ["threads", "5", "--comm", "fl-odd", "--hold-ms", "20000"]
                .map(Into::into)
                .into();
        for dir in std::iter::once(&v2).chain(&pids) {
            args.extend(["--cgroup".into(), dir.dir.clone().into_os_string()]);
        }
        (v2, pids, args)
    };
    let hold = |args: &[std::ffi::OsString]| {
        let mut lab = Lab::spawn(args);
        assert_eq!(lab.report().created, 5);
        lab
    };
    let (before_name, before) = odd("odd-before");
    let made_before = make(&before_name);
    let top = Trace::start_top(&["--interval", "200ms"]);
    let (after_name, after) = odd("odd-after");
    let made_after = make(&after_name);
    let labs = [hold(&made_before.2), hold(&made_after.2)];
    // A refresh reads the kernel's counters before it reads each cgroup's live tasks: threads
    // made between the two show as live a refresh before they show as created. Wait for
    // both, then require them exact (below).
    let s = top.wait_for(
        Duration::from_secs(10),
        "both cgroups with 6 live tasks and 5 threads created",
        |s| {
            [&before, &after].iter().all(|p| {
                row(s, p).is_some_and(|r| {
                    r["live"] == 6 && r["threads_created"].as_u64().is_some_and(|n| n >= 5)
                })
            })
        },
    );
    for path in [&before, &after] {
        let r = row(&s, path).expect("row");
        assert_eq!(r["pids_limit"]["max"], 50, "{r}");
        assert_eq!(r["pids_limit"]["current"], 6, "{r}");
        assert_eq!(r["pids_limit"]["cgroup"], path.as_str(), "{r}");
        assert_eq!(r["threads_created"], 5, "{r}");
    }
    drop(top);
    drop(labs);
    drop((made_before, made_after));
}
