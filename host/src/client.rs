//! HTTP client for a wafer server's REST API and invocation routes (used by the CLI).

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::StatusCode;

use crate::cluster::ClusterStatus;
use crate::state::{FunctionRecord, FunctionSpec};

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached.
    // The cause follows from the error's source chain (printed with `{:#}`).
    #[error(
        "cannot reach the wafer server at {url} (is `wafer dev` running? set --server or \
         WAFER_SERVER)"
    )]
    Connect {
        /// The server URL.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The server answered with an error.
    #[error("{message} (HTTP {status}, {code})")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The error code from the body.
        code: String,
        /// The message from the body.
        message: String,
        /// The guest's log, if any.
        log: Option<String>,
    },
    /// The server's answer could not be read.
    #[error("reading the server's answer: {0}")]
    Response(reqwest::Error),
    /// Encoding the request failed.
    #[error("encoding the request: {0}")]
    Encode(String),
}

/// A page of a function's guest logs on one server, as `GET /v1/functions/{name}/logs`
/// answers it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct LogPage {
    /// The server that kept them.
    pub node: u64,
    /// The cursor for what comes next.
    pub next: u64,
    /// Oldest first.
    pub records: Vec<LogEntry>,
}

/// The guest log of one invocation.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct LogEntry {
    /// Its place on its server.
    pub seq: u64,
    /// When the invocation ended, ms since the Unix epoch.
    pub at_ms: u64,
    /// The function's version that ran.
    pub version: u64,
    /// The HTTP status it was answered with.
    pub status: u16,
    /// The agent that ran it, when not the server.
    pub agent: Option<String>,
    /// Its stderr and `wafer.log` lines.
    pub log: String,
    /// Bytes logged beyond the function's log limit (not kept).
    pub dropped: u64,
}

/// A client of one server.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

