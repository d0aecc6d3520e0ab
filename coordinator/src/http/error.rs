//! Errors of the HTTP API, in OpenAI's JSON shape with the status a client expects.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::request::GenerateError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("The model `{0}` does not exist")]
    ModelNotFound(String),
    #[error(
        "This model's maximum context length is {context} tokens. However, you requested {requested} tokens ({prompt} in the prompt, {max_tokens} for the completion). Please reduce the prompt or max_tokens."
    )]
    ContextLength {
        context: usize,
        requested: usize,
        prompt: usize,
        max_tokens: usize,
    },
    #[error("{0}")]
    TooLarge(String),
    #[error("The prompt is {tokens} tokens long; this server accepts at most {limit}.")]
    PromptTooLong { tokens: usize, limit: usize },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Timeout(String),
    /// The client did not send its request body in time (`--body-timeout-s`).
    #[error("{0}")]
    BodyTimeout(String),
    #[error("{0}")]
    QueueFull(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    #[error("Not found")]
    NotFound,
    #[error("Method not allowed")]
    MethodNotAllowed,
}

impl ApiError {
    pub fn bad(message: impl Into<String>, param: &'static str) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: Some(param),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::ContextLength { .. }
            | ApiError::TooLarge(_)
            | ApiError::PromptTooLong { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> (&'static str, Option<&'static str>) {
        match self {
            ApiError::BadRequest { .. } => ("invalid_request_error", None),
            ApiError::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            ApiError::ContextLength { .. } => {
                ("invalid_request_error", Some("context_length_exceeded"))
            }
            ApiError::TooLarge(_) => ("invalid_request_error", Some("request_too_large")),
            ApiError::PromptTooLong { .. } => ("invalid_request_error", Some("prompt_too_long")),
            // What OpenAI answers for a missing or wrong key.
            ApiError::Unauthorized(_) => ("invalid_request_error", Some("invalid_api_key")),
            ApiError::Timeout(_) => ("timeout_error", Some("request_timeout")),
            ApiError::BodyTimeout(_) => ("invalid_request_error", Some("request_body_timeout")),
            ApiError::QueueFull(_) => ("rate_limit_error", Some("queue_full")),
            ApiError::Unavailable(_) => ("service_unavailable_error", Some("experts_unavailable")),
            ApiError::Internal(_) => ("internal_error", None),
            ApiError::NotFound => ("invalid_request_error", Some("not_found")),
            ApiError::MethodNotAllowed => ("invalid_request_error", Some("method_not_allowed")),
        }
    }

    /// The `{"error": {...}}` body, also sent as an SSE event when a stream fails.
    pub fn body(&self) -> serde_json::Value {
        let (kind, code) = self.kind();
        let param = match self {
            ApiError::BadRequest { param, .. } => *param,
            ApiError::ModelNotFound(_) => Some("model"),
            ApiError::ContextLength { .. } => Some("max_tokens"),
            ApiError::PromptTooLong { .. } => Some("prompt"),
            _ => None,
        };
        json!({
            "error": {
                "message": self.to_string(),
                "type": kind,
                "param": param,
                "code": code,
            }
        })
    }
}

impl From<GenerateError> for ApiError {
    fn from(e: GenerateError) -> Self {
        match e {
            GenerateError::QueueFull(_) => ApiError::QueueFull(e.to_string()),
            GenerateError::TooLargeForCache { .. } => ApiError::TooLarge(e.to_string()),
            GenerateError::ExpertsUnavailable(_) => ApiError::Unavailable(e.to_string()),
            GenerateError::ShuttingDown => ApiError::Unavailable(e.to_string()),
            GenerateError::Internal(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if matches!(self, ApiError::QueueFull(_)) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, ApiError::Unauthorized(_)) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
