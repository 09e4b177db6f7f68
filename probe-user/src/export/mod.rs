//! Where the daemon's events and counters go: `metrics` (Prometheus families, the series
//! cap), `totals` (the kernel's running totals, read at scrape time), `serve` (the hardened
//! HTTP endpoints) and `connections` (its slots, and whom to shed), `lines` (JSON event
//! lines through a bounded queue), `otlp` (OTLP/HTTP logs and spans).

pub mod connections;
pub mod lines;
pub mod metrics;
pub mod otlp;
pub mod serve;
pub mod totals;
