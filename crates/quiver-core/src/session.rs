//! One shard's sync session on its stream, as a state machine without I/O.
//!
//! In the manner of `quinn-proto`'s `Connection`: a session takes
//! [`Input`]s (a message from the peer, an answer of the store, a batch the
//! writer took, a local failure) and yields [`Action`]s (send this, read the
//! changes the peer lacks, apply this batch, end the stream) until it has a
//! result. It owns the order of the protocol and nothing else: no clock, no
//! socket, no database. `quiver-sync` pumps it over QUIC streams and the
//! store; tests pump it over in-memory pipes.
//!
//! The order on a shard stream:
//! 1. the client sends a [`SyncRequest`] (its versions and definitions of
//!    the shard); the server admits it (creating tables it lacks, if the
//!    client may write) and answers with a [`SyncReply`];
//! 2. both sides then do the same: stream the batches the other lacks,
//!    followed by [`Done`], while they apply the other's batches one at a
//!    time; once a side has sent its `Done` and applied everything up to the
//!    other's `Done`, it sends its [`Report`] and ends its side;
//! 3. the session ends with the peer's report, or with an error either side
//!    sends (after which nothing more is sent).
//!
//! Flow control is part of the machine: at most [`SEND_WINDOW`] batches are
//! read ahead of the writer, and at most [`APPLY_QUEUE`] received batches wait
//! to be applied ([`StreamSession::wants_message`] says when to read more).

use std::collections::{BTreeMap, VecDeque};

use crate::wire::{Done, ErrorCode, ErrorMsg, Message, Report, SyncReply, SyncRequest, TableDef};
use crate::{ChangeBatch, Covered, SiteId, SnapshotMark, VersionVector};

/// Per table, a version vector.
pub type TableVersions = Vec<(String, VersionVector)>;

/// Batches read but not yet taken by the writer, at most.
pub const SEND_WINDOW: usize = 2;
/// Received batches waiting to be applied, at most.
pub const APPLY_QUEUE: usize = 2;

/// Something that happened to a session.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A message from the peer on this stream.
    Received(Message),
    /// The peer ended its side of the stream.
    PeerFinished,
    /// Client: the store's versions and table definitions of the shard.
    ShardState {
        versions: TableVersions,
        schema: Vec<TableDef>,
        /// Snapshots of the shard's tables the store took in part.
        resume: Vec<SnapshotMark>,
    },
    /// Client: the tables the store created from the peer's definitions.
    TablesCreated(Vec<String>),
    /// Server: the store's definitions and versions of the requested shard
    /// (no definitions: the store holds no such shard).
    Admitted {
        schema: Vec<TableDef>,
        versions: TableVersions,
        /// Snapshots of the shard's tables the store took in part.
        resume: Vec<SnapshotMark>,
    },
    /// The next batch of the changes the peer lacks.
    ChangesRead(ChangeBatch),
    /// No more changes to read.
    ChangesEnd,
    /// The writer took a batch.
    BatchSent,
    /// The store applied the oldest batch given to [`Action::Apply`].
    Applied(Report),
    /// Something failed on this side (the store, a limit, the transport).
    /// The session tells the peer and ends.
    Failed(ErrorMsg),
}

/// Something a session asks its driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Client: read the store's versions and definitions of the shard;
    /// answer [`Input::ShardState`].
    ReadShardState { shard: String },
    /// Client: create the tables of these definitions that the store lacks;
    /// answer [`Input::TablesCreated`].
    CreateTables { shard: String, defs: Vec<TableDef> },
    /// Server: create the requester's tables the store lacks (`schema` is
    /// empty when the requester may not write) and answer
    /// [`Input::Admitted`] with the store's definitions and versions.
    Admit {
        shard: String,
        schema: Vec<TableDef>,
    },
    /// Start reading the changes of the shard that a peer holding `since`
    /// (per table) lacks; nothing is read before [`Action::ReadNext`].
    ReadChanges {
        shard: String,
        since: BTreeMap<String, VersionVector>,
        /// Snapshots the peer took in part, to be continued.
        resume: Vec<SnapshotMark>,
    },
    /// Read the next batch; answer [`Input::ChangesRead`] or
    /// [`Input::ChangesEnd`].
    ReadNext,
    /// Apply a batch in one transaction; answer [`Input::Applied`]. Only one
    /// is asked for at a time.
    Apply(ChangeBatch),
    /// Send a message to the peer (after those asked for before it).
    Send(Message),
    /// End this side of the stream once what was asked to be sent is out.
    FinishSending,
    /// Stop reading the peer's side.
    StopReceiving,
}

