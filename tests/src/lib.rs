//! Test harness for the cross-crate integration tests: one fresh database per
//! test on SQLite (a temp file) or PostgreSQL (a throwaway server started
//! from the machine's binaries, or `LIVECHAT_TEST_DATABASE_URL`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use sea_orm::{ConnectionTrait, DatabaseConnection};

pub mod node;
pub mod redis_server;

/// The database a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A WAL SQLite file in a temp dir.
    Sqlite,
    /// A fresh database on a PostgreSQL server.
    Postgres,
}

/// A fresh, migrated-or-not database, removed (SQLite) when dropped.
pub struct TestDb {
    /// Connection URL (for code that connects by itself).
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// Creates an empty database on `backend`.
    ///
    /// # Panics
    /// When PostgreSQL cannot be started or reached (the message names what
    /// to install), or SQLite's temp dir cannot be created.
    pub async fn new(backend: Backend) -> Self {
        init_tracing();
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir for SQLite");
                let url = format!("sqlite://{}?mode=rwc", dir.path().join("test.db").display());
                Self {
                    url,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => Self {
                url: create_database(&postgres_admin_url(), "lc_test").await,
                _dir: None,
            },
        }
    }

    /// Opens the database with the library's settings and runs its migrations.
    ///
    /// # Panics
    /// When connecting or migrating fails.
    pub async fn connect_migrated(&self) -> DatabaseConnection {
        use sea_orm_migration::MigratorTrait;
        let db = livechat_core::store::connect(&self.url)
            .await
            .expect("connect");
        livechat_core::store::Migrator::up(&db, None)
            .await
            .expect("migrations");
        livechat_ticket_bridge::BridgeMigrator::up(&db, None)
            .await
            .expect("bridge migrations");
        db
    }
}

/// Creates a fresh, empty database named `<prefix>_<uuid>` on the
/// PostgreSQL server of `admin` (a URL with rights to `CREATE DATABASE`)
/// and returns its URL.
///
/// # Panics
/// When the server cannot be reached or refuses.
pub async fn create_database(admin: &str, prefix: &str) -> String {
    let name = format!("{prefix}_{}", uuid::Uuid::now_v7().simple());
    let mut opts = sea_orm::ConnectOptions::new(admin.to_owned());
    opts.max_connections(1).sqlx_logging(false);
    let conn = sea_orm::Database::connect(opts)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {admin}: {e}"));
    conn.execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .expect("CREATE DATABASE");
    conn.close().await.ok();
    replace_db_name(admin, &name)
}

fn replace_db_name(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let cut = base.rfind('/').expect("database URL has a path");
    let mut out = format!("{}/{}", &base[..cut], name);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// The admin URL of the PostgreSQL used by tests: `LIVECHAT_TEST_DATABASE_URL`
/// or a server started once per test process.
///
/// # Panics
/// When no server can be started (the message names what to install).
pub fn postgres_admin_url() -> String {
    if let Ok(url) = std::env::var("LIVECHAT_TEST_DATABASE_URL")
        && !url.trim().is_empty()
    {
        return url;
    }
    static SERVER: OnceLock<Result<String, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| start_postgres(PgDurability::Fast))
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

const INSTALL_HINT: &str = "PostgreSQL server binaries (initdb, pg_ctl) not found: install the Debian package `postgresql` (apt-get install -y postgresql) or set LIVECHAT_TEST_DATABASE_URL";

fn find_bindir() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        versions.reverse();
        candidates.extend(versions);
    }
    candidates
        .into_iter()
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A command run as the `postgres` user when we are root (initdb refuses root).
fn as_pg_user(root: bool, program: &Path) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut cmd: Command, what: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// How a throwaway PostgreSQL server commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgDurability {
    /// `fsync=off`, `synchronous_commit=off`: fast tests.
    Fast,
    /// The server's defaults (fsync on, synchronous commit): a commit is on
    /// disk before it returns. For benchmarks.
    Durable,
}

