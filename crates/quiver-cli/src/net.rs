//! `quiver serve`, `quiver sync`, `quiver ping`: the networked commands.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use quiver_store::Store;
use quiver_sync::{
    Client, ClientOptions, CoordinatorOptions, Identity, Progress, Server, ServerOptions,
    ShardCoordinator, StoreHandle, SyncSpec, Trust,
};

use crate::args::{ServeArgs, SyncArgs, TrustArgs};
use crate::{config, output};

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Logs to standard error; `QUIVER_LOG` (or `RUST_LOG`) sets the filter.
pub fn init_logging(default: &str) {
    init_logging_as(default, false);
}

/// Logs as text or, for log collectors, as JSON lines.
pub fn init_logging_as(default: &str, json: bool) {
    let filter = std::env::var("QUIVER_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.to_string());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never into a file or pipe.
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn node_name(store: &Store) -> Result<String> {
    Ok(store
        .node_name()?
        .unwrap_or_else(|| format!("node-{}", &store.site_id().to_hex()[..8])))
}

fn trust(t: &TrustArgs) -> Result<Trust> {
    Ok(match (&t.ca, &t.pin, t.insecure) {
        (Some(ca), _, _) => Trust::Ca(ca.clone()),
        (None, Some(pin), _) => Trust::Pin(quiver_sync::tls::parse_pin(pin)?),
        (None, None, true) => Trust::Insecure,
        (None, None, false) => Trust::Verify,
    })
}

/// How long a one-shot command waits for a QUIC handshake before it says
/// that nothing answers (not retried: a person is waiting).
const ONE_SHOT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(2500);

/// The certificate a client presents when a server asks for one: the
/// named files, else the store's own identity if `quiver init` made one
/// and it can be read (without it, servers that do not ask still work).
fn client_identity(db: &Path, t: &TrustArgs) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    match (&t.client_cert, &t.client_key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        _ => {
            let (c, k) = quiver_sync::tls::identity_paths(db);
            match Identity::load(&c, &k) {
                Ok(_) => Some((c, k)),
                Err(e) => {
                    tracing::debug!("no client certificate to offer: {e}");
                    None
                }
            }
        }
    }
}

/// The flags of `quiver serve` as the top configuration layer.
fn flag_layer(a: &ServeArgs) -> config::Layer {
    config::Layer {
        listen: a.listen,
        token: a.token.clone(),
        cert: a.cert.clone(),
        key: a.key.clone(),
        client_ca: a.client_ca.clone(),
        peers: (!a.peers.is_empty()).then(|| config::peer_list(&a.peers)),
        peer_token: a.peer_token.clone(),
        peer_transport: a.peer_transport,
        tcp_listen: a.tcp_listen,
        max_connections: a.max_connections,
        max_streams: a.max_streams,
        idle_timeout_secs: a.idle_timeout_secs,
        log_format: a.log_format,
        http_listen: a.http,
        allow_anonymous: a.allow_anonymous.then_some(true),
        ..config::Layer::default()
    }
}

fn layered(file: Option<&Path>, flags: &config::Layer) -> Result<config::DaemonConfig> {
    let file = file.map(config::file_layer).transpose()?;
    let env = config::Layer::from_env(|n| std::env::var(n).ok())?;
    config::resolve(file.as_ref(), &env, flags)
}

/// `quiver config show`: the effective settings and where each came from.
pub fn config_show(file: Option<&Path>, json: bool) -> Result<()> {
    let c = layered(file, &config::Layer::default())?;
    if json {
        return output::json(&c.values);
    }
    let kw = c.values.keys().map(|k| k.len()).max().unwrap_or(0);
    let vw = c
        .values
        .values()
        .map(|(v, _)| v.chars().count())
        .max()
        .unwrap_or(0);
    for (k, (v, src)) in &c.values {
        println!(
            "{k:<kw$} = {v:<vw$} ({})",
            serde_json::to_value(src)?.as_str().unwrap_or("")
        );
    }
    Ok(())
}

pub fn serve(db: &Path, a: ServeArgs, json: bool) -> Result<()> {
    let cfg = layered(a.config.as_deref(), &flag_layer(&a))?;
    init_logging_as("info", cfg.log_json);
    // The lock first: a second daemon is refused before it touches the store.
    let mut lock = ServeLock::take(db)?;
    let store = Store::open(db).with_context(|| format!("opening {}", db.display()))?;
    let require_token = refuse_anonymous_network(&cfg, &store)?;
    let node = cfg
        .node
        .clone()
        .map(Ok)
        .unwrap_or_else(|| node_name(&store))?;
    let (cert_default, key_default) = quiver_sync::tls::identity_paths(db);
    let (cert, key) = (
        cfg.cert.clone().unwrap_or(cert_default),
        cfg.key.clone().unwrap_or(key_default),
    );
    let id = Identity::load(&cert, &key)?;
    let opts = ServerOptions {
        listen: cfg.listen,
        tcp_listen: cfg.tcp_listen,
        token: cfg.token.clone(),
        node: node.clone(),
        max_connections: cfg.max_connections,
        rate: cfg.rate,
        client_ca: cfg.client_ca.clone(),
        require_token,
        limits: quiver_sync::transport::TransportLimits {
            idle_timeout: cfg.idle_timeout,
            keep_alive: cfg.keep_alive,
            max_streams: cfg.max_streams,
        },
        max_frame: cfg.max_frame,
        compression: cfg.compression,
        stream: quiver_store::StreamLimits {
            max_changes: cfg.batch_max_changes,
            max_bytes: cfg.batch_max_bytes,
        },
        shutdown_grace: cfg.shutdown_grace,
        ..Default::default()
    };
    // The daemon's peers: those of --peer (and `peers` in the config), then
    // the registry's. Pins are checked before anything starts.
    let mut peers = Vec::new();
    for p in &cfg.peers {
        let (addr, pin) = match p.split_once('@') {
            Some((addr, pin)) => (
                addr.to_string(),
                Some(quiver_sync::tls::parse_pin(pin).with_context(|| format!("peer {p}"))?),
            ),
            None => (p.clone(), None),
        };
        let mut rec = quiver_store::PeerRecord::new(&addr, &addr, vec![]);
        rec.pin = pin;
        peers.push(rec);
    }
    for mut p in store.peers()? {
        p.pin = p
            .pin
            .map(|pin| quiver_sync::tls::parse_pin(&pin))
            .transpose()
            .with_context(|| format!("registered peer {}", p.node))?;
        peers.push(p);
    }
    let peer_token = cfg.peer_token.clone();
    let peer_insecure = a.peer_insecure;
    let peer_transport = cfg.peer_transport;
    let http_listen = cfg.http_listen;
    let compact_interval = cfg.compact_interval;
    let mut store = store;
    store.set_peer_horizon_days(cfg.peer_horizon_days as f64)?;
    let rt = runtime()?;
    rt.block_on(async move {
        let handle = StoreHandle::spawn(store);
        let server = Server::bind(handle.clone(), &id, opts)?;
        let addr = server.local_addr()?;
        let tcp_addr = server.tcp_addr();
        lock.record(addr)?;
        let token = server.shutdown_token();
        // The shard coordinator keeps a live link to every peer until
        // shutdown (started once the daemon is announced), and owns their
        // state, statistics and events.
        let coordinator = ShardCoordinator::new(
            handle.clone(),
            CoordinatorOptions {
                client: ClientOptions {
                    trust: if peer_insecure {
                        Trust::Insecure
                    } else {
                        Trust::Verify
                    },
                    // Peers that require client certificates get this daemon's own.
                    client_identity: Some((cert.clone(), key.clone())),
                    token: peer_token.clone(),
                    node: node.clone(),
                    transport: peer_transport,
                    ..CoordinatorOptions::default().client
                },
                ..Default::default()
            },
        );
        let http = match http_listen {
            Some(at) => {
                let health = crate::obs::Health {
                    store: handle.clone(),
                    listening: addr,
                    node: node.clone(),
                    connections: server.active_connections(),
                    list: server.connections(),
                    shutdown: token.clone(),
                    coordinator: coordinator.clone(),
                };
                Some(crate::obs::serve(at, crate::obs::install_recorder()?, health).await?)
            }
            None => None,
        };
        if json {
            output::json(&serde_json::json!({
                "listening": addr.to_string(), "node": node, "fingerprint": id.fingerprint(),
                "tcp": tcp_addr.map(|t| t.to_string()),
                "http": http.map(|h| h.to_string()),
            }))?;
        } else {
            println!("listening on {addr} as {node}");
            println!("certificate SHA-256 {}", id.fingerprint());
            if let Some(h) = http {
                println!(
                    "health and metrics on http://{h}/health and /metrics, live connections on /connections, events on /events"
                );
            }
            if let Some(t) = tcp_addr {
                println!("TLS over TCP (for clients whose UDP is blocked) on {t}");
            }
        }
        std::io::stdout().flush()?;
        coordinator.keep_live_links(peers, token.clone());
        tokio::spawn(crate::obs::compaction(
            handle.clone(),
            compact_interval,
            token.clone(),
        ));
        let signal_token = token.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            signal_token.cancel();
        });
        server.run().await?;
        Ok::<_, anyhow::Error>(())
    })
}

