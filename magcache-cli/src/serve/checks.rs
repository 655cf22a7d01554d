//! What a request is refused on before any work: a missing key before its body is read, a
//! request from another site's page, and everything the model's worker would refuse (the family's
//! resolution of the request's run, the size guard, the cache over the plan), so that a bad
//! request is a 400 at once rather than a failed job after the queue. Messages never carry the
//! server's paths.

use super::error::{authorize, from_run, ApiError};
use super::model::Served;
use super::App;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use magcache_core::{BuildEnv, RunConfig};
use std::sync::Arc;

/// The key, checked before a keyed route's handler reads the body (a client without the key
/// cannot make the server buffer a 16 MB body).
pub(crate) async fn require_key(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Err(e) = authorize(&app, req.headers()) {
        app.metrics
            .request(route_of(req.uri().path()), e.status.as_u16());
        return e.into_response();
    }
    next.run(req).await
}

/// A keyed path's route, as the handlers count it in the metrics (ids as `{id}`).
fn route_of(path: &str) -> &'static str {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match parts.as_slice() {
        ["", "v1", "images", "generations"] => "/v1/images/generations",
        ["", "v1", "videos"] => "/v1/videos",
        ["", "v1", "videos", _] => "/v1/videos/{id}",
        ["", "v1", "videos", _, "content"] => "/v1/videos/{id}/content",
        ["", "v1", "models"] => "/v1/models",
        ["", "v1", "models", _] => "/v1/models/{id}",
        _ => "(other)",
    }
}

/// The host part of a `Host` header or of an `Origin`'s authority (`127.0.0.1`, `[::1]`,
/// `localhost`), lowercased, without the port.
fn host_of(authority: &str) -> String {
    let a = authority.trim().to_ascii_lowercase();
    if let Some(end) = a.strip_prefix('[').and_then(|r| r.find(']')) {
        return a[..end + 2].to_string();
    }
    a.split(':').next().unwrap_or_default().to_string()
}

/// Whether `host` (from [`host_of`]) names this machine's loopback interface.
fn loopback_name(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why a request is refused as another site's, if it is: a browser page of another origin (its
/// `Origin` is not the `Host` it sent to: a cross-site form or fetch, which needs no CORS to be
/// sent), or, on a server bound to loopback, a `Host` that is not a loopback name (a page whose
/// own name was made to resolve to 127.0.0.1, DNS rebinding). Clients that are not browsers send
/// no `Origin`.
pub(crate) fn foreign(headers: &HeaderMap, loopback: bool) -> Option<String> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(host_of);
    if loopback {
        match &host {
            Some(h) if loopback_name(h) => {}
            _ => {
                return Some(format!(
                    "Host `{}`: this server listens on loopback and answers loopback names only",
                    host.unwrap_or_default()
                ))
            }
        }
    }
    let origin = headers.get(header::ORIGIN)?;
    let o = origin.to_str().unwrap_or_default();
    let authority = o.split_once("://").map_or("", |(_, a)| a);
    match (&host, authority.is_empty()) {
        (Some(h), false) if host_of(authority) == *h => None,
        _ => Some(format!(
            "Origin `{o}`: requests from another site's page are refused"
        )),
    }
}

/// Refuses another site's requests ([`foreign`]) with 403 before anything else.
pub(crate) async fn same_origin(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(why) = foreign(req.headers(), app.loopback) {
        app.metrics.request("(other)", 403);
        return ApiError {
            code: Some("forbidden"),
            ..ApiError::new(StatusCode::FORBIDDEN, why)
        }
        .into_response();
    }
    next.run(req).await
}

/// `msg` without the server's paths: the model's run file and its folder are named by the
/// model's id, and the server's folder of first frames as the request's picture.
pub(crate) fn scrub(msg: &str, m: &Served) -> String {
    scrub_paths(msg, &m.path, &m.id)
}

/// [`scrub`] of the model `id` served from the run file `path`.
pub(crate) fn scrub_paths(msg: &str, path: &std::path::Path, id: &str) -> String {
    let mut out = msg.to_string();
    let tmp = super::tmp_dir();
    let named = [
        (path.display().to_string(), format!("model `{id}`")),
        (tmp.display().to_string(), "(the request's picture)".into()),
        (
            crate::prepare::base_dir(path).display().to_string(),
            format!("(model `{id}`'s folder)"),
        ),
    ];
    for (path, name) in named {
        if path.len() > 1 {
            out = out.replace(&path, &name);
        }
    }
    out
}

/// What the worker would refuse for the request's run `text`, checked now: the family's
/// resolution (its keys, sizes, frames, first frame), the size guard on each stage's estimate in
/// the dtype the worker would choose, and the cache built and begun over the plan.
pub(crate) fn precheck(m: &Served, text: &str) -> Result<(), ApiError> {
    let file = m.path.display().to_string();
    let base = crate::prepare::base_dir(&m.path);
    let run = || -> magcache_core::Result<()> {
        let mut cfg = RunConfig::parse(text, &file)?;
        let fam = crate::prepare::family_of(&cfg, &file)?;
        if cfg.is_auto_dtype() {
            if let Some((dtype, _)) =
                crate::prepare::auto_dtype_by_estimate(&mut cfg, &file, &base, fam)?
            {
                cfg.model.dtype = dtype;
            }
        }
        let (plan, info) = (fam.plan)(&cfg, &file, &base)?;
        if let Some(estimate) = fam.estimate {
            for (_, fp) in estimate(&cfg, &file, &base)? {
                fp.check(&file)?;
            }
        }
        let env = BuildEnv {
            file: &file,
            base_dir: &base,
            model: &info,
        };
        if let Some(mut cache) = cfg.strategy().build(&env)? {
            cache.begin_generation(&plan)?;
        }
        Ok(())
    };
    run().map_err(|e| {
        let mut e = from_run(e);
        // The served run file passed these checks at start: what fails now is the request's.
        if e.status == StatusCode::INTERNAL_SERVER_ERROR {
            e.status = StatusCode::BAD_REQUEST;
        }
        e.message = scrub(&e.message, m);
        e
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(host: &str, origin: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        h
    }

    #[test]
    fn another_sites_pages_are_told_apart_from_clients_and_the_own_page() {
        // Clients (no Origin) and the server's own page, on loopback names.
        for host in [
            "127.0.0.1:8000",
            "localhost:8000",
            "[::1]:8000",
            "127.0.0.1",
        ] {
            assert_eq!(foreign(&headers(host, None), true), None, "{host}");
        }
        let own = headers("127.0.0.1:8000", Some("http://127.0.0.1:8000"));
        assert_eq!(foreign(&own, true), None);
        // A cross-site page: its Origin is not the Host.
        let cross = headers("127.0.0.1:8000", Some("http://attacker.example"));
        assert!(foreign(&cross, true).unwrap().contains("another site"));
        assert!(foreign(&headers("h:1", Some("null")), false).is_some());
        // DNS rebinding: the page's own name resolved to loopback (Origin and Host agree).
        let rebound = headers(
            "attacker.example:8000",
            Some("http://attacker.example:8000"),
        );
        assert!(foreign(&rebound, true).unwrap().contains("Host"));
        // Bound elsewhere (`--host 0.0.0.0`), any Host; another site's page still refused.
        assert_eq!(foreign(&headers("gpu-box:8000", None), false), None);
        assert_eq!(foreign(&rebound, false), None);
        assert!(foreign(&cross, false).is_some());
    }
}
