# wafer's public API: what clients in any language use to deploy, invoke and run jobs.
#
# Served on every server's `--api` port (`wafer dev` prints it). The bootstrap
# capability is a `Gateway`; `login` with an API token returns a `Cluster` capability
# that can do what the token's scopes allow. Every call re-checks the token, so a
# revoked or expired token's capability stops working at once.
#
# Errors: a call the server refuses answers normally with its `error` field set
# (`error.code` is `ok` on success). Transport failures (a dropped connection, a
# malformed message) are Cap'n Proto exceptions instead.
@0x9ccc9d3ae5f4ebf4;

# The bootstrap capability of the `--api` port.
interface Gateway {
  # Logs in with an API token (`wafer token create`). `cluster` is usable only if
  # `error.code` is `ok`; `token` describes the token (never its secret).
  login @0 (token :Text) -> (cluster :Cluster, token :TokenInfo, error :Error);
}

# What a logged-in client can do. Each method names the scope it needs; `admin`
# allows everything.
interface Cluster {
  # (deploy) Starts a deploy of function `name`: send the module through `upload` in
  # chunks, then call `Upload.finish`. `size` is the module's size in bytes: a module
  # over the server's limit is refused here, before any byte is sent. `manifest` is
  # the function's JSON manifest (limits and env, as `wafer deploy --manifest`; empty
  # for defaults).
  deploy @0 (name :Text, size :UInt64, manifest :Text) -> (upload :Upload, error :Error);
  # (read) Every deployed function, sorted by name.
  listFunctions @1 () -> (functions :List(FunctionInfo), error :Error);
  # (read) One function.
  getFunction @2 (name :Text) -> (function :FunctionInfo, error :Error);
  # (deploy) Removes a function.
  deleteFunction @3 (name :Text) -> (error :Error);
  # (read) The versions of function `name` kept for rollbacks (its newest 10), oldest
  # first; the last is the current one. Labels belong to the function, not to a
  # version: they are empty here.
  listVersions @15 (name :Text) -> (versions :List(FunctionInfo), error :Error);
  # (deploy) Makes kept version `version` of function `name` current again, as the
  # function's next version: the same module, limits and env (the labels stay as they
  # are). `version` 0: the one just before the current version. Answers the new
  # current record; `error.reason` is `unknown_version` or `already_current` when
  # there is nothing to restore.
  rollbackFunction @16 (name :Text, version :UInt64) -> (function :FunctionInfo, error :Error);
  # (invoke) Runs a function once, as an HTTP request to `/fn/NAME` would.
  # `response` is set when the function ran (even if it answered with an error
  # status); `error` when it could not run or failed (a timeout, a trap, an exceeded
  # limit: `error.reason` says which; `response` then holds the guest's log).
  invoke @4 (name :Text, request :InvokeRequest) -> (response :InvokeResponse, error :Error);
  # (invoke) Submits a durable job: `function` runs once on `input` (stdin -> stdout).
  submitJob @5 (job :JobSpec) -> (job :JobInfo, error :Error);
  # (read) Waits until job `id` has ended or `timeoutMs` (at most 300000) has passed;
  # `job.state` says which.
  awaitJob @6 (id :UInt64, timeoutMs :UInt32) -> (job :JobInfo, error :Error);
  # (read) Job `id` as it is now.
  getJob @7 (id :UInt64) -> (job :JobInfo, error :Error);
  # (invoke) Kills job `id`.
  killJob @8 (id :UInt64) -> (job :JobInfo, error :Error);
  # (read) The newest `limit` jobs (0: 100), newest first, in `state` if not empty.
  listJobs @9 (limit :UInt32, state :Text) -> (jobs :List(JobInfo), error :Error);
  # (read) The agents: resources, use, attributes, state.
  listNodes @10 () -> (nodes :List(NodeInfo), error :Error);
  # (read) Every attempt of the newest jobs.
  listTasks @11 () -> (tasks :List(TaskInfo), error :Error);
  # (read) The registered frameworks and their shares.
  listFrameworks @12 () -> (frameworks :List(FrameworkInfo), error :Error);
  # (read) The cluster as the server the client talks to sees it.
  status @13 () -> (status :ClusterStatus, error :Error);
  # (read) Pushes events to `sink` as they happen on the server the client talks to,
  # until the returned `subscription` is dropped or cancelled, or `sink` fails.
  watch @14 (sink :EventSink) -> (subscription :Subscription, error :Error);
}

