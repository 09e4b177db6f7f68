//! The command line's contract: usage errors exit 2, runtime errors exit 1 with one line,
//! never a panic; `faultline check` runs and passes on a supported node.
#![allow(clippy::unwrap_used)] // a test fails by panicking: helpers outside #[test] fns unwrap too

mod common;

use std::{
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    process::Command,
};

use common::FAULTLINE;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = common::faultline()
        .args(args)
        .output()
        .expect("running faultline");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_no_panic(stderr: &str) {
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
}

#[test]
fn unknown_flags_and_bad_values_exit_2() {
    for args in [
        &["trace", "--no-such-flag"][..],
        &["trace", "--duration", "10x"],
        &["trace", "--output", "xml"],
        &["trace", "--pid", "abc"],
        &["no-such-command"],
        &[],
    ] {
        let (code, _, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error:") || stderr.contains("Usage:"),
            "{args:?}: {stderr}"
        );
        assert_no_panic(&stderr);
    }
}

#[test]
fn check_reports_each_item_and_passes_here() {
    common::require_root();
    let (code, stdout, stderr) = run(&["check"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    for item in [
        "BTF",
        "tracefs",
        "syscalls:sys_exit_clone3",
        "pids controller",
        "tracepoint programs",
        "raw tracepoint kfree_skb",
        "memlock",
        "cgroup_skb programs",
        "conntrack counters",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(item)),
            "{item} missing:\n{stdout}"
        );
    }
    assert!(
        stdout.ends_with("faultline: failed task creation tracing works on this node\n"),
        "{stdout}"
    );
}

/// faultline as nobody (uid and gid 65534), from a copy nobody can execute, whatever the
/// permissions of the checkout's directories. Not as deployed (the launcher keeps uid 0).
fn as_nobody(args: &[&str]) -> std::process::Output {
    as_nobody_with(&[], args)
}

/// [`as_nobody`] with these environment variables set.
fn as_nobody_with(env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    common::require_root();
    // One copy per call: the tests of this binary run side by side.
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(common::unique(&format!("unprivileged-{n}")));
    std::fs::create_dir_all(&dir).expect("creating a temp dir");
    let exe = dir.join("faultline");
    std::fs::copy(&*FAULTLINE, &exe).expect("copying faultline");
    for p in [&dir, &exe] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let out = Command::new(&exe)
        .args(args)
        .envs(env.iter().copied())
        .uid(65534)
        .gid(65534)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    out.expect("running faultline as nobody")
}

