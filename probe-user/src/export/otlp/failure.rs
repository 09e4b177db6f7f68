//! What a failed export attempt comes to, in words an operator can act on: a TLS failure as
//! rustls says it (which certificate, what is wrong with it, what to do), a client certificate
//! the collector refused, the collector's status with what its body says (bounded and escaped:
//! a collector is not trusted to send printable text), or the transport's error with its
//! causes. And whether retrying alone may heal it.

use std::{error::Error as StdError, fmt, path::PathBuf, time::Duration};

use hyper::StatusCode;
use rustls::{AlertDescription, CertificateError};

use super::config::TlsFiles;

/// The most of a collector's answer read, and the most of it shown.
pub(super) const BODY_READ: usize = 1024;
const BODY_SHOWN: usize = 200;

/// Why one attempt did not deliver its batch.
#[derive(Debug)]
pub(super) enum Failure {
    /// No connection, or it broke: the collector down or restarting, or the network. The
    /// transport's error and its causes.
    Unreachable(String),
    /// No answer within the timeout.
    NoAnswer(Duration),
    /// The collector answered an error status; what its body says, if anything.
    Status {
        status: StatusCode,
        said: Option<String>,
    },
    /// TLS: this side does not accept the collector's certificate.
    ServerCertificate {
        error: CertificateError,
        /// The CA file trusted (`..._CERTIFICATE`); none: the system's CA certificates.
        trusted: Option<PathBuf>,
    },
    /// TLS: the collector refused this side's client certificate, or asked for one.
    ClientCertificate {
        alert: AlertDescription,
        /// The client certificate sent (`..._CLIENT_CERTIFICATE`), if any.
        sent: Option<PathBuf>,
    },
    /// TLS: any other failure, as rustls says it.
    Tls(rustls::Error),
    /// The request could not be made here (compressing its body, building it).
    Local(String),
}

