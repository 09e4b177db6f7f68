//! The man pages: clap_mangen's sections for each command, with the two it does not write,
//! ENVIRONMENT (every flag's variable, and the variables read without a flag) and EXIT STATUS.

use std::{io::Write, path::Path};

use anyhow::Context as _;
use roff::{Roff, bold, roman};

/// Variables read without a flag, and which commands read them.
const UNFLAGGED: &[(&str, &[&str], &str)] = &[
    (
        "KUBECONFIG",
        &["trace", "top", "explain", "run"],
        "A kubeconfig file for the Kubernetes API, which names pods (outside a pod; in a pod \
         its service account is used). Without an API, pods are named from the kubelet's log \
         directories.",
    ),
    (
        "KUBERNETES_SERVICE_HOST",
        &["trace", "top", "explain", "run"],
        "Set in every pod: the in-cluster API is used, with the pod's service account.",
    ),
    (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        &["run"],
        "The OTLP/HTTP collector (--otlp-endpoint wins), with v1/logs and v1/traces appended. \
         The standard OpenTelemetry exporter variables are read too: per signal \
         (OTEL_EXPORTER_OTLP_LOGS_ENDPOINT, ..._TRACES_ENDPOINT) and general or per signal \
         _HEADERS, _COMPRESSION, _PROTOCOL, _TIMEOUT, _CERTIFICATE, _CLIENT_CERTIFICATE and \
         _CLIENT_KEY; OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES over the resource; \
         OTEL_SDK_DISABLED, OTEL_LOGS_EXPORTER and OTEL_TRACES_EXPORTER to turn export off \
         (docs/reference.md, OTLP).",
    ),
    (
        "POD_NAME, POD_NAMESPACE",
        &["run"],
        "The agent's own pod (the downward API sets them in the DaemonSet), on its OTLP \
         resource.",
    ),
];

/// The page of `cmd` (built: a subcommand's title is then `faultline-<name>`) into `out`.
fn render(man: &clap_mangen::Man, cmd: &clap::Command, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    let w: &mut dyn Write = &mut buf;
    // clap_mangen's own sections as its `render` writes them (faultline sets no authors), with
    // the two it lacks before the version.
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(w)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(w)?;
    }
    let mut roff = Roff::new();
    environment(&mut roff, cmd);
    exit_status(&mut roff, cmd.get_name());
    w.write_all(roff.to_roff().as_bytes())?;
    if cmd.get_version().is_some() {
        man.render_version_section(w)?;
    }
    // Each of clap_mangen's sections starts with the same two-line preamble: once is enough.
    let body = String::from_utf8_lossy(&buf).replace(PREAMBLE, "");
    out.write_all(PREAMBLE.as_bytes())?;
    out.write_all(body.as_bytes())?;
    Ok(())
}

/// What roff writes first (how groff is to print an apostrophe).
const PREAMBLE: &str = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";

/// ENVIRONMENT: each argument's variable (the flag it stands for), then the variables this
/// command reads without one.
fn environment(roff: &mut Roff, cmd: &clap::Command) {
    roff.control("SH", ["ENVIRONMENT"]);
    let sub = cmd.get_name();
    let mut any = false;
    for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
        let Some(var) = arg.get_env() else { continue };
        let flag = arg
            .get_long()
            .map_or_else(|| arg.get_id().to_string(), |l| format!("--{l}"));
        roff.control("TP", []);
        roff.text([bold(var.to_string_lossy().into_owned())]);
        let text = match arg.get_help() {
            Some(help) => format!("{flag} (when it is not given): {help}"),
            None => format!("{flag}, when it is not given."),
        };
        roff.text([roman(text)]);
        any = true;
    }
    for (var, commands, text) in UNFLAGGED {
        // The main page lists them all.
        if sub == "faultline" || commands.contains(&sub) {
            roff.control("TP", []);
            roff.text([bold(*var)]);
            roff.text([roman(*text)]);
            any = true;
        }
    }
    if !any {
        roff.text([roman("None read.")]);
    }
}

/// EXIT STATUS, as `main` returns it.
fn exit_status(roff: &mut Roff, sub: &str) {
    roff.control("SH", ["EXIT STATUS"]);
    let success = match sub {
        "check" => "Every feature faultline needs works on this node (warnings aside).",
        "run" => "The daemon stopped cleanly after SIGTERM or SIGINT.",
        "trace" | "top" => "The observation ended (its duration, --once, or SIGINT).",
        "explain" => "A diagnosis was printed, with or without findings.",
        _ => "Success.",
    };
    let failure = match sub {
        "check" => {
            "Something faultline needs is missing; each line says what, its cost and \
                    the remedy."
        }
        _ => "An error, said in one line on stderr.",
    };
    for (code, text) in [
        ("0", success),
        ("1", failure),
        (
            "2",
            "A usage error: an unknown flag or a value that cannot be used (also one given \
             through an environment variable).",
        ),
    ] {
        roff.control("TP", []);
        roff.text([bold(code)]);
        roff.text([roman(text)]);
    }
}

/// The main page on stdout, or with `dir` one page per command there (`faultline.1`,
/// `faultline-trace.1`, ...).
pub fn write(cmd: clap::Command, dir: Option<&Path>) -> anyhow::Result<()> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let Some(dir) = dir else {
        let man = clap_mangen::Man::new(cmd.clone());
        return render(&man, &cmd, &mut std::io::stdout().lock()).context("writing the man page");
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let pages = std::iter::once(&cmd).chain(cmd.get_subcommands().filter(|s| !s.is_hide_set()));
    for page in pages {
        let man = clap_mangen::Man::new(page.clone());
        let path = dir.join(man.get_filename());
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        render(&man, page, &mut file)
            .and_then(|()| file.flush().map_err(Into::into))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
