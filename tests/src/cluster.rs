//! A cluster of real `wafer server` processes on 127.0.0.1, ports chosen at run time:
//! start, kill -9, restart on the same addresses, add and remove members, and wait on
//! each node's `GET /v1/cluster` instead of sleeping; and `wafer agent` processes
//! registered with it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::{spawn_until_ready, unused_port, wafer_bin};

/// How long cluster state may take to settle (elections, catch-up) in tests.
pub const SETTLE_DEADLINE: Duration = Duration::from_secs(60);
/// Pause between polls.
const POLL: Duration = Duration::from_millis(50);

/// How a new server becomes a member.
#[derive(Debug, Clone)]
pub enum Join {
    /// Start a new cluster.
    Bootstrap,
    /// Join through this member's RPC address.
    Via(String),
    /// Wait for `wafer cluster add`.
    Wait,
}

/// One `wafer server` process (or its addresses, while it is down).
pub struct Server {
    /// Node id.
    pub id: u64,
    /// Data folder.
    pub data: PathBuf,
    /// Gateway address (`host:port`).
    pub http: String,
    /// Cap'n Proto address (`host:port`).
    pub rpc: String,
    /// Public Cap'n Proto API address (`host:port`).
    pub api: String,
    child: Option<Child>,
}

impl Server {
    /// `http://HTTP` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// The base URL of its gateway.
    pub fn base(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Whether the process is running.
    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `wafer server --id ID --data DATA --listen RPC --http HTTP` plus `extra`, and
/// waits for its first stdout line. Returns the process and its bound addresses.
pub fn spawn_server(
    id: u64,
    data: &Path,
    rpc: &str,
    http: &str,
    api: &str,
    join: &Join,
    extra: &[String],
) -> anyhow::Result<(Child, String, String, String)> {
    let mut command = Command::new(wafer_bin()?);
    command
        .arg("server")
        .args([
            "--id",
            &id.to_string(),
            "--listen",
            rpc,
            "--http",
            http,
            "--api",
            api,
            "--data",
        ])
        .arg(data)
        .args(extra);
    match join {
        Join::Bootstrap => {}
        Join::Via(addr) => {
            command.args(["--join", addr]);
        }
        Join::Wait => {
            command.arg("--wait");
        }
    }
    // "wafer server ID: listening on http://HTTP rpc RPC api API"
    let (child, (http, rpc, api)) = spawn_until_ready(command, data, "wafer server", |line| {
        let (_, rest) = line.split_once(": listening on http://")?;
        let (http, rest) = rest.split_once(" rpc ")?;
        let (rpc, api) = rest.split_once(" api ")?;
        Some((
            http.trim().to_string(),
            rpc.trim().to_string(),
            api.trim().to_string(),
        ))
    })?;
    Ok((child, http, rpc, api))
}

/// A cluster of servers in one folder.
pub struct Cluster {
    dir: PathBuf,
    extra: Vec<String>,
    servers: BTreeMap<u64, Server>,
    http: reqwest::Client,
}

impl Cluster {
    /// Starts `n` servers (ids 1..=n) in `dir`: node 1 bootstraps, the others join
    /// through it. `extra` arguments go to every server. Waits until all agree on a
    /// leader and every node is a voter.
    pub async fn start(dir: &Path, n: u64, extra: &[&str]) -> anyhow::Result<Cluster> {
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            servers: BTreeMap::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .default_headers(crate::admin_headers())
                .build()
                .context("HTTP client")?,
        };
        cluster.add_server(1, Join::Bootstrap)?;
        for id in 2..=n {
            let via = cluster.server(1).rpc.clone();
            cluster.add_server(id, Join::Via(via))?;
        }
        let ids: Vec<u64> = (1..=n).collect();
        cluster.wait_voters(&ids, &ids).await?;
        Ok(cluster)
    }

    /// Starts server `id` with a new data folder.
    pub fn add_server(&mut self, id: u64, join: Join) -> anyhow::Result<&Server> {
        let data = self.dir.join(format!("node{id}"));
        // Fixed ports, outside the range of outgoing connections' ports: a restart
        // binds the same addresses.
        let addr = || unused_port().map(|port| format!("127.0.0.1:{port}"));
        let (child, http, rpc, api) =
            spawn_server(id, &data, &addr()?, &addr()?, &addr()?, &join, &self.extra)?;
        self.servers.insert(
            id,
            Server {
                id,
                data,
                http,
                rpc,
                api,
                child: Some(child),
            },
        );
        Ok(self.server(id))
    }

    /// Server `id`.
    ///
    /// # Panics
    /// If there is no such server (a bug in the test).
    pub fn server(&self, id: u64) -> &Server {
        match self.servers.get(&id) {
            Some(server) => server,
            None => panic!("no server {id} in this cluster"),
        }
    }

    /// Ids of the running servers.
    pub fn up(&self) -> Vec<u64> {
        self.servers
            .values()
            .filter(|s| s.is_up())
            .map(|s| s.id)
            .collect()
    }

    /// Kills server `id` with SIGKILL.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let server = self.servers.get_mut(&id).context("no such server")?;
        if let Some(mut child) = server.child.take() {
            child.kill().context("killing the server")?;
            child.wait().context("waiting for the server")?;
        }
        Ok(())
    }

