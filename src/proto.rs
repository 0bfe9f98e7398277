//! Code generated at build time from `proto/` (prost messages, tonic clients and servers): DTM's
//! `dtmgimp.Dtm` API, the `workflow.Workflow` callback service and the demo bank's `busi.Busi`. Plain data and stubs, no
//! logic, so that both the API (server) and the invoke layer (workflow callback) can use them.

/// `dtmgimp`: DTM's gRPC API.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod dtmgimp {
    tonic::include_proto!("dtmgimp");
}

/// `workflow`: the resume callback service a gRPC workflow application implements.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod workflow {
    tonic::include_proto!("workflow");
}

/// `busi`: the demo bank's gRPC service (`kubetx bank --grpc-listen`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod busi {
    tonic::include_proto!("busi");
}