# A module being uploaded (from `Cluster.deploy`).
interface Upload {
  # Appends `chunk` (at most 1 MiB) to the module. `received` is the byte count so far
  # (progress); more than the size announced to `deploy` is an error (`tooLarge`) that
  # ends the upload.
  write @0 (chunk :Data) -> (received :UInt64, error :Error);
  # Validates, compiles and commits the module: the function's new version is served
  # by the time this answers. Nothing is stored if the upload fails or is abandoned.
  finish @1 () -> (function :FunctionInfo, error :Error);
}

# Receives events (implemented by the client).
interface EventSink {
  event @0 (event :Event) -> ();
}

# An event subscription: dropping it (or calling `cancel`) stops the events.
interface Subscription {
  cancel @0 () -> ();
}

# Why a call was refused. `code` is stable; `reason` is the REST API's finer error code
# (e.g. `memory_limit`, `malformed_wasm`); `message` is for people.
struct Error {
  code @0 :Code;
  reason @1 :Text;
  message @2 :Text;

  enum Code {
    # No error.
    ok @0;
    # The token is unknown, revoked or expired.
    unauthorized @1;
    # The token lacks the scope the call needs (the message names it).
    forbidden @2;
    # No such function, job or token.
    notFound @3;
    # The request is malformed (a bad name, manifest, module, constraint).
    invalid @4;
    # Over a size limit (module, request, job input).
    tooLarge @5;
    # Refused by the cluster's state (e.g. a job that already ended).
    conflict @6;
    # No leader or quorum now, or the node is busy: retry.
    unavailable @7;
    # The function ran and failed: trap, bad exit status, memory limit, response too
    # large (`reason` says which).
    failed @8;
    # The function did not finish within its timeout.
    timeout @9;
    # A bug or a storage failure on the server.
    internal @10;
  }
}

# An API token's public description.
struct TokenInfo {
  # Its id: the first 12 hex digits of its secret's SHA-256.
  id @0 :Text;
  name @1 :Text;
  scopes @2 :List(Scope);
  # When it stops working, ms since the Unix epoch (0: never).
  expiresAtMs @3 :UInt64;
}

enum Scope {
  admin @0;
  deploy @1;
  invoke @2;
  read @3;
}

# A deployed function.
struct FunctionInfo {
  name @0 :Text;
  # 1 for the first deploy under this name, then one more per deploy.
  version @1 :UInt64;
  # The module's content digest, `sha256:<hex>`.
  digest @2 :Text;
  # The module's size in bytes.
  size @3 :UInt64;
  limits @4 :Limits;
  env @5 :List(KeyValue);
  labels @6 :List(KeyValue);
  # When this version was deployed, ms since the Unix epoch.
  deployedAtMs @7 :UInt64;
  # The earlier version whose module and spec a rollback made current again; 0 when
  # this version was deployed.
  restoredFrom @8 :UInt64;
}

# A function's limits.
struct Limits {
  memoryMb @0 :UInt64;
  timeoutMs @1 :UInt64;
  maxRequestBytes @2 :UInt64;
  maxResponseBytes @3 :UInt64;
  maxLogBytes @4 :UInt64;
  # Fuel for one run, about one unit per wasm instruction (0: unmetered).
  fuel @5 :UInt64;
}

struct KeyValue {
  key @0 :Text;
  value @1 :Text;
}

# An invocation, as an HTTP request to the function.
struct InvokeRequest {
  # HTTP method; empty: POST with a body, else GET.
  method @0 :Text;
  # Path below the function with an optional query, e.g. `/items/1?x=2`; empty: `/`.
  path @1 :Text;
  headers @2 :List(KeyValue);
  body @3 :Data;
}

# What the function answered.
struct InvokeResponse {
  status @0 :UInt16;
  headers @1 :List(KeyValue);
  body @2 :Data;
  # The guest's log (stderr) tail when it failed; empty otherwise.
  log @3 :Text;
}

