//! The library's client, server and live links over a simulated network,
//! in one process: real QUIC, TLS, stores and sessions, but datagrams go
//! through an in-memory network (quinn's abstract UDP socket) that a seed
//! drives: loss, delay with jitter (so reordering), duplication and
//! partitions that come and go, and a server that is stopped and started
//! again on the same address. Each seed ends with the network healed and
//! asks that the three replicas agree. `QUIVER_SIM_SEEDS` sets how many
//! seeds run (default 200), `QUIVER_SIM_SEED` runs one.
//!
//! A seed fixes the schedule (every fault, write, restart and pause) and
//! the network's every choice in the order datagrams reach it; QUIC's own
//! randomness and the machine's timing still vary, so a failing seed
//! replays its schedule exactly, not its interleaving.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use quiver_store::{CollectionSpec, Record, Store};
use quiver_sync::tls::{create_identity, identity_paths};
use quiver_sync::transport::{TransportLimits, UdpSocketFactory};
use quiver_sync::{
    CancellationToken, Client, ClientOptions, Identity, Server, ServerOptions, StoreHandle,
    SyncSpec, TransportChoice, Trust,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The faults of the moment.
#[derive(Clone, Copy, Default)]
struct Faults {
    loss: f64,
    dup: f64,
    delay_ms: u64,
    jitter_ms: u64,
    partitioned: bool,
}

#[derive(Default)]
struct Inbox {
    /// Which socket on the address it belongs to: a server started again
    /// on its address gets a new one, and the old socket hears no more.
    socket: u64,
    queue: VecDeque<(SocketAddr, Vec<u8>)>,
    waker: Option<Waker>,
}

struct NetState {
    rng: StdRng,
    faults: Faults,
    inboxes: HashMap<SocketAddr, Inbox>,
    next_port: u16,
    next_socket: u64,
    delivered: u64,
    dropped: u64,
}

/// The simulated network: every socket's datagrams pass through it.
#[derive(Clone)]
struct Net(Arc<Mutex<NetState>>);

impl Net {
    fn new(seed: u64) -> Net {
        Net(Arc::new(Mutex::new(NetState {
            rng: StdRng::seed_from_u64(seed),
            faults: Faults::default(),
            inboxes: HashMap::new(),
            next_port: 20_000,
            next_socket: 0,
            delivered: 0,
            dropped: 0,
        })))
    }

    fn set(&self, f: Faults) {
        self.0.lock().unwrap().faults = f;
    }

    fn factory(&self) -> UdpSocketFactory {
        let net = self.clone();
        UdpSocketFactory(Arc::new(move |bind: SocketAddr| {
            let mut st = net.0.lock().unwrap();
            let mut addr = bind;
            if addr.port() == 0 {
                addr = SocketAddr::from(([10, 0, 0, 2], st.next_port));
                st.next_port += 1;
            }
            // A restarted server takes its address again.
            st.next_socket += 1;
            let socket = st.next_socket;
            st.inboxes.insert(
                addr,
                Inbox {
                    socket,
                    ..Inbox::default()
                },
            );
            Ok(Arc::new(SimSocket {
                net: net.clone(),
                addr,
                socket,
            }) as Arc<dyn AsyncUdpSocket>)
        }))
    }

    fn deliver(&self, from: SocketAddr, to: SocketAddr, data: Vec<u8>) {
        let mut st = self.0.lock().unwrap();
        if let Some(inbox) = st.inboxes.get_mut(&to) {
            inbox.queue.push_back((from, data));
            if let Some(w) = inbox.waker.take() {
                w.wake();
            }
        }
    }

    /// What happens to one datagram: delivered after these delays (none:
    /// dropped; two: duplicated).
    fn fate(&self) -> Vec<Duration> {
        let mut st = self.0.lock().unwrap();
        let f = st.faults;
        if f.partitioned || (f.loss > 0.0 && st.rng.gen_bool(f.loss)) {
            st.dropped += 1;
            return vec![];
        }
        st.delivered += 1;
        let copies = if f.dup > 0.0 && st.rng.gen_bool(f.dup) {
            2
        } else {
            1
        };
        (0..copies)
            .map(|_| {
                let j = if f.jitter_ms > 0 {
                    st.rng.gen_range(0..=f.jitter_ms)
                } else {
                    0
                };
                Duration::from_millis(f.delay_ms + j)
            })
            .collect()
    }
}

#[derive(Debug)]
struct Writable;

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, _: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

struct SimSocket {
    net: Net,
    addr: SocketAddr,
    socket: u64,
}

impl std::fmt::Debug for SimSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimSocket({})", self.addr)
    }
}

