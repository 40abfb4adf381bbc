//! Oversize messages are answered `RESOURCE_EXHAUSTED`, as gRPC specifies, and the server
//! keeps serving. tonic refuses a message over `--max-message-bytes` before reading it, but
//! labels the refusal `OUT_OF_RANGE`; this layer relabels exactly that refusal.

use std::task::{Context, Poll};

use futures::TryFutureExt as _;
use tonic::codegen::http;

/// Wraps every service of the server.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResourceExhaustedLayer;

impl<S> tower::Layer<S> for ResourceExhaustedLayer {
    type Service = ResourceExhausted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResourceExhausted(inner)
    }
}

#[derive(Debug, Clone)]
pub struct ResourceExhausted<S>(S);

type Relabel<R> = fn(http::Response<R>) -> http::Response<R>;

impl<S, B, R> tower::Service<http::Request<B>> for ResourceExhausted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = futures::future::MapOk<S::Future, Relabel<R>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.0.call(request).map_ok(relabel::<R> as Relabel<R>)
    }
}

/// `OUT_OF_RANGE` for a message over the size limit becomes `RESOURCE_EXHAUSTED`.
fn relabel<R>(mut response: http::Response<R>) -> http::Response<R> {
    let headers = response.headers_mut();
    let too_large = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| m.contains("too large") || m.contains("too%20large"));
    if too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_size_refusal_is_relabelled() {
        let status = |code: &'static str, message: &'static str| {
            let mut r = http::Response::new(());
            r.headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static(code));
            r.headers_mut()
                .insert("grpc-message", http::HeaderValue::from_static(message));
            relabel(r).headers()["grpc-status"].clone()
        };
        assert_eq!(
            status(
                "11",
                "Error, decoded message length too large: found 1 bytes"
            ),
            "8"
        );
        assert_eq!(status("11", "index 7 is outside 0..3"), "11");
        assert_eq!(status("5", "too large"), "5");
    }
}