# A job to submit.
struct JobSpec {
  function @0 :Text;
  # Its stdin (at most 1 MiB).
  input @1 :Data;
  # Placement constraints on agent attributes, `key=value` or `key!=value`.
  constraints @2 :List(Text);
  # Attempts allowed to fail (0: the default, 3).
  maxAttempts @3 :UInt32;
  # Accelerator devices each attempt is granted (0: as its function says; at most 1).
  accel @4 :UInt64;
}

# A job and its attempts.
struct JobInfo {
  id @0 :UInt64;
  function @1 :Text;
  # STAGING, STARTING, RUNNING, FINISHED, FAILED, KILLED, UNREACHABLE or GONE.
  state @2 :Text;
  # Why it waits or why it failed; empty if nothing to say.
  reason @3 :Text;
  attempts @4 :List(TaskInfo);
  # Its stdout when FINISHED (the first result reported; at most 4 MiB).
  output @5 :Data;
  # Whether it has ended (FINISHED, FAILED or KILLED).
  ended @6 :Bool;
  submittedAtMs @7 :UInt64;
}

# One attempt of a job.
struct TaskInfo {
  job @0 :UInt64;
  # 1 for the first attempt.
  attempt @1 :UInt32;
  function @2 :Text;
  agent @3 :Text;
  state @4 :Text;
  reason @5 :Text;
  startedAtMs @6 :UInt64;
  # 0 while it runs.
  endedAtMs @7 :UInt64;
}

# Amounts of resources.
struct Resources {
  slots @0 :UInt64;
  memoryMb @1 :UInt64;
  accelerators @2 :UInt64;
}

# An agent.
struct NodeInfo {
  id @0 :Text;
  # Its executor's Cap'n Proto address.
  rpc @1 :Text;
  # `active` or `unreachable`.
  state @2 :Text;
  resources @3 :Resources;
  allocated @4 :Resources;
  free @5 :Resources;
  attributes @6 :List(KeyValue);
}

# A registered framework.
struct FrameworkInfo {
  id @0 :Text;
  name @1 :Text;
  role @2 :Text;
  # Its role's weight.
  weight @3 :Float64;
  # What its committed allocations hold.
  allocated @4 :Resources;
  # Its dominant share of the active agents' resources, 0 to 1.
  allocatedShare @5 :Float64;
}

# The Raft cluster as one server sees it.
struct ClusterStatus {
  # The server answering.
  id @0 :UInt64;
  # Leader, Follower, Candidate or Learner.
  state @1 :Text;
  # 0: no leader known.
  leaderId @2 :UInt64;
  term @3 :UInt64;
  members @4 :List(Member);
  lastLogIndex @5 :UInt64;
  appliedIndex @6 :UInt64;

  struct Member {
    id @0 :UInt64;
    # Its node (Cap'n Proto) and HTTP addresses.
    rpc @1 :Text;
    http @2 :Text;
    voter @3 :Bool;
  }
}

# Something that happened in the cluster, as the server that sends it applied it.
struct Event {
  # When the server saw it, ms since the Unix epoch.
  atMs @0 :UInt64;
  union {
    # A function was deployed (a new version).
    deployed @1 :FunctionInfo;
    # A function was removed.
    deleted @2 :Text;
    # A job changed state (submitted, placed, running, ended, ...).
    taskChanged :group {
      job @3 :UInt64;
      # The attempt, 0 when the change is the job's alone (submitted, killed).
      attempt @4 :UInt32;
      state @5 :Text;
    }
    # An agent registered (again) and is active.
    nodeJoined @6 :Text;
    # An agent stopped heartbeating and is unreachable.
    nodeLost @7 :Text;
    # The Raft leader changed (0: none known now).
    leaderChanged :group {
      leaderId @8 :UInt64;
      term @9 :UInt64;
    }
    # The client fell this many events behind and they were dropped.
    missed @10 :UInt64;
    # The subscription ended on the server's side, for this reason (the token was
    # revoked or expired); no more events follow.
    ended @11 :Text;
  }
}
