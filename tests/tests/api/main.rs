//! Cross-crate integration tests: the example host with livechat mounted,
//! against real SQLite and PostgreSQL. Each test runs on both databases.

mod auth;
mod concurrency;
mod host;
mod isolation;
mod messages;
mod sessions;
