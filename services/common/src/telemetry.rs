//! Telemetry: `tracing` to stdout (text or JSON), spans exported over OTLP/HTTP when an endpoint
//! is configured, and W3C `traceparent` carried in NATS headers so a run is one trace across
//! every service. Spans always get real trace ids, exported or not, so propagation works the
//! same with and without a collector.

use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetrySettings};

/// Flushes and shuts the exporter down when dropped (at the end of a graceful shutdown).
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports what is buffered now.
    pub fn flush(&self) {
        if let Some(p) = &self.provider
            && let Err(e) = p.force_flush()
        {
            eprintln!("telemetry flush failed: {e}");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("telemetry shutdown failed: {e}");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.log_filter: {0}")]
    Filter(String),
    #[error("telemetry.otlp_endpoint: {0}")]
    Exporter(String),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Installs the process-wide subscriber. `service` names the spans' `service.name`.
pub fn init(service: &str, settings: &TelemetrySettings) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_new(&settings.log_filter)
        .map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let mut builder = SdkTracerProvider::builder().with_resource(
        opentelemetry_sdk::Resource::builder()
            .with_service_name(format!("slipway-{service}"))
            .build(),
    );
    if let Some(endpoint) = settings.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        use opentelemetry_otlp::WithExportConfig;
        crate::tls::install_default_provider();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let tracer = provider.tracer("slipway");
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let fmt = match settings.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .boxed(),
    };
    // The log filter applies to what is printed only: spans still carry trace context (and are
    // exported) at `info` whatever the log level, so propagation never depends on logging.
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
        )
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}

/// For tests: installs the subscriber once per test binary (spans get real trace ids; nothing is
/// exported), and quietly keeps the first one.
pub fn init_for_tests() {
    static GUARD: OnceLock<Option<TelemetryGuard>> = OnceLock::new();
    GUARD.get_or_init(|| {
        let settings = TelemetrySettings {
            log_format: LogFormat::Text,
            log_filter: std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            otlp_endpoint: None,
        };
        init("test", &settings).ok()
    });
}

/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

struct HeaderInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a async_nats::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the current span's context into NATS headers as `traceparent`.
pub fn inject_current(headers: &mut async_nats::HeaderMap) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// Makes `span` a child of the trace context carried in `headers`, if any.
pub fn set_parent_from(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    if let Some(h) = headers {
        let cx = TraceContextPropagator::new().extract(&HeaderExtractor(h));
        if cx.span().span_context().is_valid() {
            // Fails only when the span is disabled, which leaves nothing to parent.
            let _ = span.set_parent(cx);
        }
    }
}

/// The trace id of the current span, as 32 hex digits, when there is one.
pub fn current_trace_id() -> Option<String> {
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The trace id carried by `traceparent` in `headers`.
pub fn trace_id_in(headers: &async_nats::HeaderMap) -> Option<String> {
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}