/// An invocation's HTTP response.
#[derive(Debug)]
pub struct InvokeResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: reqwest::header::HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Client {
    /// A client of the server at `base` (`http://host:port`) that sends `token` as
    /// its bearer token.
    pub fn new(base: &str, token: Option<&str>) -> Result<Client, ClientError> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = token {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| {
                    ClientError::Encode("the token has characters a header cannot carry".into())
                })?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .default_headers(headers)
                .build()
                .unwrap_or_default(),
        })
    }

    /// Every token (`GET /v1/tokens`).
    pub async fn tokens(&self) -> Result<serde_json::Value, ClientError> {
        let response = self.checked(self.http.get(self.url("/v1/tokens"))).await?;
        response.json().await.map_err(ClientError::Response)
    }

    /// Creates a token (`POST /v1/tokens`); the answer holds its secret.
    pub async fn create_token(
        &self,
        name: &str,
        scopes: &[crate::state::Scope],
        ttl_secs: Option<u64>,
    ) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::json!({ "name": name, "scopes": scopes, "ttl_secs": ttl_secs });
        let response = self
            .checked(self.http.post(self.url("/v1/tokens")).json(&body))
            .await?;
        response.json().await.map_err(ClientError::Response)
    }

    /// Revokes token `id` (`DELETE /v1/tokens/{id}`).
    pub async fn revoke_token(&self, id: &str) -> Result<(), ClientError> {
        self.checked(self.http.delete(self.url(&format!("/v1/tokens/{id}"))))
            .await?;
        Ok(())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let response = request.send().await.map_err(|source| {
            if source.is_connect() || source.is_timeout() {
                ClientError::Connect {
                    url: self.base.clone(),
                    source,
                }
            } else {
                ClientError::Response(source)
            }
        })?;
        Ok(response)
    }

    async fn checked(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let response = self.send(request).await?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(api_error(response).await)
        }
    }

    /// Uploads `wasm` as function `name`; `progress` is called with bytes sent so far.
    pub async fn deploy(
        &self,
        name: &str,
        wasm: Vec<u8>,
        spec: &FunctionSpec,
        progress: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<FunctionRecord, ClientError> {
        let manifest =
            serde_json::to_string(spec).map_err(|e| ClientError::Encode(e.to_string()))?;
        let total = wasm.len() as u64;
        let data = Bytes::from(wasm);
        const CHUNK: usize = 64 << 10;
        let chunks: Vec<Bytes> = (0..data.len())
            .step_by(CHUNK)
            .map(|i| data.slice(i..(i + CHUNK).min(data.len())))
            .collect();
        let mut sent = 0u64;
        let stream = futures_util::stream::iter(chunks).map(move |chunk| {
            sent += chunk.len() as u64;
            progress(sent);
            Ok::<Bytes, std::io::Error>(chunk)
        });
        let request = self
            .http
            .put(self.url(&format!("/v1/functions/{name}")))
            .header(crate::gateway::MANIFEST_HEADER, manifest)
            .header(reqwest::header::CONTENT_TYPE, "application/wasm")
            .header(reqwest::header::CONTENT_LENGTH, total)
            .body(reqwest::Body::wrap_stream(stream));
        let response = self.checked(request).await?;
        response.json().await.map_err(ClientError::Response)
    }

    /// Every deployed function, read linearizably (what any write acknowledged before
    /// this call did is included).
    pub async fn list(&self) -> Result<Vec<FunctionRecord>, ClientError> {
        #[derive(serde::Deserialize)]
        struct List {
            functions: Vec<FunctionRecord>,
        }
        let response = self
            .checked(self.http.get(self.url("/v1/functions?consistent=true")))
            .await?;
        let list: List = response.json().await.map_err(ClientError::Response)?;
        Ok(list.functions)
    }

    /// Sets labels `set` and removes labels `remove` of function `name`.
    pub async fn label(
        &self,
        name: &str,
        set: &std::collections::BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<FunctionRecord, ClientError> {
        let response = self
            .checked(
                self.http
                    .patch(self.url(&format!("/v1/functions/{name}/labels")))
                    .json(&serde_json::json!({ "set": set, "remove": remove })),
            )
            .await?;
        response.json().await.map_err(ClientError::Response)
    }

    /// The same client (token and all) for the server at `base`.
    pub fn at(&self, base: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            http: self.http.clone(),
        }
    }

    /// The server this client talks to (`http://host:port`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Function `name`'s guest logs kept by this server
    /// (`GET /v1/functions/{name}/logs`): the newest `limit` records, or with `after`
    /// the first `limit` after that cursor.
    pub async fn logs(
        &self,
        name: &str,
        after: Option<u64>,
        limit: u64,
    ) -> Result<LogPage, ClientError> {
        let mut url = format!("/v1/functions/{name}/logs?limit={limit}");
        if let Some(after) = after {
            url.push_str(&format!("&after={after}"));
        }
        let response = self.checked(self.http.get(self.url(&url))).await?;
        response.json().await.map_err(ClientError::Response)
    }

    /// The server's view of the cluster.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        let response = self.checked(self.http.get(self.url("/v1/cluster"))).await?;
        response.json().await.map_err(ClientError::Response)
    }

    /// Submits a job (`POST /v1/jobs`).
    pub async fn submit_job(
        &self,
        request: &serde_json::Value,
    ) -> Result<crate::state::JobRecord, ClientError> {
        let response = self
            .checked(self.http.post(self.url("/v1/jobs")).json(request))
            .await?;
        response.json().await.map_err(ClientError::Response)
    }

    /// Job `id` (linearizable); with `wait`, once it ended or `wait` passed.
    pub async fn job(
        &self,
        id: u64,
        wait: Option<std::time::Duration>,
    ) -> Result<crate::state::JobRecord, ClientError> {
        let mut url = self.url(&format!("/v1/jobs/{id}?consistent=true"));
        if let Some(wait) = wait {
            url.push_str(&format!("&wait={}", wait.as_secs_f64()));
        }
        let response = self.checked(self.http.get(url)).await?;
        response.json().await.map_err(ClientError::Response)
    }

    /// The newest jobs (linearizable).
    pub async fn jobs(&self) -> Result<Vec<crate::state::JobRecord>, ClientError> {
        #[derive(serde::Deserialize)]
        struct Jobs {
            jobs: Vec<crate::state::JobRecord>,
        }
        let response = self
            .checked(
                self.http
                    .get(self.url("/v1/jobs?consistent=true&limit=100")),
            )
            .await?;
        let jobs: Jobs = response.json().await.map_err(ClientError::Response)?;
        Ok(jobs.jobs)
    }

    /// A finished job's output.
    pub async fn job_output(&self, id: u64) -> Result<bytes::Bytes, ClientError> {
        let response = self
            .checked(
                self.http
                    .get(self.url(&format!("/v1/jobs/{id}/output?consistent=true"))),
            )
            .await?;
        response.bytes().await.map_err(ClientError::Response)
    }

    /// Kills job `id`.
    pub async fn kill_job(&self, id: u64) -> Result<crate::state::JobRecord, ClientError> {
        let response = self
            .checked(self.http.post(self.url(&format!("/v1/jobs/{id}/kill"))))
            .await?;
        response.json().await.map_err(ClientError::Response)
    }

    /// Every attempt of the newest jobs (`GET /v1/tasks`, linearizable), as JSON.
    pub async fn tasks(&self) -> Result<Vec<serde_json::Value>, ClientError> {
        let response = self
            .checked(self.http.get(self.url("/v1/tasks?consistent=true")))
            .await?;
        let body: serde_json::Value = response.json().await.map_err(ClientError::Response)?;
        Ok(body["tasks"].as_array().cloned().unwrap_or_default())
    }

    /// Sets a role's weight and quota; returns the role as stored.
    pub async fn set_role(
        &self,
        role: &str,
        weight: f64,
        quota: Option<crate::state::Resources>,
    ) -> Result<serde_json::Value, ClientError> {
        let response = self
            .checked(
                self.http
                    .put(self.url(&format!("/v1/roles/{role}")))
                    .json(&serde_json::json!({ "weight": weight, "quota": quota })),
            )
            .await?;
        response.json().await.map_err(ClientError::Response)
    }

    /// The configured roles, as JSON.
    pub async fn roles(&self) -> Result<serde_json::Value, ClientError> {
        let response = self
            .checked(self.http.get(self.url("/v1/roles?consistent=true")))
            .await?;
        response.json().await.map_err(ClientError::Response)
    }

    /// The agents (`GET /v1/nodes`, linearizable).
    pub async fn nodes(&self) -> Result<Vec<crate::scheduler::AgentView>, ClientError> {
        #[derive(serde::Deserialize)]
        struct Nodes {
            agents: Vec<crate::scheduler::AgentView>,
        }
        let response = self
            .checked(self.http.get(self.url("/v1/nodes?consistent=true")))
            .await?;
        let nodes: Nodes = response.json().await.map_err(ClientError::Response)?;
        Ok(nodes.agents)
    }

    /// Adds the node listening at `rpc_addr` to the cluster; returns its id.
    pub async fn cluster_add(&self, rpc_addr: &str) -> Result<u64, ClientError> {
        #[derive(serde::Deserialize)]
        struct Added {
            id: u64,
        }
        let response = self
            .checked(
                self.http
                    .post(self.url("/v1/cluster/members"))
                    .json(&serde_json::json!({ "addr": rpc_addr })),
            )
            .await?;
        let added: Added = response.json().await.map_err(ClientError::Response)?;
        Ok(added.id)
    }

    /// Removes node `id` from the cluster.
    pub async fn cluster_remove(&self, id: u64) -> Result<(), ClientError> {
        self.checked(
            self.http
                .delete(self.url(&format!("/v1/cluster/members/{id}"))),
        )
        .await?;
        Ok(())
    }

    /// The versions of function `name` the cluster keeps, oldest first (the last is the
    /// current one), read linearizably.
    pub async fn versions(&self, name: &str) -> Result<Vec<FunctionRecord>, ClientError> {
        #[derive(serde::Deserialize)]
        struct Versions {
            versions: Vec<FunctionRecord>,
        }
        let response = self
            .checked(
                self.http
                    .get(self.url(&format!("/v1/functions/{name}/versions?consistent=true"))),
            )
            .await?;
        let versions: Versions = response.json().await.map_err(ClientError::Response)?;
        Ok(versions.versions)
    }

    /// Makes kept version `version` of function `name` (`None`: the one before the
    /// current) current again; answers the function's new record.
    pub async fn rollback(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<FunctionRecord, ClientError> {
        let response = self
            .checked(
                self.http
                    .post(self.url(&format!("/v1/functions/{name}/rollback")))
                    .json(&serde_json::json!({ "version": version })),
            )
            .await?;
        response.json().await.map_err(ClientError::Response)
    }

    /// Removes function `name`.
    pub async fn remove(&self, name: &str) -> Result<(), ClientError> {
        self.checked(self.http.delete(self.url(&format!("/v1/functions/{name}"))))
            .await?;
        Ok(())
    }

    /// Invokes function `name` at `path` with `method`, `headers` and `body`. Errors
    /// answered by wafer itself (JSON with `error`) come back as [`ClientError::Api`];
    /// anything the function answered, whatever its status, comes back as a response.
    pub async fn invoke(
        &self,
        name: &str,
        method: reqwest::Method,
        path: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Result<InvokeResponse, ClientError> {
        let path = path.trim_start_matches('/');
        let url = if path.is_empty() {
            self.url(&format!("/fn/{name}"))
        } else {
            self.url(&format!("/fn/{name}/{path}"))
        };
        let mut request = self.http.request(method, url).body(body);
        for (k, v) in headers {
            request = request.header(k, v);
        }
        let response = self.send(request).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(ClientError::Response)?;
        if !status.is_success() {
            if let Ok(err) = serde_json::from_slice::<ErrorBody>(&body) {
                return Err(ClientError::Api {
                    status,
                    code: err.error,
                    message: err.message,
                    log: err.log,
                });
            }
        }
        Ok(InvokeResponse {
            status,
            headers,
            body,
        })
    }
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    error: String,
    message: String,
    log: Option<String>,
}

async fn api_error(response: reqwest::Response) -> ClientError {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(err) => ClientError::Api {
            status,
            code: err.error,
            message: err.message,
            log: err.log,
        },
        Err(_) => ClientError::Api {
            status,
            code: "http".into(),
            message: if text.is_empty() {
                status.to_string()
            } else {
                text
            },
            log: None,
        },
    }
}
