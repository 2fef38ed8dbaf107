//! The single mapping of core errors onto gRPC status codes, and of gRPC
//! codes onto HTTP statuses and the JSON error body.
use axum::response::{IntoResponse, Response};
use tonic::{Code, Status};
use workmanager_core::CoreError;

/// Core error → gRPC status. Internal details are logged, not returned.
pub fn status(e: CoreError) -> Status {
    match e {
        CoreError::NotFound(m) => Status::not_found(m),
        CoreError::InvalidArgument(m) => Status::invalid_argument(m),
        CoreError::FailedPrecondition(m) => Status::failed_precondition(m),
        CoreError::Unavailable(m) => Status::unavailable(m),
        // The worker's own code failed: an error from another "address space".
        CoreError::WorkerError(m) => Status::unknown(m),
        CoreError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
        CoreError::Internal(m) => {
            tracing::error!(error = %m, "internal error");
            Status::internal("internal error; the service log has the details under this request's correlation id")
        }
    }
}

pub fn http_status(code: Code) -> http::StatusCode {
    use http::StatusCode as S;
    match code {
        Code::Ok => S::OK,
        Code::InvalidArgument | Code::OutOfRange => S::BAD_REQUEST,
        Code::NotFound => S::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => S::CONFLICT,
        Code::Unauthenticated => S::UNAUTHORIZED,
        Code::PermissionDenied => S::FORBIDDEN,
        Code::ResourceExhausted => S::TOO_MANY_REQUESTS,
        Code::Unimplemented => S::NOT_IMPLEMENTED,
        Code::Unavailable => S::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => S::GATEWAY_TIMEOUT,
        Code::Unknown => S::UNPROCESSABLE_ENTITY,
        Code::Cancelled | Code::Internal | Code::DataLoss => S::INTERNAL_SERVER_ERROR,
    }
}

/// `SCREAMING_SNAKE` name of a gRPC code, used as the JSON `code`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An error of the REST API: `{"code","message","correlationId"}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: http::StatusCode,
    pub code: &'static str,
    pub message: String,
    pub correlation_id: String,
}

impl ApiError {
    pub fn from_status(s: &Status, correlation_id: &str) -> Self {
        Self {
            status: http_status(s.code()),
            code: code_name(s.code()),
            message: s.message().to_string(),
            correlation_id: correlation_id.to_string(),
        }
    }

    /// A core error, mapped like gRPC would map it.
    pub fn from_core(e: CoreError, correlation_id: &str) -> Self {
        Self::from_status(&status(e), correlation_id)
    }

    pub fn bad_request(message: impl Into<String>, correlation_id: &str) -> Self {
        Self {
            status: http::StatusCode::BAD_REQUEST,
            code: "INVALID_ARGUMENT",
            message: message.into(),
            correlation_id: correlation_id.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "code": self.code,
            "message": self.message,
            "correlationId": self.correlation_id,
        });
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.status == http::StatusCode::SERVICE_UNAVAILABLE {
            // Backpressure and unavailable backends are worth a retry.
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("1"),
            );
        }
        resp
    }
}
