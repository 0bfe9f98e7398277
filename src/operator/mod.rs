//! The Kubernetes operator: `Saga`, `Tcc` and `Msg` resources reconciled with the status as the
//! store.

pub mod crd;
