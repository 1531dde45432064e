//! `dns://` peer discovery (upstream §12): in `-cluster-peers` and `-leaf-servers`,
//! `dns://host:port?min=N&interval_ms=M` expands to one `nats://<ip>:<port>/` URL per A/AAAA record
//! of `host`; other URLs pass through. Start-up waits for each to have `min` addresses (default 2;
//! Go's accidental 0 took even an empty first answer), retrying every `interval_ms` (default 1000).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A parsed `dns://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsPeer {
    pub host: String,
    pub port: u16,
    pub min: usize,
    pub interval: Duration,
    /// Query parameters other than `min` and `interval_ms` (e.g. `hub=true`), kept for the result.
    pub extra_query: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("peer URL {url:?}: {why}")]
    Invalid { url: String, why: String },
    #[error("shutdown requested during peer discovery")]
    Cancelled,
}

/// Parses `dns://host:port?min=N&interval_ms=M`; `None` when `url` is not a `dns://` URL,
/// [`Error::Invalid`] without a usable host, port or parameters.
pub fn parse(url: &str) -> Result<Option<DnsPeer>, Error> {
    let Some(rest) = url.strip_prefix("dns://") else {
        return Ok(None);
    };
    let bad = |why: &str| Error::Invalid {
        url: url.to_owned(),
        why: why.to_owned(),
    };
    let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = authority.trim_end_matches('/');
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| bad("needs an explicit port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("needs a host name"));
    }
    let port: u16 = port.parse().map_err(|_| bad("port is not a number"))?;
    let mut peer = DnsPeer {
        host: host.to_owned(),
        port,
        min: 2,
        interval: Duration::from_millis(1000),
        extra_query: String::new(),
    };
    let mut extra = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "min" => peer.min = v.parse().map_err(|_| bad("min is not a number"))?,
            "interval_ms" => {
                let ms: u64 = v.parse().map_err(|_| bad("interval_ms is not a number"))?;
                peer.interval = Duration::from_millis(ms.max(1));
            }
            _ => extra.push(pair),
        }
    }
    peer.extra_query = extra.join("&");
    Ok(Some(peer))
}

/// Formats one resolved address as a NATS URL (IPv6 in brackets), keeping extra parameters.
fn url_for(ip: IpAddr, port: u16, extra_query: &str) -> String {
    let addr = std::net::SocketAddr::new(ip, port);
    if extra_query.is_empty() {
        format!("nats://{addr}/")
    } else {
        format!("nats://{addr}/?{extra_query}")
    }
}

/// Expands every `dns://` URL in `urls`, waiting until each has at least `min` addresses.
pub async fn resolve_all(
    urls: &[String],
    shutdown: &CancellationToken,
) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for url in urls {
        let Some(peer) = parse(url)? else {
            out.push(url.clone());
            continue;
        };
        tracing::info!(host = %peer.host, port = peer.port, min = peer.min, "Starting DNS A/AAAA peer discovery");
        loop {
            let lookup = tokio::net::lookup_host((peer.host.as_str(), peer.port));
            let found: BTreeSet<IpAddr> = match lookup.await {
                Ok(addrs) => addrs.map(|a| a.ip()).collect(),
                Err(e) => {
                    tracing::error!(host = %peer.host, error = %e, "Unable to discover peer URLs");
                    BTreeSet::new()
                }
            };
            if found.len() >= peer.min.max(1) {
                let urls: Vec<String> = found
                    .into_iter()
                    .map(|ip| url_for(ip, peer.port, &peer.extra_query))
                    .collect();
                tracing::info!(urls = ?urls, "Peers discovered");
                out.extend(urls);
                break;
            }
            tracing::info!(host = %peer.host, found = found.len(), min = peer.min, "Waiting for more peers in DNS");
            if !crate::retry::pause(shutdown, peer.interval).await {
                return Err(Error::Cancelled);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style_dns_urls() {
        let p = parse("dns://peers.local:4221?min=3&interval_ms=250&hub=true")
            .expect("valid")
            .expect("dns");
        assert_eq!(p.host, "peers.local");
        assert_eq!(p.port, 4221);
        assert_eq!(p.min, 3);
        assert_eq!(p.interval, Duration::from_millis(250));
        assert_eq!(p.extra_query, "hub=true");
        let d = parse("dns://h:1").expect("valid").expect("dns");
        assert_eq!((d.min, d.interval), (2, Duration::from_secs(1)));
        assert_eq!(parse("nats://h:1/"), Ok(None));
        for bad in ["dns://h", "dns://:1", "dns://h:x", "dns://h:1?min=x"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_v4_and_v6() {
        assert_eq!(
            url_for("10.0.0.1".parse().expect("ip"), 4221, ""),
            "nats://10.0.0.1:4221/"
        );
        assert_eq!(
            url_for("::1".parse().expect("ip"), 7, "hub=true"),
            "nats://[::1]:7/?hub=true"
        );
    }

    #[tokio::test]
    async fn resolves_localhost_and_passes_others_through() {
        let urls = vec![
            "nats://127.0.0.1:4222/".to_owned(),
            "dns://localhost:4223?min=1&interval_ms=10".to_owned(),
        ];
        let out = resolve_all(&urls, &CancellationToken::new())
            .await
            .expect("resolves");
        assert_eq!(out[0], "nats://127.0.0.1:4222/");
        assert!(
            out[1..]
                .iter()
                .any(|u| u == "nats://127.0.0.1:4223/" || u == "nats://[::1]:4223/"),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn waits_for_min_until_cancelled() {
        let token = CancellationToken::new();
        let t = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            t.cancel();
        });
        let urls = vec!["dns://localhost:1?min=50&interval_ms=5".to_owned()];
        assert_eq!(resolve_all(&urls, &token).await, Err(Error::Cancelled));
    }
}