/// Refuses to serve a non-loopback address that nothing guards: no token
/// (neither `--token` nor scoped tokens in the store) and no client CA,
/// unless `--allow-anonymous` says that is meant. Gives whether the server
/// must keep refusing tokenless clients (should the last token be revoked
/// while it runs).
fn refuse_anonymous_network(cfg: &config::DaemonConfig, store: &Store) -> Result<bool> {
    let exposed = !cfg.listen.ip().is_loopback() && cfg.client_ca.is_none() && !cfg.allow_anonymous;
    let guarded = cfg.token.is_some() || !store.tokens()?.is_empty();
    if guarded || !exposed {
        return Ok(exposed);
    }
    anyhow::bail!(
        "refusing to serve {} with neither a token nor a client CA: anyone who reaches it could \
         read and write every shard. Give --token T (or make scoped tokens with `quiver token \
         create`), or --client-ca FILE; or pass --allow-anonymous (allow_anonymous = true) if \
         that is really what you want",
        cfg.listen
    )
}

/// One `quiver serve` per store: an exclusive lock on `<db>.serve.lock`,
/// held for the daemon's life, holding its pid and address so that a
/// second one can say who serves the store already.
struct ServeLock {
    file: std::fs::File,
}

impl ServeLock {
    fn path(db: &Path) -> std::path::PathBuf {
        let name = db.file_name().map(|n| n.to_string_lossy().into_owned());
        db.with_file_name(format!("{}.serve.lock", name.unwrap_or_default()))
    }

