# A wafer server's node-to-node interface (the bootstrap capability of its `--listen`
# port) and the commands of the replicated state machine.
@0xdcc08716c2388336;

using Raft = import "raft.capnp".Raft;
using Accel = import "accel.capnp".Accel;
using AccelDevice = import "accel.capnp".Device;

# Where a server can be reached.
struct NodeInfo {
  id @0 :UInt64;
  # Cap'n Proto address (host:port) of its `Node` interface.
  rpcAddr @1 :Text;
  # HTTP gateway address (host:port).
  httpAddr @2 :Text;
}

# A command of the replicated state machine, as proposed and as stored in the Raft log.
struct Command {
  union {
    deployFunction :group {
      name @0 :Text;
      # Limits and environment: the function's JSON manifest.
      spec @1 :Text;
      # The WebAssembly module; stored once per SHA-256 digest.
      module @2 :Data;
      # Set by the proposer, so that every replica stores the same time.
      deployedAtMs @3 :UInt64;
    }
    deleteFunction :group {
      name @4 :Text;
    }
    # Sets and removes labels of a function (metadata only; the module is unchanged).
    setLabels :group {
      name @5 :Text;
      set @6 :List(Label);
      remove @7 :List(Text);
    }
    # Several commands proposed together, applied in order as one log entry (the
    # leader batches concurrent proposals so that one fsync commits them all).
    batch @8 :List(Command);

    # An agent registers (again): it is active with this capacity and these attributes.
    registerAgent :group {
      agent @9 :AgentInfo;
      atMs @10 :UInt64;
      # The job attempts it runs now: the others placed on it are reconciled.
      running @42 :List(TaskRef);
    }
    # The leader stopped hearing from agent `agent`: its allocations return to the pool.
    agentUnreachable :group {
      agent @11 :Text;
      atMs @12 :UInt64;
    }
    # A framework registers (again) in a role.
    registerFramework :group {
      id @13 :Text;
      name @14 :Text;
      role @15 :Text;
      atMs @16 :UInt64;
    }
    # Sets a role's weight and quota (a null quota: no limit).
    setRole :group {
      role @17 :Text;
      weight @18 :Float64;
      quota @19 :Resources;
    }
    # A framework accepts an offer: `resources` of agent `agent` become its allocation,
    # unless they are no longer free (then the command is rejected, on every replica).
    accept :group {
      framework @20 :Text;
      agent @21 :Text;
      resources @22 :Resources;
      atMs @23 :UInt64;
    }
    # An allocation's resources return to the pool.
    release :group {
      allocation @24 :UInt64;
    }
    # Submits a job: function `function` runs once on `input` (stdin -> stdout).
    submitJob :group {
      function @25 :Text;
      input @26 :Data;
      # Placement constraints, `key=value` or `key!=value`.
      constraints @27 :List(Text);
      maxAttempts @28 :UInt32;
      atMs @29 :UInt64;
      # Accelerator devices each attempt holds, when the job asks for more than its
      # function's `accel` (0: as the function says).
      accel @55 :UInt64;
    }
    # Framework `framework` places job `job` on agent `agent` (an accepted offer): a
    # new attempt, with the job's resources allocated; rejected if they are not free,
    # the agent does not match the job's constraints, or the job is not waiting.
    launchJob :group {
      job @30 :UInt64;
      framework @31 :Text;
      agent @32 :Text;
      atMs @33 :UInt64;
    }
    # An agent reports on an attempt (ignored unless it is the job's current attempt).
    updateJob :group {
      task @34 :TaskRef;
      update @35 :TaskUpdate;
      atMs @36 :UInt64;
    }
    killJob :group {
      job @37 :UInt64;
      atMs @38 :UInt64;
    }
    # Why a staging job waits (set by the scheduler; empty: no reason).
    setJobReason :group {
      job @39 :UInt64;
      reason @40 :Text;
      hasReason @41 :Bool;
    }
    # Framework `framework` runs a task on agent `agent` (an accepted offer): a job it
    # owns, placed at once (one attempt; what happens next is the framework's call).
    placeTask :group {
      framework @43 :Text;
      agent @44 :Text;
      function @45 :Text;
      input @46 :Data;
      atMs @47 :UInt64;
    }
    # Creates an API token. Only the secret's SHA-256 (`hash`, 64 hex digits) is
    # stored; the token's id is the hash's first 12 digits.
    createToken :group {
      name @48 :Text;
      # Scope names: admin, deploy, invoke, read.
      scopes @49 :List(Text);
      hash @50 :Text;
      atMs @51 :UInt64;
      # When it stops working, ms since the Unix epoch (with `hasExpiry`).
      expiresAtMs @52 :UInt64;
      hasExpiry @53 :Bool;
    }
    # Revokes the token with this id: it stops working at once.
    revokeToken :group {
      id @54 :Text;
    }
    # Makes a kept earlier version of function `name` current again, as its next
    # version (same module and spec; the labels stay as they are now).
    rollbackFunction :group {
      name @56 :Text;
      # The version to restore; 0: the one just before the current version.
      version @57 :UInt64;
      # Set by the proposer, so that every replica stores the same time.
      atMs @58 :UInt64;
    }
  }
}

