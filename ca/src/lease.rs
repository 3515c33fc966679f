//! Leader election with a `coordination.k8s.io/v1` Lease: one instance holds it and does the
//! chores that must happen once per cluster (the agents' identity garbage collection and status
//! writes, the CA's root rotation). Taking or renewing the Lease is an update with the
//! resourceVersion last read, so two candidates cannot both succeed; a Lease not renewed within
//! its duration may be taken over.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};

/// What time it is, for the Lease: the wall clock, or a test's.
pub type Clock = std::sync::Arc<dyn Fn() -> jiff::Timestamp + Send + Sync>;

/// One candidate for one Lease.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    holder: String,
    duration_seconds: i32,
    clock: Clock,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("name", &self.name)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

impl Elector {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        holder: &str,
        duration_seconds: i32,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            holder: holder.to_owned(),
            duration_seconds,
            clock: std::sync::Arc::new(jiff::Timestamp::now),
        }
    }

    /// The same candidate reading time from `clock` (tests move it instead of sleeping).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Takes or renews the Lease; `Ok(true)` while this candidate holds it.
    pub async fn try_lead(&self) -> Result<bool, kube::Error> {
        let now = || MicroTime((self.clock)());
        let spec = |transitions: i32| LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(self.duration_seconds),
            acquire_time: Some(now()),
            renew_time: Some(now()),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        };
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec(0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let current = lease.spec.clone().unwrap_or_default();
        let mine = current.holder_identity.as_deref() == Some(self.holder.as_str());
        let expired = current.renew_time.as_ref().is_none_or(|t| {
            let duration = i64::from(
                current
                    .lease_duration_seconds
                    .unwrap_or(self.duration_seconds),
            );
            t.0.as_second() + duration < (self.clock)().as_second()
        });
        if !mine && !expired {
            return Ok(false);
        }
        lease.spec = Some(if mine {
            LeaseSpec {
                renew_time: Some(now()),
                ..current
            }
        } else {
            spec(current.lease_transitions.unwrap_or(0) + 1)
        });
        // The resourceVersion read above makes this a compare-and-swap.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
