//! API errors and how they become JSON HTTP responses, in one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::cluster::ClusterError;
use crate::functions::FunctionError;
use crate::runtime::{InvokeError, RuntimeError};
use crate::state::{InvalidName, Rejection};

/// An error answered as `{"error": CODE, "message": ..., "log": ...}` with a status.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
    /// The tail of the guest's log, when a guest failed.
    pub log: Option<String>,
}

impl ApiError {
    /// An error with no log.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            log: None,
        }
    }

    /// 400 with code `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// Adds the guest's log.
    pub fn with_log(mut self, log: Option<String>) -> ApiError {
        self.log = log;
        self
    }
}

/// Marks a response the gateway made from an [`ApiError`] (a response extension, so a
/// guest's own error responses never carry it): the public API tells the two apart.
#[derive(Debug, Clone)]
pub struct ApiErrorInfo {
    /// The error's code.
    pub code: &'static str,
    /// Its message.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let info = ApiErrorInfo {
            code: self.code,
            message: self.message.clone(),
        };
        let mut body = serde_json::json!({ "error": self.code, "message": self.message });
        if let Some(log) = self.log {
            body["log"] = serde_json::Value::String(log);
        }
        let mut response = (self.status, Json(body)).into_response();
        // Running out of instances and a cluster between leaders pass: say when to retry.
        if matches!(self.code, "busy" | "unavailable") {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response.extensions_mut().insert(info);
        response
    }
}

impl From<InvalidName> for ApiError {
    fn from(err: InvalidName) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_name", err.to_string())
    }
}

impl From<FunctionError> for ApiError {
    fn from(err: FunctionError) -> ApiError {
        let message = err.to_string();
        let (status, code) = match &err {
            FunctionError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            FunctionError::Rejected(RuntimeError::Malformed(_)) => {
                (StatusCode::BAD_REQUEST, "malformed_wasm")
            }
            FunctionError::Rejected(RuntimeError::ForbiddenImport { .. }) => {
                (StatusCode::BAD_REQUEST, "forbidden_import")
            }
            FunctionError::Rejected(RuntimeError::Unsupported(_)) => {
                (StatusCode::BAD_REQUEST, "unsupported_module")
            }
            FunctionError::Rejected(RuntimeError::NotACommand)
            | FunctionError::Rejected(RuntimeError::StartSignature(_)) => {
                (StatusCode::BAD_REQUEST, "not_a_command")
            }
            FunctionError::Rejected(RuntimeError::InitialMemoryTooLarge { .. })
            | FunctionError::Rejected(RuntimeError::MemoryLimitTooHigh { .. })
            | FunctionError::InvalidLimit(_) => (StatusCode::BAD_REQUEST, "invalid_limit"),
            FunctionError::Rejected(RuntimeError::Link(_)) => {
                (StatusCode::BAD_REQUEST, "link_error")
            }
            FunctionError::InvalidEnv { .. } => (StatusCode::BAD_REQUEST, "invalid_env"),
            FunctionError::ModuleTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            FunctionError::Invoke(InvokeError::Busy(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "busy")
            }
            FunctionError::NoDevice(_) => (StatusCode::SERVICE_UNAVAILABLE, "no_device"),
            FunctionError::Rejected(RuntimeError::Engine(_))
            | FunctionError::Invoke(InvokeError::Instantiate(_))
            | FunctionError::State(_) => {
                tracing::error!(error = %message, "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, message)
    }
}

impl From<ClusterError> for ApiError {
    fn from(err: ClusterError) -> ApiError {
        let message = err.to_string();
        let (status, code) = match &err {
            ClusterError::Rejected(_) => (StatusCode::CONFLICT, "rejected"),
            ClusterError::NotLeader { .. } | ClusterError::Unavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
        };
        ApiError::new(status, code, message)
    }
}

impl From<Rejection> for ApiError {
    fn from(err: Rejection) -> ApiError {
        let message = err.to_string();
        let (status, code) = match &err {
            Rejection::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Rejection::UnknownVersion { .. } => (StatusCode::NOT_FOUND, "unknown_version"),
            Rejection::AlreadyCurrent { .. } => (StatusCode::CONFLICT, "already_current"),
            Rejection::UnknownToken(_) => (StatusCode::NOT_FOUND, "unknown_token"),
            Rejection::InvalidToken(_) => (StatusCode::BAD_REQUEST, "invalid"),
            Rejection::ModuleTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            Rejection::InvalidLabel(_) => (StatusCode::BAD_REQUEST, "invalid_label"),
            Rejection::InvalidAttribute(_) | Rejection::InvalidWeight(_) => {
                (StatusCode::BAD_REQUEST, "invalid")
            }
            Rejection::UnknownAgent(_)
            | Rejection::UnknownFramework(_)
            | Rejection::UnknownAllocation(_)
            | Rejection::UnknownJob(_) => (StatusCode::NOT_FOUND, "not_found"),
            Rejection::JobInputTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            Rejection::InvalidJob(_) => (StatusCode::BAD_REQUEST, "invalid"),
            Rejection::JobNotPlaceable { .. }
            | Rejection::JobEnded { .. }
            | Rejection::ConstraintMismatch { .. }
            | Rejection::StaleUpdate { .. } => (StatusCode::CONFLICT, "rejected"),
            Rejection::NothingToAllocate => (StatusCode::BAD_REQUEST, "invalid"),
            Rejection::AgentUnreachable(_)
            | Rejection::InsufficientResources { .. }
            | Rejection::QuotaExceeded { .. }
            | Rejection::CapacityBelowAllocated { .. } => (StatusCode::CONFLICT, "rejected"),
        };
        ApiError::new(status, code, message)
    }
}