    /// Waits until server `id` exits by itself (or fails after [`SETTLE_DEADLINE`]);
    /// returns its exit status.
    pub async fn wait_exit(&mut self, id: u64) -> anyhow::Result<std::process::ExitStatus> {
        let until = Instant::now() + SETTLE_DEADLINE;
        let server = self.servers.get_mut(&id).context("no such server")?;
        let child = server.child.as_mut().context("the server is not running")?;
        loop {
            if let Some(status) = child.try_wait().context("waiting for the server")? {
                server.child = None;
                return Ok(status);
            }
            if Instant::now() >= until {
                bail!("server {id} still runs; its log:\n{}", server.log());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops server `id` with SIGTERM (a graceful stop) and waits for it to exit.
    pub fn stop(&mut self, id: u64) -> anyhow::Result<()> {
        let server = self.servers.get_mut(&id).context("no such server")?;
        if let Some(mut child) = server.child.take() {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .context("running kill")?;
            if !status.success() {
                bail!("kill -TERM failed: {status}");
            }
            child.wait().context("waiting for the server")?;
        }
        Ok(())
    }

    /// Restarts server `id` from its data folder on its old addresses.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let extra = self.extra.clone();
        let server = self.servers.get_mut(&id).context("no such server")?;
        if server.child.is_some() {
            bail!("server {id} is running");
        }
        let (child, _, _, _) = spawn_server(
            id,
            &server.data,
            &server.rpc,
            &server.http,
            &server.api,
            &Join::Bootstrap,
            &extra,
        )?;
        server.child = Some(child);
        Ok(())
    }

    /// Node `id`'s `GET /v1/cluster`.
    pub async fn status(&self, id: u64) -> anyhow::Result<Value> {
        self.get_json(id, "/v1/cluster").await
    }

    /// Node `id`'s answer to `GET path` (a success, as JSON).
    pub async fn get_json(&self, id: u64, path: &str) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(self.server(id).url(path))
            .send()
            .await
            .with_context(|| format!("GET {path} on node {id}"))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .with_context(|| format!("reading GET {path} on node {id}"))?;
        if !status.is_success() {
            bail!("GET {path} on node {id}: {status}: {body}");
        }
        Ok(body)
    }

    /// Deploys `wasm` through node `id` (`PUT /v1/functions/{name_query}`, with any
    /// limits as a query) and checks that the deploy succeeded.
    pub async fn deploy(&self, id: u64, name_query: &str, wasm: Vec<u8>) -> anyhow::Result<()> {
        let path = format!("/v1/functions/{name_query}");
        let response = self
            .http
            .put(self.server(id).url(&path))
            .body(wasm)
            .send()
            .await
            .with_context(|| format!("PUT {path} on node {id}"))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("PUT {path} on node {id}: {status}: {body}");
        }
        Ok(())
    }

    /// Polls until `check` holds for the statuses of `nodes` (all reachable), or fails
    /// after [`SETTLE_DEADLINE`] showing the last statuses.
    pub async fn wait_until(
        &self,
        nodes: &[u64],
        what: &str,
        check: impl Fn(&[Value]) -> bool,
    ) -> anyhow::Result<Vec<Value>> {
        self.wait_until_at(nodes, "/v1/cluster", what, check).await
    }

