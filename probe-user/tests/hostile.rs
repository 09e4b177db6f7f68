//! The daemon and the CLI against a hostile node: every pod can reach the metrics port, name
//! its processes and cgroups as it likes and stall whatever reads faultline's output, and
//! every user of the node can plant links and FIFOs in a shared directory and send signals.
//! Each test is an attack (bounded in count and time, on loopback only) and asserts that
//! faultline stays up, keeps answering and says what it shed or refused. Root only.
#![allow(clippy::unwrap_used)] // a test fails by panicking: helpers outside #[test] fns unwrap too

mod common;

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{events_api::*, *};
use serde_json::json;

/// Storms fill every faultline's ring buffers on the node: one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const CID: &str = "a0a00c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";

fn pod_uid(tag: u32) -> String {
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        std::process::id(),
        0x300 + tag
    )
}

/// The value of one exact series (`name{labels}`) in an exposition, if present.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

fn alive(daemon: &mut Daemon) {
    assert!(
        daemon
            .child
            .try_wait()
            .expect("waiting on faultline")
            .is_none(),
        "faultline run exited"
    );
}

#[test]
fn eleven_hundred_idle_connections_under_a_1024_fd_limit() {
    let _serial = serial();
    // This process holds its side of the attack: the daemon's own helper raises its limit.
    probe_user::export::serve::raise_fd_limit();
    let mut daemon =
        Daemon::start_with(&["prlimit", "--nofile=1024:1024", "--"], &[], Stdio::null());
    // A pod's worth of idle connections, held open, from a peer of its own.
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while held.len() < 1100 && Instant::now() < deadline {
        if let Some(c) = connect_from(
            Ipv4Addr::new(127, 0, 0, 2),
            Ipv4Addr::LOCALHOST,
            daemon.port,
            None,
        ) {
            held.push(c);
        }
    }
    assert_eq!(held.len(), 1100, "the attack itself could not connect");
    // The kubelet's probe and Prometheus, from another address, are still served at once.
    healthz_answers(&daemon);
    let metrics = daemon.metrics();
    // Past its 16, each new connection of the peer cost it its own oldest.
    let shed = sample(
        &metrics,
        "faultline_http_shed_connections_total{reason=\"peer_full\"}",
    )
    .unwrap_or(0.0);
    assert!(shed >= 1000.0, "shed {shed}\n{metrics}");
    // The refresh goes on: 200 new threads show in the node's count.
    let threads = |d: &Daemon| sample(&d.metrics(), "faultline_node_threads").unwrap_or(0.0);
    let before = threads(&daemon);
    let mut lab = Lab::spawn(&[
        "threads",
        "200",
        "--comm",
        "fl-hostile",
        "--hold-ms",
        "20000",
    ]);
    let report = lab.report();
    assert_eq!(report.created, 200, "{report:?}");
    eventually(
        Duration::from_secs(10),
        "the refresh to count 200 more threads",
        || (threads(&daemon) >= before + 150.0).then_some(()),
    );
    assert_eq!(
        sample(&daemon.metrics(), "faultline_refresh_errors_total"),
        Some(0.0)
    );
    alive(&mut daemon);
    drop(lab);
    drop(held);
    let (status, stderr, _) = daemon.terminate();
    assert!(status.success(), "exit {status}: {stderr}");
}

#[test]
fn silent_and_half_requests_are_cut_off() {
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let mut silent = connect_from(
        Ipv4Addr::new(127, 0, 0, 3),
        Ipv4Addr::LOCALHOST,
        daemon.port,
        None,
    )
    .expect("connect");
    let mut half = connect_from(
        Ipv4Addr::new(127, 0, 0, 3),
        Ipv4Addr::LOCALHOST,
        daemon.port,
        None,
    )
    .expect("connect");
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .expect("half a request");
    for (what, conn) in [("silent", &mut silent), ("half", &mut half)] {
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let start = Instant::now();
        let mut buf = [0u8; 512];
        // The server closes (0 bytes, or a 408 first then a close).
        let mut total = 0;
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(e) => panic!("{what}: not closed by the server within 20 s: {e}"),
            }
            assert!(total < 4096, "{what}: a response to half a request");
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{what}: closed only after {:?}",
            start.elapsed()
        );
    }
    healthz_answers(&daemon);
}