impl Failure {
    /// What a failed request comes to: the rustls error in its causes, if any (the collector's
    /// certificate, or its alert about this side's), else the transport's error.
    pub(super) fn of_request(e: &(dyn StdError + 'static), tls: &TlsFiles) -> Failure {
        let causes = causes(e);
        let found = causes
            .iter()
            .find_map(|c| c.downcast_ref::<rustls::Error>());
        match found {
            Some(rustls::Error::InvalidCertificate(error)) => Failure::ServerCertificate {
                error: error.clone(),
                trusted: tls.certificate.clone(),
            },
            Some(rustls::Error::AlertReceived(alert))
                if about_client_certificate(*alert, tls.client_certificate.is_some()) =>
            {
                Failure::ClientCertificate {
                    alert: *alert,
                    sent: tls.client_certificate.clone(),
                }
            }
            Some(other) => Failure::Tls(other.clone()),
            None => Failure::Unreachable(joined(&causes)),
        }
    }

    /// The collector's answer: its status and what its body says.
    pub(super) fn status(status: StatusCode, content_type: Option<&str>, body: &[u8]) -> Failure {
        Failure::Status {
            status,
            said: said(content_type, body),
        }
    }

    /// Whether retrying alone may heal it (a collector restarting, a network back); a refused
    /// certificate waits for an operator.
    pub(super) fn heals(&self) -> bool {
        match self {
            Failure::Unreachable(_) | Failure::NoAnswer(_) | Failure::Status { .. } => true,
            Failure::ServerCertificate { .. }
            | Failure::ClientCertificate { .. }
            | Failure::Tls(_)
            | Failure::Local(_) => false,
        }
    }

    /// Whether `other` has the same cause (another status, another certificate problem: not).
    pub(super) fn same_cause(&self, other: &Failure) -> bool {
        match (self, other) {
            (Failure::Status { status: a, .. }, Failure::Status { status: b, .. }) => a == b,
            (
                Failure::ServerCertificate { error: a, .. },
                Failure::ServerCertificate { error: b, .. },
            ) => a.to_string() == b.to_string(),
            (
                Failure::ClientCertificate { alert: a, .. },
                Failure::ClientCertificate { alert: b, .. },
            ) => a == b,
            (Failure::Tls(a), Failure::Tls(b)) => a == b,
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Unreachable(why) => write!(f, "unreachable ({why})"),
            Failure::NoAnswer(timeout) => write!(f, "no answer within {timeout:?}"),
            Failure::Status { status, said } => {
                write!(f, "the collector answers {status}")?;
                match said {
                    Some(said) => write!(f, ": \"{said}\""),
                    None => Ok(()),
                }
            }
            Failure::ServerCertificate { error, trusted } => {
                let trusted = match trusted {
                    Some(ca) => format!("the CA certificate in {}", ca.display()),
                    None => "the system's CA certificates".to_owned(),
                };
                write!(
                    f,
                    "TLS: the collector's certificate is refused here (trusting {trusted}): \
                     {} ({}); {}",
                    rustls::Error::InvalidCertificate(error.clone()),
                    meaning(error),
                    remedy(error)
                )
            }
            Failure::ClientCertificate { alert, sent: None } => write!(
                f,
                "TLS: the collector asks for a client certificate and faultline has none: \
                 received fatal alert: {alert:?}; set OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and \
                 OTEL_EXPORTER_OTLP_CLIENT_KEY"
            ),
            Failure::ClientCertificate {
                alert,
                sent: Some(cert),
            } => write!(
                f,
                "TLS: the collector refused faultline's client certificate {}: received fatal \
                 alert: {alert:?} ({}); give faultline a client certificate the collector \
                 trusts (OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and _CLIENT_KEY), or have the \
                 collector trust the CA that signed it",
                cert.display(),
                refusal(*alert)
            ),
            Failure::Tls(e @ rustls::Error::InvalidMessage(_)) => write!(
                f,
                "TLS: {e}; does the collector serve TLS on this port? (http:// for one that \
                 does not)"
            ),
            Failure::Tls(e) => write!(f, "TLS: {e}"),
            Failure::Local(why) => f.write_str(why),
        }
    }
}

/// What a certificate error of rustls means, in words.
fn meaning(error: &CertificateError) -> &'static str {
    use CertificateError as E;
    match error {
        E::UnknownIssuer => "no CA trusted here signed it",
        E::Other(other) => match other.0.downcast_ref::<webpki::Error>() {
            Some(webpki::Error::CaUsedAsEndEntity) => {
                "it is a CA certificate (basicConstraints CA:TRUE, as `openssl req -x509` makes \
                 by default) used as the server's own"
            }
            _ => "the certificate or its chain is unacceptable",
        },
        E::NotValidForName | E::NotValidForNameContext { .. } => {
            "it does not name the host of the endpoint"
        }
        E::Expired | E::ExpiredContext { .. } => "it has expired",
        E::NotValidYet | E::NotValidYetContext { .. } => "it is not valid yet",
        E::Revoked => "it is revoked",
        E::InvalidPurpose | E::InvalidPurposeContext { .. } => {
            "it is not for server authentication"
        }
        E::BadEncoding => "it is not a well-formed certificate",
        E::BadSignature => {
            "its signature does not verify with the key of the CA trusted here under its \
             issuer's name: another CA of the same name signed it"
        }
        _ => "the certificate or its chain is unacceptable",
    }
}

/// What to do about a certificate error of rustls.
fn remedy(error: &CertificateError) -> &'static str {
    use CertificateError as E;
    match error {
        E::UnknownIssuer => {
            "set OTEL_EXPORTER_OTLP_CERTIFICATE to the certificate (PEM) of the CA that signed \
             the collector's"
        }
        E::Other(other)
            if matches!(
                other.0.downcast_ref::<webpki::Error>(),
                Some(webpki::Error::CaUsedAsEndEntity)
            ) =>
        {
            "give the collector a server certificate signed by a CA (with the endpoint's host \
             in its subjectAltName), and that CA's certificate to OTEL_EXPORTER_OTLP_CERTIFICATE"
        }
        E::NotValidForName | E::NotValidForNameContext { .. } => {
            "give the collector a certificate with the endpoint's host in its subjectAltName, \
             or use a name it has in the endpoint"
        }
        E::Expired | E::ExpiredContext { .. } | E::NotValidYet | E::NotValidYetContext { .. } => {
            "renew the collector's certificate, or check this node's clock"
        }
        E::InvalidPurpose | E::InvalidPurposeContext { .. } => {
            "give the collector a certificate whose extendedKeyUsage allows serverAuth"
        }
        E::BadSignature => {
            "set OTEL_EXPORTER_OTLP_CERTIFICATE to the certificate (PEM) of the CA that signed \
             the collector's"
        }
        _ => {
            "check the collector's certificate chain against the CA in \
             OTEL_EXPORTER_OTLP_CERTIFICATE"
        }
    }
}

