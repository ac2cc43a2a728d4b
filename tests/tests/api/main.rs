//! Cross-crate integration tests: the example host with livechat mounted,
//! against real SQLite and PostgreSQL. Each test runs on both databases.

mod auth;
mod bridge;
mod concurrency;
mod customers;
mod fuzz;
mod host;
mod isolation;
mod messages;
mod model;
mod multinode;
mod realtime;
mod resume;
mod routing;
mod sessions;