#[test]
fn only_get_and_head_are_served() {
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let mut conn = TcpStream::connect(("127.0.0.1", daemon.port)).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            conn,
            "{method} /metrics HTTP/1.0\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )
        .expect("request");
        let mut text = String::new();
        let _ = conn.read_to_string(&mut text);
        assert!(text.starts_with("HTTP/1.0 405 "), "{method}: {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("\r\nallow: get, head\r\n"),
            "{method}: {text}"
        );
    }
    let mut conn = TcpStream::connect(("127.0.0.1", daemon.port)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(conn, "HEAD /healthz HTTP/1.0\r\nHost: x\r\n\r\n").expect("request");
    let mut text = String::new();
    let _ = conn.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.0 200 "), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "HEAD has no body: {text:?}");
}

/// Clone failures as fast as a pids limit of 4 refuses them, for up to `n` attempts.
fn storm(tag: u32, n: &str) -> (PodCgroup, Lab) {
    let cg = PodCgroup::systemd(&unique("hostile"), &pod_uid(tag), CID, 4);
    let lab = cg.spawn(&["threads", n, "--comm", "fl-storm", "--max-failures", n]);
    (cg, lab)
}

#[test]
fn a_stalled_stdout_reader_costs_dropped_lines_not_a_stalled_daemon() {
    let _serial = serial();
    // stdout is a pipe nobody reads: it fills after ~64 KiB, about a hundred lines (the
    // event budget lifted: a line per failure).
    // Departures: a line for every event (the budget is tested apart).
    let mut daemon = Daemon::start_with(&[], NO_BUDGET, Stdio::piped());
    let (_cg, lab) = storm(1, "30000");
    lab.finish();
    healthz_answers(&daemon);
    let dropped = eventually(Duration::from_secs(10), "dropped event lines", || {
        sample(
            &daemon.metrics(),
            "faultline_event_lines_dropped_total{reason=\"queue_full\"}",
        )
        .filter(|v| *v > 0.0)
    });
    eprintln!("{dropped} event lines dropped while stdout was stalled");
    alive(&mut daemon);
    let (status, stderr, secs) = daemon.terminate();
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(
        secs < 10.0,
        "a stalled stdout held the exit for {secs:.1} s"
    );
}

#[test]
fn a_closed_stdout_ends_event_lines_not_the_daemon() {
    let _serial = serial();
    // Departures: a line for every event (the budget is tested apart).
    let mut daemon = Daemon::start_with(&[], NO_BUDGET, Stdio::piped());
    drop(daemon.child.stdout.take());
    let (_cg, lab) = storm(2, "200");
    lab.finish();
    eventually(
        Duration::from_secs(10),
        "lines dropped on the closed pipe",
        || {
            sample(
                &daemon.metrics(),
                "faultline_event_lines_dropped_total{reason=\"closed\"}",
            )
            .filter(|v| *v > 0.0)
        },
    );
    healthz_answers(&daemon);
    alive(&mut daemon);
    let (status, stderr, _) = daemon.terminate();
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(stderr.contains("stdout was closed"), "{stderr}");
}

#[test]
fn a_hostile_process_name_prints_escaped_on_one_line() {
    let _serial = serial();
    // 15 bytes, the most a comm holds: a newline, clear-screen and colour escapes.
    let hostile = "a\n\x1b[2J\x1b[31mFAK";
    let trace = Trace::start_with_output("table", &["--comm", hostile]);
    let report = lab(&[
        "forks",
        "3",
        "--comm",
        hostile,
        "--dead-pidns",
        "--max-failures",
        "1",
    ]);
    assert_eq!(report.failures, 1, "{report:?}");
    let (lines, _) = trace.stop();
    let escaped = "a\\x0a\\x1b[2J\\x1b[31mFAK";
    let rows: Vec<&String> = lines.iter().filter(|l| l.contains(escaped)).collect();
    // The event row, and the summary's "by comm" line.
    assert_eq!(rows.len(), 2, "{lines:#?}");
    assert!(rows[0].contains(" pidns_dead "), "{lines:#?}");
    for line in &lines {
        assert!(
            !line.chars().any(char::is_control),
            "a raw control character reached the table: {line:?}"
        );
    }
}

