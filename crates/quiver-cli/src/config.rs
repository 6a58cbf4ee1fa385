//! Daemon configuration, layered: defaults, then a TOML file, then the
//! environment (the seed's `QUIC_*` names and `QUIVER_*`), then flags.
//! Every value is validated once, and errors name the key and the reason.

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

/// The settings `quiver serve` takes: key, environment names, default.
/// Defaults are the library's own (`ServerOptions`, `TransportLimits`,
/// `StreamLimits`), shown as text in `quiver config show`.
fn keys() -> Vec<(&'static str, &'static [&'static str], Option<String>)> {
    let server = quiver_sync::ServerOptions::default();
    let transport = &server.limits;
    let stream = &server.stream;
    let num = |n: u64| Some(n.to_string());
    vec![
        (
            "listen",
            &["QUIVER_LISTEN"],
            Some(server.listen.to_string()),
        ),
        ("port", &["QUIC_PORT", "QUIVER_PORT"], None),
        ("node", &["QUIVER_NODE"], None),
        ("token", &["QUIVER_TOKEN"], None),
        ("cert", &["QUIC_CERT_PATH", "QUIVER_CERT"], None),
        ("key", &["QUIC_KEY_PATH", "QUIVER_KEY"], None),
        ("client_ca", &["QUIVER_CLIENT_CA"], None),
        (
            "max_connections",
            &["QUIC_MAX_CONNECTIONS", "QUIVER_MAX_CONNECTIONS"],
            num(server.max_connections as u64),
        ),
        (
            "max_streams",
            &["QUIC_MAX_STREAMS", "QUIVER_MAX_STREAMS"],
            num(transport.max_streams as u64),
        ),
        (
            "idle_timeout_secs",
            &["QUIVER_IDLE_TIMEOUT_SECS"],
            num(transport.idle_timeout.as_secs()),
        ),
        (
            "keep_alive_secs",
            &["QUIVER_KEEP_ALIVE_SECS"],
            num(transport.keep_alive.as_secs()),
        ),
        (
            "max_frame_bytes",
            &["QUIVER_MAX_FRAME_BYTES"],
            num(server.max_frame as u64),
        ),
        (
            "batch_max_changes",
            &["QUIVER_BATCH_MAX_CHANGES"],
            num(stream.max_changes as u64),
        ),
        (
            "batch_max_bytes",
            &["QUIVER_BATCH_MAX_BYTES"],
            num(stream.max_bytes as u64),
        ),
        (
            "compression",
            &["QUIVER_COMPRESSION"],
            Some(server.compression.to_string()),
        ),
        ("log_format", &["QUIVER_LOG_FORMAT"], Some("text".into())),
        (
            "http_listen",
            &["QUIVER_HTTP_LISTEN"],
            Some("127.0.0.1:0".into()),
        ),
        (
            "rate_requests_per_min",
            &["QUIVER_RATE_REQUESTS_PER_MIN"],
            num(server.rate.requests_per_min.map_or(0, |n| n.get() as u64)),
        ),
        (
            "rate_bytes_per_min",
            &["QUIVER_RATE_BYTES_PER_MIN"],
            num(server.rate.bytes_per_min.map_or(0, |n| n.get() as u64)),
        ),
        ("peers", &["QUIVER_PEERS"], None),
        (
            "allow_anonymous",
            &["QUIVER_ALLOW_ANONYMOUS"],
            Some("false".into()),
        ),
        ("peer_token", &["QUIVER_PEER_TOKEN"], None),
        (
            "shutdown_grace_secs",
            &["QUIVER_SHUTDOWN_GRACE_SECS"],
            num(server.shutdown_grace.as_secs()),
        ),
    ]
}

/// One layer's raw values, as text.
pub type Layer = BTreeMap<String, String>;

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
    /// Where `/health` and `/metrics` are served; `off` disables them.
    #[serde(skip)]
    pub http_listen: Option<SocketAddr>,
    /// Per-client limits (0: unlimited).
    #[serde(skip)]
    pub rate: quiver_sync::limits::RateLimits,
    /// Serve a non-loopback address with neither a token nor a client CA.
    #[serde(skip)]
    pub allow_anonymous: bool,
}

