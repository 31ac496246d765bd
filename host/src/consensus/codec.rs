//! Conversions between openraft's types and their Cap'n Proto form in
//! `capnp/raft.capnp`: the same entry encoding is used in the redb log and on the wire.

use openraft::{EntryPayload, LeaderId, LogId, Membership, StoredMembership};
use wafer_proto::raft_capnp::{
    append_entries_request, append_entries_response, entry, install_snapshot_request,
    install_snapshot_response, log_id, snapshot_meta, vote, vote_request, vote_response,
};

use super::{
    AppendEntriesRequest, AppendEntriesResponse, Entry, InstallSnapshotRequest,
    InstallSnapshotResponse, NodeId, SnapshotMeta, Vote, VoteRequest, VoteResponse,
};
use crate::state::{reader_options, Command};

/// Bytes or a message that do not decode into the expected Raft type.
#[derive(Debug, thiserror::Error)]
#[error("malformed Raft message: {0}")]
pub struct CodecError(String);

impl From<capnp::Error> for CodecError {
    fn from(e: capnp::Error) -> CodecError {
        CodecError(e.to_string())
    }
}

impl From<capnp::NotInSchema> for CodecError {
    fn from(e: capnp::NotInSchema) -> CodecError {
        CodecError(e.to_string())
    }
}

impl From<std::str::Utf8Error> for CodecError {
    fn from(e: std::str::Utf8Error) -> CodecError {
        CodecError(e.to_string())
    }
}

impl From<serde_json::Error> for CodecError {
    fn from(e: serde_json::Error) -> CodecError {
        CodecError(e.to_string())
    }
}

impl From<crate::state::MalformedCommand> for CodecError {
    fn from(e: crate::state::MalformedCommand) -> CodecError {
        CodecError(e.to_string())
    }
}

/// A log id from its parts.
pub fn new_log_id(term: u64, node: NodeId, index: u64) -> LogId<NodeId> {
    LogId::new(LeaderId::new(term, node), index)
}

fn write_log_id(mut b: log_id::Builder<'_>, id: &LogId<NodeId>) {
    b.set_term(id.leader_id.term);
    b.set_node(id.leader_id.node_id);
    b.set_index(id.index);
}

fn read_log_id(r: log_id::Reader<'_>) -> LogId<NodeId> {
    new_log_id(r.get_term(), r.get_node(), r.get_index())
}

fn write_vote(mut b: vote::Builder<'_>, v: &Vote) {
    b.set_term(v.leader_id.term);
    b.set_node(v.leader_id.node_id);
    b.set_committed(v.committed);
}

fn read_vote(r: vote::Reader<'_>) -> Vote {
    let mut v = Vote::new(r.get_term(), r.get_node());
    v.committed = r.get_committed();
    v
}

/// Writes one log entry.
pub fn write_entry(mut b: entry::Builder<'_>, e: &Entry) {
    write_log_id(b.reborrow().init_log_id(), &e.log_id);
    let mut payload = b.init_payload();
    match &e.payload {
        EntryPayload::Blank => payload.set_blank(()),
        EntryPayload::Normal(command) => payload.set_normal(&command.encode()),
        EntryPayload::Membership(membership) => {
            // A membership is plain ids and addresses: it always serializes.
            let json = serde_json::to_string(membership).unwrap_or_default();
            payload.set_membership(json.as_str());
        }
    }
}

/// Reads one log entry.
pub fn read_entry(r: entry::Reader<'_>) -> Result<Entry, CodecError> {
    let log_id = read_log_id(r.get_log_id()?);
    let payload = match r.get_payload().which()? {
        entry::payload::Blank(()) => EntryPayload::Blank,
        entry::payload::Normal(bytes) => EntryPayload::Normal(Command::decode(bytes?)?),
        entry::payload::Membership(json) => {
            let membership: Membership<NodeId, super::NodeAddr> =
                serde_json::from_str(json?.to_str()?)?;
            EntryPayload::Membership(membership)
        }
    };
    Ok(Entry { log_id, payload })
}

/// An entry as a single-segment message (as stored in the log).
pub fn encode_entry(e: &Entry) -> Vec<u8> {
    let mut message = capnp::message::Builder::new_default();
    write_entry(message.init_root(), e);
    capnp::serialize::write_message_to_words(&message)
}

/// Decodes [`encode_entry`]'s bytes.
pub fn decode_entry(mut bytes: &[u8]) -> Result<Entry, CodecError> {
    let message = capnp::serialize::read_message_from_flat_slice(&mut bytes, reader_options())?;
    read_entry(message.get_root()?)
}

/// Writes an append-entries request.
pub fn write_append_request(mut b: append_entries_request::Builder<'_>, r: &AppendEntriesRequest) {
    write_vote(b.reborrow().init_vote(), &r.vote);
    if let Some(prev) = &r.prev_log_id {
        write_log_id(b.reborrow().init_prev_log_id(), prev);
    }
    if let Some(commit) = &r.leader_commit {
        write_log_id(b.reborrow().init_leader_commit(), commit);
    }
    let mut entries = b.init_entries(r.entries.len() as u32);
    for (i, e) in r.entries.iter().enumerate() {
        write_entry(entries.reborrow().get(i as u32), e);
    }
}

/// Reads an append-entries request.
pub fn read_append_request(
    r: append_entries_request::Reader<'_>,
) -> Result<AppendEntriesRequest, CodecError> {
    let entries = r
        .get_entries()?
        .iter()
        .map(read_entry)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AppendEntriesRequest {
        vote: read_vote(r.get_vote()?),
        prev_log_id: if r.has_prev_log_id() {
            Some(read_log_id(r.get_prev_log_id()?))
        } else {
            None
        },
        entries,
        leader_commit: if r.has_leader_commit() {
            Some(read_log_id(r.get_leader_commit()?))
        } else {
            None
        },
    })
}

