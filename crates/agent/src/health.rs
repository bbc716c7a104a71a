//! Health checks: each checked task has a probe loop (a TCP connect, an HTTP GET, or a
//! command run beside it) whose results feed the pure [`Checker`]; the agent hears only
//! changes of health. Semantics as Docker's `HEALTHCHECK`: `starting` until a check passes,
//! failures within the start period do not count, `unhealthy` after `retries` failures in a
//! row. While a task is still `starting`, checks run every [`START_INTERVAL`] at most, so a
//! healthy task is ready (served, counted by updates) within a fraction of a second.

use std::time::Duration;

use starling_state::{CheckKind, HealthCheck, Task, TaskHealth};
use tokio::sync::mpsc;

/// The longest wait between checks of a task that is still starting.
pub const START_INTERVAL: Duration = Duration::from_millis(250);

/// The most of a failed check's output kept in its message.
const OUTPUT_MAX: usize = 200;

/// The health of one task from its check results. Pure: the caller gives the time.
#[derive(Clone, Debug)]
pub struct Checker {
    retries: u32,
    start_period_ms: u64,
    started_at: u64,
    failures: u32,
    health: TaskHealth,
}

impl Checker {
    /// A task started at `started_at` (ms), `starting`.
    pub fn new(check: &HealthCheck, started_at: u64) -> Checker {
        Checker {
            retries: check.retries.max(1),
            start_period_ms: check.start_period_ms,
            started_at,
            failures: 0,
            health: TaskHealth::Starting,
        }
    }

    /// Its health now.
    pub fn health(&self) -> TaskHealth {
        self.health
    }

    /// Takes one result at `now`; the new health when it changed.
    pub fn observe(&mut self, passed: bool, now: u64) -> Option<TaskHealth> {
        let before = self.health;
        if passed {
            self.failures = 0;
            self.health = TaskHealth::Healthy;
        } else if self.health == TaskHealth::Starting
            && now < self.started_at.saturating_add(self.start_period_ms)
        {
            // Within the start period a failure does not count.
        } else {
            self.failures = self.failures.saturating_add(1);
            if self.failures >= self.retries {
                self.health = TaskHealth::Unhealthy;
            }
        }
        (self.health != before).then_some(self.health)
    }
}

/// What a probe loop tells the agent: a task's health changed (with the last failure's
/// reason, when it is a failure).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Task id.
    pub task: String,
    /// Its new health.
    pub health: TaskHealth,
    /// Why the last check failed.
    pub why: Option<String>,
}

/// Checks `task` (its template has a check) until the returned task is aborted or the
/// health is `unhealthy`, sending every change to `tx`. `host_ip` is where its ports are;
/// `dir` its directory (a command check runs there unless the task has a working directory).
pub fn spawn(
    task: &Task,
    host_ip: String,
    dir: std::path::PathBuf,
    started_at: u64,
    tx: mpsc::Sender<Change>,
) -> Option<tokio::task::JoinHandle<()>> {
    let check = task.template.health.clone()?;
    let task = task.clone();
    Some(tokio::spawn(async move {
        let mut checker = Checker::new(&check, started_at);
        let interval = Duration::from_millis(check.interval_ms.max(1));
        let timeout = Duration::from_millis(check.timeout_ms.max(1));
        loop {
            let wait = if checker.health() == TaskHealth::Starting {
                interval.min(START_INTERVAL)
            } else {
                interval
            };
            tokio::time::sleep(wait).await;
            let result = match tokio::time::timeout(timeout, probe(&task, &host_ip, &dir)).await {
                Ok(r) => r,
                Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
            };
            let why = result.as_ref().err().cloned();
            if let Some(health) = checker.observe(result.is_ok(), starling_api::unix_ms()) {
                let change = Change {
                    task: task.id.clone(),
                    health,
                    why,
                };
                if tx.send(change).await.is_err() || health == TaskHealth::Unhealthy {
                    return;
                }
            }
        }
    }))
}

/// One check of `task`: `Ok` if it passed, else why not (one line).
pub async fn probe(task: &Task, host_ip: &str, dir: &std::path::Path) -> Result<(), String> {
    let Some(check) = &task.template.health else {
        return Ok(());
    };
    let port_of = |name: &str| {
        task.ports
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.port)
            .ok_or_else(|| format!("the task has no port {name}"))
    };
    match &check.kind {
        CheckKind::Tcp { port } => {
            let port = port_of(port)?;
            tokio::net::TcpStream::connect((host_ip, port))
                .await
                .map(drop)
                .map_err(|e| format!("connect to {host_ip}:{port}: {e}"))
        }
        CheckKind::Http { port, path } => http_get(host_ip, port_of(port)?, path).await,
        CheckKind::Command { argv } => command(task, host_ip, dir, argv).await,
    }
}

async fn http_get(host: &str, port: u16, path: &str) -> Result<(), String> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("http: {e}"))?;
    let conn = tokio::spawn(conn);
    let request = http::Request::get(path)
        .header(http::header::HOST, format!("{host}:{port}"))
        .header(http::header::USER_AGENT, "starling-health-check")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("http request: {e}"))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = response.status();
        // The body is read (and dropped) so the server sees a complete exchange.
        let _ = response.into_body().collect().await;
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("GET {path}: {status}"))
        }
    }
    .await;
    conn.abort();
    result
}