/// How a session failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The peer refused or failed, and said why.
    Peer(ErrorMsg),
    /// This side refused or failed; the peer was told.
    Local(ErrorMsg),
}

impl Failure {
    /// The code and the message.
    pub fn error(&self) -> &ErrorMsg {
        match self {
            Failure::Peer(e) | Failure::Local(e) => e,
        }
    }
}

/// What a finished session did, from its side.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub shard: String,
    pub batches_sent: u64,
    pub changes_sent: u64,
    pub batches_received: u64,
    pub changes_received: u64,
    /// What this side applied of the peer's changes.
    pub local: Report,
    /// What the peer reported it applied of this side's.
    pub remote: Report,
    /// Tables this side created from the peer's definitions (client).
    pub tables_created: Vec<String>,
    /// Tables the peer sent as snapshots (current rows in key order, not
    /// history), and the rows they brought.
    pub snapshot_tables: Vec<String>,
    pub snapshot_rows: u64,
}

/// What both kinds of session offer their driver.
pub trait StreamSession {
    /// Takes in what happened.
    fn handle(&mut self, input: Input);
    /// The next thing to do, in order.
    fn poll_action(&mut self) -> Option<Action>;
    /// Whether the session takes another message from the peer now.
    fn wants_message(&self) -> bool;
    /// The result, once the session is over.
    fn result(&self) -> Option<&Result<Outcome, Failure>>;
    /// The shard, once known.
    fn shard(&self) -> Option<&str>;
    /// How far the received batches reach into what the peer offered:
    /// `(versions done, versions total)`; the total is 0 when unknown.
    fn pull_progress(&self) -> (u64, u64);
    /// Of the snapshots the peer sends: `(rows received, rows in all)`, or
    /// `None` when it sends none.
    fn snapshot_progress(&self) -> Option<(u64, u64)>;
    /// Whether the session waits for the peer's batches (or its `Done`):
    /// the time when a silent peer counts as stalled. (Waiting for the
    /// peer's report is not: it comes once this side's batches are
    /// through, however long that takes.)
    fn awaits_changes(&self) -> bool;
}

fn msg(code: ErrorCode, message: String) -> ErrorMsg {
    ErrorMsg {
        code,
        message,
        retry_after_ms: None,
    }
}

/// What a puller expects of one shard: per table and origin site, the
/// version range (held, offered] the peer will send. The `covered` claims
/// of arriving batches say how far into each range they reach.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PullPlan {
    ranges: BTreeMap<(String, SiteId), (u64, u64)>,
    reached: BTreeMap<(String, SiteId), u64>,
    /// Versions offered in all.
    pub total: u64,
    /// Per table sent as a snapshot: rows received, rows it sends in all.
    snapshots: BTreeMap<String, (u64, u64)>,
}

impl PullPlan {
    /// From the versions this side stated and those the peer replied with.
    pub fn new(mine: &[(String, VersionVector)], theirs: &[(String, VersionVector)]) -> Self {
        let empty = VersionVector::new();
        let mut plan = PullPlan::default();
        for (table, offered) in theirs {
            let held = mine
                .iter()
                .find(|(t, _)| t == table)
                .map_or(&empty, |(_, v)| v);
            for (site, from, to) in offered.ahead_of(held) {
                plan.total += to - from;
                plan.ranges.insert((table.clone(), site), (from, to));
            }
        }
        plan
    }

    /// Takes in a batch's claims; gives the versions reached so far.
    pub fn advance(&mut self, covered: &[Covered]) -> u64 {
        for c in covered {
            let key = (c.table.clone(), c.site);
            if let Some((from, to)) = self.ranges.get(&key) {
                let reached = c.version.clamp(*from, *to) - from;
                let slot = self.reached.entry(key).or_default();
                *slot = (*slot).max(reached);
            }
        }
        self.done()
    }

    /// The versions reached so far.
    pub fn done(&self) -> u64 {
        self.reached.values().sum()
    }

    /// Takes in an arriving batch: its claims, and if it is part of a
    /// snapshot, the rows of the snapshot's table (a batch may also hold
    /// another table's history before them).
    pub fn take(&mut self, b: &ChangeBatch) {
        self.advance(&b.covered);
        if let Some(m) = &b.snapshot {
            let rows = b
                .changes
                .iter()
                .filter(|c| c.is_existence() && c.table == m.table)
                .count() as u64;
            let slot = self.snapshots.entry(m.table.clone()).or_default();
            slot.0 += rows;
            slot.1 = m.rows.max(slot.0);
        }
    }

