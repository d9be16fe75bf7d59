//! Another broker's access configuration, generated from mqseal's own
//! store (users, roles, grants) and registry (device bundles): what a
//! deployment that outgrows `mqseal-broker` loads into its cluster so that
//! each device still reaches only its own topics (docs/SCALING.md).

pub mod emqx;
pub mod rabbitmq;
