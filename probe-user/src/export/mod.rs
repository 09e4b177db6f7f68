//! Where the daemon's events and counters go: `families` (the table of Prometheus families:
//! name, help, labels, kind), `metrics` (the registry, who updates which family, the series
//! cap), `totals` (the kernel's running totals, read at scrape time), `serve` (the hardened
//! HTTP endpoints, reading `metrics`) with `connections` (its slots, and whom to shed) and
//! `server_counters` (what it shed and failed to accept), `access` (who may read `/metrics`
//! and `/explain`: basic auth, Kubernetes bearer tokens) configured with `web_config` (the
//! exporter-toolkit web config file: TLS, users), `lines` (JSON event lines through a
//! bounded queue) under the event `budget` (full lines, then summaries), `otlp` (OTLP/HTTP
//! logs and spans), `kube_events` (Kubernetes Events on the affected pods).

pub mod access;
mod bucket;
pub mod budget;
pub mod connections;
mod families;
pub mod kube_events;
pub mod lines;
pub mod metrics;
pub mod otlp;
pub mod serve;
mod server_counters;
pub mod totals;
pub mod web_config;
