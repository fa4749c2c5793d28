//! The real `countersign` binary as a child process, for what an in-process
//! gateway cannot show: `kill -9`, a restart on the same configuration, and
//! several gateways sharing one store. And a fresh PostgreSQL database per
//! test, on the machine's server (127.0.0.1:5432, trust auth, user `root`):
//! a test that needs it fails when it is unreachable, it is never skipped.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use countersign::demo::shop::ShopHandle;

use super::{write_config, GatewayOptions, Peer, USER_HEADER};

pub const BIN: &str = env!("CARGO_BIN_EXE_countersign");

/// `countersign run --config FILE` in a child process; killed on drop.
/// Its stdout and stderr of every start go to one log file beside the
/// configuration.
pub struct GatewayProcess {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Extra environment of the binary from its next start on (e.g.
    /// libfaketime's `LD_PRELOAD` and `FAKETIME`).
    env: Vec<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl GatewayProcess {
    /// Writes a configuration (as [`super::TestGateway`] does) into a new
    /// temporary directory and starts the binary on it.
    pub async fn start(peer: &Peer, shop: &ShopHandle, options: GatewayOptions) -> Self {
        Self::start_with_env(peer, shop, options, Vec::new()).await
    }

    /// As [`Self::start`], with extra environment variables from the first
    /// start on (see [`Self::set_env`]).
    pub async fn start_with_env(
        peer: &Peer,
        shop: &ShopHandle,
        options: GatewayOptions,
        env: Vec<(String, String)>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (config, proxy, admin) = write_config(dir.path(), &peer.issuer, shop, &options);
        Self::launch(config, proxy, admin, env, Some(dir)).await
    }

    /// Starts the binary on an existing configuration file that listens on
    /// `proxy` and `admin`.
    pub async fn on(config: PathBuf, proxy: SocketAddr, admin: SocketAddr) -> Self {
        Self::launch(config, proxy, admin, Vec::new(), None).await
    }

    /// Starts the binary on `config`, logging beside it; `dir` (if any) is
    /// removed when the gateway is dropped.
    async fn launch(
        config: PathBuf,
        proxy: SocketAddr,
        admin: SocketAddr,
        env: Vec<(String, String)>,
        dir: Option<tempfile::TempDir>,
    ) -> Self {
        let log = config.with_extension("log");
        let mut gateway = Self {
            proxy,
            admin,
            config,
            log,
            child: None,
            env,
            _dir: dir,
        };
        gateway.spawn().await;
        gateway
    }

    /// From the next start on, the binary runs with these extra environment
    /// variables (say libfaketime's `LD_PRELOAD` and `FAKETIME`: set
    /// directly rather than through the `faketime` command, which forks and
    /// would take the signals meant for the gateway); empty: none.
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        self.env = env;
    }

    /// The directory holding the configuration file.
    pub fn dir(&self) -> &Path {
        self.config
            .parent()
            .expect("the configuration has a directory")
    }

    /// Everything the gateway printed, over all its starts.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// POST /shop through this gateway as an agent acting for `user`.
    pub fn buy(
        &self,
        agent: &reqwest::Client,
        user: &str,
        body: serde_json::Value,
    ) -> reqwest::RequestBuilder {
        agent
            .post(self.url("/shop"))
            .header(USER_HEADER, user)
            .json(&body)
    }

    /// SIGKILL: the process ends at once, nothing of it is shut down
    /// cleanly (what a crash or an OOM kill does).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `Child::kill` sends SIGKILL on Unix.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, as an orchestrator stops a pod; waits up to `within` for the
    /// process to exit and returns how it exited (`None`: still running).
    pub async fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.child.as_ref()?;
        self.signal("TERM");
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Starts the binary again on the same configuration (same ports, same
    /// store). Kills the running one first, if any.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// Sends SIGHUP (the reload signal).
    pub fn sighup(&self) {
        self.signal("HUP");
    }

    /// SIGSTOP: the process is frozen (a VM pause, a long stall); its
    /// connections stay open.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`Self::pause`].
    pub fn unpause(&self) {
        self.signal("CONT");
    }

    /// `GET /readyz` on the admin listener: status and body.
    pub async fn readyz(&self) -> (u16, String) {
        let response = reqwest::get(format!("http://{}/readyz", self.admin))
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// `kill -<name>` the running gateway.
    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} {pid}");
    }

    pub async fn metrics(&self) -> String {
        super::flows::get_text(format!("http://{}/metrics", self.admin)).await
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    async fn spawn(&mut self) {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(
            log,
            "--- countersign run --config {}",
            self.config.display()
        )
        .unwrap();
        let stderr = log.try_clone().unwrap();
        let child = Command::new(BIN)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["run", "--config"])
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("GATEWAY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .expect("the countersign binary starts");
        self.child = Some(child);
        self.wait_ready().await;
    }

    /// Waits until the proxy port accepts connections; fails with the
    /// gateway's logs if it exits or takes longer than 20 s.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if tokio::net::TcpStream::connect(self.proxy).await.is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "the gateway exited ({status}) before listening on {}:\n{}",
                    self.proxy,
                    self.logs()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "the gateway did not listen on {} within 20 s:\n{}",
                    self.proxy,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The machine's PostgreSQL server, as its administrator sees it.
pub const PG_HOST: &str = "127.0.0.1";
pub const PG_PORT: u16 = 5432;
pub const PG_USER: &str = "root";
pub const PG_ADMIN_DB: &str = "test";

/// A database created for one test on the machine's PostgreSQL server,
/// dropped (connections and all) when this is dropped.
pub struct TestDatabase {
    pub name: String,
    /// `postgres://root@127.0.0.1:5432/<name>`, for `store: { postgres: URL }`.
    pub url: String,
}

impl TestDatabase {
    /// Creates a fresh, empty database. Panics when the server cannot be
    /// reached: these tests need PostgreSQL and are never skipped.
    pub fn create() -> Self {
        let name = format!("countersign_test_{}", uuid::Uuid::new_v4().simple());
        psql(&format!("CREATE DATABASE {name}")).unwrap_or_else(|e| {
            panic!(
                "PostgreSQL must run on {PG_HOST}:{PG_PORT} (trust auth, user {PG_USER}, \
                 database {PG_ADMIN_DB}) for the durable-approval tests: {e}"
            )
        });
        Self {
            url: format!("postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"),
            name,
        }
    }

    /// Runs `sql` in this database; returns what psql printed (unaligned,
    /// tuples only).
    pub fn query(&self, sql: &str) -> String {
        psql_in(&self.name, sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Err(e) = psql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// A PostgreSQL URL where nothing listens: a store that is down.
pub fn unreachable_postgres_url() -> String {
    format!(
        "postgres://{PG_USER}@127.0.0.1:{}/{PG_ADMIN_DB}",
        super::free_port()
    )
}

fn psql(sql: &str) -> Result<String, String> {
    psql_in(PG_ADMIN_DB, sql)
}

fn psql_in(database: &str, sql: &str) -> Result<String, String> {
    let output = Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", PG_HOST, "-p", &PG_PORT.to_string(), "-U", PG_USER])
        .args(["-d", database, "-c", sql])
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("psql could not be run (is postgresql-client installed?): {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// What `countersign dev` printed on `stdout` up to its last line ("Press
/// Ctrl-C to stop."), read on a thread of its own; panics after `within`.
pub fn dev_mode_text(stdout: std::process::ChildStdout, within: Duration) -> String {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut printed = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            printed.push_str(&line);
            printed.push('\n');
            if line.contains("Press Ctrl-C to stop.") {
                break;
            }
        }
        let _ = tx.send(printed);
    });
    rx.recv_timeout(within).expect("dev mode starts")
}

/// Approves `user`'s one pending request at the development authorization
/// server `issuer` (what `countersign dev` runs) through its approver page's
/// API, as the page's Approve button does; waits up to 20 s for one.
pub async fn approve_dev_pending(issuer: &str, user: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let listing: serde_json::Value = client
            .get(format!("{issuer}/api/requests?user={user}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let pending = listing["requests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["state"] == "pending")
            .map(|r| r["id"].as_str().unwrap().to_owned());
        if let Some(id) = pending {
            break id;
        }
        assert!(
            Instant::now() < deadline,
            "nothing pending for {user}: {listing}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let response = client
        .post(format!("{issuer}/api/requests/{id}/approve"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "approve");
}
