//! Each cause of a failed task creation, produced for real on this kernel and checked in what
//! `faultline trace` reports: cause, errno, syscall, task kind, comm, pid, evidence, and that
//! nothing else is misreported. Root only.
#![allow(clippy::unwrap_used)] // a test fails by panicking: helpers outside #[test] fns unwrap too

mod common;

use common::*;
use probe_user::attribution::cgroups::Hierarchy;
use serde_json::Value;

/// Asserts that every event of `comm` has these fields and that there is one per refused
/// creation the lab counted.
fn assert_events(
    events: &[Value],
    comm: &str,
    report: &LabReport,
    expect: &[(&str, &str)],
) -> usize {
    let mine = by_comm(events, comm);
    assert_eq!(
        mine.len() as u64,
        report.failures,
        "events of {comm}: {mine:#?}\nlab: {report:?}"
    );
    for e in &mine {
        assert_eq!(e["pid"].as_u64(), Some(report.pid), "{e}");
        for (field, value) in expect {
            assert_eq!(e[*field], *value, "field {field} of {e}");
        }
    }
    mine.len()
}

#[test]
fn pids_limit_for_threads_forks_and_vforks() {
    let Some((pids_mount, _)) = mount(Hierarchy::Pids) else {
        skipped("no pids controller on this host");
        return;
    };
    let name = unique("pids");
    let pids = TempCgroup::new(&pids_mount, &name);
    pids.write("pids.max", "10");
    // On hybrid hosts the v2 cgroup is a separate directory: join one of the same name so the
    // event's cgroup path is checked too.
    let unified = mount(Hierarchy::Unified)
        .filter(|(p, _)| *p != pids_mount)
        .map(|(p, _)| TempCgroup::new(&p, &name));
    let mut joins = vec!["--cgroup".to_owned(), pids.dir.display().to_string()];
    if let Some(u) = &unified {
        joins.extend(["--cgroup".to_owned(), u.dir.display().to_string()]);
    }
    let joins: Vec<&str> = joins.iter().map(String::as_str).collect();
    let cgroup_path = format!("/{name}");

    let trace = Trace::start(&["--cgroup", &cgroup_path]);
    let run =
        |mode: &str, comm: &str| lab(&[&[mode, "50", "--comm", comm], joins.as_slice()].concat());
    let threads = run("threads", "fl-pids-thr");
    let forks = run("forks", "fl-pids-fork");
    let sys_forks = run("sys-forks", "fl-pids-sysfork");
    let vforks = run("vforks", "fl-pids-vfork");
    let (events, summary) = trace.stop_json();

    // 10 tasks fit: the lab itself and 9 more.
    for r in [&threads, &forks, &sys_forks] {
        assert_eq!((r.created, r.failures), (9, 3), "{r:?}");
        assert!(r.errnos.iter().all(|e| *e == libc::EAGAIN as i64), "{r:?}");
    }
    let common = [
        ("cause", "pids_limit"),
        ("errno", "EAGAIN"),
        ("pids_cgroup", cgroup_path.as_str()),
    ];
    let mut n = 0;
    for (comm, report, syscall, task) in [
        ("fl-pids-thr", &threads, "clone3", "thread"),
        ("fl-pids-fork", &forks, "clone", "process"),
        ("fl-pids-sysfork", &sys_forks, "fork", "process"),
    ] {
        n += assert_events(
            &events,
            comm,
            report,
            &[&common[..], &[("syscall", syscall), ("task", task)]].concat(),
        );
    }
    // A process's refusals in a row are a burst: the first reads the kernel state, the next
    // ones within 100 ms carry that read (same evidence, above) and say how old it is.
    let mut reused = 0;
    for comm in ["fl-pids-thr", "fl-pids-fork", "fl-pids-sysfork"] {
        let mine = by_comm(&events, comm);
        assert!(mine[0].get("state_age_ms").is_none(), "{}", mine[0]);
        for e in &mine[1..] {
            if let Some(age) = e.get("state_age_ms") {
                let age = age.as_f64().unwrap();
                assert!(age > 0.0 && age <= 100.0, "{e}");
                reused += 1;
            }
        }
    }
    assert!(
        reused > 0,
        "no refusal reused its burst's state: {events:#?}"
    );
    // The vfork lab fills with fork (clone) until refused, then tries vfork.
    let vfork_events = by_comm(&events, "fl-pids-vfork");
    assert_eq!(
        vfork_events.len() as u64,
        vforks.failures,
        "{vfork_events:#?}"
    );
    assert_eq!(
        vfork_events
            .iter()
            .filter(|e| e["syscall"] == "vfork")
            .count(),
        3
    );
    assert_eq!(
        vfork_events
            .iter()
            .filter(|e| e["syscall"] == "clone")
            .count(),
        1
    );
    assert!(
        vfork_events
            .iter()
            .all(|e| e["cause"] == "pids_limit" && e["task"] == "process")
    );
    n += vfork_events.len();

    for e in &events {
        assert_eq!(
            e["evidence"],
            format!("pids.current=10 pids.max=10 cgroup={cgroup_path}"),
            "{e}"
        );
        if unified.is_some() {
            assert_eq!(e["cgroup"], cgroup_path.as_str(), "{e}");
        }
    }
    // Only this test's cgroup passed the --cgroup filter; the summary counts what was shown.
    assert_eq!(events.len(), n, "unexpected events: {events:#?}");
    assert_eq!(summary["failures"], n);
    assert_eq!(summary["by_cause"]["pids_limit"], n);
    assert_eq!(summary["by_comm"]["fl-pids-thr"], 3);
    assert_eq!(summary["by_comm"]["fl-pids-vfork"], 4);
    assert_eq!(summary["lost_events"], 0);
}