/// Starts a throwaway PostgreSQL server from the machine's binaries
/// (initdb + pg_ctl, as user `postgres` when run as root) into a temp dir
/// on a free loopback port, and returns its admin URL. A watchdog stops the
/// server and removes the dir when this process exits.
///
/// # Errors
/// A message naming what is missing (the Debian package `postgresql`) or
/// which step failed.
pub fn start_postgres(durability: PgDurability) -> Result<String, String> {
    let bindir = find_bindir().ok_or_else(|| INSTALL_HINT.to_owned())?;
    let root = is_root();
    let dir = std::env::temp_dir().join(format!(
        "livechat-pg-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    ));
    let data = dir.join("data");
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    if root {
        run(
            {
                let mut c = Command::new("chown");
                c.args(["-R", "postgres:postgres"]).arg(&dir);
                c
            },
            "chown the PostgreSQL temp dir to user postgres (create that user or run as non-root)",
        )?;
    }
    let mut initdb = as_pg_user(root, &bindir.join("initdb"));
    initdb.arg("-D").arg(&data).args([
        "-A",
        "trust",
        "-U",
        "postgres",
        "-E",
        "UTF8",
        "--no-sync",
        "--no-instructions",
    ]);
    run(initdb, "initdb")?;

    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("free port: {e}"))?
        .port();
    let mut start = as_pg_user(root, &bindir.join("pg_ctl"));
    start
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(dir.join("server.log"))
        .args([
            "-w",
            "-o",
            &format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=400{}",
                dir.display(),
                match durability {
                    PgDurability::Fast =>
                        " -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
                    PgDurability::Durable => "",
                }
            ),
            "start",
        ]);
    run(start, "pg_ctl start")?;

    // Watchdog: when this process is gone, stop the server and remove its files.
    let stop = format!(
        "{} {} -D {} -m immediate stop",
        if root { "runuser -u postgres --" } else { "" },
        bindir.join("pg_ctl").display(),
        data.display()
    );
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        dir = dir.display()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("watchdog: {e}"))?;

    Ok(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
}

/// The HTTP secret tests sign tokens with.
pub const SECRET: &str = "integration-test-secret";

/// The example host over a fresh migrated database, driven in-process.
pub struct App {
    /// In-process HTTP client of the whole host app.
    pub client: poem::test::TestClient<poem::endpoint::BoxEndpoint<'static, poem::Response>>,
    /// The service over the same database (for concurrency tests).
    pub chat: livechat_core::ChatService,
    /// The ticket bridge's dispatcher as the example host wires it; tests
    /// drive it with `dispatch_once`.
    pub dispatcher: livechat_ticket_bridge::Dispatcher<livechat_core::store::SeaOrmStore>,
    /// The host configuration the app was built with.
    pub config: livechat_example_server::Config,
    /// The open connection.
    pub db: DatabaseConnection,
    /// Keeps the database alive.
    pub test_db: TestDb,
}

impl App {
    /// A fresh app on `backend`.
    ///
    /// # Panics
    /// When the database cannot be created or migrated.
    pub async fn new(backend: Backend) -> Self {
        Self::with_config(backend, |_| {}).await
    }

    /// A fresh app on `backend` with `adjust` applied to the host config
    /// (identity secrets, webhook, capacity…).
    ///
    /// # Panics
    /// When the database cannot be created or migrated.
    pub async fn with_config(
        backend: Backend,
        adjust: impl FnOnce(&mut livechat_example_server::Config),
    ) -> Self {
        use poem::EndpointExt;
        let test_db = TestDb::new(backend).await;
        let db = test_db.connect_migrated().await;
        let mut config = livechat_example_server::Config::new(&test_db.url, SECRET);
        // Tests start chats and send from one address as fast as they can;
        // the limits have tests of their own.
        config.rate_limits = livechat_poem::RateLimits::unlimited();
        // Tests name tenants of their own, and this database has the
        // library's tables only, not the example host's: every tenant
        // offers chat (the host's directory is tested in `host.rs`).
        config.chat_tenants = livechat_example_server::ChatTenants::Any;
        adjust(&mut config);
        let mut chat_config = livechat_core::ChatConfig::default();
        chat_config.routing.default_capacity = config.agent_capacity;
        let chat = livechat_core::ChatService::new(
            livechat_core::store::SeaOrmStore::new(db.clone()),
            chat_config,
        );
        let ep = livechat_example_server::app(db.clone(), &config).boxed();
        let dispatcher = livechat_example_server::dispatcher(db.clone(), &config);
        Self {
            client: poem::test::TestClient::new(ep),
            chat,
            dispatcher,
            config,
            db,
            test_db,
        }
    }

    /// Runs the app's dispatcher until the outbox is empty.
    ///
    /// # Panics
    /// As [`drain_outbox`].
    pub async fn drain_outbox(&self) {
        drain_outbox(&self.dispatcher, &self.db).await;
    }

