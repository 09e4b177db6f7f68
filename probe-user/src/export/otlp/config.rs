//! Where and how to export, as the specification says: `--otlp-endpoint` and every
//! `OTEL_EXPORTER_OTLP_*` variable, general and per signal; the headers' and resource
//! attributes' lists.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};

/// Where and how to export: from `--otlp-endpoint` and the standard environment variables.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// `None`: the signal is not exported (no endpoint, or its exporter is `none`).
    pub logs: Option<SignalConfig>,
    pub traces: Option<SignalConfig>,
    /// `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME`, applied over faultline's own.
    pub resource: Vec<(String, String)>,
}

/// One signal's collector: its `OTEL_EXPORTER_OTLP_<SIGNAL>_*` variables over the general ones.
#[derive(Clone, Debug)]
pub struct SignalConfig {
    pub uri: hyper::Uri,
    /// `..._HEADERS`: extra request headers (e.g. an API key).
    pub headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
    pub gzip: bool,
    pub timeout: Duration,
    pub tls: TlsFiles,
}

/// `..._CERTIFICATE`, `..._CLIENT_CERTIFICATE`, `..._CLIENT_KEY`: PEM files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub certificate: Option<PathBuf>,
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl OtlpConfig {
    /// `None` when nothing is to be exported. `endpoint` (the flag) wins over
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (to which `v1/logs`, `v1/traces` are appended); the
    /// per-signal endpoints are used as they are, and each per-signal variable wins over its
    /// general one. `OTEL_SDK_DISABLED=true` or `OTEL_LOGS_EXPORTER` / `OTEL_TRACES_EXPORTER=none` turn export off.
    pub fn from_env(
        endpoint: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        let var = |name: &str| {
            env(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        // With where it came from, for errors.
        let base = endpoint
            .map(|e| ("--otlp-endpoint".to_owned(), e.trim().to_owned()))
            .or_else(|| {
                let name = "OTEL_EXPORTER_OTLP_ENDPOINT";
                var(name).map(|v| (name.to_owned(), v))
            });
        let signal = |signal: &str, path: &str| -> anyhow::Result<Option<SignalConfig>> {
            let exporter = format!("OTEL_{signal}_EXPORTER");
            match var(&exporter).as_deref() {
                None | Some("otlp") => {}
                Some("none") => return Ok(None),
                Some(other) => bail!("{exporter}={other}: otlp or none"),
            }
            // The per-signal variable, else the general one; with its name for errors.
            let get = |key: &str| {
                let own = format!("OTEL_EXPORTER_OTLP_{signal}_{key}");
                let general = format!("OTEL_EXPORTER_OTLP_{key}");
                var(&own)
                    .map(|v| (own, v))
                    .or_else(|| var(&general).map(|v| (general, v)))
            };
            let own_endpoint = format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT");
            let (source, given, url) = match (var(&own_endpoint), &base) {
                (Some(url), _) => (own_endpoint, url.clone(), url),
                (None, Some((source, base))) => (
                    source.clone(),
                    base.clone(),
                    format!("{}/{path}", base.trim_end_matches('/')),
                ),
                (None, None) => return Ok(None),
            };
            if let Some((name, p)) = get("PROTOCOL")
                && p != "http/protobuf"
            {
                bail!("{name}={p}: only http/protobuf is supported");
            }
            if !url.starts_with("http://") && !url.starts_with("https://") {
                bail!("{source} {given:?}: http:// or https:// expected");
            }
            let uri: hyper::Uri = url
                .parse()
                .with_context(|| format!("{source} {given:?} is not a URL"))?;
            if uri.host().is_none_or(str::is_empty) {
                bail!("{source} {given:?}: no host");
            }
            let gzip = match get("COMPRESSION") {
                None => false,
                Some((_, c)) if c == "none" => false,
                Some((_, c)) if c == "gzip" => true,
                Some((name, c)) => bail!("{name}={c}: gzip or none"),
            };
            let timeout = match get("TIMEOUT") {
                None => Duration::from_secs(10),
                Some((name, ms)) => match ms.parse::<u64>() {
                    Ok(0) => bail!("{name}={ms}: more than 0 milliseconds expected"),
                    Ok(ms) => Duration::from_millis(ms),
                    Err(_) => bail!("{name}={ms}: milliseconds expected"),
                },
            };
            let headers = match get("HEADERS") {
                None => Vec::new(),
                Some((name, list)) => headers(&list).with_context(|| name.clone())?,
            };
            let file = |key: &str| get(key).map(|(_, path)| PathBuf::from(path));
            let tls = TlsFiles {
                certificate: file("CERTIFICATE"),
                client_certificate: file("CLIENT_CERTIFICATE"),
                client_key: file("CLIENT_KEY"),
            };
            if tls.client_certificate.is_some() != tls.client_key.is_some() {
                bail!(
                    "OTLP {path}: OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and _CLIENT_KEY go together"
                );
            }
            Ok(Some(SignalConfig {
                uri,
                headers,
                gzip,
                timeout,
                tls,
            }))
        };
        let (logs, traces) = (signal("LOGS", "v1/logs")?, signal("TRACES", "v1/traces")?);
        if logs.is_none() && traces.is_none() {
            return Ok(None);
        }
        let mut resource = pairs(var("OTEL_RESOURCE_ATTRIBUTES").as_deref());
        if let Some(name) = var("OTEL_SERVICE_NAME") {
            resource.push(("service.name".to_owned(), name));
        }
        Ok(Some(OtlpConfig {
            logs,
            traces,
            resource,
        }))
    }

    /// Which signals go where, for the log at the start.
    pub fn describe(&self) -> String {
        let one = |name: &str, s: &Option<SignalConfig>| match s {
            Some(s) => format!("{name} to {}", s.uri),
            None => format!("{name} not exported"),
        };
        format!(
            "OTLP: {}; {}",
            one("logs", &self.logs),
            one("traces", &self.traces)
        )
    }
}

/// The spec's header list: `key=value` items separated by commas, values percent-decoded;
/// an item that is not `key=value` or not a valid header is an error naming it.
pub(super) fn headers(
    list: &str,
) -> anyhow::Result<Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>> {
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((k, v)) = item.split_once('=').filter(|(k, _)| !k.trim().is_empty()) else {
            bail!("header {item:?} is not key=value");
        };
        let k = k.trim();
        out.push((
            k.parse()
                .with_context(|| format!("bad header name {k:?}"))?,
            percent_decode(v.trim())
                .parse()
                .with_context(|| format!("bad value for header {k}"))?,
        ));
    }
    Ok(out)
}

/// `k=v,k2=v2` (the W3C baggage form the OTEL_* variables use), values percent-decoded;
/// malformed items are skipped.
pub(super) fn pairs(list: Option<&str>) -> Vec<(String, String)> {
    list.unwrap_or_default()
        .split(',')
        .filter_map(|item| {
            let (k, v) = item.split_once('=')?;
            let k = k.trim();
            (!k.is_empty()).then(|| (k.to_owned(), percent_decode(v.trim())))
        })
        .collect()
}

/// `%XX` decoded (as OTEL_EXPORTER_OTLP_HEADERS and OTEL_RESOURCE_ATTRIBUTES values are); a
/// `%` without two hex digits stays as it is, bytes that are not UTF-8 become U+FFFD.
pub(super) fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::super::{Resources, records::Subject};
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn the_standard_variables_configure_the_exporter() {
        assert!(OtlpConfig::from_env(None, env(&[])).unwrap().is_none());
        let c = OtlpConfig::from_env(
            None,
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "https://tempo:4318/v1/traces",
                ),
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=a%20b, x-b = c "),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/ca.pem"),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "deployment.environment=prod,k8s.cluster.name=eu-1",
                ),
                ("OTEL_SERVICE_NAME", "faultline-eu"),
            ]),
        )
        .unwrap()
        .unwrap();
        let (logs, traces) = (c.logs.clone().unwrap(), c.traces.clone().unwrap());
        assert_eq!(logs.uri, "http://collector:4318/v1/logs");
        assert_eq!(traces.uri, "https://tempo:4318/v1/traces");
        for s in [&logs, &traces] {
            assert_eq!(s.headers.len(), 2);
            assert_eq!(s.headers[0].1, "a b");
            assert_eq!(s.headers[1].0, "x-b");
            assert_eq!(s.headers[1].1, "c");
            assert!(s.gzip);
            assert_eq!(s.timeout, Duration::from_millis(2500));
            assert_eq!(s.tls.certificate.as_deref(), Some("/ca.pem".as_ref()));
        }
        let r = Resources::new("node-1", &c.resource).of(&Subject::Node);
        let get = |k: &str| {
            r.attributes
                .iter()
                .filter(|a| a.key == k)
                .map(|a| format!("{:?}", a.value))
                .collect::<Vec<_>>()
        };
        assert_eq!(get("service.name").len(), 1, "one service.name");
        assert!(get("service.name")[0].contains("faultline-eu"));
        assert!(get("k8s.node.name")[0].contains("node-1"));
        assert!(get("k8s.cluster.name")[0].contains("eu-1"));
        // The flag wins over the variable.
        let c = OtlpConfig::from_env(
            Some("http://local:4318"),
            env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://other:4318")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.logs.unwrap().uri, "http://local:4318/v1/logs");
    }

    #[test]
    fn a_signal_without_an_endpoint_is_not_exported() {
        let c = OtlpConfig::from_env(
            None,
            env(&[(
                "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
                "http://loki:3100/otlp/v1/logs",
            )]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            c.logs.as_ref().unwrap().uri,
            "http://loki:3100/otlp/v1/logs"
        );
        assert!(c.traces.is_none());
        assert_eq!(
            c.describe(),
            "OTLP: logs to http://loki:3100/otlp/v1/logs; traces not exported"
        );
        let c = OtlpConfig::from_env(
            None,
            env(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://tempo:4318/v1/traces",
            )]),
        )
        .unwrap()
        .unwrap();
        assert!(c.logs.is_none() && c.traces.is_some());
    }

    #[test]
    fn per_signal_variables_win_over_the_general_ones() {
        let c = OtlpConfig::from_env(
            Some("http://c:4318"),
            env(&[
                ("OTEL_EXPORTER_OTLP_HEADERS", "a=general"),
                ("OTEL_EXPORTER_OTLP_LOGS_HEADERS", "a=logs"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
                ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "none"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
                ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "300"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", "/c.pem"),
                ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "/k.pem"),
            ]),
        )
        .unwrap()
        .unwrap();
        let (logs, traces) = (c.logs.unwrap(), c.traces.unwrap());
        assert_eq!(logs.headers[0].1, "logs");
        assert_eq!(traces.headers[0].1, "general");
        assert!(logs.gzip && !traces.gzip);
        assert_eq!(logs.timeout, Duration::from_millis(1000));
        assert_eq!(traces.timeout, Duration::from_millis(300));
        assert_eq!(logs.tls, TlsFiles::default());
        assert_eq!(traces.tls.client_key.as_deref(), Some("/k.pem".as_ref()));
    }

    #[test]
    fn export_can_be_turned_off() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        for off in [("OTEL_SDK_DISABLED", "true"), ("OTEL_SDK_DISABLED", "TRUE")] {
            assert!(
                OtlpConfig::from_env(None, env(&[endpoint, off]))
                    .unwrap()
                    .is_none()
            );
        }
        let c = OtlpConfig::from_env(
            None,
            env(&[
                endpoint,
                ("OTEL_SDK_DISABLED", "false"),
                ("OTEL_TRACES_EXPORTER", "none"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert!(c.logs.is_some() && c.traces.is_none());
        let both_off = [
            endpoint,
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_LOGS_EXPORTER", "none"),
        ];
        assert!(
            OtlpConfig::from_env(None, env(&both_off))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_bad_flag_is_named_as_the_flag() {
        let e = |endpoint| {
            OtlpConfig::from_env(Some(endpoint), env(&[]))
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default()
        };
        assert_eq!(
            e("localhost:4318"),
            "--otlp-endpoint \"localhost:4318\": http:// or https:// expected"
        );
        assert!(e("http://").starts_with("--otlp-endpoint \"http://\""));
    }

    #[test]
    fn unsupported_settings_are_one_line_errors() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        for (vars, says) in [
            (
                vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://c:4318")],
                "OTEL_EXPORTER_OTLP_ENDPOINT \"ftp://c:4318\": http:// or https:// expected",
            ),
            (
                vec![("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://a b/v1/logs")],
                "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT \"http://a b/v1/logs\" is not a URL",
            ),
            (
                vec![endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc",
            ),
            (
                vec![endpoint, ("OTEL_EXPORTER_OTLP_LOGS_COMPRESSION", "zstd")],
                "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION=zstd",
            ),
            (
                vec![endpoint, ("OTEL_EXPORTER_OTLP_TIMEOUT", "5s")],
                "OTEL_EXPORTER_OTLP_TIMEOUT=5s: milliseconds expected",
            ),
            (
                vec![endpoint, ("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT", "0")],
                "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT=0: more than 0 milliseconds expected",
            ),
            (
                vec![endpoint, ("OTEL_EXPORTER_OTLP_HEADERS", "a=1,bad")],
                "\"bad\" is not key=value",
            ),
            (
                vec![endpoint, ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "a b=1")],
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            ),
            (
                vec![endpoint, ("OTEL_LOGS_EXPORTER", "console")],
                "OTEL_LOGS_EXPORTER=console",
            ),
            (
                vec![endpoint, ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/k.pem")],
                "go together",
            ),
        ] {
            let e = format!("{:#}", OtlpConfig::from_env(None, env(&vars)).unwrap_err());
            assert!(!e.contains('\n'), "{e}");
            assert!(e.contains(says), "{e} should say {says}");
        }
    }
}
