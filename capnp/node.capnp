# A wafer server's node-to-node interface (the bootstrap capability of its `--listen`
# port) and the commands of the replicated state machine.
@0xdcc08716c2388336;

using Raft = import "raft.capnp".Raft;

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
  }
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

interface Node {
  # This node's identity, and whether it already belongs to a cluster.
  info @0 () -> (info :NodeInfo, member :Bool);
  # The Raft endpoint of this node.
  raft @1 () -> (raft :Raft);
  # Commits `command` through the leader; answers once it is applied on the leader with
  # its log index. `rejection` is the state machine's refusal as JSON (empty when the
  # command was applied); `failure` is null when the command was committed.
  propose @2 (command :Command) -> (logIndex :UInt64, rejection :Text, failure :Failure);
  # The leader's commit index, confirmed by a quorum (a linearizable read point).
  readIndex @3 () -> (index :UInt64, failure :Failure);
  # Adds `node` as a learner, then (with `voter`) promotes it to voter.
  addNode @4 (node :NodeInfo, voter :Bool) -> (failure :Failure);
  # Removes node `id` from the cluster's voters and learners.
  removeNode @5 (id :UInt64) -> (failure :Failure);

  # An agent registers (or registers again after it was unreachable or restarted); any
  # server takes it and answers once it is committed. The agent then heartbeats every
  # `heartbeatMs` to the leader.
  registerAgent @6 (agent :AgentInfo) -> (heartbeatMs :UInt32, failure :Failure);
  # Agent `agent` is alive. Only the leader takes heartbeats (others answer `notLeader`
  # with the leader). `reregister`: the leader does not know the agent as active (it
  # was marked unreachable, or the registration is not applied yet): register again.
  heartbeat @7 (agent :Text) -> (reregister :Bool, failure :Failure);
}

# An agent's interface (the bootstrap capability of its `--listen` port): servers and
# gateways reach it to run work on its slots.
interface Executor {
  # The agent's identity and capacity.
  info @0 () -> (agent :AgentInfo);
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