    /// A token for `user` with `roles`, allowed in `tenants` (`None`: all),
    /// valid for ten minutes.
    ///
    /// # Panics
    /// Never in practice (signing an in-memory claim set).
    #[must_use]
    pub fn token(user: i64, roles: &[&str], tenants: Option<&[i64]>) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
        livechat_example_server::issue_token(
            SECRET,
            &livechat_example_server::Claims {
                sub: user,
                roles: roles.iter().map(|r| (*r).to_owned()).collect(),
                tenant_ids: tenants.map(<[i64]>::to_vec),
                iat: now,
                exp: now + 600,
            },
        )
        .expect("sign token")
    }

    /// A `SUPPORT_AGENT` token for `user`, every tenant.
    #[must_use]
    pub fn agent(user: i64) -> String {
        Self::token(user, &["SUPPORT_AGENT"], None)
    }

    /// Sends `method path` with optional bearer token, `X-Tenant-ID` and
    /// JSON body; returns the status and the JSON body (`Null` if empty).
    pub async fn call(
        &self,
        method: poem::http::Method,
        path: &str,
        token: Option<&str>,
        tenant: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (poem::http::StatusCode, serde_json::Value) {
        let mut req = self.client.request(method, path);
        if let Some(token) = token {
            req = req.header("Authorization", format!("Bearer {token}"));
        }
        if let Some(tenant) = tenant {
            req = req.header("X-Tenant-ID", tenant);
        }
        if let Some(body) = body {
            req = req.body_json(&body);
        }
        Self::decode(req.send().await).await
    }

    /// Status and JSON body of a response (`Null` when the body is empty).
    ///
    /// # Panics
    /// When the body is not JSON.
    pub async fn decode(
        resp: poem::test::TestResponse,
    ) -> (poem::http::StatusCode, serde_json::Value) {
        let status = resp.0.status();
        let bytes = resp.0.into_body().into_vec().await.expect("read body");
        let json = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "{status}: body is not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        (status, json)
    }

    /// `call` as agent `user` in `tenant`.
    pub async fn agent_call(
        &self,
        method: poem::http::Method,
        path: &str,
        user: i64,
        tenant: i64,
        body: Option<serde_json::Value>,
    ) -> (poem::http::StatusCode, serde_json::Value) {
        let token = Self::agent(user);
        self.call(method, path, Some(&token), Some(&tenant.to_string()), body)
            .await
    }

    /// Sets agent `user` online in `tenant` over HTTP.
    ///
    /// # Panics
    /// When the route does not answer 200.
    pub async fn go_online(&self, user: i64, tenant: i64) {
        let (status, body) = self
            .agent_call(
                poem::http::Method::PUT,
                "/livechat/agents/me/status",
                user,
                tenant,
                Some(serde_json::json!({"status": "online"})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    /// Starts a session for agent `user` in `tenant` (going online first);
    /// returns its id.
    ///
    /// # Panics
    /// When the route does not answer 201.
    pub async fn open_session(&self, user: i64, tenant: i64) -> String {
        self.go_online(user, tenant).await;
        let (status, body) = self
            .agent_call(
                poem::http::Method::POST,
                "/livechat/sessions",
                user,
                tenant,
                Some(serde_json::json!({})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["data"]["id"].as_str().expect("session id").to_owned()
    }

    /// Checks that agent `user` in `tenant` gets 400
    /// `invalid_query` for `GET path_and_query`.
    ///
    /// # Panics
    /// When the answer is anything else.
    pub async fn assert_invalid_query(&self, path_and_query: &str, user: i64, tenant: i64) {
        let (code, body) = self
            .agent_call(poem::http::Method::GET, path_and_query, user, tenant, None)
            .await;
        assert_eq!(code, 400, "{path_and_query}: {body}");
        assert_eq!(body["error"]["code"], "invalid_query", "{path_and_query}");
    }

    /// The sessions of `tenant` with `status` (at most 200), newest first,
    /// through the service.
    ///
    /// # Panics
    /// When the service refuses.
    pub async fn sessions_with_status(
        &self,
        tenant: livechat_core::TenantId,
        status: livechat_core::SessionStatus,
    ) -> Vec<livechat_core::SessionView> {
        self.chat
            .list_sessions(
                tenant,
                livechat_core::SessionFilter {
                    status: Some(status),
                    ..livechat_core::SessionFilter::default()
                },
                None,
                Some(200),
            )
            .await
            .expect("sessions listed")
            .sessions
    }

    /// As [`App::open_session`] through the service: sets `agent` online in
    /// `tenant` and starts a session for them.
    ///
    /// # Panics
    /// When the service refuses either.
    pub async fn open_service_session(
        &self,
        tenant: livechat_core::TenantId,
        agent: livechat_core::UserId,
    ) -> livechat_core::ChatSession {
        self.chat
            .set_agent_status(tenant, agent, livechat_core::PresenceStatus::Online)
            .await
            .expect("agent online");
        self.chat
            .start_session(tenant, agent, None)
            .await
            .expect("session started")
    }
}

/// Declares each listed `async fn name(backend: Backend)` as two tests,
/// `name::sqlite` and `name::postgres`, on a multi-thread runtime; after
/// `current_thread:`, on a current-thread runtime (where tasks spawned by
/// the test run only when it awaits).
#[macro_export]
macro_rules! on_both_databases {
    (current_thread: $($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "current_thread")]
                async fn sqlite() {
                    super::$name($crate::Backend::Sqlite).await;
                }
                #[tokio::test(flavor = "current_thread")]
                async fn postgres() {
                    super::$name($crate::Backend::Postgres).await;
                }
            }
        )*
    };
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn sqlite() {
                    super::$name($crate::Backend::Sqlite).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn postgres() {
                    super::$name($crate::Backend::Postgres).await;
                }
            }
        )*
    };
}

