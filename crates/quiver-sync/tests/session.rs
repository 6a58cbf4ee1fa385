//! The sync session without a network: a client session against a server
//! session over in-memory pipes, on two real SQLite stores. Deliveries are
//! interleaved at random across shards, directions and store answers;
//! batches are delivered twice; connections are cut at any step; scopes,
//! read-only peers and table filters refuse or narrow. Whatever happens, no
//! session is left hanging, refusals are the ones expected, and a clean
//! sync afterwards leaves both stores equal.

use std::collections::VecDeque;

use proptest::prelude::*;
use quiver_core::session::{
    Action, ClientConfig, ClientSession, Failure, Input, Outcome, ServerConfig, ServerSession,
    StreamSession,
};
use quiver_core::wire::{ErrorCode, ErrorMsg, Message};
use quiver_core::ChangeBatch;
use quiver_store::{Store, StreamLimits};
use quiver_sync::schema::{ensure_tables, shard_defs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Shard `s0` holds `t0` and `t1`; shard `s1` holds `t2`, which only the
/// client has at first.
const TABLES: [(&str, &str); 3] = [("t0", "s0"), ("t1", "s0"), ("t2", "s1")];
const SHARDS: [&str; 2] = ["s0", "s1"];

fn store(dir: &tempfile::TempDir, name: &str, with_s1: bool) -> Store {
    let mut s = Store::init(dir.path().join(name)).unwrap();
    for (t, shard) in TABLES {
        if shard == "s1" && !with_s1 {
            continue;
        }
        s.execute_sql(&format!("CREATE TABLE {t}(id TEXT PRIMARY KEY, v TEXT)"))
            .unwrap();
        s.add_table(t, shard, quiver_core::Strategy::Lww).unwrap();
    }
    s
}

/// One write: on the client (`true`) or the server, to a table (index), a
/// key, a value, or a delete.
type Write = (bool, usize, u8, u8, bool);

fn write(a: &mut Store, b: &mut Store, w: &Write) {
    let (on_client, t, key, val, delete) = *w;
    let s = if on_client { a } else { b };
    let table = TABLES[t % TABLES.len()].0;
    if s.table(table).is_err() {
        return;
    }
    let sql = if delete {
        format!("DELETE FROM {table} WHERE id = 'k{key}'")
    } else {
        format!("INSERT OR REPLACE INTO {table} VALUES ('k{key}', 'v{val}')")
    };
    s.execute_sql(&sql).unwrap();
}

fn rows(s: &Store, table: &str) -> Vec<(String, String)> {
    if s.table(table).is_err() {
        return Vec::new();
    }
    let mut st = s
        .connection()
        .prepare(&format!("SELECT id, v FROM {table} ORDER BY id"))
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

/// What a round of syncs is allowed and made to do.
#[derive(Debug, Clone)]
struct Round {
    seed: u64,
    /// Sync only `t0` of `s0`.
    filter: bool,
    /// The client pushes nothing.
    pull_only: bool,
    /// The server takes the client's changes.
    may_push: bool,
    /// The server lets the client see `s0` only.
    scoped: bool,
    /// Cut the connection at this step.
    cut_at: Option<usize>,
    /// Per mille of batches delivered twice.
    dup: u32,
    /// Per mille of applies that fail (a full disk, say).
    fail: u32,
    /// At this step, one direction of one stream ends early: what was not
    /// yet delivered is lost.
    truncate_at: Option<usize>,
}

impl Round {
    fn clean(seed: u64) -> Round {
        Round {
            seed,
            filter: false,
            pull_only: false,
            may_push: true,
            scoped: false,
            cut_at: None,
            dup: 0,
            fail: 0,
            truncate_at: None,
        }
    }
}

/// One side of one stream: its session, its inbox, its pending store work.
struct Side<S> {
    session: S,
    /// Messages from the peer (`None`: the peer ended its side).
    inbox: VecDeque<Option<Message>>,
    /// Store work asked for, answered in order.
    work: VecDeque<Action>,
    /// Reads asked for (of the changes the peer lacks), answered in order
    /// but independently of the store work, as a reader connection does.
    read_work: VecDeque<Action>,
    /// The peer's stream ended early: nothing more arrives.
    cut_off: bool,
    /// Batches read ahead, of the changes the peer lacks.
    reads: VecDeque<ChangeBatch>,
    /// Batches handed to the writer and not yet acknowledged.
    unacked: usize,
    finished_sending: bool,
    receiving: bool,
}

impl<S: StreamSession> Side<S> {
    fn new(session: S) -> Self {
        Side {
            session,
            inbox: VecDeque::new(),
            work: VecDeque::new(),
            read_work: VecDeque::new(),
            cut_off: false,
            reads: VecDeque::new(),
            unacked: 0,
            finished_sending: false,
            receiving: true,
        }
    }
}

/// Moves a side's actions out: messages to the peer's inbox, store work to
/// its queue.
fn pump<S: StreamSession, T>(side: &mut Side<S>, peer: &mut Side<T>) {
    while let Some(a) = side.session.poll_action() {
        match a {
            Action::Send(m) if !side.finished_sending => {
                if matches!(m, Message::Batch(_)) {
                    side.unacked += 1;
                }
                if peer.receiving && !peer.cut_off {
                    peer.inbox.push_back(Some(m));
                }
            }
            Action::Send(_) => panic!("a message after the end of the stream"),
            Action::FinishSending => {
                if !side.finished_sending && peer.receiving && !peer.cut_off {
                    peer.inbox.push_back(None);
                }
                side.finished_sending = true;
            }
            Action::StopReceiving => {
                side.receiving = false;
                side.inbox.clear();
            }
            a @ (Action::ReadChanges { .. } | Action::ReadNext) => side.read_work.push_back(a),
            other => side.work.push_back(other),
        }
    }
}

/// Does a side's oldest store work (or read); gives the session's answer.
fn work<S>(
    side: &mut Side<S>,
    store: &mut Store,
    peer_name: &str,
    read: bool,
    fail: bool,
) -> Option<Input> {
    let a = if read {
        side.read_work.pop_front()?
    } else {
        side.work.pop_front()?
    };
    Some(match a {
        Action::ReadShardState { shard } => Input::ShardState {
            resume: store.snapshot_progress(&shard).unwrap(),
            versions: store.table_versions(&shard).unwrap().into_iter().collect(),
            schema: shard_defs(store, &shard).unwrap(),
        },
        Action::CreateTables { shard, defs } => match ensure_tables(store, &shard, &defs, None) {
            Ok(created) => Input::TablesCreated(created),
            Err(e) => Input::Failed(internal(&e.to_string())),
        },
        Action::Admit { shard, schema } => {
            if !schema.is_empty() {
                ensure_tables(store, &shard, &schema, None).unwrap();
            }
            Input::Admitted {
                resume: store.snapshot_progress(&shard).unwrap(),
                schema: shard_defs(store, &shard).unwrap(),
                versions: store.table_versions(&shard).unwrap().into_iter().collect(),
            }
        }
        Action::ReadChanges {
            shard,
            since,
            resume,
        } => {
            // Small batches, so that streams interleave.
            let limits = StreamLimits {
                max_changes: 3,
                ..StreamLimits::default()
            };
            side.reads = store
                .changes_since_tables(&shard, &since, limits)
                .unwrap()
                .resume_snapshots(&resume)
                .map(|b| b.unwrap())
                .collect();
            return None;
        }
        Action::ReadNext => match side.reads.pop_front() {
            Some(b) => Input::ChangesRead(b),
            None => Input::ChangesEnd,
        },
        Action::Apply(_) if fail => Input::Failed(internal("disk full")),
        Action::Apply(b) => Input::Applied(store.apply_from(&b, Some(peer_name)).unwrap()),
        other => panic!("not store work: {other:?}"),
    })
}

fn internal(m: &str) -> ErrorMsg {
    ErrorMsg {
        code: ErrorCode::Internal,
        message: m.into(),
        retry_after_ms: None,
    }
}

type Stream = (Side<ClientSession>, Side<ServerSession>);

/// Runs one round: a stream per shard, every step chosen at random among
/// those that can happen. Gives each stream's client and server results.
#[allow(clippy::type_complexity)]
fn run(
    a: &mut Store,
    b: &mut Store,
    round: &Round,
) -> Vec<(Result<Outcome, Failure>, Result<Outcome, Failure>)> {
    let mut rng = StdRng::seed_from_u64(round.seed);
    let mut streams: Vec<Stream> = SHARDS
        .iter()
        .map(|shard| {
            let tables = if round.filter && *shard == "s0" {
                vec!["t0".to_string()]
            } else {
                Vec::new()
            };
            let c = ClientSession::new(ClientConfig {
                shard: shard.to_string(),
                tables,
                pull_only: round.pull_only,
            });
            let s = ServerSession::new(ServerConfig {
                may_push: round.may_push,
                scope: round.scoped.then(|| vec!["s0".to_string()]),
            });
            (Side::new(c), Side::new(s))
        })
        .collect();
    for (c, s) in &mut streams {
        pump(c, s);
    }
    let mut step = 0usize;
    loop {
        if round.cut_at == Some(step) {
            // The connection is gone: work under way may or may not have
            // been done (each apply is one transaction), and each side
            // learns it from its transport.
            for (c, s) in &mut streams {
                for _ in 0..rng.gen_range(0..=c.work.len()) {
                    if let Some(i) = work(c, a, "server", false, false) {
                        c.session.handle(i);
                    }
                }
                for _ in 0..rng.gen_range(0..=s.work.len()) {
                    if let Some(i) = work(s, b, "client", false, false) {
                        s.session.handle(i);
                    }
                }
                c.receiving = false;
                s.receiving = false;
                c.session.handle(Input::Failed(internal("connection lost")));
                s.session.handle(Input::Failed(internal("connection lost")));
                // What they ask for after the end must not send anything
                // after their end of stream (`pump` checks).
                pump(c, s);
                pump(s, c);
            }
            break;
        }
        if round.truncate_at == Some(step) {
            let (c, s) = &mut streams[rng.gen_range(0..SHARDS.len())];
            let inbox_of_client = rng.gen_bool(0.5);
            let side_inbox = if inbox_of_client {
                c.cut_off = true;
                &mut c.inbox
            } else {
                s.cut_off = true;
                &mut s.inbox
            };
            let keep = rng.gen_range(0..=side_inbox.len());
            side_inbox.truncate(keep);
            side_inbox.push_back(None);
        }
        // Every step that can happen now: (stream, side, kind).
        let mut steps = Vec::new();
        for (i, (c, s)) in streams.iter().enumerate() {
            let sides = [
                (
                    true,
                    c.session.wants_message() && !c.inbox.is_empty(),
                    [!c.work.is_empty(), c.unacked > 0, !c.read_work.is_empty()],
                ),
                (
                    false,
                    s.session.wants_message() && !s.inbox.is_empty(),
                    [!s.work.is_empty(), s.unacked > 0, !s.read_work.is_empty()],
                ),
            ];
            for (client, deliver, [work, ack, read]) in sides {
                for (kind, can) in [(0, deliver), (1, work), (2, ack), (3, read)] {
                    if can {
                        steps.push((i, client, kind));
                    }
                }
            }
        }
        if steps.is_empty() {
            break;
        }
        let (i, client, kind) = steps[rng.gen_range(0..steps.len())];
        let (c, s) = &mut streams[i];
        let dup = rng.gen_range(0..1000) < round.dup;
        let fail = rng.gen_range(0..1000) < round.fail;
        if client {
            step_side(c, s, a, kind, dup, fail, "server");
        } else {
            step_side(s, c, b, kind, dup, fail, "client");
        }
        step += 1;
        assert!(step < 100_000, "the sessions do not end");
    }
    streams
        .into_iter()
        .map(|(c, s)| {
            let c = c.session.result().cloned();
            let s = s.session.result().cloned();
            (
                c.expect("a client session left without a result"),
                s.expect("a server session left without a result"),
            )
        })
        .collect()
}

fn step_side<S: StreamSession, T: StreamSession>(
    side: &mut Side<S>,
    peer: &mut Side<T>,
    store: &mut Store,
    kind: u8,
    dup: bool,
    fail: bool,
    peer_name: &str,
) {
    match kind {
        0 => {
            let m = side.inbox.pop_front().unwrap();
            match m {
                Some(m) => {
                    if dup && matches!(m, Message::Batch(_)) {
                        side.inbox.push_front(Some(m.clone()));
                    }
                    side.session.handle(Input::Received(m))
                }
                None => side.session.handle(Input::PeerFinished),
            }
        }
        1 | 3 => {
            if let Some(i) = work(side, store, peer_name, kind == 3, fail) {
                side.session.handle(i);
            }
        }
        _ => {
            side.unacked -= 1;
            side.session.handle(Input::BatchSent);
        }
    }
    pump(side, peer);
}

fn code(r: &Result<Outcome, Failure>) -> Option<ErrorCode> {
    r.as_ref().err().map(|f| f.error().code)
}

fn assert_equal(a: &Store, b: &Store) {
    for (t, _) in TABLES {
        assert_eq!(rows(a, t), rows(b, t), "table {t} differs");
    }
}

fn writes() -> impl Strategy<Value = Vec<Write>> {
    proptest::collection::vec(
        (
            any::<bool>(),
            0usize..3,
            0u8..6,
            any::<u8>(),
            prop::bool::weighted(0.2),
        ),
        0..24,
    )
}

fn round() -> impl Strategy<Value = Round> {
    (
        any::<u64>(),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.15),
        prop::option::weighted(0.3, 0usize..60),
        prop_oneof![Just(0u32), Just(300u32)],
        prop_oneof![3 => Just(0u32), 1 => Just(200u32)],
        prop::option::weighted(0.15, 0usize..60),
    )
        .prop_map(
            |(seed, filter, pull_only, may_push, scoped, cut_at, dup, fail, truncate_at)| Round {
                seed,
                filter,
                pull_only,
                may_push,
                scoped,
                cut_at,
                dup,
                fail,
                truncate_at,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn sessions_end_as_they_should_and_a_clean_sync_converges(
        before in writes(),
        during in writes(),
        first in round(),
        last_seed in any::<u64>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut a = store(&dir, "a.db", true);
        let mut b = store(&dir, "b.db", false);
        for w in &before {
            write(&mut a, &mut b, w);
        }
        // Does the client hold s0 changes the server lacks? (For the
        // read-only refusal.)
        let client_has_s0 = !a.changes_since_tables(
            "s0",
            &b.table_versions("s0").unwrap().into_iter().filter(|(t, _)| !first.filter || t == "t0").collect(),
            StreamLimits::default(),
        ).unwrap().map(|x| x.unwrap()).all(|x| x.changes.is_empty());
        let results = run(&mut a, &mut b, &first);
        let faults = first.cut_at.is_some() || first.truncate_at.is_some() || first.fail > 0;
        for (i, (c, s)) in results.iter().enumerate() {
            // A failure that is not a refusal names its cause on both ends:
            // the side that failed (Local) told the other (Peer).
            if let (Err(Failure::Local(e)), Err(Failure::Peer(p))) | (Err(Failure::Peer(p)), Err(Failure::Local(e))) = (c, s) {
                prop_assert_eq!(e, p);
            }
            if faults {
                continue;
            }
            // Both ends agree on failure: a side that failed made the other fail.
            prop_assert_eq!(c.is_ok(), s.is_ok(), "stream {}: {:?} / {:?}", i, c, s);
            let shard = SHARDS[i];
            let expected = if shard == "s1" && (first.scoped || !first.may_push) {
                // Out of scope, or not creatable by a read-only peer: absent.
                Some(ErrorCode::UnknownShard)
            } else if shard == "s0" && !first.may_push && !first.pull_only && client_has_s0 {
                Some(ErrorCode::Forbidden)
            } else {
                None
            };
            // What the client held may have been replaced by the server's
            // concurrent version (applied before the client read its own
            // changes): then it has nothing left to push, and no refusal.
            let expected = match (expected, c) {
                (Some(ErrorCode::Forbidden), Ok(o)) if o.changes_sent == 0 && o.changes_received > 0 => None,
                (e, _) => e,
            };
            prop_assert_eq!(code(c), expected, "client of stream {}: {:?}", i, c);
            prop_assert_eq!(code(s), expected, "server of stream {}: {:?}", i, s);
            if let (Ok(c), Ok(s)) = (c, s) {
                // Each side's report is what the other applied.
                prop_assert_eq!(c.remote, s.local);
                prop_assert_eq!(s.remote, c.local);
                if first.dup == 0 {
                    prop_assert_eq!(c.changes_sent, s.changes_received);
                    prop_assert_eq!(s.changes_sent, c.changes_received);
                }
            }
        }
        if !faults && !first.filter && !first.pull_only && first.may_push && !first.scoped {
            assert_equal(&a, &b);
        }
        // More writes, then a clean sync: whatever happened before, the
        // stores end equal.
        for w in &during {
            write(&mut a, &mut b, w);
        }
        for (c, s) in run(&mut a, &mut b, &Round::clean(last_seed)) {
            prop_assert!(c.is_ok() && s.is_ok(), "{:?} / {:?}", c, s);
        }
        assert_equal(&a, &b);
    }
}