/// Writes an append-entries response.
pub fn write_append_response(
    mut b: append_entries_response::Builder<'_>,
    r: &AppendEntriesResponse,
) {
    match r {
        AppendEntriesResponse::Success => b.set_success(()),
        AppendEntriesResponse::PartialSuccess(matching) => {
            let group = b.init_partial_success();
            if let Some(id) = matching {
                write_log_id(group.init_matching(), id);
            }
        }
        AppendEntriesResponse::Conflict => b.set_conflict(()),
        AppendEntriesResponse::HigherVote(v) => write_vote(b.init_higher_vote(), v),
    }
}

/// Reads an append-entries response.
pub fn read_append_response(
    r: append_entries_response::Reader<'_>,
) -> Result<AppendEntriesResponse, CodecError> {
    Ok(match r.which()? {
        append_entries_response::Success(()) => AppendEntriesResponse::Success,
        append_entries_response::PartialSuccess(group) => {
            AppendEntriesResponse::PartialSuccess(if group.has_matching() {
                Some(read_log_id(group.get_matching()?))
            } else {
                None
            })
        }
        append_entries_response::Conflict(()) => AppendEntriesResponse::Conflict,
        append_entries_response::HigherVote(v) => AppendEntriesResponse::HigherVote(read_vote(v?)),
    })
}

/// Writes a vote request.
pub fn write_vote_request(mut b: vote_request::Builder<'_>, r: &VoteRequest) {
    write_vote(b.reborrow().init_vote(), &r.vote);
    if let Some(last) = &r.last_log_id {
        write_log_id(b.init_last_log_id(), last);
    }
}

/// Reads a vote request.
pub fn read_vote_request(r: vote_request::Reader<'_>) -> Result<VoteRequest, CodecError> {
    Ok(VoteRequest {
        vote: read_vote(r.get_vote()?),
        last_log_id: if r.has_last_log_id() {
            Some(read_log_id(r.get_last_log_id()?))
        } else {
            None
        },
    })
}

/// Writes a vote response.
pub fn write_vote_response(mut b: vote_response::Builder<'_>, r: &VoteResponse) {
    write_vote(b.reborrow().init_vote(), &r.vote);
    b.set_vote_granted(r.vote_granted);
    if let Some(last) = &r.last_log_id {
        write_log_id(b.init_last_log_id(), last);
    }
}

/// Reads a vote response.
pub fn read_vote_response(r: vote_response::Reader<'_>) -> Result<VoteResponse, CodecError> {
    Ok(VoteResponse {
        vote: read_vote(r.get_vote()?),
        vote_granted: r.get_vote_granted(),
        last_log_id: if r.has_last_log_id() {
            Some(read_log_id(r.get_last_log_id()?))
        } else {
            None
        },
    })
}

/// Writes a snapshot's metadata.
pub fn write_snapshot_meta(mut b: snapshot_meta::Builder<'_>, meta: &SnapshotMeta) {
    if let Some(last) = &meta.last_log_id {
        write_log_id(b.reborrow().init_last_log_id(), last);
    }
    let json = serde_json::to_string(&meta.last_membership).unwrap_or_default();
    b.set_last_membership(json.as_str());
    b.set_snapshot_id(meta.snapshot_id.as_str());
}

/// Reads a snapshot's metadata.
pub fn read_snapshot_meta(r: snapshot_meta::Reader<'_>) -> Result<SnapshotMeta, CodecError> {
    let last_membership: StoredMembership<NodeId, super::NodeAddr> =
        serde_json::from_str(r.get_last_membership()?.to_str()?)?;
    Ok(SnapshotMeta {
        last_log_id: if r.has_last_log_id() {
            Some(read_log_id(r.get_last_log_id()?))
        } else {
            None
        },
        last_membership,
        snapshot_id: r.get_snapshot_id()?.to_str()?.to_string(),
    })
}

/// Writes one chunk of a snapshot.
pub fn write_snapshot_request(
    mut b: install_snapshot_request::Builder<'_>,
    r: &InstallSnapshotRequest,
) {
    write_vote(b.reborrow().init_vote(), &r.vote);
    write_snapshot_meta(b.reborrow().init_meta(), &r.meta);
    b.set_offset(r.offset);
    b.set_data(&r.data);
    b.set_done(r.done);
}

/// Reads one chunk of a snapshot.
pub fn read_snapshot_request(
    r: install_snapshot_request::Reader<'_>,
) -> Result<InstallSnapshotRequest, CodecError> {
    Ok(InstallSnapshotRequest {
        vote: read_vote(r.get_vote()?),
        meta: read_snapshot_meta(r.get_meta()?)?,
        offset: r.get_offset(),
        data: r.get_data()?.to_vec(),
        done: r.get_done(),
    })
}

/// Writes a snapshot-chunk response.
pub fn write_snapshot_response(
    b: install_snapshot_response::Builder<'_>,
    r: &InstallSnapshotResponse,
) {
    write_vote(b.init_vote(), &r.vote);
}

/// Reads a snapshot-chunk response.
pub fn read_snapshot_response(
    r: install_snapshot_response::Reader<'_>,
) -> Result<InstallSnapshotResponse, CodecError> {
    Ok(InstallSnapshotResponse {
        vote: read_vote(r.get_vote()?),
    })
}