#[test]
fn sigkill_leaves_no_program_attached() {
    let _serial = serial();
    let mut daemon = Daemon::start(&[]);
    let pid = daemon.child.id();
    let ids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("fdinfo")
        .flatten()
        .filter_map(|fd| std::fs::read_to_string(fd.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .map(|v| v.trim().to_owned())
        })
        .collect();
    assert!(ids.len() >= 9, "programs held: {ids:?}");
    daemon.child.kill().expect("SIGKILL");
    let _ = daemon.child.wait();
    for id in ids {
        eventually(
            Duration::from_secs(10),
            "the kernel to free the program",
            || {
                let out = Command::new("bpftool")
                    .args(["prog", "show", "id", &id])
                    .output()
                    .expect("bpftool");
                (!out.status.success()).then_some(())
            },
        );
    }
}

/// `/explain` from a pod: bad windows (past the history's hour included) are a 400 whose text
/// cannot drive a terminal, and asking in a loop (2,000 requests) is answered from
/// one report a second while the daemon keeps counting events.
#[test]
fn explain_in_a_loop_or_with_garbage_stays_cheap_and_safe() {
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    for bad in [
        "since=soon",
        "since=%1b%5b2J",
        "since=-5m",
        "since=",
        "since=0s",
        "since=99999h",
    ] {
        let (status, body) = http_get(daemon.port, &format!("/explain?{bad}")).expect("GET");
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(!body.chars().any(|c| c == '\u{1b}'), "{bad}: {body:?}");
        assert!(!body.contains("\\x0a"), "{bad}: {body:?}");
    }
    let (status, body) = http_get(daemon.port, "/explain?since=1h").expect("GET");
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).expect("a report");
    assert!(
        report["window_s"].as_f64().is_some_and(|w| w <= 3600.0),
        "{report}"
    );
    // 2,000 requests from 4 clients would be as many reports; the answers are reused, and
    // the failures a storm makes meanwhile are still counted.
    let (_cg, storm_lab) = storm(40, "300");
    let started = Instant::now();
    let hammer: Vec<_> = (0..4)
        .map(|_| {
            let port = daemon.port;
            std::thread::spawn(move || {
                (0..500)
                    .filter(|_| http_get(port, "/explain").is_some_and(|(s, _)| s == 200))
                    .count()
            })
        })
        .collect();
    let answered: usize = hammer.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    storm_lab.wait();
    assert_eq!(answered, 2000, "in {:?}", started.elapsed());
    healthz_answers(&daemon);
    eventually(
        Duration::from_secs(20),
        "the storm's failures counted",
        || {
            daemon
                .metrics()
                .lines()
                .any(|l| {
                    l.starts_with("faultline_clone_failures_total{")
                        && l.contains(r#"cause="pids_limit""#)
                        && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) >= Some(1.0)
                })
                .then_some(())
        },
    );
}

/// A sticky, world-writable directory of the test's, as /tmp is; removed on drop.
struct SharedDir(PathBuf);