/// The alerts a collector sends about the client certificate it was given (or not given):
/// with one `sent`, also a signature it could not verify (a CA of the same name but another
/// key signed it: rustls and OpenSSL say `decrypt_error`).
fn about_client_certificate(alert: AlertDescription, sent: bool) -> bool {
    use AlertDescription as A;
    match alert {
        A::BadCertificate
        | A::UnsupportedCertificate
        | A::CertificateRevoked
        | A::CertificateExpired
        | A::CertificateUnknown
        | A::UnknownCA
        | A::AccessDenied
        | A::CertificateRequired => true,
        A::DecryptError => sent,
        _ => false,
    }
}

/// What a collector's alert says about the client certificate, in words.
fn refusal(alert: AlertDescription) -> &'static str {
    use AlertDescription as A;
    match alert {
        A::UnknownCA => "it does not trust the CA that signed it",
        A::CertificateExpired => "it has expired or is not valid yet",
        A::CertificateRevoked => "it is revoked",
        A::AccessDenied => "the collector does not admit this client",
        A::CertificateRequired => "the collector got no certificate",
        A::DecryptError => {
            "a signature of it does not verify: another CA of the name of the one the collector \
             trusts signed it"
        }
        _ => "the collector finds it unacceptable",
    }
}

/// `e` and its causes. An `io::Error`'s own `source()` skips the error it wraps (a rustls
/// error in hyper's), so that one is taken from `get_ref()`.
fn causes<'a>(e: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    let mut out = Vec::new();
    let mut next = Some(e);
    // Bounded: a chain is a few links; a cycle must not hang the sender.
    while let Some(e) = next.filter(|_| out.len() < 16) {
        out.push(e);
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
    }
    out
}

