//! What a web page may not do to a server on this machine (issue 15, finding 6): a page on
//! another site can make the browser send requests to `127.0.0.1`, and through DNS rebinding
//! (its own host name re-pointed at 127.0.0.1) read the answers too.
//!
//! - A request that carries an `Origin` other than the server's own (the `Host` it was sent to)
//!   is refused with 403, unless `--cors-origin` lists that origin; then it gets CORS headers,
//!   preflights included.
//! - In open mode on a loopback address, a `Host` other than the listen address, `localhost`,
//!   `127.0.0.1`, `[::1]`, the public URL's host or one of `--allowed-hosts` is refused with 403
//!   (a rebinding page's requests carry its own host name).
//!
//! It also refuses the requests [`super::framing`] marked as carrying both `Transfer-Encoding`
//! and `Content-Length`.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;

/// Which hosts and origins may reach the server.
#[derive(Debug, Clone, Default)]
pub struct WebPolicy {
    /// Host names (lowercase, no port) a request may be addressed to; `None`: any.
    pub allowed_hosts: Option<Vec<String>>,
    /// Origins (`scheme://host[:port]`, or `*`) that other sites' pages may call from.
    pub cors_origins: Vec<String>,
}

impl WebPolicy {
    /// The host part of a `Host` header value (`name`, `name:port`, `[v6]`, `[v6]:port`),
    /// lowercase.
    pub fn host_name(host: &str) -> String {
        let host = host.trim();
        let name = if host.starts_with('[') {
            host.split_once(']').map_or(host, |(v6, _)| v6).to_string() + "]"
        } else {
            host.rsplit_once(':')
                .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
                .map_or(host, |(name, _)| name)
                .to_string()
        };
        name.to_ascii_lowercase()
    }

    fn host_allowed(&self, host: Option<&str>) -> bool {
        match (&self.allowed_hosts, host) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(allowed), Some(h)) => {
                let name = Self::host_name(h);
                allowed.contains(&name)
            }
        }
    }

    fn cors_allows(&self, origin: &str) -> bool {
        self.cors_origins
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }
}

/// An `Origin` is the server's own when it names the host the request was sent to.
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let Some(host) = host else {
        return false;
    };
    let bare = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    bare.is_some_and(|b| b.eq_ignore_ascii_case(host.trim()))
}

pub async fn check(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if req.headers().contains_key(super::framing::CONFLICT_HEADER) {
        return ApiError::AmbiguousLength.into_response();
    }
    let policy = &state.web;
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    if !policy.host_allowed(host.as_deref()) {
        return ApiError::HostNotAllowed.into_response();
    }
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or("").to_string());
    let Some(origin) = origin else {
        return next.run(req).await;
    };
    if same_origin(&origin, host.as_deref()) {
        return next.run(req).await;
    }
    if !policy.cors_allows(&origin) {
        return ApiError::OriginNotAllowed.into_response();
    }
    let allow = HeaderValue::from_str(&origin).unwrap_or(HeaderValue::from_static("null"));
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut res = if preflight {
        let mut res = Response::new(Body::empty());
        *res.status_mut() = StatusCode::NO_CONTENT;
        let h = res.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        res
    } else {
        next.run(req).await
    };
    let h = res.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("x-request-id, retry-after"),
    );
    h.append(header::VARY, HeaderValue::from_static("origin"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert_eq!(WebPolicy::host_name("LocalHost:8080"), "localhost");
        assert_eq!(WebPolicy::host_name("127.0.0.1"), "127.0.0.1");
        assert_eq!(WebPolicy::host_name("[::1]:80"), "[::1]");
        assert_eq!(WebPolicy::host_name("[::1]"), "[::1]");
        assert_eq!(WebPolicy::host_name("evil.example:8080"), "evil.example");
    }

    #[test]
    fn same_origin_is_the_host_sent_to() {
        assert!(same_origin("http://127.0.0.1:8080", Some("127.0.0.1:8080")));
        assert!(!same_origin(
            "http://127.0.0.1:8081",
            Some("127.0.0.1:8080")
        ));
        assert!(!same_origin("null", Some("127.0.0.1:8080")));
        assert!(!same_origin("http://evil.example", None));
    }
}