#[test]
fn without_privileges_trace_fails_with_one_line() {
    let out = as_nobody(&["trace", "--duration", "1s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("faultline: error: "), "{stderr}");
    assert!(
        lines[0].contains("needs root") || lines[0].contains("tracefs"),
        "{stderr}"
    );
    assert_no_panic(&stderr);
}

/// `check` as a user who may not read the mounted tracefs says so, not "not mounted".
#[test]
fn check_as_nobody_tells_an_unreadable_tracefs_from_a_missing_one() {
    let out = as_nobody(&["check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("tracefs"))
        .unwrap_or_else(|| panic!("no tracefs line:\n{stdout}"));
    let readable = std::fs::metadata("/sys/kernel/tracing")
        .is_ok_and(|m| m.permissions().mode() & 0o005 == 0o005);
    if !readable {
        assert!(
            line.contains(
                "is mounted at /sys/kernel/tracing but not readable by this user (uid 65534)"
            ) && line.contains("needs root"),
            "{line}"
        );
    }
    assert!(!line.contains("not mounted"), "{line}");
}

/// Flags do what they say: the pod filters exist where there is something to filter (`-n`
/// as kubectl has it), not in `run`; top's interval is `--interval` only.
#[test]
fn pod_filters_and_their_short_flags() {
    for cmd in ["trace", "top", "explain"] {
        let (code, help, _) = run(&[cmd, "--help"]);
        assert_eq!(code, 0);
        assert!(
            help.contains("-n, --namespace <NAMESPACE>"),
            "{cmd}: {help}"
        );
    }
    for flag in ["--namespace", "--pod", "--container"] {
        let (code, _, stderr) = run(&["run", flag, "x"]);
        assert_eq!(code, 2, "run {flag}: {stderr}");
        assert!(stderr.contains("unexpected argument"), "{stderr}");
    }
    let (code, _, stderr) = run(&["top", "--interval", "soon"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("\"soon\" is not a duration (e.g. 30s, 5m, 1h)"),
        "{stderr}"
    );
    let (code, _, stderr) = run(&["run", "--listen", "9847"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("is not an address to listen on"),
        "{stderr}"
    );
}

/// `--events` decides which programs are loaded: a DNS-only trace attaches no clone program
/// (the cgroup naming programs serve every signal's attribution).
#[test]
fn trace_attaches_only_the_programs_of_the_events_asked_for() {
    let trace = common::Trace::start(&["--events", "dns"]);
    let programs = trace.programs();
    let (events, summary) = trace.stop_json();
    assert_eq!(
        programs,
        ["cgroup_mkdir", "cgroup_rmdir", "dns_egress", "dns_ingress"],
        "{programs:?}"
    );
    assert!(
        events.iter().all(|e| e["kind"] != "clone_failure"),
        "{events:#?}"
    );
    assert_eq!(summary["kernel_failures"], 0, "{summary}");
}

/// Zero intervals are usage errors, and a reader that goes away ends a one-shot command
/// quietly (SIGPIPE, as for grep), not with a panic.
#[test]
fn zero_intervals_and_closed_pipes() {
    for args in [
        &["top", "--interval", "0s"][..],
        &["run", "--refresh", "0s"],
    ] {
        let (code, _, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains("longer than zero"), "{stderr}");
    }
    common::require_root();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{} check | head -1", common::faultline_shell()))
        .output()
        .expect("sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_no_panic(&stderr);
    assert!(stderr.is_empty(), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok    kernel"));
}

/// The man page and completions come from the command line's own definition.
#[test]
fn man_page_and_completions() {
    let (code, page, stderr) = run(&["man"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        page.contains(".TH faultline 1") && page.contains("trace"),
        "{page}"
    );
    for (shell, marker) in [
        ("bash", "_faultline()"),
        ("zsh", "#compdef faultline"),
        ("fish", "complete -c faultline"),
    ] {
        let (code, script, stderr) = run(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {stderr}");
        assert!(script.contains(marker), "{shell}: {script}");
    }
    let (_, help, _) = run(&["--help"]);
    assert!(
        help.contains("  completions  ") && help.contains("  man  "),
        "{help}"
    );
    // One page per command, as the main page's SEE ALSO names them; each renders.
    let dir = std::env::temp_dir().join(common::unique("man"));
    let (code, _, stderr) = run(&["man", "--dir", &dir.display().to_string()]);
    assert_eq!(code, 0, "{stderr}");
    let main = std::fs::read_to_string(dir.join("faultline.1")).unwrap();
    for cmd in [
        "trace",
        "explain",
        "top",
        "run",
        "check",
        "completions",
        "man",
    ] {
        let name = format!("faultline-{cmd}");
        // In roff, `-` is written `\-`.
        assert!(main.contains(&format!("faultline\\-{cmd}(1)")), "{main}");
        let page = dir.join(format!("{name}.1"));
        let text = std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{name}.1: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{name}: {text}"
        );
        // What clap_mangen does not write: the variables and the exit codes.
        for section in [".SH ENVIRONMENT", ".SH \"EXIT STATUS\"", "\\fB2\\fR"] {
            assert!(text.contains(section), "{name}: no {section}:\n{text}");
        }
        let rendered = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(&page)
            .output();
        if let Ok(out) = rendered {
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.stderr.is_empty(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let page = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let run_page = page("faultline-run.1");
    for var in [
        "FAULTLINE_REFRESH",
        "FAULTLINE_LOG_LEVEL",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "KUBECONFIG",
    ] {
        assert!(run_page.contains(var), "faultline-run.1 has no {var}");
    }
    assert!(
        !page("faultline-check.1").contains("OTEL_EXPORTER"),
        "check reads no OTLP variable"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `faultline run` that must be refused: its environment, its arguments, what it says.
type Refused<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);

/// `faultline run` checks everything the user typed before anything loads: a listen address
/// that is not this host's or is taken, an events file in a missing directory, a bad OTLP
/// endpoint or OTEL_* value, a missing kubeconfig are each one line and exit 2, as deployed.
/// That it comes before loading: as nobody, who may load nothing, the same line comes, not
/// the missing privileges' (checked first thing when loading).
#[test]
fn run_refuses_what_the_user_typed_before_anything_loads() {
    common::require_root();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = format!("127.0.0.1:{}", busy.local_addr().unwrap().port());
    let free = format!("127.0.0.1:{}", common::free_port());
    let missing = std::env::temp_dir().join(common::unique("no-such-dir"));
    let events = missing.join("events.jsonl").display().to_string();
    let kubeconfig = missing.join("kubeconfig").display().to_string();
    let otlp = "http://127.0.0.1:4318";
    let cases: &[Refused<'_>] = &[
        (
            &[],
            &["--listen", "192.0.2.1:9847"],
            "--listen 192.0.2.1:9847: Cannot assign requested address (os error 99); not an address of this host",
        ),
        (
            &[],
            &["--listen", &busy],
            "Address already in use (os error 98); another process listens there",
        ),
        (
            &[],
            &["--listen", &free, "--events-file", &events],
            &format!("opening the events file {events}: No such file or directory"),
        ),
        (
            &[],
            &["--listen", &free, "--otlp-endpoint", "localhost:4318"],
            "--otlp-endpoint \"localhost:4318\": http:// or https:// expected",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_TIMEOUT", "5s")],
            &["--listen", &free, "--otlp-endpoint", otlp],
            "OTEL_EXPORTER_OTLP_TIMEOUT=5s: milliseconds expected",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_CERTIFICATE", &kubeconfig)],
            &[
                "--listen",
                &free,
                "--otlp-endpoint",
                "https://127.0.0.1:4318",
            ],
            "reading the CA certificate",
        ),
        (
            &[],
            &["--listen", &free, "--kubeconfig", &kubeconfig],
            &format!("reading the kubeconfig {kubeconfig}"),
        ),
    ];
    for (env, args, says) in cases {
        let args = [&["--log-level", "debug", "run"][..], args].concat();
        let out = common::faultline()
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(
            lines[0].starts_with("faultline: error: ") && lines[0].contains(says),
            "{args:?} should say {says:?}: {stderr}"
        );
        let nobody = as_nobody_with(env, &args);
        let said = String::from_utf8_lossy(&nobody.stderr);
        assert_eq!(nobody.status.code(), Some(2), "as nobody, {args:?}: {said}");
        assert!(said.contains(says), "as nobody, {args:?}: {said}");
    }
    // A bad address is clap's usage error.
    let (code, _, stderr) = run(&["run", "--listen", "localhost:9847"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("is not an address to listen on"),
        "{stderr}"
    );
}