/// Reads a TOML file into a layer, refusing unknown keys and non-scalar values.
pub fn file_layer(path: &Path) -> Result<Layer> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("reading config {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| anyhow!("config {}: {e}", path.display()))?;
    let mut out = Layer::new();
    let keys = keys();
    for (k, v) in table {
        if !keys.iter().any(|(name, _, _)| *name == k) {
            let known: Vec<&str> = keys.iter().map(|(n, _, _)| *n).collect();
            bail!(
                "config {}: unknown key `{k}` (known keys: {})",
                path.display(),
                known.join(", ")
            );
        }
        let s = match v {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(a) if k == "peers" => a
                .into_iter()
                .map(|x| match x {
                    toml::Value::String(s) => Ok(s),
                    other => Err(anyhow!(
                        "config {}: key `peers` holds {other}, expected strings",
                        path.display()
                    )),
                })
                .collect::<Result<Vec<_>>>()?
                .join(","),
            other => bail!(
                "config {}: key `{k}` has the wrong type ({})",
                path.display(),
                other.type_str()
            ),
        };
        out.insert(k, s);
    }
    Ok(out)
}

/// Reads the environment into a layer.
pub fn env_layer(get: impl Fn(&str) -> Option<String>) -> Layer {
    let mut out = Layer::new();
    for (key, names, _) in keys() {
        for n in names {
            if let Some(v) = get(n) {
                out.insert(key.to_string(), v);
                break;
            }
        }
    }
    out
}

fn parse<T: std::str::FromStr>(key: &str, v: &str, what: &str) -> Result<T> {
    v.trim()
        .parse()
        .map_err(|_| anyhow!("config key `{key}`: {v:?} is not {what}"))
}

fn range<T: PartialOrd + std::fmt::Display + Copy>(key: &str, v: T, lo: T, hi: T) -> Result<T> {
    if v < lo || v > hi {
        bail!("config key `{key}`: {v} is out of range ({lo} to {hi})");
    }
    Ok(v)
}

/// The number under `key`, which must lie within `lo..=hi`.
fn bounded<'a, T>(
    get: &impl Fn(&str) -> Option<&'a str>,
    key: &str,
    what: &str,
    lo: T,
    hi: T,
) -> Result<T>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    range(key, parse(key, get(key).unwrap_or(""), what)?, lo, hi)
}

