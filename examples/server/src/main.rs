//! `livechat-example-server`: the example host. See the crate docs of
//! `livechat_example_server` for routes and configuration.

use livechat_example_server::{Config, run};

/// mimalloc: the request path allocates a lot of small, short-lived values
/// (statements, rows, JSON); glibc's allocator was a sixth of the CPU in
/// the write-path profile (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn,sea_orm=warn".into()),
        )
        .init();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            tracing::error!(error = %err, "bad configuration");
            std::process::exit(2);
        }
    };
    if let Err(err) = run(config).await {
        tracing::error!(error = %err, "server stopped with an error");
        std::process::exit(1);
    }
}