#[test]
fn rlimit_nproc_as_a_non_root_user() {
    let trace = Trace::start(&["--comm", "fl-nproc"]);
    let report = lab(&[
        "forks", "50", "--comm", "fl-nproc", "--uid", "65534", "--nproc", "5",
    ]);
    let (events, summary) = trace.stop_json();
    assert_eq!(report.failures, 3, "{report:?}");
    assert_events(
        &events,
        "fl-nproc",
        &report,
        &[
            ("cause", "rlimit_nproc"),
            ("errno", "EAGAIN"),
            ("syscall", "clone"),
            ("task", "process"),
        ],
    );
    for e in &events {
        assert_eq!(e["uid"], 65534);
        let evidence = e["evidence"].as_str().unwrap_or_default();
        assert!(
            evidence.starts_with("uid=65534 processes=") && evidence.ends_with(" RLIMIT_NPROC=5"),
            "{e}"
        );
    }
    assert_eq!(summary["failures"], 3);
    assert_eq!(summary["by_cause"]["rlimit_nproc"], 3);
}

#[test]
fn pid_max_of_a_fresh_pid_namespace() {
    if !per_namespace_pid_max() {
        skipped("this kernel has one global pid_max (before 6.14): see pid_max_of_the_node_global");
        return;
    }
    let trace = Trace::start(&["--comm", "fl-pidmax"]);
    // pid_max is per pid namespace on Linux >= 6.14: nothing host-wide changes.
    let report = lab(&[
        "threads",
        "400",
        "--comm",
        "fl-pidmax",
        "--pidns-pid-max",
        "301",
    ]);
    let (events, _) = trace.stop_json();
    // pids 1..300 exist in the namespace: init plus 299 threads.
    assert_eq!((report.created, report.failures), (299, 3), "{report:?}");
    assert_pid_max_threads(&events, "fl-pidmax", &report, |evidence| {
        evidence.contains(" level=1 pids=300 pid_max=301: no free pid in [300, 301)")
    });
}

/// Every thread creation the lab saw refused is reported as pid_max, with this evidence.
fn assert_pid_max_threads(
    events: &[Value],
    comm: &str,
    report: &LabReport,
    evidence_ok: impl Fn(&str) -> bool,
) {
    assert_events(
        events,
        comm,
        report,
        &[
            ("cause", "pid_max"),
            ("errno", "EAGAIN"),
            ("syscall", "clone3"),
            ("task", "thread"),
        ],
    );
    for e in by_comm(events, comm) {
        assert!(
            evidence_ok(e["evidence"].as_str().unwrap_or_default()),
            "{e}"
        );
    }
}