    /// Rows received and rows in all of the snapshots, if any.
    pub fn snapshot_rows(&self) -> Option<(u64, u64)> {
        (!self.snapshots.is_empty()).then(|| {
            self.snapshots
                .values()
                .fold((0, 0), |(d, t), (dd, tt)| (d + dd, t + tt))
        })
    }

    /// The tables sent as snapshots.
    pub fn snapshot_tables(&self) -> Vec<String> {
        self.snapshots.keys().cloned().collect()
    }
}

/// The versions the peer holds of each table to send, restricted to the
/// table filter; tables the peer did not list start from nothing.
pub fn their_versions(
    mine: &[String],
    theirs: &[(String, VersionVector)],
    filter: &[String],
) -> BTreeMap<String, VersionVector> {
    mine.iter()
        .filter(|t| filter.is_empty() || filter.contains(t))
        .map(|t| {
            let vv = theirs
                .iter()
                .find(|(n, _)| n == t)
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            (t.clone(), vv)
        })
        .collect()
}

/// The machinery both sides share: the action queue, the result, and the
/// exchange of batches once the stream is open.
#[derive(Debug, Default)]
struct Stream {
    shard: String,
    /// Tables of this sync (empty: every table of the shard).
    filter: Vec<String>,
    /// Whether the peer may write to this side.
    peer_may_push: bool,
    actions: VecDeque<Action>,
    result: Option<Result<Outcome, Failure>>,
    out: Outcome,
    plan: PullPlan,
    /// The exchange has begun (request and reply are through).
    open: bool,
    // Sending.
    reading: bool,
    read_pending: bool,
    unsent: usize,
    done_sent: bool,
    report_sent: bool,
    /// This side's end of the stream was asked for: nothing more to send.
    sending_finished: bool,
    // Receiving.
    queue: VecDeque<ChangeBatch>,
    applying: bool,
    peer_done: bool,
    remote: Option<Report>,
}

impl Stream {
    fn push(&mut self, a: Action) {
        self.actions.push_back(a);
    }

    fn finished(&self) -> bool {
        self.result.is_some()
    }

    /// Tells the peer why, ends both directions and fails.
    fn fail(&mut self, e: ErrorMsg) {
        if self.finished() {
            return;
        }
        if !self.sending_finished {
            self.push(Action::Send(Message::Error(e.clone())));
            self.finish_sending();
        }
        self.push(Action::StopReceiving);
        self.result = Some(Err(Failure::Local(e)));
    }

    fn protocol(&mut self, m: String) {
        self.fail(msg(ErrorCode::Protocol, m));
    }

    /// The peer failed and said so: end without a word.
    fn peer_failed(&mut self, e: ErrorMsg) {
        if self.finished() {
            return;
        }
        self.finish_sending();
        self.push(Action::StopReceiving);
        self.result = Some(Err(Failure::Peer(e)));
    }

    fn finish_sending(&mut self) {
        if !self.sending_finished {
            self.sending_finished = true;
            self.push(Action::FinishSending);
        }
    }

    /// Starts streaming what the peer lacks.
    fn begin(&mut self, since: BTreeMap<String, VersionVector>, resume: Vec<SnapshotMark>) {
        self.open = true;
        self.reading = true;
        self.push(Action::ReadChanges {
            shard: self.shard.clone(),
            since,
            resume,
        });
        self.read_more();
    }

    fn read_more(&mut self) {
        if self.reading && !self.read_pending && self.unsent < SEND_WINDOW && !self.finished() {
            self.read_pending = true;
            self.push(Action::ReadNext);
        }
    }

    fn apply_next(&mut self) {
        if self.applying || self.finished() {
            return;
        }
        if let Some(b) = self.queue.pop_front() {
            self.applying = true;
            self.push(Action::Apply(b));
        } else {
            self.report_if_ready();
        }
    }

    fn report_if_ready(&mut self) {
        if self.done_sent
            && self.peer_done
            && !self.applying
            && self.queue.is_empty()
            && !self.report_sent
            && !self.finished()
        {
            self.report_sent = true;
            self.push(Action::Send(Message::Report(self.out.local)));
            self.finish_sending();
        }
        self.finish_if_ready();
    }

