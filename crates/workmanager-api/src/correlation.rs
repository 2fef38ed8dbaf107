//! Correlation ids for both servers: one tower layer reads `x-correlation-id`
//! (else the trace id of `traceparent`, else makes a UUID), puts it in the
//! request's extensions for the handlers and audit records, and echoes it in
//! the response headers (gRPC response metadata). The same layer counts the
//! requests in flight, so shutdown can wait for exactly those (and not for
//! idle keep-alive connections).
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderValue, Request, Response};
use tower::{Layer, Service};

pub const HEADER: &str = "x-correlation-id";

/// The request's correlation id, as stored in request extensions.
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

/// Picks the correlation id for a request from its headers.
pub fn from_headers(headers: &HeaderMap) -> String {
    if let Some(id) = headers.get(HEADER).and_then(|v| v.to_str().ok()) {
        let id = id.trim();
        if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) {
            return id.to_string();
        }
    }
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        // version "-" trace-id (32 hex) "-" parent-id "-" flags
        if let Some(trace) = tp.split('-').nth(1) {
            if trace.len() == 32
                && trace.bytes().all(|b| b.is_ascii_hexdigit())
                && trace.bytes().any(|b| b != b'0')
            {
                return trace.to_ascii_lowercase();
            }
        }
    }
    uuid::Uuid::new_v4().to_string()
}

/// Requests whose handler has not yet produced a response.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.0.clone())
    }
}

struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, Default)]
pub struct CorrelationLayer {
    inflight: InFlight,
}

impl CorrelationLayer {
    pub fn new(inflight: InFlight) -> Self {
        Self { inflight }
    }
}

impl<S> Layer<S> for CorrelationLayer {
    type Service = Correlation<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Correlation {
            inner,
            inflight: self.inflight.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Correlation<S> {
    inner: S,
    inflight: InFlight,
}

impl<S, B, RB> Service<Request<B>> for Correlation<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let id = from_headers(req.headers());
        let header = HeaderValue::from_str(&id).ok();
        req.extensions_mut().insert(CorrelationId(id));
        let guard = self.inflight.enter();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await;
            drop(guard);
            let mut resp = resp?;
            if let Some(h) = header {
                resp.headers_mut().insert(HEADER, h);
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_then_traceparent_then_new() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert_eq!(from_headers(&h), "4bf92f3577b34da6a3ce929d0e0e4736");
        h.insert(HEADER, HeaderValue::from_static("abc-123"));
        assert_eq!(from_headers(&h), "abc-123");
        let fresh = from_headers(&HeaderMap::new());
        assert!(uuid::Uuid::parse_str(&fresh).is_ok());
        let mut bad = HeaderMap::new();
        bad.insert(HEADER, HeaderValue::from_static("has space"));
        assert_ne!(from_headers(&bad), "has space");
    }
}
