//! HTTP response counters by method, route, status and error code; the name and rendering are
//! in `crate::metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::metrics::{Exposition, HTTP_RESPONSES};

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

    pub fn render(&self, out: &mut Exposition) {
        let Ok(counts) = self.counts.lock() else {
            return;
        };
        let samples = counts.iter().map(|((method, route, status, code), n)| {
            let status = status.to_string();
            let labels: Vec<(&str, String)> = vec![
                ("method", method.clone()),
                ("route", route.clone()),
                ("status", status),
                ("code", code.to_string()),
            ];
            (labels, *n as f64)
        });
        let samples: Vec<(Vec<(&str, String)>, f64)> = samples.collect();
        out.labelled(
            &HTTP_RESPONSES,
            samples
                .iter()
                .map(|(l, n)| (l.iter().map(|(k, v)| (*k, v.as_str())), *n)),
        );
    }
}