/// The outbox events of `tenant` stored through `chat`, oldest first (the
/// first 200, the largest page).
///
/// # Panics
/// When they cannot be read.
pub async fn events_of(
    chat: &livechat_core::ChatService,
    tenant: livechat_core::TenantId,
) -> Vec<livechat_core::DomainEvent> {
    let page = livechat_core::PageSize::parse(Some(200), chat.config()).expect("page size");
    livechat_core::OutboxRepository::list_events(chat.store(), tenant, None, page)
        .await
        .expect("events")
}

/// Starts a chat (about `topic`) for host user `user` as a customer of
/// `tenant` through `chat`, resolving the customer first; the chat as
/// started (routed or waiting).
///
/// # Panics
/// When the service refuses either step.
pub async fn start_user_chat(
    chat: &livechat_core::ChatService,
    tenant: i64,
    user: i64,
    topic: &str,
) -> livechat_core::SessionView {
    let customer = chat
        .resolve_customer(t(tenant), livechat_core::CustomerIdentity::User(u(user)))
        .await
        .expect("customer resolved");
    chat.start_customer_chat(
        t(tenant),
        customer.id,
        livechat_core::CustomerChatRequest {
            topic: topic.into(),
            ..Default::default()
        },
    )
    .await
    .expect("chat started")
    .view
}

/// A multi-thread runtime of `workers` threads for a test that is not
/// async itself (a property test runs each case on it).
///
/// # Panics
/// When the runtime cannot be built.
#[must_use]
pub fn test_runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs the property `test` on `cases` random values of `strategy`
/// (`PROPTEST_CASES` runs more or fewer); a failing case is shrunk (up to
/// 64 steps, each a fresh database in the model tests) and the test
/// panics with it. Nothing is written to the tree.
///
/// # Panics
/// When a case fails.
pub fn check_property<S: proptest::strategy::Strategy>(
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), proptest::test_runner::TestCaseError>,
) {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 64,
        ..proptest::test_runner::Config::default()
    });
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

/// Declares each listed property, `name => run(sqlite_cases,
/// postgres_cases)` with `fn run(backend: Backend, cases: u32)`, as two
/// tests, `name::sqlite` and `name::postgres` (as [`on_both_databases`]
/// does for async tests), each with its own number of cases.
#[macro_export]
macro_rules! property_on_both_databases {
    ($($name:ident => $run:ident($sqlite:expr, $postgres:expr)),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn sqlite() {
                    super::$run($crate::Backend::Sqlite, $sqlite);
                }
                #[test]
                fn postgres() {
                    super::$run($crate::Backend::Postgres, $postgres);
                }
            }
        )*
    };
}