/// Before 6.14 pid_max is one value for the whole node: the seed incident of this project.
/// The allocator hands out pids cyclically in [300, pid_max) once it has wrapped, so a full
/// node is one with no free pid in that range, not one with pid_max tasks.
#[test]
fn pid_max_of_the_node_global() {
    if per_namespace_pid_max() {
        skipped("this kernel has a pid_max per namespace: see pid_max_of_a_fresh_pid_namespace");
        return;
    }
    let Some(kernel) = vm_kernel() else {
        skipped(
            "not run: lowering the global pid_max stops the whole machine from creating tasks; \
             `cargo xtask vm-test` runs it in a disposable VM",
        );
        return;
    };
    let _restore = SysctlGuard::keep("/proc/sys/kernel/pid_max");
    let trace = Trace::start(&["--comm", "fl-gpidmax"]);
    // 20 pids left on the node: the lab takes them (others on the machine may take a few).
    let report = lab(&[
        "threads",
        "100",
        "--comm",
        "fl-gpidmax",
        "--global-pid-max-free",
        "20",
    ]);
    let (events, _) = trace.stop_json();
    assert!(
        report.created <= 20 && report.failures == 3,
        "{kernel}: {report:?}"
    );
    assert_pid_max_threads(&events, "fl-gpidmax", &report, |evidence| {
        evidence.contains(" level=0 ") && evidence.contains(" (global): no free pid in [300, ")
    });
}

#[test]
fn enomem_in_a_pid_namespace_whose_init_exited() {
    let trace = Trace::start(&["--comm", "fl-deadns"]);
    let report = lab(&[
        "forks",
        "5",
        "--comm",
        "fl-deadns",
        "--dead-pidns",
        "--max-failures",
        "2",
    ]);
    let (events, summary) = trace.stop_json();
    assert_eq!((report.created, report.failures), (0, 2), "{report:?}");
    assert!(
        report.errnos.iter().all(|e| *e == libc::ENOMEM as i64),
        "{report:?}"
    );
    assert_events(
        &events,
        "fl-deadns",
        &report,
        &[
            ("cause", "pidns_dead"),
            ("errno", "ENOMEM"),
            ("syscall", "clone"),
            ("task", "process"),
        ],
    );
    assert_eq!(summary["by_cause"]["pidns_dead"], 2);
    assert!(
        summary["by_cause"].get("memory").is_none(),
        "ENOMEM must not read as memory: {summary}"
    );
}

#[test]
fn memory_cgroup_limit_hit_by_thread_creation() {
    let Some((memory_mount, _)) = mount(Hierarchy::Memory) else {
        skipped("no memory controller on this host");
        return;
    };
    let name = unique("memory");
    let memory = TempCgroup::new(&memory_mount, &name);
    let dir = memory.dir.display().to_string();
    // 1 MiB of room holds a few dozen threads' kernel stacks: 1,000 is plenty, and few enough
    // stacks to map and touch quickly under emulation.
    let trace = Trace::start(&["--comm", "fl-memory"]);
    let report = lab(&[
        "threads",
        "1000",
        "--comm",
        "fl-memory",
        "--memory-cgroup",
        &dir,
        "--memory-headroom",
        "1048576",
    ]);
    let (events, _) = trace.stop_json();
    // glibc turns clone3's ENOMEM into EAGAIN for pthread_create; the syscall says ENOMEM.
    assert_eq!(report.failures, 3, "{report:?}");
    assert!(report.created > 0 && report.created < 1000, "{report:?}");
    assert_events(
        &events,
        "fl-memory",
        &report,
        &[
            ("cause", "memory"),
            ("errno", "ENOMEM"),
            ("syscall", "clone3"),
            ("task", "thread"),
        ],
    );
    for e in &events {
        let evidence = e["evidence"].as_str().unwrap_or_default();
        assert!(
            evidence.starts_with("memory.usage=") && evidence.ends_with(&format!("cgroup=/{name}")),
            "{e}"
        );
    }
}

/// threads-max is node-wide: lowering it could break other work on the machine, so this runs
/// only when asked (FAULTLINE_TEST_THREADS_MAX=1). The decision logic has unit tests.
#[test]
fn threads_max_opt_in() {
    if std::env::var("FAULTLINE_TEST_THREADS_MAX").as_deref() != Ok("1") {
        skipped("threads-max is host-wide; set FAULTLINE_TEST_THREADS_MAX=1 to run this test");
        return;
    }
    let trace = Trace::start(&["--comm", "fl-thrmax"]);
    let loadavg = std::fs::read_to_string("/proc/loadavg").expect("loadavg");
    let threads: u64 = loadavg
        .split_whitespace()
        .nth(3)
        .and_then(|f| f.split_once('/'))
        .and_then(|(_, t)| t.parse().ok())
        .expect("threads");
    let guard = SysctlGuard::set("/proc/sys/kernel/threads-max", &(threads + 40).to_string());
    let report = lab(&["threads", "400", "--comm", "fl-thrmax"]);
    // Restored after the trace has handled the events: threads-max itself is read from /proc.
    let (events, _) = trace.stop_json();
    drop(guard);
    assert_events(
        &events,
        "fl-thrmax",
        &report,
        &[
            ("cause", "threads_max"),
            ("errno", "EAGAIN"),
            ("syscall", "clone3"),
        ],
    );
}