    fn finish_if_ready(&mut self) {
        if let (true, Some(remote), false) = (self.report_sent, self.remote, self.finished()) {
            self.out.remote = remote;
            self.out.shard = self.shard.clone();
            self.result = Some(Ok(std::mem::take(&mut self.out)));
        }
    }

    /// Checks an incoming batch against the stream it arrived on.
    fn check(&self, b: &ChangeBatch) -> Result<(), ErrorMsg> {
        if b.shard != self.shard {
            return Err(msg(
                ErrorCode::BadBatch,
                format!(
                    "batch for shard {:?} on the stream of shard {:?}",
                    b.shard, self.shard
                ),
            ));
        }
        if !self.peer_may_push && !b.changes.is_empty() {
            return Err(msg(
                ErrorCode::Forbidden,
                "this token is read-only: pushed changes are refused".into(),
            ));
        }
        if !self.filter.is_empty() {
            if let Some(c) = b.changes.iter().find(|c| !self.filter.contains(&c.table)) {
                return Err(msg(
                    ErrorCode::BadBatch,
                    format!("batch names table {:?} outside this sync's tables", c.table),
                ));
            }
        }
        Ok(())
    }

    /// A message once the exchange is open.
    fn received(&mut self, m: Message) {
        match m {
            Message::Error(e) | Message::Refused(e) => self.peer_failed(e),
            Message::Batch(b) if !self.peer_done => {
                if let Err(e) = self.check(&b) {
                    return self.fail(e);
                }
                self.out.batches_received += 1;
                self.out.changes_received += b.changes.len() as u64;
                self.plan.take(&b);
                if b.snapshot.is_some() {
                    self.out.snapshot_tables = self.plan.snapshot_tables();
                    self.out.snapshot_rows = self.plan.snapshot_rows().map_or(0, |(d, _)| d);
                }
                self.queue.push_back(b);
                self.apply_next();
            }
            Message::Done(_) if !self.peer_done => {
                self.peer_done = true;
                self.report_if_ready();
            }
            Message::Report(r) if self.peer_done && self.remote.is_none() => {
                self.remote = Some(r);
                self.finish_if_ready();
            }
            other if self.peer_done => self.protocol(format!(
                "expected the peer's report, got {}",
                other.kind().1
            )),
            other => self.protocol(format!(
                "unexpected {} message on a shard stream",
                other.kind().1
            )),
        }
    }

    /// The front of both sides' `handle`: nothing counts after the end,
    /// and in the exchange the stream takes the input. Gives back an input
    /// for the opening phase to handle.
    fn route(&mut self, exchanging: bool, input: Input) -> Option<Input> {
        if self.finished() {
            return None;
        }
        if !exchanging {
            return Some(input);
        }
        if let Err(input) = self.exchange(input) {
            self.misplaced(&input);
        }
        None
    }

    /// An input the opening phase had no use for: a failure ends the
    /// session; anything else came at the wrong time.
    fn unexpected(&mut self, input: Input) {
        match input {
            Input::Failed(e) => self.fail(e),
            other => self.misplaced(&other),
        }
    }

    /// Inputs of the exchange; gives back an input that does not belong here.
    // The `Err` is the input handed back by value (not an error value),
    // moved once per input.
    #[allow(clippy::result_large_err)]
    fn exchange(&mut self, input: Input) -> Result<(), Input> {
        match input {
            Input::Received(m) => self.received(m),
            Input::PeerFinished if !self.peer_done => {
                self.protocol("the peer ended the shard stream before it was done".into())
            }
            Input::PeerFinished if self.remote.is_none() => {
                self.protocol("the peer ended the shard stream without its report".into())
            }
            Input::PeerFinished => {}
            Input::ChangesRead(b) if self.read_pending => {
                self.read_pending = false;
                self.out.batches_sent += 1;
                self.out.changes_sent += b.changes.len() as u64;
                self.unsent += 1;
                self.push(Action::Send(Message::Batch(b)));
                self.read_more();
            }
            Input::ChangesEnd if self.read_pending => {
                self.read_pending = false;
                self.reading = false;
                self.done_sent = true;
                self.push(Action::Send(Message::Done(Done {
                    batches: self.out.batches_sent,
                    changes: self.out.changes_sent,
                })));
                self.report_if_ready();
            }
            Input::BatchSent if self.unsent > 0 => {
                self.unsent -= 1;
                self.read_more();
            }
            Input::Applied(r) if self.applying => {
                self.applying = false;
                self.out.local.add(&r);
                self.apply_next();
            }
            Input::Failed(e) => self.fail(e),
            other => return Err(other),
        }
        Ok(())
    }