# One attempt of a job.
struct TaskRef {
  job @0 :UInt64;
  attempt @1 :UInt32;
}

# What an agent reports about an attempt.
struct TaskUpdate {
  union {
    running @0 :Void;
    finished :group {
      exitCode @1 :Int32;
      output @2 :Data;
    }
    failed :group {
      reason @3 :Text;
      exitCode @4 :Int32;
      hasExitCode @5 :Bool;
    }
  }
  # The tail of what the attempt logged (stderr and `wafer::log`), at most 4 KiB;
  # empty for `running`.
  log @6 :Data;
}

# What an agent needs to run an attempt (its input and module are fetched by digest).
struct TaskLaunch {
  task @0 :TaskRef;
  function @1 :Text;
  # Digest (`sha256:<hex>`) of the module.
  module @2 :Text;
  # The function's limits, JSON.
  limits @3 :Text;
  env @4 :List(Label);
  # Digest of the input.
  input @5 :Text;
}

# Amounts of resources (see `Resources` in host/src/state/resources.rs).
struct Resources {
  slots @0 :UInt64;
  memoryMb @1 :UInt64;
  accelerators @2 :UInt64;
}

# What an agent registers with.
struct AgentInfo {
  id @0 :Text;
  # Cap'n Proto address of its executor.
  rpcAddr @1 :Text;
  resources @2 :Resources;
  attributes @3 :List(Label);
}

struct Label {
  key @0 :Text;
  value @1 :Text;
}

# Why a request to a node failed.
struct Failure {
  kind @0 :Kind;
  message @1 :Text;
  # With `notLeader`: the leader this node knows of (null when none is known).
  leader @2 :NodeInfo;

  enum Kind {
    # This node is not the leader; retry at `leader`.
    notLeader @0;
    # The request was refused (bad input, or rejected by the state machine).
    rejected @1;
    # The cluster cannot serve the request now (no quorum, shutting down): retry.
    unavailable @2;
  }
}

# The bootstrap capability of a server's `--listen` port, of an agent's executor
# port and of an accelerator backend's port: a peer proves it belongs to the cluster
# (it knows the cluster secret) before it gets anything. A wrong secret fails the
# call, and every call pipelined on its result, with "wrong cluster secret".
interface Door {
  # A server's `Node` interface (an agent refuses: it has none).
  node @0 (secret :Data) -> (node :Node);
  # An agent's `Executor` (a server refuses: it has none).
  executor @1 (secret :Data) -> (executor :Executor);
  # An accelerator backend's `Accel` (`wafer accel`; servers and agents refuse).
  accel @2 (secret :Data) -> (accel :Accel);
}

interface Node {
  # This node's identity, and whether it already belongs to a cluster.
  info @0 () -> (info :NodeInfo, member :Bool);
  # The Raft endpoint of this node.
  raft @1 () -> (raft :Raft);
  # Commits `command` through the leader; answers once it is applied on the leader with
  # its log index. `rejection` is the state machine's refusal as JSON (empty when the
  # command was applied); `failure` is null when the command was committed.
  # `created`: the id the command created (a submitted job's), 0 if none.
  propose @2 (command :Command) -> (logIndex :UInt64, rejection :Text, failure :Failure, created :UInt64);
  # The leader's commit index, confirmed by a quorum (a linearizable read point).
  readIndex @3 () -> (index :UInt64, failure :Failure);
  # Adds `node` as a learner, then (with `voter`) promotes it to voter.
  addNode @4 (node :NodeInfo, voter :Bool) -> (failure :Failure);
  # Removes node `id` from the cluster's voters and learners.
  removeNode @5 (id :UInt64) -> (failure :Failure);

  # An agent registers (or registers again after it was unreachable or restarted); any
  # server takes it and answers once it is committed. The agent then heartbeats every
  # `heartbeatMs` to the leader.
  # `running`: the job attempts it runs now (reconciled with what the state expects).
  registerAgent @6 (agent :AgentInfo, running :List(TaskRef)) -> (heartbeatMs :UInt32, failure :Failure);
  # Agent `agent` is alive. Only the leader takes heartbeats (others answer `notLeader`
  # with the leader). `reregister`: the leader does not know the agent as active (it
  # was marked unreachable, or the registration is not applied yet): register again.
  # `assigned`: the attempts placed on this agent; it runs those it does not run yet and
  # stops the others.
  # `busySlots`: the most invocations (under serverless leases) it ran at once since its
  # last heartbeat; the serverless framework grows and shrinks its lease with it.
  # `accelBusy`: the most of those granted an accelerator device at once; the serverless
  # framework leases that many of the agent's devices, and gives them back when idle.
  heartbeat @7 (agent :Text, busySlots :UInt32, accelBusy :UInt32) -> (reregister :Bool, failure :Failure, assigned :List(TaskLaunch));
  # An agent reports on a job attempt; committed through the leader. `accepted` is false
  # when the report was stale (not the current attempt, or the job already ended): the
  # agent stops that attempt.
  taskUpdate @8 (agent :Text, task :TaskRef, update :TaskUpdate) -> (accepted :Bool, failure :Failure);
  # A module or job input/output by digest (`sha256:<hex>`).
  fetch @9 (digest :Text) -> (data :Data, found :Bool);
  # The scheduler API for external frameworks (served by the leader).
  scheduler @10 () -> (scheduler :Scheduler);
}

