# Raft RPC between wafer servers, and the encoding of Raft log entries (the same bytes
# are stored in each server's log and sent to followers).
@0xb18f3e4c1a09be4c;

# openraft's LogId: the leader that proposed the entry (term, node) and its index.
struct LogId {
  term @0 :UInt64;
  node @1 :UInt64;
  index @2 :UInt64;
}

# openraft's Vote: a (term, node) pair; committed once a quorum granted it.
struct Vote {
  term @0 :UInt64;
  node @1 :UInt64;
  committed @2 :Bool;
}

# One log entry.
struct Entry {
  logId @0 :LogId;
  payload :union {
    # A no-op a new leader appends to commit its term.
    blank @1 :Void;
    # A state-machine command (`Command` in node.capnp, as a single-segment message).
    normal @2 :Data;
    # A membership configuration: openraft's `Membership` as JSON.
    membership @3 :Text;
  }
}

# Pointer fields left null stand for "none" (an absent log id).
struct AppendEntriesRequest {
  vote @0 :Vote;
  prevLogId @1 :LogId;
  entries @2 :List(Entry);
  leaderCommit @3 :LogId;
}

struct AppendEntriesResponse {
  union {
    success @0 :Void;
    # Only entries up to `matching` (null: none) were accepted.
    partialSuccess :group {
      matching @1 :LogId;
    }
    # The follower's log does not contain `prevLogId`.
    conflict @2 :Void;
    # The follower has seen a newer vote: the sender is no longer leader.
    higherVote @3 :Vote;
  }
}

struct VoteRequest {
  vote @0 :Vote;
  lastLogId @1 :LogId;
}

struct VoteResponse {
  vote @0 :Vote;
  voteGranted @1 :Bool;
  lastLogId @2 :LogId;
}

struct SnapshotMeta {
  lastLogId @0 :LogId;
  # openraft's `StoredMembership` as JSON.
  lastMembership @1 :Text;
  snapshotId @2 :Text;
}

# One chunk of a snapshot: a large snapshot is sent as many of these, never one message.
struct InstallSnapshotRequest {
  vote @0 :Vote;
  meta @1 :SnapshotMeta;
  offset @2 :UInt64;
  data @3 :Data;
  done @4 :Bool;
}

struct InstallSnapshotResponse {
  vote @0 :Vote;
}

# Served by every server. `error`, when not empty, is openraft's `RaftError` as JSON and
# the response is then meaningless.
interface Raft {
  appendEntries @0 (request :AppendEntriesRequest) -> (response :AppendEntriesResponse, error :Text);
  vote @1 (request :VoteRequest) -> (response :VoteResponse, error :Text);
  installSnapshot @2 (request :InstallSnapshotRequest) -> (response :InstallSnapshotResponse, error :Text);
}