#[test]
fn table_output_has_one_line_per_failure_and_a_summary() {
    let trace = Trace::start_with_output("table", &["--comm", "fl-table"]);
    let report = lab(&[
        "forks",
        "5",
        "--comm",
        "fl-table",
        "--dead-pidns",
        "--max-failures",
        "2",
    ]);
    let (lines, _) = trace.stop();
    assert!(lines[0].starts_with("TIME "), "{lines:?}");
    let rows: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(" fl-table ") && !l.starts_with("by "))
        .collect();
    assert_eq!(rows.len() as u64, report.failures, "{lines:#?}");
    for row in rows {
        for word in [
            " clone ",
            " process ",
            " ENOMEM ",
            " pidns_dead ",
            &format!(" {} ", report.pid),
        ] {
            assert!(row.contains(word), "{word:?} missing in {row:?}");
        }
    }
    // Other tests' failures, traced too, are filtered out: their number varies.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("2 failed task creation(s) shown, ")
                && l.ends_with(" filtered out, 0 lost")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l == "by cause:  pidns_dead 2"),
        "{lines:#?}"
    );
}

/// `--btf` with a description of this kernel that lacks `pids_cgroup` (its name altered in a
/// copy of the running kernel's BTF): the failure is still reported with its cause, and with
/// `--kernel-log warn` the program says which evidence it could not read.
#[test]
fn a_missing_offset_shows_as_a_kernel_log_line() {
    let btf = std::fs::read("/sys/kernel/btf/vmlinux").expect("vmlinux BTF");
    let (name, renamed) = (&b"\0pids_cgroup\0"[..], &b"\0pids_cgrouq\0"[..]);
    let at: Vec<usize> = btf
        .windows(name.len())
        .enumerate()
        .filter(|(_, w)| *w == name)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        at.len(),
        1,
        "the name pids_cgroup appears once in the BTF strings"
    );
    let mut doctored = btf;
    doctored[at[0]..at[0] + name.len()].copy_from_slice(renamed);
    let path = std::env::temp_dir().join(unique("btf"));
    let _file = TempFile::new(&path, &doctored);
    let path = path.display().to_string();

    let trace = Trace::start(&["--comm", "fl-klog", "--btf", &path, "--kernel-log", "warn"]);
    let report = lab(&[
        "forks", "50", "--comm", "fl-klog", "--uid", "65534", "--nproc", "3",
    ]);
    let (lines, stderr) = trace.stop();
    assert_eq!(report.failures, 3, "{report:?}");
    let events: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &serde_json::Value| e["comm"] == "fl-klog")
        .collect();
    assert_eq!(events.len(), 3, "{lines:#?}");
    assert!(
        events.iter().all(|e| e["cause"] == "rlimit_nproc"),
        "{events:#?}"
    );
    // check reads the same description and names what it lacks.
    let check = common::faultline()
        .args(["check", "--btf", &path])
        .output()
        .expect("running check");
    let check = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.contains("missing pids_cgroup.css, pids_cgroup.counter, pids_cgroup.limit"),
        "{check}"
    );
    let logged = stderr
        .lines()
        .filter(|l| {
            *l == "faultline: kernel warn: clone failure without a pids cgroup snapshot (offset missing or read failed)"
        })
        .count();
    assert!(logged >= 3, "one kernel log line per failure: {stderr}");
}

/// A pod uid unique to this test run.
fn pod_uid(tag: u32) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), tag)
}

