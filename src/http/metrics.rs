//! HTTP response counters by method, route, status and error code (Prometheus text).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

type Labels = (String, String, u16, &'static str);

#[derive(Debug, Default)]
pub struct HttpMetrics {
    counts: Mutex<BTreeMap<Labels, u64>>,
}

impl HttpMetrics {
    /// `route` is the matched route pattern (`None`: no route matched, counted as "unmatched" so
    /// that arbitrary paths cannot grow the label set).
    pub fn record(
        &self,
        method: &str,
        route: Option<&str>,
        status: u16,
        code: Option<&'static str>,
    ) {
        let method = match method {
            "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "PATCH" | "OPTIONS" => method,
            _ => "OTHER",
        };
        let key = (
            method.to_string(),
            route.unwrap_or("unmatched").to_string(),
            status,
            code.unwrap_or(""),
        );
        if let Ok(mut counts) = self.counts.lock() {
            *counts.entry(key).or_default() += 1;
        }
    }

    pub fn render(&self, out: &mut String) {
        let name = "diffusiond_http_responses_total";
        let _ = writeln!(
            out,
            "# HELP {name} HTTP responses by method, route, status and error code."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        if let Ok(counts) = self.counts.lock() {
            for ((method, route, status, code), n) in counts.iter() {
                let _ = writeln!(
                    out,
                    "{name}{{method=\"{method}\",route=\"{route}\",status=\"{status}\",code=\"{code}\"}} {n}"
                );
            }
        }
    }
}