# Free resources of one agent offered to one framework.
struct Offer {
  id @0 :UInt64;
  agent @1 :Text;
  resources @2 :Resources;
  attributes @3 :List(Label);
}

# A task an external framework runs: function `function` once on `input` (one slot and
# the function's memory).
struct TaskInfo {
  function @0 :Text;
  input @1 :Data;
}

# A task's state, as its framework is told.
struct TaskStatus {
  job @0 :UInt64;
  attempt @1 :UInt32;
  # STAGING, STARTING, RUNNING, FINISHED, FAILED, KILLED, UNREACHABLE or GONE.
  state @2 :Text;
  reason @3 :Text;
  agent @4 :Text;
  # With FINISHED: the output's digest (fetch it with `Node.fetch`).
  output @5 :Text;
}

# Served by an external framework; the leader calls it.
interface FrameworkCallback {
  # New offers for this framework.
  offers @0 (offers :List(Offer)) -> ();
  # Offers withdrawn (timed out, or their agent was lost).
  rescind @1 (offers :List(UInt64)) -> ();
  # A task of this framework changed state.
  status @2 (status :TaskStatus) -> ();
}

# Mesos's scheduler API, on the leader (others answer `notLeader`).
interface Scheduler {
  # Registers framework `id` (again) in `role` and sends its offers and task updates to
  # `callback` until it disconnects or this node stops leading.
  subscribe @0 (id :Text, name :Text, role :Text, callback :FrameworkCallback) -> (failure :Failure);
  # Whether `framework` is subscribed here (a framework checks, and subscribes again).
  subscribed @1 (framework :Text) -> (yes :Bool, failure :Failure);
  # Accepts offer `offer` with `tasks` (they must fit in it); answers the tasks' job ids.
  accept @2 (framework :Text, offer :UInt64, tasks :List(TaskInfo)) -> (jobs :List(UInt64), failure :Failure);
  # Declines an offer; its agent is not offered to this framework for `refuseSeconds`.
  decline @3 (framework :Text, offer :UInt64, refuseSeconds :Float64) -> (failure :Failure);
  # Stops (false) or resumes (true) offers to this framework.
  wantOffers @4 (framework :Text, want :Bool) -> (failure :Failure);
  # Kills a task (job) of this framework.
  kill @5 (framework :Text, job :UInt64) -> (failure :Failure);
}

# An agent's interface (the bootstrap capability of its `--listen` port): servers and
# gateways reach it to run work on its slots.
interface Executor {
  # The agent's identity and capacity.
  info @0 () -> (agent :AgentInfo);
  # Runs an attempt (the leader pushes it once placed; heartbeats repeat the list).
  launch @1 (task :TaskLaunch) -> ();
  # Stops an attempt.
  kill @2 (task :TaskRef) -> ();
  # Runs a function once for an invocation under a serverless lease: the module by
  # digest (fetched from the servers and compiled once), its limits (JSON), argv, env
  # and stdin. `error` is set when it could not run (busy, module gone); otherwise
  # `outcome` says how it ended.
  run @3 (module :Text, limits :Text, args :List(Text), env :List(Label), stdin :Data)
      -> (outcome :Outcome, error :Text, busy :Bool);
  # An accelerator backend (`wafer accel --agent`) attaches its `devices`, reachable at
  # `address` (through its `Door`). It renews every 2 s; an attachment not renewed for
  # 6 s lapses. The agent offers the devices as `accel` resources.
  attachAccel @4 (address :Text, devices :List(AccelDevice)) -> ();
}

# How a run ended, and what it wrote.
struct Outcome {
  exit :union {
    code @0 :Int32;
    timeout @1 :Void;
    memoryLimit @2 :Void;
    responseTooLarge @3 :Void;
    trap @4 :Text;
    # The guest used all of its fuel (`Limits.fuel`).
    outOfFuel @10 :Void;
  }
  stdout @5 :Data;
  log @6 :Data;
  logDropped @7 :UInt64;
  memoryRefused @8 :Bool;
  durationNs @9 :UInt64;
  # Fuel the run used (0: it did not count fuel).
  fuelUsed @11 :UInt64;
}

# One item of a state snapshot. A snapshot file is a stream of single-segment messages:
# a `SnapshotMeta` (raft.capnp), then one `SnapshotItem` per stored record.
struct SnapshotItem {
  union {
    # A function's record (JSON, as stored).
    function :group {
      name @0 :Text;
      record @1 :Data;
    }
    # A module blob.
    blob :group {
      digest @2 :Text;
      module @3 :Data;
    }
    # A row of one of the scheduling tables (agents, frameworks, roles, allocations,
    # counters), as stored.
    row :group {
      table @4 :Text;
      key @5 :Data;
      value @6 :Data;
    }
  }
}
