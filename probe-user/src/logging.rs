//! faultline's own messages (not its events): one facade, `tracing`, with levels. Plain for
//! people, `faultline: <message>` on stderr (errors as `faultline: error: ...`), or one JSON
//! object per line for a log pipeline (`--log-format json`, the DaemonSet's setting).

use std::fmt;

use clap::ValueEnum;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    filter::{LevelFilter, Targets},
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    layer::SubscriberExt as _,
    registry::LookupSpan,
    util::SubscriberInitExt as _,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `faultline: <message>` lines.
    Plain,
    /// One JSON object per line: timestamp, level, message, target.
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

impl LogLevel {
    fn level(self) -> Level {
        match self {
            LogLevel::Error => Level::ERROR,
            LogLevel::Warn => Level::WARN,
            LogLevel::Info => Level::INFO,
            LogLevel::Debug => Level::DEBUG,
        }
    }
}

/// Targets whose records never reach the output: kube's crates (a prefix: kube_client,
/// kube_runtime), whose client logs every failed request at ERROR (8 lines in 10 s while the
/// API is unreachable); `attribution::kubeapi` says the API's state itself, once per change.
const QUIET_TARGET: &str = "kube";

/// Installs the subscriber for the whole process (once; later calls change nothing).
pub fn init(format: LogFormat, level: LogLevel) {
    let targets = Targets::new()
        .with_default(level.level())
        .with_target(QUIET_TARGET, LevelFilter::OFF);
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level.level());
    let _ = match format {
        LogFormat::Plain => builder
            .event_format(Plain)
            .finish()
            .with(targets)
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .finish()
            .with(targets)
            .try_init(),
    };
}

/// `faultline: ` and the message, as the command line has always printed it.
struct Plain;

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "faultline: ")?;
        if *event.metadata().level() == Level::ERROR {
            write!(writer, "error: ")?;
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