/// The causes' texts joined by `: `, each said once (an `io::Error` shows its wrapped error's
/// text as its own).
fn joined(causes: &[&(dyn StdError + 'static)]) -> String {
    let mut texts: Vec<String> = Vec::with_capacity(causes.len());
    for c in causes {
        let text = c.to_string();
        if !texts.iter().any(|t| t.contains(&text)) {
            texts.push(text);
        }
    }
    texts.join(": ")
}

/// `google.rpc.Status`, the body of an OTLP/HTTP collector's error answers in protobuf.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

/// What a collector's error answer says: the message of its protobuf `Status`, else the body
/// as text; escaped, at most [`BODY_SHOWN`] characters. None for an empty body.
fn said(content_type: Option<&str>, body: &[u8]) -> Option<String> {
    use prost::Message as _;
    let protobuf = content_type.is_some_and(|t| t.starts_with("application/x-protobuf"));
    let text = match RpcStatus::decode(body) {
        Ok(status) if protobuf && !status.message.is_empty() => status.message,
        _ => crate::text::from_bytes(body),
    };
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let shown: String = text.chars().take(BODY_SHOWN).collect();
    let cut = shown.len() < text.len() || body.len() >= BODY_READ;
    let mut out = crate::text::printable(&shown).into_owned();
    if cut {
        out.push_str("...");
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(ca: Option<&str>, client: Option<&str>) -> TlsFiles {
        TlsFiles {
            certificate: ca.map(PathBuf::from),
            client_certificate: client.map(PathBuf::from),
            client_key: client.map(|_| PathBuf::from("/k.pem")),
        }
    }

    /// A rustls error as hyper-rustls hands it over: in an io::Error in an io::Error.
    fn wrapped(e: rustls::Error) -> std::io::Error {
        std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    #[test]
    fn the_rustls_error_is_found_inside_io_errors() {
        let e = wrapped(CertificateError::UnknownIssuer.into());
        let f = Failure::of_request(&e, &files(Some("/etc/ca.pem"), None));
        let text = f.to_string();
        assert!(
            text.starts_with(
                "TLS: the collector's certificate is refused here (trusting the CA certificate \
                 in /etc/ca.pem): invalid peer certificate: UnknownIssuer (no CA trusted here \
                 signed it); set OTEL_EXPORTER_OTLP_CERTIFICATE"
            ),
            "{text}"
        );
        assert!(!f.heals());
        let ca_as_server = CertificateError::Other(rustls::OtherError(std::sync::Arc::new(
            webpki::Error::CaUsedAsEndEntity,
        )));
        let text =
            Failure::of_request(&wrapped(ca_as_server.into()), &files(None, None)).to_string();
        assert!(text.contains("CaUsedAsEndEntity"), "{text}");
        assert!(
            text.contains("trusting the system's CA certificates"),
            "{text}"
        );
        assert!(text.contains("it is a CA certificate"), "{text}");
        assert!(text.contains("signed by a CA"), "{text}");
    }

    #[test]
    fn a_collector_alert_about_the_client_certificate_is_a_refusal() {
        let alert = |a| wrapped(rustls::Error::AlertReceived(a));
        let f = Failure::of_request(
            &alert(AlertDescription::UnknownCA),
            &files(Some("/ca.pem"), Some("/client.pem")),
        );
        let text = f.to_string();
        assert!(
            text.starts_with(
                "TLS: the collector refused faultline's client certificate /client.pem: \
                 received fatal alert: UnknownCA (it does not trust the CA that signed it)"
            ),
            "{text}"
        );
        let f = Failure::of_request(
            &alert(AlertDescription::CertificateRequired),
            &files(None, None),
        );
        assert!(
            f.to_string().contains("asks for a client certificate"),
            "{f}"
        );
        // A signature the collector could not verify, after faultline sent a certificate.
        let f = Failure::of_request(
            &alert(AlertDescription::DecryptError),
            &files(None, Some("/client.pem")),
        );
        assert!(f.to_string().contains("another CA of the name"), "{f}");
        // Another alert is TLS as rustls says it.
        let f = Failure::of_request(
            &alert(AlertDescription::ProtocolVersion),
            &files(None, None),
        );
        assert_eq!(f.to_string(), "TLS: received fatal alert: ProtocolVersion");
    }

    #[test]
    fn a_transport_error_says_each_cause_once() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = std::io::Error::other(refused);
        let f = Failure::of_request(&e, &files(None, None));
        assert_eq!(f.to_string(), "unreachable (connection refused)");
        assert!(f.heals());
    }

    #[test]
    fn bodies_are_bounded_and_escaped() {
        let f = Failure::status(
            StatusCode::BAD_REQUEST,
            Some("text/plain"),
            b"bad\x1b[31m request\n\xff",
        );
        assert_eq!(
            f.to_string(),
            "the collector answers 400 Bad Request: \"bad\\x1b[31m request\\x0a\\xff\""
        );
        let long = "x".repeat(5000);
        let f = Failure::status(StatusCode::BAD_REQUEST, None, &long.as_bytes()[..BODY_READ]);
        let text = f.to_string();
        assert!(text.ends_with("...\""), "{text}");
        assert!(text.len() < BODY_SHOWN + 60, "{text}");
        let f = Failure::status(StatusCode::UNAUTHORIZED, None, b"  ");
        assert_eq!(f.to_string(), "the collector answers 401 Unauthorized");
    }

    #[test]
    fn a_protobuf_status_says_its_message() {
        use prost::Message as _;
        let body = RpcStatus {
            code: 3,
            message: "log record 2 has no\ttime".to_owned(),
        }
        .encode_to_vec();
        let f = Failure::status(
            StatusCode::BAD_REQUEST,
            Some("application/x-protobuf"),
            &body,
        );
        assert_eq!(
            f.to_string(),
            "the collector answers 400 Bad Request: \"log record 2 has no\\x09time\""
        );
    }

    #[test]
    fn causes_compare_by_kind_and_status() {
        let s = |code| Failure::status(StatusCode::from_u16(code).unwrap(), None, b"");
        assert!(s(503).same_cause(&s(503)));
        assert!(!s(503).same_cause(&s(502)));
        assert!(Failure::Unreachable("a".into()).same_cause(&Failure::Unreachable("b".into())));
        assert!(!Failure::Unreachable("a".into()).same_cause(&s(503)));
    }
}