impl SharedDir {
    fn new(name: &str) -> SharedDir {
        let dir = std::env::temp_dir().join(unique(name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        SharedDir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mkfifo(path: &Path) {
    sh(&format!("mkfifo -m 600 '{}'", path.display()));
}

/// `faultline run --events-file <path>`, which must refuse to start: exit 2 and one line that
/// says `says`, within seconds (a FIFO would hang an open that waits for a reader).
fn refused_events_file(path: &Path, says: &str) {
    let path = path.display().to_string();
    // Departures: events-file: the path under test.
    let (code, lines) = Daemon::refused(&["--events-file", &path], Duration::from_secs(30));
    assert_eq!(code, Some(2), "{path}: {lines:#?}");
    assert_eq!(lines.len(), 1, "{path}: {lines:#?}");
    assert!(
        lines[0].contains(&format!("opening the events file {path}: {says}")),
        "{path} should say {says:?}: {lines:#?}"
    );
}

/// Another user's symbolic link at the events file's path, in a sticky world-writable
/// directory, naming a file only root may write: refused, whether the kernel protects such
/// links (`fs.protected_symlinks=1`, the default) or not (0), and the file is untouched. A
/// root's own link is refused too (faultline follows none), and so is a FIFO, without a
/// reader (which would hang the start) or with one (which would read every line).
#[test]
fn an_events_file_that_is_a_link_or_a_fifo_is_refused_at_start() {
    let _serial = serial();
    let dir = SharedDir::new("events-refused");
    let secret = dir.join("root-only");
    std::fs::write(&secret, "root's own\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let planted = dir.join("events.jsonl");
    std::os::unix::fs::symlink(&secret, &planted).unwrap();
    std::os::unix::fs::lchown(&planted, Some(65534), Some(65534)).unwrap();
    for protected in ["0", "1"] {
        let _sysctl = SysctlGuard::set("/proc/sys/fs/protected_symlinks", protected);
        refused_events_file(
            &planted,
            "a symbolic link (owned by uid 65534), which faultline does not follow: name the file itself",
        );
        assert_eq!(
            std::fs::read_to_string(&secret).unwrap(),
            "root's own\n",
            "protected_symlinks={protected}"
        );
    }
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o600);

    let own = dir.join("root-link.jsonl");
    std::os::unix::fs::symlink(&secret, &own).unwrap();
    refused_events_file(&own, "a symbolic link (owned by uid 0)");

    let fifo = dir.join("fifo.jsonl");
    mkfifo(&fifo);
    refused_events_file(&fifo, "a FIFO, not a regular file");
    let _reader = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    refused_events_file(&fifo, "a FIFO, not a regular file");
}

/// The events file faultline creates is its own (0600). After SIGHUP a FIFO in its place is
/// refused, said once however often SIGHUP comes, and the lines meanwhile are counted as
/// dropped while the daemon goes on; once a file can be made there again, lines go to it.
#[test]
fn a_fifo_in_place_of_the_events_file_after_sighup_is_said_once_and_counted() {
    let _serial = serial();
    let dir = SharedDir::new("events-reopen");
    let events = dir.join("events.jsonl");
    // Departures: events-file: the event lines under test, in a file.
    let mut daemon = Daemon::start(&["--events-file", &events.display().to_string()]);
    let log = daemon.stderr_lines();
    let mode = std::fs::metadata(&events).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o600, "created {mode:o}");

    std::fs::rename(&events, dir.join("events.jsonl.1")).unwrap();
    mkfifo(&events);
    for _ in 0..2 {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(daemon.child.id() as i32, libc::SIGHUP) };
        std::thread::sleep(Duration::from_secs(1));
    }
    let refusal = |l: &str| l.contains("a FIFO, not a regular file");
    let said = line_within(
        &log,
        Duration::from_secs(10 * pace()),
        "the refusal",
        refusal,
    );
    assert!(
        said.starts_with("WARN ") && said.contains("reason=\"reopen_failed\""),
        "{said}"
    );
    {
        let (_cg, lab) = storm(60, "20");
        lab.finish();
    }
    eventually(
        Duration::from_secs(10 * pace()),
        "lines counted as dropped",
        || {
            sample(
                &daemon.metrics(),
                "faultline_event_lines_dropped_total{reason=\"reopen_failed\"}",
            )
            .filter(|v| *v > 0.0)
        },
    );
    healthz_answers(&daemon);
    alive(&mut daemon);
    let again: Vec<String> = log.try_iter().filter(|l| refusal(l)).collect();
    assert!(again.is_empty(), "said more than once: {again:#?}");

    std::fs::remove_file(&events).unwrap();
    line_within(
        &log,
        Duration::from_secs(10 * pace()),
        "the file back",
        |l| l.contains("writing event lines to the events file again"),
    );
    let (_cg, lab) = storm(61, "20");
    lab.finish();
    eventually(
        Duration::from_secs(20 * pace()),
        "lines in the new file",
        || {
            std::fs::read_to_string(&events)
                .ok()
                .filter(|t| t.contains("fl-storm"))
        },
    );
    assert!(std::fs::metadata(&events).unwrap().is_file());
    let (status, _, _) = daemon.terminate();
    assert!(status.success(), "exit {status}");
}

/// Signals faultline has no use for, whose default action would end it: the daemon ignores
/// them and keeps serving, each sent a few times; SIGTERM still stops it as before.
#[test]
fn signals_it_does_not_use_leave_the_daemon_serving() {
    let _serial = serial();
    let mut daemon = Daemon::start(&[]);
    for (signal, name) in [
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGALRM, "SIGALRM"),
        (libc::SIGVTALRM, "SIGVTALRM"),
        (libc::SIGPROF, "SIGPROF"),
        (libc::SIGIO, "SIGIO"),
    ] {
        for _ in 0..3 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(daemon.child.id() as i32, signal) };
        }
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            daemon.child.try_wait().unwrap().is_none(),
            "{name} ended faultline run"
        );
        healthz_answers(&daemon);
    }
    let (status, stderr, _) = daemon.terminate();
    assert!(status.success(), "exit {status}: {stderr}");
}

