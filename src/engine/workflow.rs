//! Workflow, server side: a progress store plus a periodic resume call while prepared.

use base64::Engine as _;
use serde::Deserialize;

use super::{Call, Pass, Plan, Policy, Target, park_after_pass};
use crate::model::{GlobalTrans, Millis, TransStatus};

/// Workflow identity carried in `custom_data`: `{"name":"wf","data":"<base64 input>"}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct WorkflowCustom {
    /// Workflow name, sent as `op` on the resume call.
    #[serde(deserialize_with = "crate::engine::layout::null_default")]
    pub name: String,
    /// Base64 of the workflow input, sent decoded as the resume body.
    #[serde(deserialize_with = "crate::engine::layout::null_default")]
    pub data: String,
}

impl WorkflowCustom {
    /// Parses `custom_data`.
    pub fn parse(custom_data: &str) -> Result<Self, String> {
        if custom_data.trim().is_empty() {
            return Ok(WorkflowCustom::default());
        }
        serde_json::from_str(custom_data).map_err(|e| format!("invalid workflow custom_data: {e}"))
    }

    /// The decoded input (empty when absent or not base64).
    pub fn input(&self) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(self.data.as_bytes())
            .unwrap_or_default()
    }
}

/// The resume call's body: the input as is over HTTP; over gRPC, the `workflow.WorkflowData`
/// message that `workflow.Workflow/Execute` takes, wrapping the input.
fn resume_body(global: &GlobalTrans, input: Vec<u8>) -> Vec<u8> {
    use prost::Message as _;
    if global.protocol == "grpc" {
        crate::proto::workflow::WorkflowData { data: input }.encode_to_vec()
    } else {
        input
    }
}

pub(super) fn plan(global: &GlobalTrans, pass: &Pass, now: Millis, policy: &Policy) -> Plan {
    match global.status {
        TransStatus::Prepared if !pass.attempted(Target::WorkflowResume) => {
            let custom = WorkflowCustom::parse(&global.custom_data).unwrap_or_default();
            Plan::Invoke(vec![Call {
                target: Target::WorkflowResume,
                url: global.query_prepared.clone(),
                branch_id: "00".to_owned(),
                op: custom.name.clone(),
                body: resume_body(global, custom.input()),
            }])
        }
        // The client decides the outcome with its submit; until then keep resuming.
        TransStatus::Prepared | TransStatus::Submitted | TransStatus::Aborting => {
            park_after_pass(global, pass, now, policy)
        }
        TransStatus::Succeed | TransStatus::Failed => Plan::Finished,
    }
}
