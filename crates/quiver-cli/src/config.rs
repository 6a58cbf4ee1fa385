//! Daemon configuration, layered: defaults, then a TOML file, then the
//! environment (the seed's `QUIC_*` names and `QUIVER_*`), then flags.
//! Each layer is read once into typed values (a file's or the
//! environment's bad value is refused there, naming the key); the defaults
//! are the library's own (`ServerOptions`, `TransportLimits`,
//! `StreamLimits`); the merged result is checked once, and every value
//! keeps where it came from for `quiver config show`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde::Serialize;

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Default,
    File,
    Env,
    Flag,
}

/// The daemon's log format on standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("text or json".into()),
        }
    }
}

/// Where `/health`, `/metrics` and `/events` are served, or nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpListen {
    Off,
    At(SocketAddr),
}

/// By default the HTTP endpoint listens on loopback, on a free port.
pub const HTTP_LISTEN_DEFAULT: HttpListen = HttpListen::At(SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
    0,
));

impl std::str::FromStr for HttpListen {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "off" | "" => Ok(HttpListen::Off),
            a => a
                .parse()
                .map(HttpListen::At)
                .map_err(|_| "an address like 127.0.0.1:9464, or off".into()),
        }
    }
}

/// One value of a layer: read from text (the environment), from TOML, and
/// shown as text.
trait Setting: Sized + Clone {
    /// What a good value looks like, for errors.
    const WHAT: &'static str;
    fn from_text(s: &str) -> Option<Self>;
    fn from_toml(v: toml::Value) -> std::result::Result<Self, toml::Value> {
        match v {
            toml::Value::String(s) => Self::from_text(&s).ok_or(toml::Value::String(s)),
            other => Err(other),
        }
    }
    fn show(&self) -> String;
}

macro_rules! text_setting {
    ($($t:ty => $what:literal, $show:expr;)*) => {$(
        impl Setting for $t {
            const WHAT: &'static str = $what;
            fn from_text(s: &str) -> Option<Self> {
                s.trim().parse().ok()
            }
            fn show(&self) -> String {
                let show: fn(&$t) -> String = $show;
                show(self)
            }
        }
    )*};
}

text_setting! {
    SocketAddr => "an address like 127.0.0.1:4433", |v| v.to_string();
    LogFormat => "text or json", |v| match v { LogFormat::Text => "text".into(), LogFormat::Json => "json".into() };
    HttpListen => "an address like 127.0.0.1:9464, or off", |v| match v {
        HttpListen::Off => "off".into(),
        HttpListen::At(a) => a.to_string(),
    };
    quiver_sync::TcpListen => "an address like 0.0.0.0:4433, same (the QUIC address on TCP), or off", |v| v.to_string();
    quiver_sync::TransportChoice => "auto, quic or tcp", |v| v.to_string();
}

macro_rules! number_setting {
    ($($t:ty),*) => {$(
        impl Setting for $t {
            const WHAT: &'static str = "a whole number";
            fn from_text(s: &str) -> Option<Self> {
                s.trim().parse().ok()
            }
            fn from_toml(v: toml::Value) -> std::result::Result<Self, toml::Value> {
                match v {
                    toml::Value::Integer(i) => <$t>::try_from(i).map_err(|_| toml::Value::Integer(i)),
                    other => Err(other),
                }
            }
            fn show(&self) -> String {
                self.to_string()
            }
        }
    )*};
}

number_setting!(u16, u32, u64, usize);

/// Strings (tokens, names) are taken as they are, spaces included.
impl Setting for String {
    const WHAT: &'static str = "a string";
    fn from_text(s: &str) -> Option<Self> {
        Some(s.to_string())
    }
    fn show(&self) -> String {
        self.clone()
    }
}

impl Setting for PathBuf {
    const WHAT: &'static str = "a path";
    fn from_text(s: &str) -> Option<Self> {
        Some(PathBuf::from(s))
    }
    fn show(&self) -> String {
        self.display().to_string()
    }
}