    /// An input that came when it could not: a fault of the driver.
    fn misplaced(&mut self, input: &Input) {
        self.fail(msg(
            ErrorCode::Internal,
            format!(
                "session driver gave {} at the wrong time",
                input_name(input)
            ),
        ));
    }

    fn wants_message(&self) -> bool {
        !self.finished() && self.queue.len() < APPLY_QUEUE
    }

    fn awaits_changes(&self) -> bool {
        self.open && !self.peer_done && !self.finished()
    }
}

fn input_name(i: &Input) -> &'static str {
    match i {
        Input::Received(_) => "a message",
        Input::PeerFinished => "the end of the peer's stream",
        Input::ShardState { .. } => "the shard state",
        Input::TablesCreated(_) => "created tables",
        Input::Admitted { .. } => "an admission",
        Input::ChangesRead(_) => "a batch read",
        Input::ChangesEnd => "the end of the changes",
        Input::BatchSent => "a sent batch",
        Input::Applied(_) => "an applied batch",
        Input::Failed(_) => "a failure",
    }
}

/// What a client asks of one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientConfig {
    pub shard: String,
    /// Tables to sync (empty: the whole shard).
    pub tables: Vec<String>,
    /// Pull only: offer nothing (the token is read-only).
    pub pull_only: bool,
}

#[derive(Debug)]
enum ClientPhase {
    /// Waiting for the store's state of the shard.
    State,
    /// The request is out; waiting for the reply.
    Reply {
        held: TableVersions,
    },
    /// Waiting for the store to create the peer's tables.
    Tables {
        reply: SyncReply,
    },
    Exchange,
}

/// The client's side of one shard's stream.
#[derive(Debug)]
pub struct ClientSession {
    config: ClientConfig,
    phase: ClientPhase,
    s: Stream,
}

impl ClientSession {
    pub fn new(config: ClientConfig) -> Self {
        let mut s = Stream {
            shard: config.shard.clone(),
            filter: config.tables.clone(),
            // The client asked for this shard's changes.
            peer_may_push: true,
            ..Default::default()
        };
        s.push(Action::ReadShardState {
            shard: config.shard.clone(),
        });
        ClientSession {
            config,
            phase: ClientPhase::State,
            s,
        }
    }
}

impl StreamSession for ClientSession {
    fn handle(&mut self, input: Input) {
        let exchanging = matches!(self.phase, ClientPhase::Exchange);
        let Some(input) = self.s.route(exchanging, input) else {
            return;
        };
        let phase = std::mem::replace(&mut self.phase, ClientPhase::Exchange);
        match (phase, input) {
            (
                ClientPhase::State,
                Input::ShardState {
                    versions,
                    schema,
                    resume,
                },
            ) => {
                let tables = &self.config.tables;
                let versions: TableVersions = versions
                    .into_iter()
                    .filter(|(t, _)| tables.is_empty() || tables.contains(t))
                    .collect();
                self.s.push(Action::Send(Message::SyncRequest(SyncRequest {
                    shard: self.config.shard.clone(),
                    tables: tables.clone(),
                    versions: versions.clone(),
                    want_schema: schema.is_empty(),
                    schema,
                    resume,
                })));
                self.phase = ClientPhase::Reply { held: versions };
            }
            (ClientPhase::Reply { held }, Input::Received(Message::SyncReply(reply))) => {
                self.s.plan = PullPlan::new(&held, &reply.versions);
                self.s.push(Action::CreateTables {
                    shard: self.config.shard.clone(),
                    defs: reply.schema.clone(),
                });
                self.phase = ClientPhase::Tables { reply };
            }
            (_, Input::Received(Message::Error(e) | Message::Refused(e))) => self.s.peer_failed(e),
            (ClientPhase::Reply { .. }, Input::Received(other)) => self
                .s
                .protocol(format!("expected a sync reply, got {}", other.kind().1)),
            (ClientPhase::Reply { .. }, Input::PeerFinished) => self
                .s
                .protocol("stream ended while waiting for the sync reply".into()),
            (ClientPhase::Tables { reply }, Input::TablesCreated(created)) => {
                self.s.out.tables_created = created;
                let since = if self.config.pull_only {
                    BTreeMap::new()
                } else {
                    let names: Vec<String> = reply.schema.iter().map(|d| d.name.clone()).collect();
                    their_versions(&names, &reply.versions, &self.config.tables)
                };
                self.s.begin(since, reply.resume);
            }
            (phase, other) => {
                self.phase = phase;
                self.s.unexpected(other);
            }
        }
    }