    fn take(db: &Path) -> Result<ServeLock> {
        let path = Self::path(db);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("creating the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let held = std::fs::read_to_string(&path).unwrap_or_default();
                let held = held.trim();
                anyhow::bail!(
                    "{} is already served by another `quiver serve` ({}); stop it first, or \
                     serve another store",
                    db.display(),
                    if held.is_empty() { "starting up" } else { held }
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        let mut lock = ServeLock { file };
        lock.write(&format!("pid {}", std::process::id()))?;
        Ok(lock)
    }

    /// Adds the bound address, once known.
    fn record(&mut self, addr: std::net::SocketAddr) -> Result<()> {
        self.write(&format!("pid {}, listening on {addr}", std::process::id()))
    }

    fn write(&mut self, text: &str) -> Result<()> {
        use std::io::Seek;
        self.file.set_len(0)?;
        self.file.rewind()?;
        writeln!(self.file, "{text}")?;
        Ok(())
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub fn sync(db: &Path, a: SyncArgs, json: bool) -> Result<()> {
    init_logging("warn");
    let store = Store::open(db).with_context(|| format!("opening {}", db.display()))?;
    let opts = ClientOptions {
        trust: trust(&a.trust)?,
        transport: a.trust.transport,
        client_identity: client_identity(db, &a.trust),
        token: a.token,
        node: node_name(&store)?,
        retries: a.retries.unwrap_or(4),
        connect_timeout: ONE_SHOT_CONNECT_TIMEOUT,
        // A live link keeps trying an absent server; a one-shot sync says
        // so at once, unless retries were asked for.
        retry_no_answer: a.watch || a.retries.is_some(),
        ..Default::default()
    };
    let spec = SyncSpec {
        shards: a.shards,
        tables: a.tables,
    };
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(std::time::Duration::from_millis(100));
        b
    });
    let started = std::time::Instant::now();
    let progress = bar.clone().map(|b| {
        // A change is one cell (or a row's record), so a row brings several.
        let counted = move |verb: &str, shard: &str, n: u64| {
            let secs = started.elapsed().as_secs_f64();
            format!(
                "{shard}: {verb} {n} changes (cells), {:.0}/s, {secs:.1} s",
                n as f64 / secs.max(0.001)
            )
        };
        Arc::new(move |p: Progress| {
            b.set_message(match p {
                Progress::Connecting { addr } => format!("connecting to {addr}"),
                Progress::Handshaking => "handshaking".into(),
                Progress::Pulling {
                    shard,
                    snapshot_rows_done: Some(done),
                    snapshot_rows_total: Some(total),
                    bytes,
                    ..
                } => {
                    // A snapshot: rows, not changes, and how many in all.
                    let secs = started.elapsed().as_secs_f64();
                    let share = done as f64 / total.max(1) as f64;
                    let left = if share > 0.0 && done < total {
                        format!(", ~{:.0} s left", secs * (1.0 - share) / share)
                    } else {
                        String::new()
                    };
                    format!(
                        "{shard}: snapshot {done} / {total} rows, {:.1} MB, {:.0} rows/s{left}",
                        bytes as f64 / 1e6,
                        done as f64 / secs.max(0.001)
                    )
                }
                Progress::Pulling {
                    shard,
                    changes,
                    versions_done,
                    versions_total,
                    ..
                } => {
                    let line = counted("received", &shard, changes);
                    if versions_total == 0 {
                        line
                    } else {
                        // The share of the offered versions the batches
                        // reach: a bar's worth of "how far", and from its
                        // pace, how long is left.
                        let done = versions_done as f64 / versions_total as f64;
                        let secs = started.elapsed().as_secs_f64();
                        let left = if done > 0.0 {
                            format!(", ~{:.0} s left", secs * (1.0 - done) / done)
                        } else {
                            String::new()
                        };
                        format!(
                            "{line}, {:.0}% of {versions_total} versions{left}",
                            done * 100.0
                        )
                    }
                }
                Progress::Pushing { shard, changes } => counted("sent", &shard, changes),
                Progress::Applying { shard, applied } => counted("applied", &shard, applied),
                Progress::Done => "done".into(),
            })
        }) as quiver_sync::ProgressFn
    });
    let rt = runtime()?;
    if a.watch {
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        return rt.block_on(watch_link(store, opts, a.addr, spec, json));
    }
    let result = rt.block_on(async move {
        let mut client = Client::new(StoreHandle::spawn(store), opts);
        let r = client.sync(&a.addr, &spec, progress).await;
        client.close().await;
        r
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let r = result?;
    if json {
        return output::json(&r);
    }
    println!(
        "synced with {} in {} ms over {}: sent {} changes, received {} ({} applied)",
        r.peer_node,
        r.duration_ms,
        match r.transport {
            quiver_sync::Transport::Quic => "QUIC",
            quiver_sync::Transport::Tcp => "TLS/TCP",
        },
        r.changes_sent,
        r.changes_received,
        r.applied
    );
    if r.snapshot_rows > 0 {
        println!(
            "  snapshot: {} rows of {} (current rows, not history)",
            r.snapshot_rows,
            r.snapshot_tables.join(", ")
        );
    }
    if r.conflicts_detected + r.peer_conflicts_detected > 0 {
        println!(
            "  conflicts here: {} ({} resolved by strategy, {} open: quiver conflicts list); \
             on {}: {}",
            r.conflicts_detected,
            r.conflicts_resolved,
            r.conflicts_open,
            r.peer_node,
            r.peer_conflicts_detected
        );
    }
    if r.held > 0 {
        println!(
            "  held {} change(s) for tables or columns this replica does not know yet; \
             they apply when the schema arrives (quiver status shows them)",
            r.held
        );
    }
    for s in &r.shards {
        println!(
            "  {:<12} sent {:>7}  received {:>7}  applied {:>7}  bytes out {:>9} in {:>9}{}",
            s.shard,
            s.changes_sent,
            s.changes_received,
            s.local.applied,
            s.bytes_sent,
            s.bytes_received,
            if s.tables_created.is_empty() {
                String::new()
            } else {
                format!("  created {}", s.tables_created.join(", "))
            }
        );
    }
    Ok(())
}

/// `quiver sync --watch`: a live link that prints each round until interrupted.
async fn watch_link(
    store: Store,
    opts: ClientOptions,
    addr: String,
    spec: SyncSpec,
    json: bool,
) -> Result<()> {
    let stop = quiver_sync::CancellationToken::new();
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal_stop.cancel();
    });
    let up = std::sync::atomic::AtomicBool::new(false);
    let to = addr.clone();
    let on_round: quiver_sync::RoundFn = Arc::new(move |r: &quiver_sync::SyncResult| {
        // Said once the first round has passed, so that a refusal (a token,
        // a pin) is the first and only thing printed.
        if !json && !up.swap(true, std::sync::atomic::Ordering::Relaxed) {
            println!("live link to {to} ({}) up; Ctrl-C to stop", r.peer_node);
        }
        if json {
            let _ = output::json(r);
        } else if r.changes_sent + r.changes_received > 0 {
            println!(
                "sent {} changes, received {} ({} applied), {} conflicts here ({} ms)",
                r.changes_sent, r.changes_received, r.applied, r.conflicts_detected, r.duration_ms
            );
        }
        let _ = std::io::stdout().flush();
    });
    let mut client = Client::new(StoreHandle::spawn(store), opts);
    let r = client.live(&addr, &spec, stop, Some(on_round)).await;
    client.close().await;
    Ok(r?)
}

/// `quiver watch`: store events as JSON lines, until interrupted.
pub fn watch(store: Store, shard: Option<String>) -> Result<()> {
    init_logging("warn");
    let rt = runtime()?;
    rt.block_on(async move {
        let handle = StoreHandle::spawn(store);
        let mut events = handle.events();
        let stop = quiver_sync::CancellationToken::new();
        let s2 = stop.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            s2.cancel();
        });
        loop {
            let e = tokio::select! {
                _ = stop.cancelled() => break,
                e = events.recv() => e,
            };
            match e {
                Ok(e) => {
                    let shown = match &shard {
                        Some(s) => e.in_shard(s),
                        None => Some(e),
                    };
                    if let Some(e) = shown {
                        output::json(&e)?;
                        std::io::stdout().flush()?;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("({n} events skipped)")
                }
                Err(_) => break,
            }
        }
        Ok::<_, anyhow::Error>(())
    })
}

/// `quiver status --server ADDR`: a daemon's live connections.
pub fn server_status(addr: &str, json: bool) -> Result<()> {
    let body = runtime()?.block_on(crate::obs::get(addr, "/connections"))?;
    let v: serde_json::Value = serde_json::from_str(&body)
        .with_context(|| format!("{addr}/connections did not answer JSON"))?;
    if json {
        return output::json(&v);
    }
    let list: Vec<quiver_sync::ConnectionInfo> =
        serde_json::from_value(v["connections"].clone())
            .with_context(|| format!("{addr}/connections: unexpected answer"))?;
    println!(
        "{} on {}: {} live connection{}",
        v["node"].as_str().unwrap_or("?"),
        v["listening"].as_str().unwrap_or("?"),
        list.len(),
        if list.len() == 1 { "" } else { "s" }
    );
    if list.is_empty() {
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            let mut mode = vec![if c.read_only {
                "read-only"
            } else {
                "read-write"
            }];
            if c.live {
                mode.push("live");
            }
            if c.client_cert.is_some() {
                mode.push("client-cert");
            }
            mode.push(c.transport.as_str());
            vec![
                c.remote.clone(),
                c.node.clone(),
                if c.shards.is_empty() {
                    "-".into()
                } else {
                    c.shards.join(",")
                },
                format!("{}s ago", now.saturating_sub(c.since_ms) / 1000),
                c.bytes_sent.to_string(),
                c.bytes_received.to_string(),
                format!("{:.1}", c.rtt_ms),
                mode.join(" "),
            ]
        })
        .collect();
    output::table(
        &[
            "PEER",
            "NODE",
            "SHARDS",
            "SINCE",
            "BYTES OUT",
            "BYTES IN",
            "RTT MS",
            "ACCESS",
        ],
        &rows,
    );
    Ok(())
}

