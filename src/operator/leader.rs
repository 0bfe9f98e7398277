//! Leader election on a `coordination.k8s.io` Lease, so that of several replicas only one drives
//! transactions. Every write is a compare-and-swap on the Lease's resourceVersion.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::{PostParams, ResourceExt};
use tracing::{info, warn};

use crate::model::Millis;

/// Settings of the election.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// Lease name.
    pub lease_name: String,
    /// Namespace of the Lease (the operator's own).
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a leader stays leader without renewing.
    pub lease_duration: Duration,
}

/// Acquires and renews the Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaderConfig,
}

fn micro_time(at: Millis) -> Option<MicroTime> {
    k8s_openapi::jiff::Timestamp::from_millisecond(at).ok().map(MicroTime)
}

impl LeaderElector {
    /// An elector using `client`.
    pub fn new(client: kube::Client, config: LeaderConfig) -> Self {
        LeaderElector {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    /// How often to renew: a fifth of the lease, so that a renewal that is slow to be answered
    /// (a loaded API server) still lands well before the renew deadline.
    pub fn renew_interval(&self) -> Duration {
        self.config.lease_duration / 5
    }

    /// How soon to try again after a renewal failed: a fifteenth of the lease (1 s of 15 s), so
    /// that several attempts fit before the renew deadline.
    pub fn retry_period(&self) -> Duration {
        self.config.lease_duration / 15
    }

    /// How long after a renewal this replica may still act: two thirds of the lease, so that it
    /// has stopped (and its calls have been cancelled) before another replica may take over.
    pub fn renew_deadline(&self) -> Duration {
        self.config.lease_duration * 2 / 3
    }

    /// One attempt to become or stay leader. True when this replica holds the Lease now.
    pub async fn try_acquire_or_renew(&self, now: Millis) -> Result<bool, kube::Error> {
        let duration_secs = self.config.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.lease_name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: micro_time(now),
                    renew_time: micro_time(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    info!(identity = %self.config.identity, "became leader");
                    Ok(true)
                }
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(error),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let renewed = spec.renew_time.as_ref().map(|t| t.0.as_millisecond()).unwrap_or(0);
        let duration = spec.lease_duration_seconds.unwrap_or(duration_secs) as Millis * 1000;
        let mine = holder == self.config.identity;
        if !mine && !holder.is_empty() && renewed + duration > now {
            return Ok(false);
        }
        let mut next = spec.clone();
        next.holder_identity = Some(self.config.identity.clone());
        next.lease_duration_seconds = Some(duration_secs);
        next.renew_time = micro_time(now);
        if !mine {
            next.acquire_time = micro_time(now);
            next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        lease.spec = Some(next);
        match self
            .api
            .replace(&self.config.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                if !mine {
                    info!(identity = %self.config.identity, previous = %holder, "became leader");
                }
                Ok(true)
            }
            // Someone else renewed or took it first.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Gives the Lease up (on shutdown) so that a standby takes over without waiting.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.lease_name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        let name = lease.name_any();
        if let Err(error) = self.api.replace(&name, &PostParams::default(), &lease).await {
            warn!(%error, "cannot release the leader lease; it expires on its own");
        }
    }
}