    fn poll_action(&mut self) -> Option<Action> {
        self.s.actions.pop_front()
    }

    fn wants_message(&self) -> bool {
        match self.phase {
            ClientPhase::Reply { .. } => !self.s.finished(),
            ClientPhase::Exchange => self.s.wants_message(),
            _ => false,
        }
    }

    fn result(&self) -> Option<&Result<Outcome, Failure>> {
        self.s.result.as_ref()
    }

    fn shard(&self) -> Option<&str> {
        Some(&self.config.shard)
    }

    fn pull_progress(&self) -> (u64, u64) {
        (self.s.plan.done(), self.s.plan.total)
    }

    fn snapshot_progress(&self) -> Option<(u64, u64)> {
        self.s.plan.snapshot_rows()
    }

    fn awaits_changes(&self) -> bool {
        self.s.awaits_changes()
    }
}

/// How a server treats the peer of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Whether the peer may write (read-only tokens may not).
    pub may_push: bool,
    /// Shards the peer may see (`None`: all).
    pub scope: Option<Vec<String>>,
}

#[derive(Debug)]
enum ServerPhase {
    Request,
    Admit { req: SyncRequest },
    Exchange,
}

/// The server's side of one shard's stream.
#[derive(Debug)]
pub struct ServerSession {
    config: ServerConfig,
    phase: ServerPhase,
    s: Stream,
}

impl ServerSession {
    pub fn new(config: ServerConfig) -> Self {
        let s = Stream {
            peer_may_push: config.may_push,
            ..Default::default()
        };
        ServerSession {
            config,
            phase: ServerPhase::Request,
            s,
        }
    }

    fn no_shard(&mut self, shard: &str) {
        self.s.fail(msg(
            ErrorCode::UnknownShard,
            format!("this server holds no shard {shard:?}"),
        ));
    }
}

impl StreamSession for ServerSession {
    fn handle(&mut self, input: Input) {
        let exchanging = matches!(self.phase, ServerPhase::Exchange);
        let Some(input) = self.s.route(exchanging, input) else {
            return;
        };
        let phase = std::mem::replace(&mut self.phase, ServerPhase::Exchange);
        match (phase, input) {
            (ServerPhase::Request, Input::Received(Message::SyncRequest(req))) => {
                if self
                    .config
                    .scope
                    .as_ref()
                    .is_some_and(|s| !s.contains(&req.shard))
                {
                    // Out of scope looks exactly like absent.
                    return self.no_shard(&req.shard);
                }
                self.s.shard = req.shard.clone();
                self.s.filter = req.tables.clone();
                self.s.push(Action::Admit {
                    shard: req.shard.clone(),
                    schema: if self.config.may_push {
                        req.schema.clone()
                    } else {
                        Vec::new()
                    },
                });
                self.phase = ServerPhase::Admit { req };
            }
            (ServerPhase::Request, Input::Received(Message::Error(e) | Message::Refused(e))) => {
                self.s.peer_failed(e)
            }
            (ServerPhase::Request, Input::Received(other)) => self
                .s
                .protocol(format!("expected a sync request, got {}", other.kind().1)),
            (ServerPhase::Request, Input::PeerFinished) => self
                .s
                .protocol("stream ended while waiting for a sync request".into()),
            (
                ServerPhase::Admit { req },
                Input::Admitted {
                    schema,
                    versions,
                    resume,
                },
            ) => {
                if schema.is_empty() {
                    return self.no_shard(&req.shard);
                }
                if let Some(t) = req
                    .tables
                    .iter()
                    .find(|t| !schema.iter().any(|d| &d.name == *t))
                {
                    return self.s.fail(msg(
                        ErrorCode::UnknownShard,
                        format!("shard {:?} has no table {t:?}", req.shard),
                    ));
                }
                let names: Vec<String> = schema.iter().map(|d| d.name.clone()).collect();
                let versions: TableVersions = versions
                    .into_iter()
                    .filter(|(t, _)| req.tables.is_empty() || req.tables.contains(t))
                    .collect();
                self.s.push(Action::Send(Message::SyncReply(SyncReply {
                    versions,
                    schema,
                    resume,
                })));
                let since = their_versions(&names, &req.versions, &req.tables);
                self.s.begin(since, req.resume);
            }
            (phase, other) => {
                self.phase = phase;
                self.s.unexpected(other);
            }
        }
    }

