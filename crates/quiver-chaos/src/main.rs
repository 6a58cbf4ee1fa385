//! `quiver-chaos`: a UDP relay between QUIC peers that injects faults, for
//! tests and measurements on one machine (the kernel here has no netem).
//!
//! It listens on `--listen`; each client address gets a socket of its own
//! towards `--upstream`, so the server sees one peer per client. Every
//! datagram, in each direction, may be dropped (random loss, bursts,
//! partitions), delayed with jitter (in order, or reordered), duplicated,
//! truncated or corrupted. A seed drives every random choice and is
//! printed. Commands on standard input change the faults while it runs:
//!
//! ```text
//! set [up|down|both] loss=0.05 burst=0.01 burst_len=20 delay_ms=50 jitter_ms=30 reorder=true dup=0.02 corrupt=0.001 truncate=0.001
//! partition [up|down|both]
//! heal
//! stats
//! ```
//!
//! `up` is client to server, `down` server to client. Each command is
//! answered with one line (`ok`, or `error: …`); `stats` answers a JSON
//! object of counts per direction.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::AsyncBufReadExt;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "quiver-chaos",
    about = "A UDP relay that injects network faults"
)]
struct Args {
    /// Address clients send to.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The server's address.
    #[arg(long)]
    upstream: SocketAddr,
    /// Seed of every random choice (default: a random one, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Faults from the start, in both directions, as for `set`
    /// (e.g. `--faults "loss=0.1 delay_ms=50"`).
    #[arg(long, default_value = "")]
    faults: String,
}

/// The faults of one direction.
#[derive(Debug, Clone, Default)]
struct Faults {
    loss: f64,
    /// Chance that a datagram starts a burst of `burst_len` losses.
    burst: f64,
    burst_len: u32,
    delay_ms: f64,
    jitter_ms: f64,
    /// Each datagram's delay drawn on its own (they overtake each other);
    /// otherwise order is kept.
    reorder: bool,
    dup: f64,
    corrupt: f64,
    truncate: f64,
    partitioned: bool,
}

impl Faults {
    fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let p = || -> Result<f64> {
            let v: f64 = value
                .parse()
                .with_context(|| format!("{key}={value}: not a number"))?;
            if !(0.0..=1.0).contains(&v) {
                bail!("{key}={value}: a probability lies between 0 and 1");
            }
            Ok(v)
        };
        let ms = || -> Result<f64> {
            let v: f64 = value
                .parse()
                .with_context(|| format!("{key}={value}: not a number"))?;
            if !(0.0..=10_000.0).contains(&v) {
                bail!("{key}={value}: milliseconds between 0 and 10000");
            }
            Ok(v)
        };
        match key {
            "loss" => self.loss = p()?,
            "burst" => self.burst = p()?,
            "burst_len" => self.burst_len = value.parse().context("burst_len: a whole number")?,
            "delay_ms" => self.delay_ms = ms()?,
            "jitter_ms" => self.jitter_ms = ms()?,
            "reorder" => self.reorder = value.parse().context("reorder: true or false")?,
            "dup" => self.dup = p()?,
            "corrupt" => self.corrupt = p()?,
            "truncate" => self.truncate = p()?,
            _ => bail!("unknown fault {key:?} (loss, burst, burst_len, delay_ms, jitter_ms, reorder, dup, corrupt, truncate)"),
        }
        Ok(())
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    seen: u64,
    sent: u64,
    dropped: u64,
    duplicated: u64,
    corrupted: u64,
    truncated: u64,
}

/// One direction's faults, counts, burst state and the deadline of its
/// last datagram (to keep order).
#[derive(Default)]
struct Direction {
    faults: Faults,
    counts: Counts,
    burst_left: u32,
    last_deadline: Option<Instant>,
}

struct State {
    rng: StdRng,
    up: Direction,
    down: Direction,
}

#[derive(Clone, Copy)]
enum Dir {
    Up,
    Down,
}

/// What to do with one datagram: send these copies after these delays.
fn decide(state: &mut State, dir: Dir, mut data: Vec<u8>) -> Vec<(Instant, Vec<u8>, bool)> {
    let State { rng, up, down } = state;
    let d = match dir {
        Dir::Up => up,
        Dir::Down => down,
    };
    let f = d.faults.clone();
    d.counts.seen += 1;
    if f.partitioned {
        d.counts.dropped += 1;
        return vec![];
    }
    if d.burst_left > 0 {
        d.burst_left -= 1;
        d.counts.dropped += 1;
        return vec![];
    }
    if f.burst > 0.0 && rng.gen_bool(f.burst) {
        d.burst_left = f.burst_len.saturating_sub(1);
        d.counts.dropped += 1;
        return vec![];
    }
    if f.loss > 0.0 && rng.gen_bool(f.loss) {
        d.counts.dropped += 1;
        return vec![];
    }
    if f.truncate > 0.0 && rng.gen_bool(f.truncate) && data.len() > 1 {
        let keep = rng.gen_range(1..data.len());
        data.truncate(keep);
        d.counts.truncated += 1;
    }
    if f.corrupt > 0.0 && rng.gen_bool(f.corrupt) && !data.is_empty() {
        let i = rng.gen_range(0..data.len());
        data[i] ^= rng.gen_range(1..=255u8);
        d.counts.corrupted += 1;
    }
    let copies = if f.dup > 0.0 && rng.gen_bool(f.dup) {
        d.counts.duplicated += 1;
        2
    } else {
        1
    };
    let now = Instant::now();
    let mut out = Vec::with_capacity(copies);
    for _ in 0..copies {
        let jitter = if f.jitter_ms > 0.0 {
            rng.gen_range(-f.jitter_ms..=f.jitter_ms)
        } else {
            0.0
        };
        let ms = (f.delay_ms + jitter).max(0.0);
        let mut at = now + Duration::from_secs_f64(ms / 1000.0);
        if !f.reorder {
            if let Some(last) = d.last_deadline {
                at = at.max(last);
            }
            d.last_deadline = Some(at);
        }
        d.counts.sent += 1;
        out.push((at, data.clone(), f.reorder));
    }
    out
}

