//! The HTTP side: OpenAI's request and error shapes, a request's keys laid over its model's run
//! file (checked exactly as a run file is), and the handlers.

use super::error::{authorize, from_run, ApiError};
use super::model::{seed_value, Job, Request, Served};
use super::App;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use magcache_core::RunConfig;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `WxH`, each side 1..=16384 (the size guard judges the rest).
fn parse_size(s: &str) -> Result<(u64, u64), ApiError> {
    let bad = || {
        ApiError::bad(
            "size",
            format!("`{s}` is not WIDTHxHEIGHT (e.g. 1024x1024)"),
        )
    };
    // Digits only on either side (`u64`'s parse also takes a `+`; no spaces).
    let side = |t: &str| -> Result<u64, ApiError> {
        match !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            true => t.parse().map_err(|_| bad()),
            false => Err(bad()),
        }
    };
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    let (w, h) = (side(w)?, side(h)?);
    if !(1..=16384).contains(&w) || !(1..=16384).contains(&h) {
        return Err(ApiError::bad(
            "size",
            format!("`{s}`: each side must be 1..=16384 pixels"),
        ));
    }
    Ok((w, h))
}

/// The run file's table `name`, made when absent.
fn table<'a>(doc: &'a mut toml::Table, name: &str) -> Result<&'a mut toml::Table, ApiError> {
    if !doc.get(name).is_some_and(toml::Value::is_table) {
        doc.insert(name.into(), toml::Value::Table(Default::default()));
    }
    doc.get_mut(name)
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("[{name}]")))
}

/// The model's run file with the request's keys: the text every picture of the request is run
/// from, checked as a run file is (errors name the request field).
pub(crate) fn request_text(
    m: &Served,
    r: &Request,
    inputs: toml::Table,
) -> Result<String, ApiError> {
    let file = m.path.display().to_string();
    let mut doc: toml::Table = toml::from_str(&m.text)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{file}: {e}")))?;
    if r.prompt.trim().is_empty() {
        return Err(ApiError::bad(
            "prompt",
            "prompt: must not be empty or blank",
        ));
    }
    // A text encoder reads a few hundred tokens at most (`max_sequence_length`); a longer text
    // would only hold the worker and the prompt cache.
    for (param, text) in [
        ("prompt", Some(&r.prompt)),
        ("negative_prompt", r.negative_prompt.as_ref()),
    ] {
        if let Some(t) = text.filter(|t| t.len() > MAX_PROMPT_BYTES) {
            return Err(ApiError::bad(
                param,
                format!("{param}: {} bytes; at most {MAX_PROMPT_BYTES} (the text encoder reads at most its max_sequence_length tokens)", t.len()),
            ));
        }
    }
    let prompt = table(&mut doc, "prompt")?;
    prompt.insert("text".into(), r.prompt.clone().into());
    if let Some(n) = &r.negative_prompt {
        prompt.insert("negative".into(), n.clone().into());
    }
    if let Some(s) = &r.size {
        let (w, h) = parse_size(s)?;
        let inputs = table(&mut doc, "inputs")?;
        inputs.insert("width".into(), toml::Value::Integer(w as i64));
        inputs.insert("height".into(), toml::Value::Integer(h as i64));
    }
    if let Some(steps) = r.num_inference_steps {
        if !(1..=1000).contains(&steps) {
            return Err(ApiError::bad(
                "num_inference_steps",
                format!("num_inference_steps = {steps}: must be 1..=1000"),
            ));
        }
        table(&mut doc, "sampling")?.insert("steps".into(), toml::Value::Integer(steps as i64));
    }
    if let Some(g) = r.guidance_scale {
        if !(g.is_finite() && g.abs() <= MAX_GUIDANCE) {
            return Err(ApiError::bad(
                "guidance_scale",
                format!(
                    "guidance_scale = {g}: must be a number from -{MAX_GUIDANCE} to {MAX_GUIDANCE}"
                ),
            ));
        }
        table(&mut doc, "sampling")?.insert("guidance_scale".into(), g.into());
    }
    if let Some(c) = &r.cache {
        doc.insert("cache".into(), toml::Value::Table(c.clone()));
    }
    table(&mut doc, "inputs")?.extend(inputs);
    let text = toml::to_string(&doc)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let cfg = RunConfig::parse(&text, &file).map_err(from_run)?;
    cfg.validate(&file).map_err(from_run)?;
    // A request's `cache` names no file on the server (a profile): the server's files are its run
    // files' to name, and an error about another file would tell the client what it holds.
    if r.cache.is_some() {
        if let Some((key, _)) = cfg.strategy().input_files().first() {
            return Err(ApiError::bad(
                "cache",
                format!("{key}: a request may not name a file on the server; serve a run file whose [cache] names it"),
            ));
        }
    }
    Ok(text)
}

/// The longest `prompt` or `negative_prompt` a request may send, in bytes.
const MAX_PROMPT_BYTES: usize = 16 << 10;

/// The largest `guidance_scale` magnitude a request may ask for (far past any model's use; a
/// larger one overflows the latents).
const MAX_GUIDANCE: f64 = 1000.0;

