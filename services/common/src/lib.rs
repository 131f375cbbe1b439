//! Shared glue for Slipway's services, and nothing else: configuration, telemetry, NATS
//! connection, the subject map and topology, setup, NATS authorization, typed request/reply,
//! durable-consumer workers with dead letters, typed run-event and usage publishers, the service
//! kit (health, metrics, graceful shutdown), KV records, failpoints, the TLS provider and HTTP
//! client set-up.
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod blobs;
pub mod cli;
pub mod config;
pub mod deadletter;
pub mod failpoint;
pub mod health;
pub mod http;
pub mod keys;
pub mod lease;
pub mod metrics;
pub mod nats;
pub mod operations;
pub mod partition;
pub mod records;
pub mod rpc;
pub mod run_events;
pub mod service;
pub mod setup;
pub mod shutdown;
pub mod subjects;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod usage;
pub mod worker;

pub use app::App;
pub use config::Settings;
pub use rpc::{RpcClient, RpcError, ServiceError};
pub use shutdown::Shutdown;
pub use subjects::Service;
