//! Middleware of the hot routes as plain tower layers. `axum::middleware::from_fn` clones the
//! route's whole service stack below it on every request (so that its future may own one);
//! a [`Wrapped`] service calls the service below it in place, which the `Route` below allows
//! (its own future owns what it needs). BENCHMARKS.md, issue 15.

use std::convert::Infallible;
use std::future::Future;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::response::Response;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Map};

/// What a [`WrapLayer`] does around each request.
pub trait Wrapper: Clone + Send + Sync + 'static {
    /// Answers `request`: at once, or by sending it on with `next` and working on the answer.
    fn wrap<F>(&self, request: Request, next: impl FnOnce(Request) -> F) -> BoxFuture<'static, Response>
    where
        F: Future<Output = Response> + Send + 'static;
}

/// A layer running a [`Wrapper`] around every request of the services it wraps.
#[derive(Clone)]
pub struct WrapLayer<W>(pub W);

impl<S, W: Clone> tower::Layer<S> for WrapLayer<W> {
    type Service = Wrapped<S, W>;

    fn layer(&self, inner: S) -> Self::Service {
        Wrapped {
            inner,
            wrapper: self.0.clone(),
        }
    }
}

/// A service with a [`Wrapper`] around it.
#[derive(Clone)]
pub struct Wrapped<S, W> {
    inner: S,
    wrapper: W,
}

impl<S, W> tower::Service<Request> for Wrapped<S, W>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
    W: Wrapper,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Map<BoxFuture<'static, Response>, fn(Response) -> Result<Response, Infallible>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let inner = &mut self.inner;
        self.wrapper
            .wrap(request, |request| inner.call(request).map(infallible))
            .map(Ok)
    }
}

fn infallible(result: Result<Response, Infallible>) -> Response {
    match result {
        Ok(response) => response,
        Err(never) => match never {},
    }
}