/// Layers defaults, file, environment and flags, and validates the result.
pub fn resolve(file: Option<&Layer>, env: &Layer, flags: &Layer) -> Result<DaemonConfig> {
    let mut values: BTreeMap<String, (String, Source)> = BTreeMap::new();
    for (key, _, default) in keys() {
        let pick = flags
            .get(key)
            .map(|v| (v.clone(), Source::Flag))
            .or_else(|| env.get(key).map(|v| (v.clone(), Source::Env)))
            .or_else(|| {
                file.and_then(|f| f.get(key))
                    .map(|v| (v.clone(), Source::File))
            })
            .or_else(|| default.map(|d| (d, Source::Default)));
        if let Some(p) = pick {
            values.insert(key.to_string(), p);
        }
    }
    let get = |k: &str| values.get(k).map(|(v, _)| v.as_str());
    let mut listen: SocketAddr = parse(
        "listen",
        get("listen").unwrap_or(""),
        "an address like 127.0.0.1:4433",
    )?;
    if let Some(port) = get("port") {
        listen.set_port(parse("port", port, "a port number")?);
    }
    let idle: u64 = bounded(&get, "idle_timeout_secs", "a number of seconds", 1, 86_400)?;
    let keep: u64 = bounded(&get, "keep_alive_secs", "a number of seconds", 1, 3_600)?;
    if keep >= idle {
        bail!("config key `keep_alive_secs`: {keep} must be below idle_timeout_secs ({idle}), or idle links would time out");
    }
    let grace: u64 = bounded(&get, "shutdown_grace_secs", "a number of seconds", 0, 3_600)?;
    let log_format = get("log_format").unwrap_or("text");
    if !matches!(log_format, "text" | "json") {
        bail!("config key `log_format`: {log_format:?} is not text or json");
    }
    let nonempty = |k: &str| get(k).filter(|v| !v.is_empty()).map(str::to_string);
    Ok(DaemonConfig {
        listen,
        node: nonempty("node"),
        token: nonempty("token"),
        cert: nonempty("cert").map(PathBuf::from),
        key: nonempty("key").map(PathBuf::from),
        client_ca: match nonempty("client_ca").map(PathBuf::from) {
            Some(p) if !p.is_file() => {
                bail!("config key `client_ca`: {} is not a file", p.display())
            }
            other => other,
        },
        max_connections: bounded(&get, "max_connections", "a whole number", 1, 1_000_000)?,
        // At least the handshake, a live subscription and one shard at a time.
        max_streams: bounded(&get, "max_streams", "a whole number", 3, 10_000)?,
        idle_timeout: Duration::from_secs(idle),
        shutdown_grace: Duration::from_secs(grace),
        keep_alive: Duration::from_secs(keep),
        max_frame: bounded(
            &get,
            "max_frame_bytes",
            "a number of bytes",
            65_536,
            64 << 20,
        )?,
        batch_max_changes: bounded(&get, "batch_max_changes", "a whole number", 1, 1_000_000)?,
        batch_max_bytes: bounded(&get, "batch_max_bytes", "a number of bytes", 1024, 64 << 20)?,
        compression: parse(
            "compression",
            get("compression").unwrap_or(""),
            "true or false",
        )?,
        log_json: log_format == "json",
        allow_anonymous: parse(
            "allow_anonymous",
            get("allow_anonymous").unwrap_or(""),
            "true or false",
        )?,
        peers: get("peers")
            .map(|p| {
                p.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
        peer_token: nonempty("peer_token"),
        rate: quiver_sync::limits::RateLimits {
            requests_per_min: std::num::NonZeroU32::new(parse(
                "rate_requests_per_min",
                get("rate_requests_per_min").unwrap_or("0"),
                "a whole number (0: unlimited)",
            )?),
            bytes_per_min: std::num::NonZeroU32::new(parse(
                "rate_bytes_per_min",
                get("rate_bytes_per_min").unwrap_or("0"),
                "a whole number of bytes (0: unlimited)",
            )?),
        },
        http_listen: match get("http_listen").unwrap_or("off") {
            "off" | "" => None,
            v => Some(parse(
                "http_listen",
                v,
                "an address like 127.0.0.1:9464, or off",
            )?),
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

    fn layer(pairs: &[(&str, &str)]) -> Layer {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn flags_over_env_over_file_over_defaults() {
        let file = layer(&[
            ("max_connections", "10"),
            ("max_streams", "20"),
            ("node", "from-file"),
        ]);
        let env = layer(&[("max_connections", "11"), ("port", "5000")]);
        let flags = layer(&[("max_connections", "12")]);
        let c = resolve(Some(&file), &env, &flags).unwrap();
        assert_eq!(c.max_connections, 12);
        assert_eq!(c.values["max_connections"].1, Source::Flag);
        assert_eq!(c.max_streams, 20);
        assert_eq!(c.values["max_streams"].1, Source::File);
        assert_eq!(c.listen.port(), 5000);
        assert_eq!(c.values["idle_timeout_secs"].1, Source::Default);
        assert_eq!(c.node.as_deref(), Some("from-file"));
    }

    #[test]
    fn bad_values_name_the_key() {
        for (k, v, says) in [
            ("max_connections", "zero", "not a whole number"),
            ("max_connections", "0", "out of range"),
            ("keep_alive_secs", "60", "below idle_timeout_secs"),
            ("listen", "nowhere", "not an address"),
            ("log_format", "xml", "text or json"),
            ("max_frame_bytes", "10", "out of range"),
            ("client_ca", "/no/such/ca.pem", "not a file"),
            ("max_streams", "2", "out of range"),
        ] {
            let e = resolve(None, &Layer::new(), &layer(&[(k, v)]))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("`{k}`")) && e.contains(says),
                "{k}={v}: {e}"
            );
        }
    }

    #[test]
    fn the_seed_environment_names_are_read() {
        let env = env_layer(|n| match n {
            "QUIC_MAX_CONNECTIONS" => Some("7".into()),
            "QUIC_CERT_PATH" => Some("/c.pem".into()),
            _ => None,
        });
        let c = resolve(None, &env, &Layer::new()).unwrap();
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.cert, Some(PathBuf::from("/c.pem")));
        assert_eq!(c.values["max_connections"].1, Source::Env);
    }
}
