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

#[test]
fn without_privileges_trace_fails_with_one_line() {
    common::require_root();
    // Not as deployed: faultline as an unprivileged uid (the launcher keeps uid 0).
    // A copy nobody can execute, whatever the permissions of the checkout's directories.
    let dir = std::env::temp_dir().join(common::unique("unprivileged"));
    std::fs::create_dir_all(&dir).expect("creating a temp dir");
    let exe = dir.join("faultline");
    std::fs::copy(&*FAULTLINE, &exe).expect("copying faultline");
    for p in [&dir, &exe] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let out = Command::new(&exe)
        .args(["trace", "--duration", "1s"])
        .uid(65534)
        .gid(65534)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.expect("running faultline as nobody");
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
}
