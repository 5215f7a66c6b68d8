//! Gantry's coordinator as a library: the server's services and edges, and the admin
//! CLI. The `gantry` binary (`main.rs`) parses the command line and calls into it.
//!
//! # Layers
//!
//! The code sits in five layers, bottom first, and imports only go down (a module may
//! import modules of its own layer, never in a cycle, and of lower layers). The table is
//! declared in `coordinator/layers.toml` and checked by `tests/tests/layering.rs`.
//!
//! | layer | where | what it owns | what it must not know |
//! |---|---|---|---|
//! | base | `store/`, `base/` | the store (the only module that knows redb); configuration and on-disk layout; labels; audit entries and who acts ([`base::audit::Acting`]); the kinds of an admin failure; the authorization table's counters; job logs; chunk packs; sealed secrets; source trees; metrics; the webhook sender's HTTP client | any service, how requests arrive, the CLI |
//! | services | `services/` | what the coordinator does: the scheduler's shell (`engine`), runs (submit, follow, log ingest), artifacts (one `scope`, reads, writes, retention), deployments (the `gantry-deploy` machine's shell) and environments, agents (the live-session registry, presence), access (join tokens, enrollment, certificates, login tokens), the one holding rule (`holds`), secrets, notifications and webhooks, triggers, `gantry exec`, agent upgrades, delivery figures; and [`services::coordinator::Coordinator`], which builds one of each | sessions, streams or HTTP (they get frame writers and readers, never connections), the CLI |
//! | admin | `admin.rs` | the admin router: one line per request kind, each answered by its service with an `Acting` context; typed errors become the `AdminError` the CLI sees | how a request arrived |
//! | edges | `edges/` | the QUIC listener and its admission, the enrollment, agent and admin sessions (`edges/quic/`); the HTTP side: server, request parsing, dashboard login and CSRF, the dashboard, what new hosts download (`edges/http/`); `gantry server`, which starts them | the storage engine; decisions (they ask services) |
//! | cli | `cli/` | the admin CLI: commands, output formatting (`cli/output/`), the admin context and client, and `init`, `bundle`, `demo`; the crate root and the binary | nothing on the server side imports it |
//!
//! Decisions that are more than a lookup live in sans-IO machines in their own crates
//! (`gantry-scheduler`, `gantry-deploy`); the services are their shells.

mod admin;
mod base;
pub mod cli;
mod edges;
mod services;
mod store;

pub use edges::server;