/// The container of the Event test's pod.
const CID_EVENT: &str = "a1a10c6b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f";

/// A pod's process name (a colour escape, a BEL, the line and paragraph separators) and the
/// name of a cgroup above it (a terminal link, OSC 8, and the separators) reach the note of a
/// Kubernetes Event, which `kubectl describe` and `kubectl get events` print: escaped there as
/// everywhere else.
#[test]
fn a_kubernetes_event_note_carries_what_a_pod_names_escaped() {
    let _serial = serial();
    let uid = pod_uid(70);
    let api = StandIn::start(pod("cart-h", &uid, CID_EVENT));
    let config = kubeconfig(api.port);
    let logs = KubeletLogs::new(&[("shop", "cart-h", &uid, "app", CID_EVENT)]);
    // Departures: kubeconfig: the stand-in API that records the Events; kubelet-logs: the
    // test's pods named by kubelet log directories of its own; node-name: the stand-in's node.
    let daemon = Daemon::start(&[
        "--kubeconfig",
        &config.path().display().to_string(),
        "--kubelet-logs",
        &logs.arg(),
        "--node-name",
        "node-1",
    ]);
    let link = "\x1b]8;;mailto:ops@evil.example\x07click\x1b]8;;\x07\u{2028}FAKE\u{2029}";
    let cg = PodCgroup::systemd(
        &format!("{}{link}", unique("hostile-link")),
        &uid,
        CID_EVENT,
        4,
    );
    let comm = "k\x1b[31m\x07\u{2028}\u{2029}";
    let report = cg.lab(&["threads", "8", "--comm", comm, "--max-failures", "1"]);
    assert_eq!(report.failures, 1, "{report:?}");
    let (_, _, event) = eventually(Duration::from_secs(20 * pace()), "the Event", || {
        api.events()
            .into_iter()
            .find(|(m, _, b)| m == "POST" && b["regarding"]["uid"] == json!(uid))
    });
    let note = event["note"].as_str().unwrap();
    assert!(
        !note
            .chars()
            .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')),
        "{note:?}"
    );
    for escaped in [
        "to k\\x1b[31m\\x07\\u{2028}\\u{2029} (pid ",
        "\\x1b]8;;mailto:ops@evil.example\\x07click\\x1b]8;;\\x07\\u{2028}FAKE\\u{2029}/kubepods.slice/",
    ] {
        assert!(note.contains(escaped), "{escaped} in {note:?}");
    }
    healthz_answers(&daemon);
}