async fn command(
    task: &Task,
    host_ip: &str,
    dir: &std::path::Path,
    argv: &[String],
) -> Result<(), String> {
    let program = argv.first().ok_or("no program")?;
    let env = crate::exec::environment(task, host_ip);
    let cwd = crate::exec::workdir(task, dir);
    let path = env.get("PATH").cloned().unwrap_or_default();
    let resolved = crate::exec::resolve_program(program, &path, Some(&cwd))?;
    let mut cmd = tokio::process::Command::new(resolved);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env)
        .current_dir(&cwd)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    // As the task's own user, as a container's check runs inside it.
    if let Some(user) = &task.template.process.user {
        if !nix::unistd::geteuid().is_root() {
            return Err(format!(
                "cannot run the check as {user}: the agent is not root"
            ));
        }
        let (uid, gid) = crate::exec::lookup_user(user)?;
        cmd.uid(uid).gid(gid);
    }
    let output = cmd.output().await.map_err(|e| format!("{program}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let text: String = text.chars().take(OUTPUT_MAX).collect();
    let status = match output.status.code() {
        Some(c) => format!("exit code {c}"),
        None => "killed by a signal".to_owned(),
    };
    Err(if text.is_empty() {
        status
    } else {
        format!("{status}: {text}")
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn check(retries: u32, start_period_ms: u64) -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Command {
                argv: vec!["true".into()],
            },
            interval_ms: 1000,
            timeout_ms: 1000,
            retries,
            start_period_ms,
        }
    }

    fn task(kind: CheckKind, port: u16) -> Task {
        let mut t = crate::testing::task("t1", &["sleep"], starling_state::TaskState::Running);
        t.template.process.env =
            std::collections::BTreeMap::from([("CHECKED".into(), "yes".into())]);
        t.template.health = Some(HealthCheck {
            kind,
            interval_ms: 100,
            timeout_ms: 1000,
            retries: 1,
            start_period_ms: 0,
        });
        t.ports = vec![starling_state::AssignedPort {
            name: "HTTP".into(),
            port,
        }];
        t
    }

    /// A server that answers every connection with `status` (one HTTP/1.1 response).
    async fn http_server(status: &'static str) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf).await;
                let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                let _ = c.write_all(reply.as_bytes()).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn probes_tcp_http_and_commands() {
        let dir = std::env::temp_dir();
        let ok = http_server("200 OK").await;
        let bad = http_server("503 Service Unavailable").await;
        let http = |port| {
            task(
                CheckKind::Http {
                    port: "HTTP".into(),
                    path: "/health".into(),
                },
                port,
            )
        };
        assert_eq!(probe(&http(ok), "127.0.0.1", &dir).await, Ok(()));
        let e = probe(&http(bad), "127.0.0.1", &dir).await.unwrap_err();
        assert!(e.contains("503"), "{e}");
        let tcp = |port| {
            task(
                CheckKind::Tcp {
                    port: "HTTP".into(),
                },
                port,
            )
        };
        assert_eq!(probe(&tcp(ok), "127.0.0.1", &dir).await, Ok(()));
        // A port nothing listens on (bound, then closed).
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert!(probe(&tcp(closed), "127.0.0.1", &dir).await.is_err());
        let cmd = |script: &str| {
            task(
                CheckKind::Command {
                    argv: vec!["sh".into(), "-c".into(), script.into()],
                },
                ok,
            )
        };
        // The task's environment (its variables and ports) is the check's.
        assert_eq!(
            probe(
                &cmd("test \"$CHECKED:$PORT\" = yes:$STARLING_PORT_HTTP"),
                "127.0.0.1",
                &dir
            )
            .await,
            Ok(())
        );
        let e = probe(&cmd("echo not ready; exit 3"), "127.0.0.1", &dir)
            .await
            .unwrap_err();
        assert_eq!(e, "exit code 3: not ready");
    }

    #[test]
    fn starting_until_a_pass_unhealthy_after_retries_in_a_row() {
        let mut c = Checker::new(&check(3, 0), 0);
        assert_eq!(c.health(), TaskHealth::Starting);
        assert_eq!(c.observe(false, 10), None);
        assert_eq!(c.observe(true, 20), Some(TaskHealth::Healthy));
        assert_eq!(c.observe(false, 30), None);
        assert_eq!(c.observe(false, 40), None);
        // A pass resets the count.
        assert_eq!(c.observe(true, 50), None);
        assert_eq!(c.observe(false, 60), None);
        assert_eq!(c.observe(false, 70), None);
        assert_eq!(c.observe(false, 80), Some(TaskHealth::Unhealthy));
        assert_eq!(c.observe(true, 90), Some(TaskHealth::Healthy));
    }

    #[test]
    fn failures_in_the_start_period_do_not_count() {
        let mut c = Checker::new(&check(1, 1000), 0);
        for t in [100, 500, 999] {
            assert_eq!(c.observe(false, t), None);
        }
        assert_eq!(c.observe(false, 1000), Some(TaskHealth::Unhealthy));
        // Once healthy, the start period no longer shelters a failure.
        let mut c = Checker::new(&check(1, 1000), 0);
        assert_eq!(c.observe(true, 100), Some(TaskHealth::Healthy));
        assert_eq!(c.observe(false, 200), Some(TaskHealth::Unhealthy));
    }
}