impl AsyncUdpSocket for SimSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable)
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        let size = t.segment_size.unwrap_or(t.contents.len()).max(1);
        for seg in t.contents.chunks(size) {
            for delay in self.net.fate() {
                let (net, from, to, data) =
                    (self.net.clone(), self.addr, t.destination, seg.to_vec());
                if delay.is_zero() {
                    net.deliver(from, to, data);
                } else {
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        net.deliver(from, to, data);
                    });
                }
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut st = self.net.0.lock().unwrap();
        let Some(inbox) = st.inboxes.get_mut(&self.addr) else {
            return Poll::Pending;
        };
        if inbox.socket != self.socket {
            // Replaced by a newer socket on the address: silent for good.
            return Poll::Pending;
        }
        match inbox.queue.pop_front() {
            Some((from, data)) => {
                let n = data.len().min(bufs[0].len());
                bufs[0][..n].copy_from_slice(&data[..n]);
                meta[0] = RecvMeta {
                    addr: from,
                    len: n,
                    stride: n,
                    ecn: None,
                    dst_ip: None,
                };
                Poll::Ready(Ok(1))
            }
            None => {
                inbox.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

struct Node {
    _dir: tempfile::TempDir,
    handle: StoreHandle,
    db: std::path::PathBuf,
}

fn node(name: &str) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join(format!("{name}.db"));
    let mut s = Store::init(&db).unwrap();
    s.create_collection(&CollectionSpec::new("docs", 2))
        .unwrap();
    Node {
        handle: StoreHandle::spawn_unwatched(s),
        db,
        _dir: dir,
    }
}

async fn export(h: &StoreHandle) -> Vec<u8> {
    h.call(|s| {
        let mut buf = Vec::new();
        s.export("docs", &mut buf).map(|_| buf)
    })
    .await
    .unwrap()
    .unwrap()
}

const SERVER: ([u8; 4], u16) = ([10, 0, 0, 1], 4433);

fn start_server(a: &Node, id: &Identity, net: &Net) -> CancellationToken {
    let opts = ServerOptions {
        listen: SocketAddr::from(SERVER),
        udp: Some(net.factory()),
        limits: TransportLimits {
            idle_timeout: Duration::from_secs(3),
            keep_alive: Duration::from_millis(500),
            ..Default::default()
        },
        shutdown_grace: Duration::from_millis(200),
        ..Default::default()
    };
    let server = Server::bind(a.handle.clone(), id, opts).unwrap();
    let stop = server.shutdown_token();
    tokio::spawn(server.run());
    stop
}

/// One seed's run; returns what the network did, or why the replicas differ.
async fn run_seed(seed: u64) -> Result<(u64, u64), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let net = Net::new(seed ^ 0x5eed);
    let (a, b, c) = (node("a"), node("b"), node("c"));
    let fp = create_identity(&a.db, &["quiver.sim".into()]).unwrap();
    let (cert, key) = identity_paths(&a.db);
    let id = Identity::load(&cert, &key).unwrap();
    let mut server = start_server(&a, &id, &net);
    let addr = SocketAddr::from(SERVER).to_string();
    let opts = ClientOptions {
        trust: Trust::Pin(fp),
        transport: TransportChoice::Quic,
        udp: Some(net.factory()),
        connect_timeout: Duration::from_millis(800),
        retries: 3,
        ..Default::default()
    };
    // b keeps a live link; c syncs now and then.
    let stop = CancellationToken::new();
    let live = {
        let (mut client, to, stop) = (
            Client::new(b.handle.clone(), opts.clone()),
            addr.clone(),
            stop.clone(),
        );
        tokio::spawn(async move { client.live(&to, &SyncSpec::default(), stop, None).await })
    };
    let mut c_client = Client::new(c.handle.clone(), opts.clone());
    for step in 0..rng.gen_range(8..16) {
        match rng.gen_range(0..10) {
            0..=3 => {
                let who = [&a, &b, &c][rng.gen_range(0..3)];
                let id = format!("r{}", rng.gen_range(0..6));
                let v = vec![step as f32, rng.gen_range(0..100) as f32];
                let _ = who.handle.put("docs", Record::new(&id, v)).await;
            }
            4 => {
                let who = [&a, &b, &c][rng.gen_range(0..3)];
                let _ = who
                    .handle
                    .delete("docs", &format!("r{}", rng.gen_range(0..6)))
                    .await;
            }
            5..=6 => net.set(Faults {
                loss: [0.0, 0.05, 0.2][rng.gen_range(0..3)],
                dup: [0.0, 0.05][rng.gen_range(0..2)],
                delay_ms: rng.gen_range(0..15),
                jitter_ms: rng.gen_range(0..15),
                partitioned: rng.gen_bool(0.3),
            }),
            7 => {
                let _ = c_client.sync(&addr, &SyncSpec::default(), None).await;
            }
            8 => {
                // The server stops and comes back on the same address.
                server.cancel();
                tokio::time::sleep(Duration::from_millis(rng.gen_range(10..200))).await;
                server = start_server(&a, &id, &net);
            }
            _ => net.set(Faults::default()),
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..120))).await;
    }
    // Healed: everyone catches up, and agrees.
    net.set(Faults::default());
    stop.cancel();
    let _ = live.await;
    let mut b_client = Client::new(b.handle.clone(), opts.clone());
    for round in 0..3 {
        let r1 = b_client.sync(&addr, &SyncSpec::default(), None).await;
        let r2 = c_client.sync(&addr, &SyncSpec::default(), None).await;
        let (ea, eb, ec) = (
            export(&a.handle).await,
            export(&b.handle).await,
            export(&c.handle).await,
        );
        if ea == eb && eb == ec {
            server.cancel();
            let st = net.0.lock().unwrap();
            return Ok((st.delivered, st.dropped));
        }
        if round == 2 {
            return Err(format!(
                "seed {seed}: replicas differ after the heal (syncs: {:?}, {:?}); a {} b {} c {} bytes",
                r1.map(|r| r.changes_received).map_err(|e| e.to_string()),
                r2.map(|r| r.changes_received).map_err(|e| e.to_string()),
                ea.len(),
                eb.len(),
                ec.len()
            ));
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_converge_over_a_simulated_network_for_many_seeds() {
    let seeds: Vec<u64> = match std::env::var("QUIVER_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("QUIVER_SIM_SEED: a number")],
        Err(_) => {
            let n: u64 = std::env::var("QUIVER_SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(200);
            (0..n).collect()
        }
    };
    // Seeds run side by side, each on a network of its own.
    let (mut delivered, mut dropped) = (0, 0);
    let mut failures = Vec::new();
    for chunk in seeds.chunks(40) {
        let mut set = tokio::task::JoinSet::new();
        for &seed in chunk {
            set.spawn(async move {
                tokio::time::timeout(Duration::from_secs(120), run_seed(seed))
                    .await
                    .unwrap_or_else(|_| Err(format!("seed {seed}: did not finish in 120 s")))
            });
        }
        while let Some(r) = set.join_next().await {
            match r.unwrap() {
                Ok((d, x)) => {
                    delivered += d;
                    dropped += x;
                }
                Err(e) => failures.push(e),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed (rerun one with QUIVER_SIM_SEED=N):\n{}",
        failures.len(),
        seeds.len(),
        failures.join("\n")
    );
    assert!(
        dropped > 0 && delivered > 0,
        "the network did drop and deliver"
    );
}