/// `quiver clone ADDR --db NEW`: a new replica from the server's whole
/// store. The hello needs a site of its own: a throwaway store gives it.
pub fn clone(
    db: &Path,
    addr: &str,
    token: Option<String>,
    name: Option<String>,
    t: &TrustArgs,
    json: bool,
) -> Result<()> {
    init_logging("warn");
    if db.exists() {
        anyhow::bail!(
            "{} already exists; clone makes a new store (pick another --db)",
            db.display()
        );
    }
    let scratch = tempfile::tempdir()?;
    let hello_store = Store::init(scratch.path().join("hello.db"))?;
    let opts = ClientOptions {
        trust: trust(t)?,
        transport: t.transport,
        client_identity: client_identity(db, t),
        token,
        node: name.clone().unwrap_or_else(|| "clone".into()),
        retries: 0,
        connect_timeout: ONE_SHOT_CONNECT_TIMEOUT,
        ..Default::default()
    };
    let rt = runtime()?;
    let r = rt.block_on(async move {
        let mut client = Client::new(StoreHandle::spawn_unwatched(hello_store), opts);
        let r = client.clone_store(addr, db).await;
        client.close().await;
        r
    })?;
    let mut s = Store::open(db)?;
    if let Some(n) = &name {
        s.set_node_name(n)?;
    }
    let fp = quiver_sync::tls::create_identity(db, &[])?;
    if json {
        let mut v = serde_json::to_value(&r)?;
        v["fingerprint"] = fp.into();
        return output::json(&v);
    }
    println!(
        "cloned {} from {} in {} ms: {} bytes, {} tables; new site {}",
        db.display(),
        r.peer_node,
        r.duration_ms,
        r.bytes,
        r.tables,
        r.site_id
    );
    println!("certificate SHA-256 {fp}; sync with the source as with any peer");
    Ok(())
}

pub fn ping(db: &Path, addr: &str, token: Option<String>, t: &TrustArgs, json: bool) -> Result<()> {
    init_logging("warn");
    let store = Store::open(db).with_context(|| format!("opening {}", db.display()))?;
    let opts = ClientOptions {
        trust: trust(t)?,
        transport: t.transport,
        client_identity: client_identity(db, t),
        token,
        node: node_name(&store)?,
        retries: 0,
        connect_timeout: ONE_SHOT_CONNECT_TIMEOUT,
        ..Default::default()
    };
    let rt = runtime()?;
    let r = rt.block_on(async move {
        let mut client = Client::new(StoreHandle::spawn(store), opts);
        let r = client.ping(addr).await;
        client.close().await;
        r
    })?;
    if json {
        return output::json(&r);
    }
    println!(
        "pong from {}: {:.2} ms (connect {:.2} ms, {} rtt {:.2} ms)",
        r.peer_node,
        r.rtt_ms,
        r.connect_ms,
        match r.transport {
            quiver_sync::Transport::Quic => "QUIC",
            quiver_sync::Transport::Tcp => "TCP",
        },
        r.quic_rtt_ms
    );
    Ok(())
}
