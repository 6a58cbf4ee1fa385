//! Raw command-line arguments (clap derive). Validation happens in the
//! command handlers, which turn them into library calls.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "quiver",
    version,
    about = "Multi-master sync for SQLite vectors and agent memory"
)]
pub struct Cli {
    /// The store file.
    #[arg(long, global = true, default_value = "./quiver.db", env = "QUIVER_DB")]
    pub db: PathBuf,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new store.
    Init {
        /// A human name for this node.
        #[arg(long)]
        name: Option<String>,
        /// Extra names or addresses for the TLS certificate (localhost and
        /// the loopback addresses are always included).
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
    },
    /// Serve this store to peers over QUIC (and TLS over TCP for those
    /// whose UDP is blocked).
    Serve(ServeArgs),
    /// Sync with a server: both directions, shard by shard.
    Sync(SyncArgs),
    /// Measure the round trip to a server.
    Ping {
        /// The server, HOST:PORT.
        addr: String,
        /// Token the server asks for (or QUIVER_TOKEN).
        #[arg(long, env = "QUIVER_TOKEN")]
        token: Option<String>,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// Make a new replica (at --db, which must not exist) from a
    /// consistent copy of a server's whole store; it gets a site id of its
    /// own and none of the server's tokens or peers, and syncs both ways.
    Clone {
        /// The server, HOST:PORT.
        addr: String,
        /// Token the server asks for (or QUIVER_TOKEN); it must cover every shard.
        #[arg(long, env = "QUIVER_TOKEN")]
        token: Option<String>,
        /// This replica's node name.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// Create, list and drop vector collections.
    #[command(subcommand)]
    Collection(CollectionCmd),
    /// Insert or replace a record.
    Put {
        /// The collection.
        collection: String,
        /// The record's id, unique across replicas (a UUID, say).
        id: String,
        /// The vector as a JSON array, e.g. '[0.1, 0.2]'.
        #[arg(long)]
        vector: String,
        /// Metadata as a JSON object.
        #[arg(long)]
        meta: Option<String>,
        /// Text kept with the record, e.g. the passage the vector embeds.
        #[arg(long)]
        content: Option<String>,
    },
    /// Show a record.
    Get {
        /// The collection.
        collection: String,
        /// The record's id.
        id: String,
    },
    /// Delete a record.
    Delete {
        /// The collection.
        collection: String,
        /// The record's id.
        id: String,
    },
    /// Import records from a JSON-lines file ({"id","vector","metadata","content"} a line).
    Import {
        /// The collection.
        collection: String,
        /// A JSON-lines file: one {"id","vector","metadata","content"} object a line.
        file: PathBuf,
        /// Records per transaction.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Import the good lines and report the bad ones by number, instead
        /// of stopping at the first bad line.
        #[arg(long)]
        skip_bad: bool,
    },
    /// Print the visible rows of a collection or table as JSON lines, sorted by key.
    Export {
        /// A collection or a replicated table.
        collection: String,
        /// Write to a file instead of standard output.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Run SQL on the store; writes to replicated tables are tracked.
    Sql {
        /// One or more statements separated by `;`; each query's rows are printed.
        sql: String,
    },
    /// Register tables for replication.
    #[command(subcommand)]
    Table(TableCmd),
    /// Agent memory (episodes, skills, edges).
    #[command(subcommand)]
    Memory(MemoryCmd),
    /// Schema conflicts with peers, and their resolution.
    #[command(subcommand)]
    Schema(SchemaCmd),
    /// List and resolve conflicts.
    #[command(subcommand)]
    Conflicts(ConflictsCmd),
    /// k-nearest-neighbour search in a collection.
    Search(SearchArgs),
    /// Site id, shards, tables with row counts, version vectors, peers;
    /// with --server, a running daemon's live connections.
    Status {
        /// A daemon's HTTP address (printed by `quiver serve`; --http or
        /// http_listen): list its live connections instead.
        #[arg(long, value_name = "ADDR")]
        server: Option<String>,
    },
    /// Purge tombstones and superseded records every peer has acknowledged
    /// (peers silent past the horizon excepted), and give the space back.
    Compact {
        /// Only this shard.
        #[arg(long)]
        shard: Option<String>,
        /// Say what would be purged and what holds the rest back; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Peers silent this long (days, fractions allowed) stop holding
        /// compaction back (default: the store's, set by the daemon's
        /// peer_horizon_days, else 30).
        #[arg(long, value_name = "DAYS")]
        peer_horizon_days: Option<f64>,
    },
    /// The daemon's effective configuration, with where each value came from.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Access tokens for `quiver serve`, scoped to shards and read-only or read-write.
    #[command(subcommand)]
    Token(TokenCmd),
    /// The peer registry (`quiver serve` keeps live links to registered peers).
    #[command(subcommand)]
    Peers(PeersCmd),
    /// Print store events (local and remote changes, conflicts) as JSON lines.
    Watch {
        /// Only events of this shard.
        #[arg(long)]
        shard: Option<String>,
    },
    /// Three replicas syncing over QUIC on loopback, with conflicts; exits 0 if they converge.
    Demo {
        /// Rows each replica writes.
        #[arg(long, default_value_t = 500)]
        rows: usize,
    },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML file of settings (see `quiver config show`); flags and the
    /// environment override it.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Address to listen on (default 127.0.0.1:4433); port 0 picks a free
    /// port (the bound address is printed).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Token clients must present for full access (scoped tokens: `quiver token create`).
    #[arg(long)]
    pub token: Option<String>,
    /// Certificate (PEM); default: the one `quiver init` made beside the store.
    #[arg(long)]
    pub cert: Option<std::path::PathBuf>,
    /// Private key (PEM); default: the one `quiver init` made beside the store.
    #[arg(long)]
    pub key: Option<std::path::PathBuf>,
    /// Mutual TLS: require client certificates issued by (or equal to) a
    /// certificate in this PEM file.
    #[arg(long)]
    pub client_ca: Option<std::path::PathBuf>,
    /// Keep a live link to this peer, HOST:PORT or HOST:PORT@FINGERPRINT (repeatable).
    #[arg(long = "peer", value_name = "ADDR[@PIN]")]
    pub peers: Vec<String>,
    /// Token to present to peers.
    #[arg(long)]
    pub peer_token: Option<String>,
    /// How live links to peers connect: auto (QUIC, falling back to TLS
    /// over TCP when UDP does not get through), quic or tcp.
    #[arg(long, value_name = "auto|quic|tcp")]
    pub peer_transport: Option<quiver_sync::TransportChoice>,
    /// Where to take TLS over TCP (HTTP/2) for clients whose UDP is
    /// blocked: HOST:PORT, `same` (default: the --listen address on TCP)
    /// or `off`.
    #[arg(long, value_name = "ADDR|same|off")]
    pub tcp_listen: Option<quiver_sync::TcpListen>,
    /// Do not verify peers' certificates (when no @PIN is given).
    #[arg(long)]
    pub peer_insecure: bool,
    /// Connections served at once (default 1024); the next is refused with a retry hint.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Concurrent streams per connection (default 64).
    #[arg(long)]
    pub max_streams: Option<u32>,
    /// Seconds a silent connection lives (default 30).
    #[arg(long)]
    pub idle_timeout_secs: Option<u64>,
    /// Log format on standard error (default text).
    #[arg(long, value_enum)]
    pub log_format: Option<crate::config::LogFormat>,
    /// Where to serve /health and /metrics over HTTP (default 127.0.0.1:0;
    /// `off` disables it). The bound address is printed.
    #[arg(long, value_name = "ADDR|off")]
    pub http: Option<crate::config::HttpListen>,
    /// Serve a non-loopback address although neither a token nor a client
    /// CA guards it: anyone who reaches it may read and write every shard.
    #[arg(long)]
    pub allow_anonymous: bool,
}

/// How to reach the server and trust its certificate (verification is on
/// by default).
#[derive(Debug, Args, Clone)]
pub struct TrustArgs {
    /// auto: QUIC, and TLS over TCP beside it when QUIC has not answered
    /// within 300 ms (the first to complete wins); quic or tcp: only that.
    #[arg(long, value_name = "auto|quic|tcp", default_value = "auto")]
    pub transport: quiver_sync::TransportChoice,
    /// Trust certificates signed by (or equal to) the certificates in this PEM file.
    #[arg(long, conflicts_with_all = ["pin", "insecure"])]
    pub ca: Option<std::path::PathBuf>,
    /// Trust exactly the certificate with this SHA-256 fingerprint.
    #[arg(long, conflicts_with = "insecure")]
    pub pin: Option<String>,
    /// Do not verify the server at all (encrypted, not authenticated).
    #[arg(long)]
    pub insecure: bool,
    /// Client certificate (PEM) for servers that require one (mutual TLS);
    /// default: the store's own, made by `quiver init`.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --client-cert.
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// The server, HOST:PORT.
    pub addr: String,
    /// Shards to sync (repeatable); default: every shard either side holds.
    #[arg(long = "shard")]
    pub shards: Vec<String>,
    /// Limit the sync to these tables (comma-separated), e.g. the memory
    /// shard's episodes,skills,edges.
    #[arg(long, value_delimiter = ',')]
    pub tables: Vec<String>,
    /// Token the server asks for (or QUIVER_TOKEN).
    #[arg(long, env = "QUIVER_TOKEN")]
    pub token: Option<String>,
    #[command(flatten)]
    pub trust: TrustArgs,
    /// Retries of transient failures (a lost connection, a busy server;
    /// default 4). A server that does not answer the handshake is retried
    /// only when --retries is given.
    #[arg(long)]
    pub retries: Option<u32>,
    /// Keep a live link after catching up: push and pull each change as it
    /// commits, until interrupted.
    #[arg(long)]
    pub watch: bool,
}

#[derive(Debug, Args)]
pub struct SearchArgs {
    /// The collection.
    pub collection: String,
    /// The query vector as a JSON array.
    #[arg(long)]
    pub vector: String,
    /// Number of neighbours.
    #[arg(short, long, default_value_t = 10)]
    pub k: usize,
    /// Metadata filter as JSON, e.g. '{"lang": "en", "year": {"$gte": 2020}}'.
    #[arg(long)]
    pub filter: Option<String>,
}

#[derive(Debug, Args)]
pub struct BenchSearchArgs {
    /// Collection to query (in --db); without it a synthetic one is made.
    #[arg(long)]
    pub collection: Option<String>,
    /// Vectors in the synthetic collection.
    #[arg(long, default_value_t = 100_000)]
    pub n: usize,
    /// Dimensions of the synthetic vectors.
    #[arg(long, default_value_t = 384)]
    pub dim: usize,
    /// Number of neighbours per query.
    #[arg(short, long, default_value_t = 10)]
    pub k: usize,
    /// Number of queries to time.
    #[arg(long, default_value_t = 100)]
    pub queries: usize,
}

#[derive(Debug, Subcommand)]
pub enum CollectionCmd {
    /// Create a collection.
    Create {
        /// The collection's name (letters, digits and _).
        name: String,
        /// Dimensions of every vector in it.
        #[arg(long)]
        dim: usize,
        /// cosine, l2 or dot.
        #[arg(long, default_value = "cosine")]
        metric: String,
        /// lww, fww, merge, manual, local-wins or remote-wins.
        #[arg(long, default_value = "lww")]
        strategy: String,
        /// The shard it syncs in.
        #[arg(long, default_value = "default")]
        shard: String,
    },
    /// List collections.
    List,
    /// Drop a collection on this replica.
    Drop {
        /// The collection.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TableCmd {
    /// Register an existing table (it needs an explicit, globally unique PRIMARY KEY).
    Add {
        /// An existing table of the store (not a view).
        table: String,
        /// The shard it syncs in.
        #[arg(long, default_value = "default")]
        shard: String,
        /// How concurrent writes to a column resolve: lww, fww, max, min,
        /// counter, merge, manual, local-wins or remote-wins.
        #[arg(long, default_value = "lww")]
        strategy: String,
        /// A column's own rule, as COLUMN=RULE (e.g. views=counter,
        /// title=fww); repeatable. Rules: lww, fww, max, min, counter
        /// (increments on different replicas add up), merge, manual.
        #[arg(long, value_name = "COLUMN=RULE")]
        column: Vec<String>,
        /// A column that points at a row of another replicated table of
        /// the shard, as COLUMN=TABLE.KEY (e.g. src=episodes.id);
        /// repeatable. Kept whole across merges (see --on-delete).
        #[arg(long, value_name = "COLUMN=TABLE.KEY")]
        references: Vec<String>,
        /// What happens to a row whose referenced row is deleted: cascade
        /// (deleted too, on every replica) or keep (left, listed as
        /// dangling in `quiver status`).
        #[arg(long, default_value = "cascade", value_name = "cascade|keep")]
        on_delete: String,
    },
    /// List replicated tables and collections.
    List,
    /// Drop a column of a replicated table (SQLite refuses a plain ALTER
    /// TABLE … DROP COLUMN while capture watches the column). Peers keep it.
    DropColumn {
        /// A replicated table.
        table: String,
        /// One of its columns (not a key column).
        column: String,
    },
    /// Change the rule of one column (a schema change; peers take it at
    /// their next sync).
    Policy {
        /// A replicated table.
        table: String,
        /// COLUMN=RULE, e.g. title=fww.
        #[arg(value_name = "COLUMN=RULE")]
        rule: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SchemaCmd {
    /// Columns a peer defines with another type: their shard is held.
    Conflicts,
    /// Resolve a schema conflict: keep this replica's column (the peer
    /// then resolves with theirs) or take the peer's (this replica's
    /// values of the column are discarded; the peer's arrive at the next sync).
    Resolve {
        /// The column, as TABLE.COLUMN.
        column: String,
        /// Which definition stays: this replica's (ours) or the peer's (theirs).
        #[arg(long, value_name = "ours|theirs")]
        keep: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the effective configuration of `quiver serve`.
    Show {
        /// The TOML file `quiver serve --config` would read.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Make a token; it is printed once and stored only as a hash.
    Create {
        /// Shards it may see (repeatable; default: all).
        #[arg(long = "shard")]
        shards: Vec<String>,
        /// Pull only: pushed changes are refused.
        #[arg(long)]
        read_only: bool,
        /// A note for `token list`, e.g. who holds it.
        #[arg(long)]
        label: Option<String>,
    },
    /// List tokens (their scope, never the tokens).
    List,
    /// Revoke a token by id.
    Revoke {
        /// The token's id, from `token list`.
        id: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum PeersCmd {
    /// Register a peer.
    Add {
        /// The peer's node name.
        node: String,
        /// HOST:PORT.
        addr: String,
        /// Shards to sync with it (repeatable; default: all).
        #[arg(long = "shard")]
        shards: Vec<String>,
        /// Token to present to it.
        #[arg(long)]
        token: Option<String>,
        /// SHA-256 fingerprint of its certificate.
        #[arg(long)]
        pin: Option<String>,
    },
    /// List registered peers and their state.
    List,
    /// Remove a peer.
    Remove {
        /// The peer's node name.
        node: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum MemoryCmd {
    /// Create the agent-memory tables in the `memory` shard.
    Init,
}

#[derive(Debug, Subcommand)]
pub enum ConflictsCmd {
    /// List open conflicts.
    List {
        /// Only conflicts of this shard.
        #[arg(long)]
        shard: Option<String>,
        /// Include resolved conflicts.
        #[arg(long)]
        all: bool,
    },
    /// Resolve an open conflict.
    Resolve(ResolveArgs),
}

/// Exactly one of `--keep` and `--value`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("choice").required(true).args(["keep", "value"])))]
pub struct ResolveArgs {
    /// The conflict's number, from `quiver conflicts list`.
    pub id: i64,
    /// Keep a recorded version (its site:db_version handle, or a unique prefix).
    #[arg(long, value_name = "VERSION")]
    pub keep: Option<String>,
    /// Write a new value instead (JSON: a number array for vectors, an
    /// object for metadata, a string or number for a plain column).
    #[arg(long)]
    pub value: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Insert N vectors through quiverdb and through plain SQLite; report the ratio.
    Write {
        /// Rows to insert on each side.
        #[arg(long, default_value_t = 10_000)]
        n: usize,
        /// Dimensions of each vector.
        #[arg(long, default_value_t = 384)]
        dim: usize,
        /// Rows per transaction.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Also measure a table with per-column rules: one `counter` and
        /// one `fww` column, each row inserted and then incremented once
        /// from SQL, against the same table without rules.
        #[arg(long)]
        policies: bool,
    },
    /// k-NN queries per second: quiverdb's search against a plain scalar loop.
    Search(BenchSearchArgs),
    /// Many clients syncing at once against one `quiver serve`.
    Load {
        /// Clients syncing at once.
        #[arg(long, default_value_t = 200)]
        clients: usize,
        /// Rows each client writes.
        #[arg(long, default_value_t = 20)]
        rows: usize,
        /// quic, tcp (TLS over TCP) or auto.
        #[arg(long, default_value = "quic", value_name = "quic|tcp|auto")]
        transport: quiver_sync::TransportChoice,
    },
    /// A replica receiving rows from a `quiver serve` process over QUIC,
    /// against plain SQLite inserting them.
    Sync {
        /// Rows to sync.
        #[arg(long, default_value_t = 10_000)]
        n: usize,
        /// Dimensions of each vector.
        #[arg(long, default_value_t = 384)]
        dim: usize,
        /// snapshot: into an empty replica; delta: into one that already
        /// holds the source's earlier rows; clone: `quiver clone`'s
        /// whole-store copy.
        #[arg(long, default_value = "snapshot", value_name = "snapshot|delta|clone")]
        mode: String,
        /// quic, tcp (TLS over TCP, as where UDP is blocked) or auto.
        #[arg(long, default_value = "quic", value_name = "quic|tcp|auto")]
        transport: quiver_sync::TransportChoice,
    },
    /// Remote updates applied to rows a replica holds, half of them
    /// concurrent with its own edits, against plain SQLite inserting them.
    Apply {
        /// Changes to apply.
        #[arg(long, default_value_t = 20_000)]
        n: usize,
    },
    /// Compaction of N clock records (rows inserted and deleted, every
    /// tombstone acknowledged): how long one pass takes.
    Compact {
        /// Clock records to compact.
        #[arg(long, default_value_t = 1_000_000)]
        n: usize,
    },
    /// Concurrent versions applied and resolved.
    Conflicts {
        /// Conflicting rows.
        #[arg(long, default_value_t = 100)]
        n: usize,
    },
    /// Write-to-visible latency across a live link (p50/p99).
    Live {
        /// Single writes to time.
        #[arg(long, default_value_t = 1000)]
        writes: usize,
        /// Bursts of 100 writes to time.
        #[arg(long, default_value_t = 20)]
        bursts: usize,
    },
}

impl Command {
    /// Whether the command opens sockets (a server, a client, the demo's
    /// replicas or a benchmark's): a peer closing one is an error it
    /// handles, never a signal that ends the process.
    pub fn uses_network(&self) -> bool {
        matches!(
            self,
            Command::Serve(_)
                | Command::Sync(_)
                | Command::Ping { .. }
                | Command::Clone { .. }
                | Command::Demo { .. }
                | Command::Bench(_)
                | Command::Status { server: Some(_) }
        )
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every argument of every command says what it is for in `--help`.
    #[test]
    fn every_argument_has_a_description() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "quiver", &mut missing);
        assert!(missing.is_empty(), "without a description: {missing:#?}");
    }
}
