//! Bearer-token authentication of the DTM API and the metrics route. Several tokens may be
//! accepted at once, so that a token can be rotated without downtime.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};
use tokio::sync::watch;

use super::layer::Wrapper;

/// A set of accepted tokens, held as SHA-256 digests: compared in constant time whatever their
/// length, and never kept in clear.
#[derive(Clone, Default)]
pub struct TokenSet(Arc<[[u8; 32]]>);

impl TokenSet {
    /// The given tokens, blank ones (and surrounding whitespace) ignored.
    pub fn new<S: AsRef<str>>(tokens: impl IntoIterator<Item = S>) -> Self {
        TokenSet(
            tokens
                .into_iter()
                .map(|t| t.as_ref().trim().to_owned())
                .filter(|t| !t.is_empty())
                .map(|t| digest(&t))
                .collect(),
        )
    }

    /// How many tokens the set holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when the set holds no token.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The tokens the API accepts now; empty: no authentication. The set may be replaced while the
/// server runs (rotation by editing the token file, see [`crate::reload`]).
#[derive(Clone)]
pub struct Tokens {
    current: watch::Receiver<TokenSet>,
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens::new(Vec::<String>::new())
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.current.borrow().len())
    }
}

impl From<watch::Receiver<TokenSet>> for Tokens {
    fn from(current: watch::Receiver<TokenSet>) -> Self {
        Tokens { current }
    }
}

impl Tokens {
    /// A fixed set of tokens, blank ones (and surrounding whitespace) ignored.
    pub fn new<S: AsRef<str>>(tokens: impl IntoIterator<Item = S>) -> Self {
        // The sender is dropped at once: the receiver keeps this value for good.
        watch::channel(TokenSet::new(tokens)).1.into()
    }

    /// True when no token is configured (the API is open).
    pub fn is_empty(&self) -> bool {
        self.current.borrow().is_empty()
    }

    /// Whether `presented` is one of the tokens; every token is compared, in constant time.
    pub fn accepts(&self, presented: &str) -> bool {
        let presented = digest(presented);
        let found = self
            .current
            .borrow()
            .0
            .iter()
            .fold(Choice::from(0), |found, token| found | token.ct_eq(&presented));
        found.into()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(request: &Request) -> Option<&str> {
    let value = request.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Middleware: 401 unless tokens are off or the request carries one of them.
pub async fn require_token(State(tokens): State<Tokens>, request: Request, next: Next) -> Response {
    if allowed(&tokens, &request) {
        return next.run(request).await;
    }
    unauthorized()
}

/// Middleware of the DTM routes: [`require_token`], then the request's span
/// ([`crate::telemetry::trace_request`]), in one plain layer (see [`super::layer`]).
#[derive(Clone)]
pub struct DtmGate(pub Tokens);

impl Wrapper for DtmGate {
    fn wrap<F>(&self, request: Request, next: impl FnOnce(Request) -> F) -> BoxFuture<'static, Response>
    where
        F: std::future::Future<Output = Response> + Send + 'static,
    {
        if allowed(&self.0, &request) {
            return crate::telemetry::trace_request(request, next);
        }
        Box::pin(std::future::ready(unauthorized()))
    }
}

/// Whether tokens are off or the request carries one of them.
fn allowed(tokens: &Tokens, request: &Request) -> bool {
    tokens.is_empty() || bearer(request).is_some_and(|token| tokens.accepts(token))
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(json!({"message": "a valid bearer token is required (Authorization: Bearer <token>)"})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configured_token_is_accepted_and_nothing_else() {
        let tokens = Tokens::new(["old-token", " new-token \n", ""]);
        assert!(tokens.accepts("old-token") && tokens.accepts("new-token"));
        assert!(!tokens.accepts("new-toke") && !tokens.accepts("") && !tokens.accepts("new-token2"));
        assert!(Tokens::new(Vec::<String>::new()).is_empty());
        assert_eq!(format!("{tokens:?}"), "Tokens(2 configured)");
    }
}