/// Where one direction's datagrams for one client go.
#[derive(Clone)]
enum Out {
    Upstream(Arc<UdpSocket>),
    Client(Arc<UdpSocket>, SocketAddr),
}

impl Out {
    async fn send(&self, data: &[u8]) {
        let _ = match self {
            Out::Upstream(s) => s.send(data).await,
            Out::Client(s, to) => s.send_to(data, *to).await,
        };
    }
}

/// A direction's sender: datagrams in order go through one queue (their
/// deadlines never decrease); reordered ones each wait on their own.
fn sender(out: Out) -> mpsc::UnboundedSender<(Instant, Vec<u8>, bool)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>, bool)>();
    tokio::spawn(async move {
        while let Some((at, data, reorder)) = rx.recv().await {
            if reorder {
                let out = out.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    out.send(&data).await;
                });
            } else {
                tokio::time::sleep_until(at).await;
                out.send(&data).await;
            }
        }
    });
    tx
}

fn apply_command(state: &Mutex<State>, line: &str) -> Result<String> {
    let mut words = line.split_whitespace();
    let Some(cmd) = words.next() else {
        return Ok(String::new());
    };
    let mut rest: Vec<&str> = words.collect();
    let which = match rest.first().copied() {
        Some("up") => {
            rest.remove(0);
            (true, false)
        }
        Some("down") => {
            rest.remove(0);
            (false, true)
        }
        Some("both") => {
            rest.remove(0);
            (true, true)
        }
        _ => (true, true),
    };
    let mut st = state
        .lock()
        .map_err(|_| anyhow::anyhow!("state lock poisoned"))?;
    let mut dirs: Vec<&mut Direction> = Vec::new();
    let State { up, down, .. } = &mut *st;
    if which.0 {
        dirs.push(up);
    }
    if which.1 {
        dirs.push(down);
    }
    match cmd {
        "set" => {
            // All or nothing: check every pair on a copy first.
            let mut checked = Vec::new();
            for d in &dirs {
                let mut f = d.faults.clone();
                for kv in &rest {
                    let (k, v) = kv
                        .split_once('=')
                        .with_context(|| format!("{kv:?}: expected key=value"))?;
                    f.set(k, v)?;
                }
                checked.push(f);
            }
            for (d, f) in dirs.into_iter().zip(checked) {
                d.faults = f;
            }
            Ok("ok".into())
        }
        "partition" => {
            for d in dirs {
                d.faults.partitioned = true;
            }
            Ok("ok".into())
        }
        "heal" => {
            for d in dirs {
                d.faults.partitioned = false;
            }
            Ok("ok".into())
        }
        "stats" => {
            let c = |c: Counts| {
                serde_json::json!({"seen": c.seen, "sent": c.sent, "dropped": c.dropped,
                    "duplicated": c.duplicated, "corrupted": c.corrupted, "truncated": c.truncated})
            };
            Ok(serde_json::json!({"up": c(st.up.counts), "down": c(st.down.counts)}).to_string())
        }
        other => bail!("unknown command {other:?} (set, partition, heal, stats)"),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random);
    let state = Arc::new(Mutex::new(State {
        rng: StdRng::seed_from_u64(seed),
        up: Direction::default(),
        down: Direction::default(),
    }));
    if !args.faults.trim().is_empty() {
        apply_command(&state, &format!("set both {}", args.faults))?;
    }
    let front = Arc::new(
        UdpSocket::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?,
    );
    println!(
        "chaos listening on {} upstream {} seed {seed}",
        front.local_addr()?,
        args.upstream
    );

    // Commands from standard input.
    {
        let state = state.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let answer = match apply_command(&state, &line) {
                    Ok(a) => a,
                    Err(e) => format!("error: {e:#}"),
                };
                if !answer.is_empty() {
                    println!("{answer}");
                }
            }
        });
    }

    type Queue = mpsc::UnboundedSender<(Instant, Vec<u8>, bool)>;
    let mut clients: HashMap<SocketAddr, Queue> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = front.recv_from(&mut buf).await?;
        let up = match clients.get(&from) {
            Some(q) => q.clone(),
            None => {
                let bind: SocketAddr = if args.upstream.is_ipv6() {
                    "[::1]:0".parse()?
                } else {
                    "127.0.0.1:0".parse()?
                };
                let s = Arc::new(UdpSocket::bind(bind).await?);
                s.connect(args.upstream).await?;
                let up = sender(Out::Upstream(s.clone()));
                clients.insert(from, up.clone());
                // The server's answers to this client.
                let down = sender(Out::Client(front.clone(), from));
                let state = state.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    loop {
                        let n = match s.recv(&mut buf).await {
                            Ok(n) => n,
                            // The server is not there for a moment (it is
                            // restarting): the kernel says so for a datagram
                            // sent to it. The path stays, as a NAT's would.
                            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                            Err(_) => return,
                        };
                        let copies = match state.lock() {
                            Ok(mut st) => decide(&mut st, Dir::Down, buf[..n].to_vec()),
                            Err(_) => return,
                        };
                        for c in copies {
                            let _ = down.send(c);
                        }
                    }
                });
                up
            }
        };
        let copies = match state.lock() {
            Ok(mut st) => decide(&mut st, Dir::Up, buf[..n].to_vec()),
            Err(_) => bail!("state lock poisoned"),
        };
        for c in copies {
            let _ = up.send(c);
        }
    }
}
