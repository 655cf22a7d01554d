//! Errors in OpenAI's shape, a run's error as a request's, and the API key's check.

use super::App;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use magcache_core::Error;
use serde_json::json;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }
    /// The model's queue is full (429, `Retry-After`).
    pub fn busy(model: &str) -> Self {
        ApiError {
            code: Some("queue_full"),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("model `{model}`: the queue is full; retry later"),
            )
        }
    }
    /// A body that is not JSON (or not an object): 400 with no `param`.
    pub fn body(e: &serde_json::Error) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    }
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400 | 405 | 413 | 422 => "invalid_request_error",
            _ => "server_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message.replace('\n', " "),
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }});
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// A run's error as a request's: the request field behind the run file key it names.
pub(crate) fn from_run(e: Error) -> ApiError {
    let (key, msg) = match &e {
        // The guard's refusal: the request's own knob is the size (the message says what else).
        Error::TooLarge { key, msg, .. } => return ApiError::bad("size", format!("{key}: {msg}")),
        Error::Config { key, msg, .. } => (key.clone(), msg.clone()),
        Error::Cancelled => {
            return ApiError {
                code: Some("cancelled"),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the request was cancelled")
            }
        }
        _ => {
            // A strategy's check of its keys against the model names the key in its text.
            let msg = e.to_string();
            if crate::prepare::names_cache_key(&msg) {
                return ApiError::bad("cache", msg);
            }
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg);
        }
    };
    let param = if key.starts_with("cache") {
        "cache"
    } else if key.starts_with("sampling.steps") {
        "num_inference_steps"
    } else if key.starts_with("sampling.guidance") {
        "guidance_scale"
    } else if key.starts_with("inputs.height") || key.starts_with("inputs.width") {
        "size"
    } else if key == "prompt.negative" {
        "negative_prompt"
    } else if key.starts_with("prompt") {
        "prompt"
    } else if key.starts_with("inputs.seed") || key == "seed" {
        "seed"
    } else if key.starts_with("inputs.num_frames") {
        "num_frames"
    } else if key.starts_with("inputs.image") {
        "input_reference"
    } else {
        return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    };
    // The key is the request's (laid over the run file, which was checked at start): said without
    // the run file's path and the line of the merged text, which would point into the user's file.
    ApiError::bad(param, format!("{key}: {msg}"))
}

/// Checks the `Authorization: Bearer KEY` header when the server has a key.
pub(crate) fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.api_key else {
        return Ok(());
    };
    // The scheme is case-insensitive (RFC 9110, 11.1).
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let mut words = v.split_ascii_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some(scheme), Some(token), None) if scheme.eq_ignore_ascii_case("bearer") => {
                    Some(token)
                }
                _ => None,
            }
        });
    match given {
        Some(g) if same_key(g.as_bytes(), key.as_bytes()) => Ok(()),
        _ => Err(ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (Authorization: Bearer KEY)",
            )
        }),
    }
}

/// Whether a given key is the server's, in time that depends on the length only (not on where
/// the first differing byte is).
fn same_key(given: &[u8], key: &[u8]) -> bool {
    given.len() == key.len() && given.iter().zip(key).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}