    /// Polls until `check` holds for the answers of `nodes` to `GET path`, or fails
    /// after [`SETTLE_DEADLINE`] showing the last answers.
    pub async fn wait_until_at(
        &self,
        nodes: &[u64],
        path: &str,
        what: &str,
        check: impl Fn(&[Value]) -> bool,
    ) -> anyhow::Result<Vec<Value>> {
        let until = Instant::now() + SETTLE_DEADLINE;
        let mut last = Vec::new();
        loop {
            let mut statuses = Vec::new();
            for &id in nodes {
                match self.get_json(id, path).await {
                    Ok(status) => statuses.push(status),
                    Err(e) => {
                        statuses.clear();
                        last = vec![Value::String(format!("node {id}: {e:#}"))];
                        break;
                    }
                }
            }
            if statuses.len() == nodes.len() {
                if check(&statuses) {
                    return Ok(statuses);
                }
                last = statuses;
            }
            if Instant::now() >= until {
                bail!(
                    "timed out waiting until {what}; last statuses: {last:#?}\n{}",
                    self.log_tails()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The last lines of every server's log, for failure messages.
    fn log_tails(&self) -> String {
        const LINES: usize = 40;
        let mut out = String::new();
        for (id, server) in &self.servers {
            let log = server.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LINES)..];
            out.push_str(&format!("--- node {id}'s log (last {LINES} lines):\n"));
            for line in tail {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Waits until `nodes` agree on one leader among them; returns its id.
    pub async fn wait_leader(&self, nodes: &[u64]) -> anyhow::Result<u64> {
        let statuses = self
            .wait_until(nodes, "the nodes agree on a leader", |all| {
                let leader = all[0]["leader_id"].as_u64();
                leader.is_some_and(|l| nodes.contains(&l))
                    && all.iter().all(|s| s["leader_id"].as_u64() == leader)
            })
            .await?;
        statuses[0]["leader_id"]
            .as_u64()
            .context("no leader id in the status")
    }

    /// Waits until every node of `nodes` sees exactly `voters` as voters (and a leader).
    pub async fn wait_voters(&self, nodes: &[u64], voters: &[u64]) -> anyhow::Result<()> {
        let mut want: Vec<u64> = voters.to_vec();
        want.sort_unstable();
        self.wait_until(nodes, &format!("the voters are {want:?}"), |all| {
            all.iter().all(|s| {
                let mut got: Vec<u64> = s["members"]
                    .as_array()
                    .map(|m| {
                        m.iter()
                            .filter(|m| m["voter"] == true)
                            .filter_map(|m| m["id"].as_u64())
                            .collect()
                    })
                    .unwrap_or_default();
                got.sort_unstable();
                got == want && s["leader_id"].as_u64().is_some()
            })
        })
        .await?;
        Ok(())
    }

    /// The `--listen` addresses of the running servers.
    pub fn rpc_addrs(&self) -> Vec<String> {
        self.servers
            .values()
            .filter(|s| s.is_up())
            .map(|s| s.rpc.clone())
            .collect()
    }

    /// Starts agent `name` (data in DIR/NAME) registered with every server, with
    /// `extra` arguments (`--slots 4`, `--attribute zone=b` ...).
    pub fn start_agent(&self, name: &str, extra: &[&str]) -> anyhow::Result<AgentProc> {
        let mut agent = AgentProc {
            id: String::new(),
            data: self.dir.join(name),
            rpc: String::new(),
            servers: self.rpc_addrs(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        agent.restart()?;
        Ok(agent)
    }

    /// Waits until `nodes` all list agents `ids` in `state` (`active`, `unreachable`).
    pub async fn wait_agents(
        &self,
        nodes: &[u64],
        ids: &[&str],
        state: &str,
    ) -> anyhow::Result<()> {
        self.wait_until_at(
            nodes,
            "/v1/nodes",
            &format!("agents {ids:?} are {state}"),
            |all| {
                all.iter().all(|answer| {
                    ids.iter().all(|id| {
                        answer["agents"].as_array().is_some_and(|agents| {
                            agents.iter().any(|a| a["id"] == *id && a["state"] == state)
                        })
                    })
                })
            },
        )
        .await?;
        Ok(())
    }

    /// Waits until node `id` has applied at least log index `index`.
    pub async fn wait_applied(&self, id: u64, index: u64) -> anyhow::Result<Value> {
        let statuses = self
            .wait_until(&[id], &format!("node {id} applied index {index}"), |all| {
                all[0]["applied_index"].as_u64().is_some_and(|a| a >= index)
            })
            .await?;
        Ok(statuses[0].clone())
    }
}

/// One `wafer agent` process (or its settings, while it is down).
pub struct AgentProc {
    /// Its id (from its ready line).
    pub id: String,
    /// Data folder.
    pub data: PathBuf,
    /// Its executor's address.
    pub rpc: String,
    servers: Vec<String>,
    extra: Vec<String>,
    child: Option<Child>,
}

impl AgentProc {
    /// Kills the agent with SIGKILL.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing the agent")?;
            child.wait().context("waiting for the agent")?;
        }
        Ok(())
    }

    /// (Re)starts the agent from its data folder; waits until it is registered.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("agent {} is running", self.id);
        }
        let mut command = Command::new(wafer_bin()?);
        command
            .arg("agent")
            .args([
                "--servers",
                &self.servers.join(","),
                "--listen",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(&self.data)
            .args(&self.extra);
        // "wafer agent ID: registered; executor rpc ADDR"
        let (child, (id, rpc)) = spawn_until_ready(command, &self.data, "wafer agent", |line| {
            let rest = line.strip_prefix("wafer agent ")?;
            let (id, rest) = rest.split_once(": registered; executor rpc ")?;
            Some((id.trim().to_string(), rest.trim().to_string()))
        })?;
        self.id = id;
        self.rpc = rpc;
        self.child = Some(child);
        Ok(())
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