/// Logs warnings and errors of the code under test into the test output
/// (shown for failing tests).
pub fn init_tracing() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn,sqlx=error".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// Undispatched events in the outbox.
///
/// # Panics
/// When the count cannot be read.
pub async fn pending_events(db: &DatabaseConnection) -> i64 {
    count_rows(db, "livechat_outbox WHERE dispatched_at IS NULL").await
}

/// `SELECT COUNT(*) FROM {from}`: `from` is a table, optionally followed
/// by its `WHERE` condition.
///
/// # Panics
/// When the query fails.
pub async fn count_rows(db: &DatabaseConnection, from: &str) -> i64 {
    use sea_orm::Statement;
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT COUNT(*) AS n FROM {from}"),
        ))
        .await
        .expect("count rows")
        .expect("one row");
    row.try_get::<i64>("", "n").expect("count")
}

/// Locks the row of session `id` inside `tx` (`SELECT … FOR UPDATE`), as a
/// routing change, a close or another node's append holds it (PostgreSQL
/// tests of waits on that row).
///
/// # Errors
/// What the statement met: a deadlock, a lock timeout.
pub async fn lock_session_row(
    tx: &sea_orm::DatabaseTransaction,
    id: impl std::fmt::Display,
) -> Result<(), sea_orm::DbErr> {
    tx.execute_unprepared(&format!(
        "SELECT id FROM livechat_sessions WHERE id = '{id}' FOR UPDATE"
    ))
    .await
    .map(drop)
}

/// A transaction of `db` holding the row of session `id`
/// ([`lock_session_row`]), returned open.
///
/// # Panics
/// When the transaction cannot begin or the row cannot be locked.
pub async fn hold_session_row(
    db: &DatabaseConnection,
    id: impl std::fmt::Display,
) -> sea_orm::DatabaseTransaction {
    use sea_orm::TransactionTrait;
    let tx = db.begin().await.expect("begin");
    lock_session_row(&tx, id)
        .await
        .expect("lock the session row");
    tx
}

/// Runs `dispatcher` until the outbox has no undispatched event.
///
/// # Panics
/// When a pass fails, or when events are still undispatched after 60 s
/// (a retried sink failure waits 1, 2, 4… s; a loaded machine can make a
/// few of those in a row): the panic lists them, with their attempts,
/// due time, claim and last error.
pub async fn drain_outbox(
    dispatcher: &livechat_ticket_bridge::Dispatcher<livechat_core::store::SeaOrmStore>,
    db: &DatabaseConnection,
) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        dispatcher.dispatch_once().await.expect("dispatch");
        if pending_events(db).await == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT kind, attempts, CAST(available_at AS TEXT) AS due, \
             CAST(claimed_until AS TEXT) AS claimed, last_error \
             FROM livechat_outbox WHERE dispatched_at IS NULL ORDER BY id",
        ))
        .await
        .expect("pending events");
    let text = |r: &sea_orm::QueryResult, column: &str| {
        r.try_get::<Option<String>>("", column)
            .ok()
            .flatten()
            .unwrap_or_default()
    };
    let pending: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} attempts={} due={} claimed={} error={}",
                text(r, "kind"),
                r.try_get::<i32>("", "attempts").unwrap_or_default(),
                text(r, "due"),
                text(r, "claimed"),
                text(r, "last_error"),
            )
        })
        .collect();
    panic!("the outbox did not drain: {pending:#?}");
}

/// Tenant `n` (a valid id).
///
/// # Panics
/// For `n <= 0`.
#[must_use]
pub fn t(n: i64) -> livechat_core::TenantId {
    livechat_core::TenantId::new(n).expect("positive tenant id")
}

/// User `n` (a valid id).
///
/// # Panics
/// For `n <= 0`.
#[must_use]
pub fn u(n: i64) -> livechat_core::UserId {
    livechat_core::UserId::new(n).expect("positive user id")
}

/// The visitor token and session id of a customer start's answer (`201`
/// of `POST /livechat/customer/chats` for a new visitor).
///
/// # Panics
/// When the answer has no visitor token or session id.
#[must_use]
pub fn visitor_chat(started: &serde_json::Value) -> (String, String) {
    let field = |value: &serde_json::Value, name: &str| {
        value
            .as_str()
            .unwrap_or_else(|| panic!("a {name} in {started}"))
            .to_owned()
    };
    (
        field(&started["data"]["visitor_token"], "visitor token"),
        field(&started["data"]["session"]["id"], "session id"),
    )
}