/// 20 pods made one right after another after faultline started, each refusing a fork at
/// once (pids.max 1: the lab alone fills it): every failure is named by its pod and container
/// cgroup, none is `?`. The kernel names each new cgroup before anything runs in it; a walk
/// limited to one per 250 ms named 5 of 20.
#[test]
fn attribution_by_id_names_a_burst_of_new_pods() {
    const PODS: u32 = 20;
    let cid = |i: u32| format!("{:064x}", 0xb0b0_0000_u64 + u64::from(i));
    let uids: Vec<String> = (0..PODS).map(|i| pod_uid(100 + i)).collect();
    let names: Vec<String> = (0..PODS).map(|i| format!("burst-{i}")).collect();
    let cids: Vec<String> = (0..PODS).map(cid).collect();
    let logs = KubeletLogs::new(
        &(0..PODS as usize)
            .map(|i| {
                (
                    "burst",
                    names[i].as_str(),
                    uids[i].as_str(),
                    "app",
                    cids[i].as_str(),
                )
            })
            .collect::<Vec<_>>(),
    );
    let trace = Trace::start(&["--comm", "fl-burst", "--kubelet-logs", &logs.arg()]);
    let top = unique("burst");
    let mut pods = Vec::new();
    let mut labs = Vec::new();
    for i in 0..PODS {
        let cg = PodCgroup::systemd(
            &format!("{top}-{i}"),
            &uids[i as usize],
            &cids[i as usize],
            1,
        );
        labs.push(cg.spawn(&["forks", "1", "--comm", "fl-burst", "--max-failures", "1"]));
        pods.push(cg);
    }
    let reports: Vec<LabReport> = labs.iter_mut().map(Lab::report).collect();
    for lab in labs {
        lab.wait();
    }
    let (events, _) = trace.stop_json();
    for (i, r) in reports.iter().enumerate() {
        assert_eq!((r.created, r.failures), (0, 1), "pod {i}: {r:?}");
        let mine: Vec<&serde_json::Value> = events
            .iter()
            .filter(|e| e["pid"].as_u64() == Some(r.pid))
            .collect();
        assert_eq!(mine.len(), 1, "pod {i}: {events:#?}");
        let e = mine[0];
        let cgroup = format!(
            "/{}",
            pods[i]
                .v2
                .leaf()
                .dir
                .strip_prefix(mount(Hierarchy::Unified).expect("cgroup v2").0)
                .expect("under the v2 mount")
                .display()
        );
        assert_eq!(e["cgroup"], cgroup, "pod {i}: {e}");
        assert_eq!(
            e["workload"],
            format!("burst/burst-{i}/app"),
            "pod {i}: {e}"
        );
        assert_eq!(e["pod"]["uid"], uids[i], "pod {i}: {e}");
        assert_eq!(e["cause"], "pids_limit", "pod {i}: {e}");
    }
}

/// A cgroup 40 levels deep, made after faultline started (a walk stopped at 32 levels):
/// its failure is attributed to its whole path.
#[test]
fn attribution_by_id_names_a_cgroup_deeper_than_32_levels() {
    let (unified, _) = mount(Hierarchy::Unified).expect("cgroup v2 mount");
    let (pids_mount, pids_v2) = mount(Hierarchy::Pids).expect("pids controller");
    let trace = Trace::start(&["--comm", "fl-deep"]);
    let top = unique("deep");
    let levels: Vec<String> = (0..40).map(|i| format!("d{i}")).collect();
    let rel = format!("{top}/{}", levels.join("/"));
    let deep = CgroupTree::new(&unified, &rel);
    // The limit: on the leaf itself on cgroup v2, in a shallow v1 pids cgroup on hybrid hosts.
    let pids = (!pids_v2).then(|| TempCgroup::new(&pids_mount, &top));
    pids.as_ref().unwrap_or(deep.leaf()).write("pids.max", "1");
    let mut args = vec![
        "forks".to_owned(),
        "1".to_owned(),
        "--comm".to_owned(),
        "fl-deep".to_owned(),
        "--max-failures".to_owned(),
        "1".to_owned(),
        "--cgroup".to_owned(),
        deep.leaf().dir.display().to_string(),
    ];
    if let Some(p) = &pids {
        args.extend(["--cgroup".to_owned(), p.dir.display().to_string()]);
    }
    let report = lab(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let (events, _) = trace.stop_json();
    assert_eq!((report.created, report.failures), (0, 1), "{report:?}");
    assert_eq!(events.len(), 1, "{events:#?}");
    let e = &events[0];
    assert_eq!(e["cgroup"], format!("/{rel}"), "{e}");
    assert_eq!(e["cause"], "pids_limit", "{e}");
    if pids.is_none() {
        // The pids cgroup is the same deep one, named by id as well.
        assert_eq!(e["pids_cgroup"], format!("/{rel}"), "{e}");
    }
}
