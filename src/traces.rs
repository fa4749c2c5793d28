//! Traces (OpenTelemetry), off unless `traces:` is configured.
//!
//! A held call spans the agent, this gateway, the authorization server,
//! perhaps another replica, and the API. Spans are made with the
//! OpenTelemetry SDK and exported in batches as OTLP/HTTP protobuf over
//! the gateway's own HTTP client. The trace context of a call travels as a
//! W3C `traceparent` string: from the agent, into the store with the
//! approval, and to the upstream with the forwarded call, so that a
//! forward made later, or by another replica, joins the agent's trace.
//!
//! Spans carry names, ids, policies, outcomes and statuses; never a token,
//! a body, a binding message or a header value.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use prost::Message as _;

pub use opentelemetry::trace::SpanKind as Kind;

use crate::config::TracesConfig;
use crate::headers::TRACEPARENT_HEADER;

/// How long one export may take before it is given up (the batch is lost,
/// the gateway goes on).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway's tracer: cheap to clone; does nothing when off.
#[derive(Clone, Default)]
pub struct Traces {
    on: Option<Arc<On>>,
}

struct On {
    provider: SdkTracerProvider,
    tracer: opentelemetry_sdk::trace::SdkTracer,
}

impl std::fmt::Debug for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traces")
            .field("on", &self.on.is_some())
            .finish()
    }
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("traces: {0}")]
pub struct TracesError(String);

/// Where a new span hangs.
#[derive(Debug, Clone, Copy)]
pub enum Parent<'a> {
    /// A new trace.
    Root,
    /// A `traceparent` string (the agent's, or one kept with an approval);
    /// a new trace when it is not a valid one.
    Remote(Option<&'a str>),
    /// A span of this process.
    Span(&'a Span),
}

impl Traces {
    /// Tracing off: every span is a no-op.
    pub fn off() -> Self {
        Self::default()
    }

    /// Starts the batch exporter for `config`.
    pub fn start(config: &TracesConfig) -> Result<Self, TracesError> {
        let headers = config
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), value.0.expose().to_owned()))
            .collect();
        let exporter = OtlpHttp::new(config.endpoint.0.to_string(), headers)?;
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio.0,
            ))))
            .build();
        let tracer = provider.tracer("countersign");
        Ok(Self {
            on: Some(Arc::new(On { provider, tracer })),
        })
    }

    pub fn is_on(&self) -> bool {
        self.on.is_some()
    }

    /// A new span, ended when dropped.
    pub fn span(&self, name: &'static str, kind: SpanKind, parent: Parent<'_>) -> Span {
        let Some(on) = &self.on else {
            return Span { inner: None };
        };
        let parent = match parent {
            Parent::Root => Context::new(),
            Parent::Remote(traceparent) => traceparent
                .and_then(TraceParent::parse)
                .map(|p| Context::new().with_remote_span_context(p.0))
                .unwrap_or_default(),
            Parent::Span(span) => match &span.inner {
                Some(inner) => {
                    Context::new().with_remote_span_context(inner.span_context().clone())
                }
                None => Context::new(),
            },
        };
        let span = on
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .start_with_context(&on.tracer, &parent);
        Span {
            inner: Some(Box::new(span)),
        }
    }

    /// Exports what is left (at shutdown).
    pub fn flush(&self) {
        if let Some(on) = &self.on {
            if let Err(error) = on.provider.shutdown() {
                tracing::warn!(%error, "traces: the last spans could not be exported");
            }
        }
    }
}

/// One span of the gateway; a no-op when tracing is off or the trace is
/// not sampled. Ends when dropped.
#[derive(Debug)]
pub struct Span {
    /// Boxed: a span lives in the futures of every traced call, and a
    /// pointer is all they hold when tracing is off.
    inner: Option<Box<opentelemetry_sdk::trace::Span>>,
}

impl Span {
    pub fn set(&mut self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        if let Some(span) = &mut self.inner {
            span.set_attribute(KeyValue::new(key, value));
        }
    }

    /// Marks the span failed, with a short reason (never a secret).
    pub fn fail(&mut self, reason: impl Into<Cow<'static, str>>) {
        if let Some(span) = &mut self.inner {
            span.set_status(Status::error(reason));
        }
    }

    /// This span as a W3C `traceparent`, for the upstream or the store.
    /// `None` when tracing is off.
    pub fn traceparent(&self) -> Option<String> {
        let context = self.inner.as_ref()?.span_context();
        context
            .is_valid()
            .then(|| TraceParent(context.clone()).to_string())
    }
}

/// A valid W3C trace context.
#[derive(Debug, Clone)]
pub struct TraceParent(SpanContext);

impl TraceParent {
    /// Reads a `traceparent` header value; `None` unless valid.
    pub fn parse(value: &str) -> Option<Self> {
        let carrier = HashMap::from([(TRACEPARENT_HEADER.to_owned(), value.to_owned())]);
        let context = TraceContextPropagator::new().extract(&carrier);
        let span = context.span().span_context().clone();
        span.is_valid().then_some(Self(span))
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.0.trace_id(),
            self.0.span_id(),
            self.0.trace_flags().to_u8()
        )
    }
}

/// OTLP/HTTP protobuf export. Called on the batch processor's own thread,
/// where a blocking request is in place.
#[derive(Debug)]
struct OtlpHttp {
    client: reqwest::blocking::Client,
    endpoint: String,
    /// Never printed: may hold an API key.
    headers: Vec<(String, String)>,
    resource: ResourceAttributesWithSchema,
}

impl OtlpHttp {
    fn new(endpoint: String, headers: Vec<(String, String)>) -> Result<Self, TracesError> {
        // A blocking client may not be built inside the async runtime.
        let client = std::thread::spawn(|| {
            reqwest::blocking::Client::builder()
                .timeout(EXPORT_TIMEOUT)
                .build()
        })
        .join()
        .map_err(|_| TracesError("the HTTP client could not be built".into()))?
        .map_err(|e| TracesError(e.to_string()))?;
        Ok(Self {
            client,
            endpoint,
            headers,
            resource: ResourceAttributesWithSchema::default(),
        })
    }

    fn send(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let request = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(batch, &self.resource),
        };
        let mut builder = self
            .client
            .post(&self.endpoint)
            .header(http::header::CONTENT_TYPE, "application/x-protobuf");
        for (name, value) in &self.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let response = builder
            .body(request.encode_to_vec())
            .send()
            .map_err(|e| OTelSdkError::InternalFailure(format!("export failed: {e}")))?;
        if !response.status().is_success() {
            return Err(OTelSdkError::InternalFailure(format!(
                "the collector answered {}",
                response.status()
            )));
        }
        Ok(())
    }
}

impl SpanExporter for OtlpHttp {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        std::future::ready(self.send(batch))
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_reads_back_as_written() {
        let raw = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let parsed = TraceParent::parse(raw).expect("valid");
        assert_eq!(parsed.to_string(), raw);
    }

    #[test]
    fn malformed_traceparents_are_not_followed() {
        for raw in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "zz-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        ] {
            assert!(TraceParent::parse(raw).is_none(), "{raw:?}");
        }
    }

    #[test]
    fn off_spans_have_no_context() {
        let traces = Traces::off();
        let span = traces.span("call", SpanKind::Server, Parent::Root);
        assert!(span.traceparent().is_none());
    }
}
