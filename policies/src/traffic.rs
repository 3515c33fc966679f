//! The `TrafficPolicy` custom resource (`signet.dev/v1alpha1`, namespaced): how a Service's
//! endpoints are used by the proxies that route requests to it, attached to Services with
//! `targetRefs` in the style of Gateway API policy attachment (GEP-713): the load-balancing
//! algorithm, outlier ejection, and a local rate limit. It takes effect where routes govern
//! the Service (the mesh profile) or where a Gateway routes to it; a Service no route governs
//! is carried as a byte stream, and this policy does not change that.
//!
//! These types are the CRD's source of truth (`deploy/crds/` is generated from them); `check`
//! turns a spec into what the proxy uses, or says which field is wrong and why.

use std::time::Duration;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How the proxies use the endpoints of the Services it targets.
#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "signet.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    plural = "trafficpolicies",
    shortname = "stp",
    namespaced,
    status = "TrafficPolicyStatus",
    doc = "Load balancing, outlier ejection and rate limiting for the Services it targets."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    /// The Services (group "", kind Service, in this namespace) it applies to.
    pub target_refs: Vec<TargetRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// A policy's target (Gateway API's `LocalPolicyTargetReference`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum Algorithm {
    /// Power of two choices over requests in flight × peak-EWMA latency.
    #[default]
    #[serde(rename = "PeakEWMA")]
    PeakEwma,
    RoundRobin,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    #[serde(default)]
    pub algorithm: Algorithm,
}

/// Failure accrual: an endpoint answering 5xx or refusing connections this many times in a row
/// is ejected, for `baseEjectionTime` doubling up to `maxEjectionTime` (with jitter).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// 0 turns ejection off. Default 7.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// Default `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// Default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_time: Option<String>,
    /// At most this share (1 to 100) of the endpoints is ejected at once. Default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejected_percent: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum RateLimitKey {
    /// One bucket per source identity (SPIFFE ID).
    #[default]
    Source,
    /// One bucket for everyone, per proxy.
    Service,
}

/// A token bucket per proxy: `requestsPerSecond` on average, `burst` at once; requests past it
/// are answered 429 with `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: u32,
    /// Default: `requestsPerSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    #[serde(default)]
    pub key: RateLimitKey,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}

/// A spec checked: what the proxy applies.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub algorithm: Algorithm,
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_share: f64,
    /// (per second, burst, key).
    pub rate_limit: Option<(u32, u32, RateLimitKey)>,
}

impl Default for Checked {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::PeakEwma,
            consecutive_failures: 7,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(60),
            max_ejected_share: 0.5,
            rate_limit: None,
        }
    }
}

/// `1s`, `500ms`, `2m`, `1h`: a number and a unit (ms, s, m, h).
fn duration(field: &str, text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{field}: `{text}` needs a unit (ms, s, m, h)"))?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{field}: `{text}` is not a number and a unit"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        other => return Err(format!("{field}: unit `{other}` is not ms, s, m or h")),
    };
    if d.is_zero() {
        return Err(format!("{field}: must be more than zero"));
    }
    Ok(d)
}

impl TrafficPolicySpec {
    /// What the proxy applies, or every problem, each naming its field.
    pub fn check(&self) -> Result<Checked, Vec<String>> {
        let mut problems = vec![];
        let mut out = Checked::default();
        if self.target_refs.is_empty() {
            problems.push("spec.targetRefs: at least one Service".to_owned());
        }
        for (i, t) in self.target_refs.iter().enumerate() {
            if !t.group.is_empty() || t.kind != "Service" {
                problems.push(format!(
                    "spec.targetRefs[{i}]: {}/{} {} is not a Service (group \"\", kind Service)",
                    t.group, t.kind, t.name
                ));
            }
        }
        if let Some(lb) = &self.load_balancer {
            out.algorithm = lb.algorithm;
        }
        if let Some(o) = &self.outlier_detection {
            if let Some(n) = o.consecutive_failures {
                out.consecutive_failures = n;
            }
            let mut get = |field: &str, v: &Option<String>, into: &mut Duration| {
                if let Some(v) = v {
                    match duration(field, v) {
                        Ok(d) => *into = d,
                        Err(e) => problems.push(e),
                    }
                }
            };
            get(
                "spec.outlierDetection.baseEjectionTime",
                &o.base_ejection_time,
                &mut out.base_ejection,
            );
            get(
                "spec.outlierDetection.maxEjectionTime",
                &o.max_ejection_time,
                &mut out.max_ejection,
            );
            if out.max_ejection < out.base_ejection {
                problems.push(
                    "spec.outlierDetection.maxEjectionTime: shorter than baseEjectionTime".into(),
                );
            }
            if let Some(p) = o.max_ejected_percent {
                if (1..=100).contains(&p) {
                    out.max_ejected_share = f64::from(p) / 100.0;
                } else {
                    problems.push(format!(
                        "spec.outlierDetection.maxEjectedPercent: {p} is not 1 to 100"
                    ));
                }
            }
        }
        if let Some(r) = &self.rate_limit {
            let burst = r.burst.unwrap_or(r.requests_per_second);
            if r.requests_per_second == 0 {
                problems.push("spec.rateLimit.requestsPerSecond: must be more than zero".into());
            } else if burst == 0 {
                problems.push("spec.rateLimit.burst: must be more than zero".into());
            } else {
                out.rate_limit = Some((r.requests_per_second, burst, r.key));
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> Result<TrafficPolicySpec, serde_yaml::Error> {
        serde_yaml::from_str(yaml)
    }

    #[test]
    fn a_spec_checks_into_what_the_proxy_applies_and_each_problem_names_its_field() {
        let ok = spec(
            "targetRefs: [{group: '', kind: Service, name: api}]\n\
             loadBalancer: {algorithm: RoundRobin}\n\
             outlierDetection: {consecutiveFailures: 3, baseEjectionTime: 500ms, maxEjectionTime: 2m}\n\
             rateLimit: {requestsPerSecond: 10, burst: 5}\n",
        )
        .expect("parses");
        let c = ok.check().expect("valid");
        assert_eq!(c.algorithm, Algorithm::RoundRobin);
        assert_eq!(c.consecutive_failures, 3);
        assert_eq!(c.base_ejection, Duration::from_millis(500));
        assert_eq!(c.max_ejection, Duration::from_secs(120));
        assert_eq!(c.rate_limit, Some((10, 5, RateLimitKey::Source)));

        let bad = spec(
            "targetRefs: [{group: apps, kind: Deployment, name: api}]\n\
             outlierDetection: {baseEjectionTime: 5, maxEjectedPercent: 0}\n\
             rateLimit: {requestsPerSecond: 0}\n",
        )
        .expect("parses");
        let problems = bad.check().expect_err("invalid");
        for field in [
            "spec.targetRefs[0]: apps/Deployment api is not a Service",
            "spec.outlierDetection.baseEjectionTime: `5` needs a unit",
            "spec.outlierDetection.maxEjectedPercent: 0 is not 1 to 100",
            "spec.rateLimit.requestsPerSecond",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(field)),
                "{field} in {problems:?}"
            );
        }
        assert!(
            spec("targetRefs: []\nretries: 3\n").is_err(),
            "an unknown field is refused, not ignored"
        );
    }
}