/// A request body as JSON (malformed JSON, unknown fields and bodies over the limit in OpenAI's
/// shape).
pub(crate) fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Request, ApiError> {
    let body = body.map_err(|e| {
        let status = e.status();
        ApiError::new(status, e.body_text())
    })?;
    // The path of a field of the wrong type (`n`, `cache.threshold`) is its `param`; a body that
    // is not JSON, or not an object, has none.
    // A JSON array would be read as the fields in their order (serde's sequence form of a
    // struct): the request is an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid request body: a JSON object of the request's fields, not an array",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(&body);
    let r: Request = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let missing = inner
            .to_string()
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next().map(str::to_string));
        match path.as_str() {
            // A required field left out: named as its `param`.
            "." | "" if missing.is_some() => {
                let f = missing.unwrap_or_default();
                ApiError::bad(&f, format!("{f}: missing"))
            }
            // `?`: the body broke off or is not JSON before any field was read.
            "." | "" | "?" => ApiError::body(&inner),
            // `param` is the request's field (`cache`), the message the whole path.
            p => ApiError::bad(
                p.split(['.', '[']).next().unwrap_or(p),
                format!("{p}: {inner}"),
            ),
        }
    })?;
    de.end().map_err(|e| ApiError::body(&e))?;
    Ok(r)
}

/// Sets the job's cancel flag when the request goes away (a client that disconnects).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Counts a request whose client went away before its answer (the handler dropped): status 499,
/// nginx's "client closed request".
struct CountIfDropped<'a>(&'a App, &'static str, bool);

impl Drop for CountIfDropped<'_> {
    fn drop(&mut self) {
        if !self.2 {
            self.0.metrics.request(self.1, 499);
        }
    }
}

/// `POST /v1/images/generations`.
pub(crate) async fn images(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut count = CountIfDropped(&app, "/v1/images/generations", false);
    let r = generate_images(&app, &headers, body).await;
    count.2 = true;
    let status = match &r {
        Ok(_) => 200,
        Err(e) => e.status.as_u16(),
    };
    app.metrics.request("/v1/images/generations", status);
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn generate_images(
    app: &Arc<App>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ApiError> {
    authorize(app, headers)?;
    let r = parse_body(body)?;
    let m = app.model(&r.model)?;
    let n = r.n.unwrap_or(1);
    if !(1..=8).contains(&n) {
        return Err(ApiError::bad("n", format!("n = {n}: must be 1..=8")));
    }
    if r.response_format
        .as_deref()
        .is_some_and(|f| f != "b64_json")
    {
        return Err(ApiError::bad(
            "response_format",
            "only `b64_json` is served (no URLs)",
        ));
    }
    let text = request_text(m, &r, toml::Table::new())?;
    super::checks::precheck_off_thread(app, &m.id, &text).await?;
    let seed = r.seed.unwrap_or(m.seed);
    seed_value(seed).map_err(from_run)?;
    // Picture i takes seed + i: the last one must be a seed too, before any picture is made.
    seed_value(seed.saturating_add(n - 1)).map_err(|_| {
        ApiError::bad(
            "seed",
            format!("seed = {seed} with n = {n}: the pictures take seed to seed + n - 1, which must be at most 2^63 - 1"),
        )
    })?;
    let seeds: Vec<u64> = (0..n).map(|i| seed.wrapping_add(i)).collect();
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancel.clone());
    app.track(&cancel);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = Job {
        text,
        seeds,
        cancel,
        video: None,
        reply: tx,
    };
    if !m.submit(job) {
        return Err(ApiError::busy(&m.id));
    }
    let pictures = rx
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the model's worker stopped",
            )
        })?
        .map_err(|e| {
            let mut e = from_run(e);
            e.message = super::checks::scrub(&e.message, m);
            e
        })?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let data: Vec<Value> = pictures
        .iter()
        .map(|p| json!({"b64_json": b64.encode(&p.bytes)}))
        .collect();
    let figures: Vec<_> = pictures.iter().map(|p| &p.figures).collect();
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(json!({"created": created, "data": data, "magcache": figures}))
}

/// `GET /v1/models`.
pub(crate) async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&app, &headers) {
        app.metrics.request("/v1/models", e.status.as_u16());
        return e.into_response();
    }
    app.metrics.request("/v1/models", 200);
    let data: Vec<Value> = app.models.iter().map(model_object).collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

fn model_object(m: &Served) -> Value {
    json!({"id": m.id, "object": "model", "created": 0, "owned_by": "magcache",
           "family": m.family, "video": m.fps.is_some()})
}

/// `GET /v1/models/{id}` (the `openai` client's `models.retrieve`).
pub(crate) async fn model(
    State(app): State<Arc<App>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let r = authorize(&app, &headers).and_then(|_| app.model(&id).map(model_object));
    let status = r.as_ref().map_or_else(|e| e.status.as_u16(), |_| 200);
    app.metrics.request("/v1/models/{id}", status);
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /health`: 200 once every model is loaded (they are before the server listens).
pub(crate) async fn health(State(app): State<Arc<App>>) -> Response {
    app.metrics.request("/health", 200);
    Json(json!({"status": "ok", "models": app.models.len()})).into_response()
}

/// `GET /metrics`.
pub(crate) async fn metrics(State(app): State<Arc<App>>) -> Response {
    let queue = app
        .models
        .iter()
        .map(|m| m.depth.load(Ordering::SeqCst))
        .sum();
    let text = app.metrics.text(queue);
    app.metrics.request("/metrics", 200);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// `GET /`: the page (served by the binary itself: no CDN, no build step).
pub(crate) async fn page(State(app): State<Arc<App>>) -> Response {
    app.metrics.request("/", 200);
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("page.html"),
    )
        .into_response()
}

/// Any other path.
pub(crate) async fn not_found(State(app): State<Arc<App>>) -> Response {
    app.metrics.request("(other)", 404);
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint").into_response()
}

/// A known path with a method it does not take (405; the router adds the `Allow` header).
pub(crate) async fn method_not_allowed(
    State(app): State<Arc<App>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> Response {
    app.metrics.request("(other)", 405);
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
    .into_response()
}