    fn poll_action(&mut self) -> Option<Action> {
        self.s.actions.pop_front()
    }

    fn wants_message(&self) -> bool {
        match self.phase {
            ServerPhase::Request => !self.s.finished(),
            ServerPhase::Exchange => self.s.wants_message(),
            ServerPhase::Admit { .. } => false,
        }
    }

    fn result(&self) -> Option<&Result<Outcome, Failure>> {
        self.s.result.as_ref()
    }

    fn shard(&self) -> Option<&str> {
        (!self.s.shard.is_empty()).then_some(self.s.shard.as_str())
    }

    fn pull_progress(&self) -> (u64, u64) {
        (self.s.plan.done(), self.s.plan.total)
    }

    fn snapshot_progress(&self) -> Option<(u64, u64)> {
        self.s.plan.snapshot_rows()
    }

    fn awaits_changes(&self) -> bool {
        self.s.awaits_changes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ColumnDef;

    fn vv(pairs: &[(SiteId, u64)]) -> VersionVector {
        let mut v = VersionVector::new();
        for (s, n) in pairs {
            v.set(*s, *n);
        }
        v
    }

    #[test]
    fn a_pull_plan_counts_the_offered_ranges_and_how_far_batches_reach() {
        let (a, b) = (SiteId::from_bytes([1; 16]), SiteId::from_bytes([2; 16]));
        let mine = vec![("docs".to_string(), vv(&[(a, 2)]))];
        let theirs = vec![
            ("docs".to_string(), vv(&[(a, 10), (b, 5)])),
            ("notes".to_string(), vv(&[(a, 3)])),
        ];
        let mut plan = PullPlan::new(&mine, &theirs);
        assert_eq!(plan.total, 8 + 5 + 3);
        let cov = |t: &str, s: SiteId, v: u64| Covered {
            table: t.into(),
            site: s,
            version: v,
        };
        assert_eq!(plan.advance(&[cov("docs", a, 6)]), 4);
        // A claim below what was reached, or of a range not offered, moves nothing.
        assert_eq!(plan.advance(&[cov("docs", a, 3), cov("other", a, 9)]), 4);
        assert_eq!(
            plan.advance(&[cov("docs", b, 5), cov("notes", a, 99)]),
            4 + 5 + 3
        );
        assert_eq!(plan.advance(&[cov("docs", a, 10)]), plan.total);
    }

    /// A snapshot batch's rows count against the rows its mark says the
    /// stream sends; another table's history in the same batch does not.
    #[test]
    fn a_pull_plan_counts_snapshot_rows_of_the_marked_table_only() {
        let a = SiteId::from_bytes([1; 16]);
        let row = |t: &str, k: &str, col: Option<&str>| crate::Change {
            table: t.into(),
            pk: vec![crate::Value::Text(k.into())],
            column: col.map(str::to_string),
            value: crate::Value::Null,
            hlc: crate::Hlc::ZERO,
            site: a,
            db_version: 1,
            cl: 1,
            replaces: VersionVector::new(),
        };
        let mark = |rows: u64| {
            Some(Box::new(SnapshotMark {
                table: "docs".into(),
                after: Some(crate::Value::Text("k".into())),
                versions: vv(&[(a, 9)]),
                rows,
                sweep: false,
            }))
        };
        let mut plan = PullPlan::default();
        assert_eq!(plan.snapshot_rows(), None);
        plan.take(&ChangeBatch {
            shard: "s".into(),
            changes: vec![
                row("notes", "n1", None),
                row("docs", "k1", None),
                row("docs", "k1", Some("title")),
                row("docs", "k2", None),
            ],
            covered: vec![],
            snapshot: mark(5),
        });
        assert_eq!(plan.snapshot_rows(), Some((2, 5)));
        plan.take(&ChangeBatch {
            shard: "s".into(),
            changes: vec![row("docs", "k3", None), row("docs", "k4", None)],
            covered: vec![],
            snapshot: mark(5),
        });
        assert_eq!(plan.snapshot_rows(), Some((4, 5)));
        assert_eq!(plan.snapshot_tables(), ["docs"]);
    }

    fn def(name: &str) -> TableDef {
        TableDef {
            name: name.into(),
            kind: crate::TableKind::Table,
            strategy: crate::Strategy::Lww,
            pk: vec![ColumnDef::plain("id", "TEXT", true)],
            columns: vec![],
            dim: None,
            metric: None,
        }
    }

    fn drain(s: &mut impl StreamSession) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    #[test]
    fn the_client_opens_with_its_state_and_ends_with_the_peers_report() {
        let mut c = ClientSession::new(ClientConfig {
            shard: "s".into(),
            ..Default::default()
        });
        assert_eq!(
            drain(&mut c),
            vec![Action::ReadShardState { shard: "s".into() }]
        );
        assert!(!c.wants_message(), "nothing to read before the request");
        c.handle(Input::ShardState {
            resume: Vec::new(),
            versions: vec![],
            schema: vec![def("t")],
        });
        let a = drain(&mut c);
        assert!(matches!(&a[..], [Action::Send(Message::SyncRequest(r))] if !r.want_schema));
        c.handle(Input::Received(Message::SyncReply(SyncReply {
            resume: Vec::new(),
            versions: vec![],
            schema: vec![def("t")],
        })));
        assert!(matches!(&drain(&mut c)[..], [Action::CreateTables { .. }]));
        c.handle(Input::TablesCreated(vec![]));
        assert!(matches!(
            &drain(&mut c)[..],
            [Action::ReadChanges { .. }, Action::ReadNext]
        ));
        c.handle(Input::ChangesEnd);
        assert!(matches!(
            &drain(&mut c)[..],
            [Action::Send(Message::Done(_))]
        ));
        c.handle(Input::Received(Message::Done(Done::default())));
        assert_eq!(
            drain(&mut c),
            vec![
                Action::Send(Message::Report(Report::default())),
                Action::FinishSending
            ]
        );
        assert!(c.result().is_none(), "the peer's report is still to come");
        let remote = Report {
            applied: 3,
            ..Default::default()
        };
        c.handle(Input::Received(Message::Report(remote)));
        assert_eq!(c.result().unwrap().as_ref().unwrap().remote, remote);
    }

    #[test]
    fn a_server_refuses_a_shard_outside_the_scope_as_if_absent() {
        let mut s = ServerSession::new(ServerConfig {
            may_push: true,
            scope: Some(vec!["mine".into()]),
        });
        s.handle(Input::Received(Message::SyncRequest(SyncRequest {
            resume: Vec::new(),
            shard: "other".into(),
            tables: vec![],
            versions: vec![],
            want_schema: true,
            schema: vec![],
        })));
        let a = drain(&mut s);
        assert!(
            matches!(&a[0], Action::Send(Message::Error(e)) if e.code == ErrorCode::UnknownShard)
        );
        assert!(matches!(s.result(), Some(Err(Failure::Local(_)))));
        // Nothing after the end changes anything.
        s.handle(Input::ChangesEnd);
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn a_misplaced_input_fails_the_session_instead_of_being_dropped() {
        let mut c = ClientSession::new(ClientConfig::default());
        drain(&mut c);
        c.handle(Input::Applied(Report::default()));
        assert!(
            matches!(c.result(), Some(Err(Failure::Local(e))) if e.code == ErrorCode::Internal)
        );
    }

    #[test]
    fn reading_stays_within_the_send_window() {
        let mut c = ClientSession::new(ClientConfig {
            shard: "s".into(),
            ..Default::default()
        });
        c.handle(Input::ShardState {
            resume: Vec::new(),
            versions: vec![],
            schema: vec![def("t")],
        });
        c.handle(Input::Received(Message::SyncReply(SyncReply {
            resume: Vec::new(),
            versions: vec![],
            schema: vec![def("t")],
        })));
        c.handle(Input::TablesCreated(vec![]));
        drain(&mut c);
        let batch = ChangeBatch {
            shard: "s".into(),
            ..Default::default()
        };
        let reads = |c: &mut ClientSession| {
            drain(c)
                .iter()
                .filter(|a| matches!(a, Action::ReadNext))
                .count()
        };
        c.handle(Input::ChangesRead(batch.clone()));
        assert_eq!(reads(&mut c), 1);
        c.handle(Input::ChangesRead(batch.clone()));
        assert_eq!(reads(&mut c), 0, "two batches unsent: wait for the writer");
        c.handle(Input::BatchSent);
        assert_eq!(reads(&mut c), 1);
    }
}