impl Setting for bool {
    const WHAT: &'static str = "true or false";
    fn from_text(s: &str) -> Option<Self> {
        s.trim().parse().ok()
    }
    fn from_toml(v: toml::Value) -> std::result::Result<Self, toml::Value> {
        match v {
            toml::Value::Boolean(b) => Ok(b),
            other => Err(other),
        }
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

/// Peers: a TOML array of `ADDR[@PIN]` strings, or a comma-separated list
/// (flags and array entries may hold several, comma-separated too).
impl Setting for Vec<String> {
    const WHAT: &'static str = "a list of ADDR[@PIN]";
    fn from_text(s: &str) -> Option<Self> {
        Some(peer_list(&[s]))
    }
    fn from_toml(v: toml::Value) -> std::result::Result<Self, toml::Value> {
        match v {
            toml::Value::String(s) => Ok(peer_list(&[s])),
            toml::Value::Array(a) if a.iter().all(toml::Value::is_str) => Ok(peer_list(
                &a.iter().filter_map(toml::Value::as_str).collect::<Vec<_>>(),
            )),
            other => Err(other),
        }
    }
    fn show(&self) -> String {
        self.join(",")
    }
}

/// `ADDR[@PIN]` entries, each of which may hold several separated by
/// commas; spaces around them and empty ones dropped.
pub fn peer_list(items: &[impl AsRef<str>]) -> Vec<String> {
    items
        .iter()
        .flat_map(|i| i.as_ref().split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// The settings `quiver serve` takes, each with its type and environment
/// names: the one list the layers, the defaults and `config show` follow.
macro_rules! settings {
    ($($key:ident: $t:ty = [$($env:literal),*];)*) => {
        /// One layer of settings, typed: a TOML file, the environment, the
        /// flags or the defaults.
        #[derive(Debug, Clone, Default)]
        pub struct Layer {
            $(pub $key: Option<$t>,)*
        }

        /// Every key, as files and `config show` name them.
        const KEYS: &[&str] = &[$(stringify!($key)),*];

        impl Layer {
            /// A TOML table: unknown keys and values of the wrong type are refused.
            fn from_toml(path: &Path, table: toml::Table) -> Result<Layer> {
                let mut l = Layer::default();
                for (k, v) in table {
                    match k.as_str() {
                        $(stringify!($key) => {
                            l.$key = Some(<$t as Setting>::from_toml(v).map_err(|v| anyhow!(
                                "config {}: key `{k}` has the wrong type or value ({}: {v}), expected {}",
                                path.display(), v.type_str(), <$t as Setting>::WHAT
                            ))?);
                        })*
                        _ => bail!(
                            "config {}: unknown key `{k}` (known keys: {})",
                            path.display(),
                            KEYS.join(", ")
                        ),
                    }
                }
                Ok(l)
            }

            /// The environment: the first name set for each key.
            pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Layer> {
                let mut l = Layer::default();
                $(
                    if let Some((name, v)) = [$($env),*].iter().find_map(|n| get(n).map(|v| (*n, v))) {
                        l.$key = Some(<$t as Setting>::from_text(&v).ok_or_else(|| anyhow!(
                            "config key `{}` (from {name}): {v:?} is not {}",
                            stringify!($key), <$t as Setting>::WHAT
                        ))?);
                    }
                )*
                Ok(l)
            }

            /// Each key from the first layer that sets it, with its source
            /// and its value as `config show` prints it.
            fn merge(layers: &[(&Layer, Source)]) -> (Layer, BTreeMap<String, (String, Source)>) {
                let mut out = Layer::default();
                let mut shown = BTreeMap::new();
                $(
                    if let Some((v, src)) = layers.iter().find_map(|(l, s)| l.$key.as_ref().map(|v| (v, *s))) {
                        shown.insert(stringify!($key).to_string(), (Setting::show(v), src));
                        out.$key = Some(v.clone());
                    }
                )*
                (out, shown)
            }
        }
    };
}

settings! {
    listen: SocketAddr = ["QUIVER_LISTEN"];
    port: u16 = ["QUIC_PORT", "QUIVER_PORT"];
    node: String = ["QUIVER_NODE"];
    token: String = ["QUIVER_TOKEN"];
    cert: PathBuf = ["QUIC_CERT_PATH", "QUIVER_CERT"];
    key: PathBuf = ["QUIC_KEY_PATH", "QUIVER_KEY"];
    client_ca: PathBuf = ["QUIVER_CLIENT_CA"];
    max_connections: usize = ["QUIC_MAX_CONNECTIONS", "QUIVER_MAX_CONNECTIONS"];
    max_streams: u32 = ["QUIC_MAX_STREAMS", "QUIVER_MAX_STREAMS"];
    idle_timeout_secs: u64 = ["QUIVER_IDLE_TIMEOUT_SECS"];
    keep_alive_secs: u64 = ["QUIVER_KEEP_ALIVE_SECS"];
    max_frame_bytes: u32 = ["QUIVER_MAX_FRAME_BYTES"];
    batch_max_changes: usize = ["QUIVER_BATCH_MAX_CHANGES"];
    batch_max_bytes: usize = ["QUIVER_BATCH_MAX_BYTES"];
    compression: bool = ["QUIVER_COMPRESSION"];
    log_format: LogFormat = ["QUIVER_LOG_FORMAT"];
    http_listen: HttpListen = ["QUIVER_HTTP_LISTEN"];
    tcp_listen: quiver_sync::TcpListen = ["QUIVER_TCP_LISTEN"];
    peer_transport: quiver_sync::TransportChoice = ["QUIVER_PEER_TRANSPORT"];
    rate_requests_per_min: u32 = ["QUIVER_RATE_REQUESTS_PER_MIN"];
    rate_bytes_per_min: u32 = ["QUIVER_RATE_BYTES_PER_MIN"];
    peers: Vec<String> = ["QUIVER_PEERS"];
    allow_anonymous: bool = ["QUIVER_ALLOW_ANONYMOUS"];
    peer_token: String = ["QUIVER_PEER_TOKEN"];
    shutdown_grace_secs: u64 = ["QUIVER_SHUTDOWN_GRACE_SECS"];
    compact_interval_secs: u64 = ["QUIVER_COMPACT_INTERVAL_SECS"];
    peer_horizon_days: u64 = ["QUIVER_PEER_HORIZON_DAYS"];
}

impl Layer {
    /// The library's own defaults.
    fn defaults() -> Layer {
        let server = quiver_sync::ServerOptions::default();
        let transport = &server.limits;
        let stream = &server.stream;
        Layer {
            listen: Some(server.listen),
            max_connections: Some(server.max_connections),
            max_streams: Some(transport.max_streams),
            idle_timeout_secs: Some(transport.idle_timeout.as_secs()),
            keep_alive_secs: Some(transport.keep_alive.as_secs()),
            max_frame_bytes: Some(server.max_frame),
            batch_max_changes: Some(stream.max_changes),
            batch_max_bytes: Some(stream.max_bytes),
            compression: Some(server.compression),
            log_format: Some(LogFormat::Text),
            http_listen: Some(HTTP_LISTEN_DEFAULT),
            tcp_listen: Some(server.tcp_listen),
            peer_transport: Some(quiver_sync::ClientOptions::default().transport),
            rate_requests_per_min: Some(server.rate.requests_per_min.map_or(0, |n| n.get())),
            rate_bytes_per_min: Some(server.rate.bytes_per_min.map_or(0, |n| n.get())),
            allow_anonymous: Some(false),
            shutdown_grace_secs: Some(server.shutdown_grace.as_secs()),
            compact_interval_secs: Some(DEFAULT_COMPACT_INTERVAL_SECS),
            peer_horizon_days: Some(quiver_store::DEFAULT_PEER_HORIZON_DAYS as u64),
            ..Layer::default()
        }
    }
}

/// The effective configuration, each value with its source.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonConfig {
    pub values: BTreeMap<String, (String, Source)>,
    #[serde(skip)]
    pub listen: SocketAddr,
    #[serde(skip)]
    pub node: Option<String>,
    #[serde(skip)]
    pub token: Option<String>,
    #[serde(skip)]
    pub cert: Option<PathBuf>,
    #[serde(skip)]
    pub key: Option<PathBuf>,
    /// Mutual TLS: client certificates must chain to one in this PEM file.
    #[serde(skip)]
    pub client_ca: Option<PathBuf>,
    #[serde(skip)]
    pub max_connections: usize,
    #[serde(skip)]
    pub max_streams: u32,
    #[serde(skip)]
    pub idle_timeout: Duration,
    /// At shutdown, how long exchanges in flight may take to finish.
    #[serde(skip)]
    pub shutdown_grace: Duration,
    #[serde(skip)]
    pub keep_alive: Duration,
    #[serde(skip)]
    pub max_frame: u32,
    #[serde(skip)]
    pub batch_max_changes: usize,
    #[serde(skip)]
    pub batch_max_bytes: usize,
    #[serde(skip)]
    pub compression: bool,
    #[serde(skip)]
    pub log_json: bool,
    #[serde(skip)]
    pub peers: Vec<String>,
    #[serde(skip)]
    pub peer_token: Option<String>,
    /// TLS over TCP beside QUIC (`same`: the QUIC address on TCP).
    #[serde(skip)]
    pub tcp_listen: quiver_sync::TcpListen,
    /// How live links to peers connect (auto: QUIC, falling back to TCP).
    #[serde(skip)]
    pub peer_transport: quiver_sync::TransportChoice,
    /// Where `/health` and `/metrics` are served; `off` disables them.
    #[serde(skip)]
    pub http_listen: Option<SocketAddr>,
    /// Per-client limits (0: unlimited).
    #[serde(skip)]
    pub rate: quiver_sync::limits::RateLimits,
    /// Serve a non-loopback address with neither a token nor a client CA.
    #[serde(skip)]
    pub allow_anonymous: bool,
    /// How often the daemon compacts (`None`: never, `compact_interval_secs = 0`).
    #[serde(skip)]
    pub compact_interval: Option<Duration>,
    /// Peers silent this many days stop holding compaction back.
    #[serde(skip)]
    pub peer_horizon_days: u64,
}

/// The daemon compacts hourly unless told otherwise.
pub const DEFAULT_COMPACT_INTERVAL_SECS: u64 = 3_600;

/// Reads a TOML file into a layer, refusing unknown keys and values of the
/// wrong type.
pub fn file_layer(path: &Path) -> Result<Layer> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("reading config {}: {e}", path.display()))?;
    text_layer(path, &text)
}

/// A config file's text (read from `path`) as a layer.
pub fn text_layer(path: &Path, text: &str) -> Result<Layer> {
    let table: toml::Table = text
        .parse()
        .map_err(|e| anyhow!("config {}: {e}", path.display()))?;
    Layer::from_toml(path, table)
}

fn range<T: PartialOrd + std::fmt::Display + Copy>(key: &str, v: T, lo: T, hi: T) -> Result<T> {
    if v < lo || v > hi {
        bail!("config key `{key}`: {v} is out of range ({lo} to {hi})");
    }
    Ok(v)
}

/// Layers defaults, file, environment and flags, and checks the result.
pub fn resolve(file: Option<&Layer>, env: &Layer, flags: &Layer) -> Result<DaemonConfig> {
    let defaults = Layer::defaults();
    let none = Layer::default();
    let (c, values) = Layer::merge(&[
        (flags, Source::Flag),
        (env, Source::Env),
        (file.unwrap_or(&none), Source::File),
        (&defaults, Source::Default),
    ]);
    // Every key below has a default, so the merged layer holds it.
    let set = |v: Option<u64>| v.unwrap_or_default();
    let mut listen = c
        .listen
        .ok_or_else(|| anyhow!("config key `listen`: no address"))?;
    if let Some(port) = c.port {
        listen.set_port(port);
    }
    let idle = range("idle_timeout_secs", set(c.idle_timeout_secs), 1, 86_400)?;
    let keep = range("keep_alive_secs", set(c.keep_alive_secs), 1, 3_600)?;
    if keep >= idle {
        bail!("config key `keep_alive_secs`: {keep} must be below idle_timeout_secs ({idle}), or idle links would time out");
    }
    let grace = range("shutdown_grace_secs", set(c.shutdown_grace_secs), 0, 3_600)?;
    let compact = range(
        "compact_interval_secs",
        set(c.compact_interval_secs),
        0,
        30 * 86_400,
    )?;
    let horizon = range("peer_horizon_days", set(c.peer_horizon_days), 1, 3_650)?;
    let nonempty = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
    let path = |v: &Option<PathBuf>| v.clone().filter(|p| !p.as_os_str().is_empty());
    Ok(DaemonConfig {
        listen,
        node: nonempty(&c.node),
        token: nonempty(&c.token),
        cert: path(&c.cert),
        key: path(&c.key),
        client_ca: match path(&c.client_ca) {
            Some(p) if !p.is_file() => {
                bail!("config key `client_ca`: {} is not a file", p.display())
            }
            other => other,
        },
        max_connections: range(
            "max_connections",
            c.max_connections.unwrap_or_default(),
            1,
            1_000_000,
        )?,
        // At least the handshake, a live subscription and one shard at a time.
        max_streams: range("max_streams", c.max_streams.unwrap_or_default(), 3, 10_000)?,
        idle_timeout: Duration::from_secs(idle),
        shutdown_grace: Duration::from_secs(grace),
        compact_interval: (compact > 0).then(|| Duration::from_secs(compact)),
        peer_horizon_days: horizon,
        keep_alive: Duration::from_secs(keep),
        max_frame: range(
            "max_frame_bytes",
            c.max_frame_bytes.unwrap_or_default(),
            65_536,
            64 << 20,
        )?,
        batch_max_changes: range(
            "batch_max_changes",
            c.batch_max_changes.unwrap_or_default(),
            1,
            1_000_000,
        )?,
        batch_max_bytes: range(
            "batch_max_bytes",
            c.batch_max_bytes.unwrap_or_default(),
            1024,
            64 << 20,
        )?,
        compression: c.compression.unwrap_or_default(),
        log_json: c.log_format == Some(LogFormat::Json),
        allow_anonymous: c.allow_anonymous.unwrap_or_default(),
        peers: c.peers.clone().unwrap_or_default(),
        peer_token: nonempty(&c.peer_token),
        tcp_listen: c.tcp_listen.unwrap_or_default(),
        peer_transport: c.peer_transport.unwrap_or_default(),
        rate: quiver_sync::limits::RateLimits {
            requests_per_min: std::num::NonZeroU32::new(c.rate_requests_per_min.unwrap_or(0)),
            bytes_per_min: std::num::NonZeroU32::new(c.rate_bytes_per_min.unwrap_or(0)),
        },
        http_listen: match c.http_listen.unwrap_or(HttpListen::Off) {
            HttpListen::Off => None,
            HttpListen::At(a) => Some(a),
        },
        values: values
            .into_iter()
            .map(|(k, (v, s))| {
                let shown = if k.contains("token") && !v.is_empty() {
                    "(set)".to_string()
                } else {
                    v
                };
                (k, (shown, s))
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toml(text: &str) -> Result<Layer> {
        Layer::from_toml(Path::new("test.toml"), text.parse()?)
    }

    fn env(pairs: &[(&str, &str)]) -> Result<Layer> {
        Layer::from_env(|n| {
            pairs
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn flags_over_env_over_file_over_defaults() -> Result<()> {
        let file = toml("max_connections = 10\nmax_streams = 20\nnode = \"from-file\"\n")?;
        let env = env(&[("QUIVER_MAX_CONNECTIONS", "11"), ("QUIVER_PORT", "5000")])?;
        let flags = Layer {
            max_connections: Some(12),
            ..Layer::default()
        };
        let c = resolve(Some(&file), &env, &flags)?;
        assert_eq!(c.max_connections, 12);
        assert_eq!(c.values["max_connections"].1, Source::Flag);
        assert_eq!(c.max_streams, 20);
        assert_eq!(c.values["max_streams"].1, Source::File);
        assert_eq!(c.listen.port(), 5000);
        assert_eq!(c.values["idle_timeout_secs"].1, Source::Default);
        assert_eq!(c.node.as_deref(), Some("from-file"));
        Ok(())
    }

    #[test]
    fn defaults_are_the_library_s_own() -> Result<()> {
        let c = resolve(None, &Layer::default(), &Layer::default())?;
        let server = quiver_sync::ServerOptions::default();
        assert_eq!(c.listen, server.listen);
        assert_eq!(c.max_connections, server.max_connections);
        assert_eq!(c.idle_timeout, server.limits.idle_timeout);
        assert_eq!(c.batch_max_bytes, server.stream.max_bytes);
        assert_eq!(c.shutdown_grace, server.shutdown_grace);
        assert_eq!(c.http_listen, Some("127.0.0.1:0".parse()?));
        assert_eq!(
            c.values["max_frame_bytes"],
            (server.max_frame.to_string(), Source::Default)
        );
        assert!(c.values.values().all(|(_, s)| *s == Source::Default));
        Ok(())
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, k, says) in [
            (
                "max_connections = \"zero\"",
                "max_connections",
                "a whole number",
            ),
            ("max_connections = 0", "max_connections", "out of range"),
            ("max_connections = -1", "max_connections", "a whole number"),
            (
                "keep_alive_secs = 60",
                "keep_alive_secs",
                "below idle_timeout_secs",
            ),
            ("listen = \"nowhere\"", "listen", "an address"),
            ("log_format = \"xml\"", "log_format", "text or json"),
            ("http_listen = \"here\"", "http_listen", "or off"),
            ("max_frame_bytes = 10", "max_frame_bytes", "out of range"),
            ("client_ca = \"/no/such/ca.pem\"", "client_ca", "not a file"),
            ("max_streams = 2", "max_streams", "out of range"),
            ("max_streams = [1]", "max_streams", "wrong type"),
            ("peers = [1]", "peers", "ADDR[@PIN]"),
            ("colour = \"blue\"", "colour", "unknown key"),
        ] {
            let e = toml(text)
                .and_then(|file| resolve(Some(&file), &Layer::default(), &Layer::default()))
                .expect_err(text)
                .to_string();
            assert!(
                e.contains(&format!("`{k}`")) && e.contains(says),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn the_seed_environment_names_are_read_and_bad_ones_named() -> Result<()> {
        let env_layer = env(&[("QUIC_MAX_CONNECTIONS", "7"), ("QUIC_CERT_PATH", "/c.pem")])?;
        let c = resolve(None, &env_layer, &Layer::default())?;
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.cert, Some(PathBuf::from("/c.pem")));
        assert_eq!(c.values["max_connections"].1, Source::Env);
        let e = env(&[("QUIVER_COMPRESSION", "maybe")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`compression`") && e.contains("QUIVER_COMPRESSION"),
            "{e}"
        );
        let peers = env(&[("QUIVER_PEERS", "a:1, b:2@ff,")])?;
        assert_eq!(
            peers.peers,
            Some(vec!["a:1".to_string(), "b:2@ff".to_string()])
        );
        Ok(())
    }
}
