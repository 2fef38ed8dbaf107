//! The OpenAPI 3 document of the REST API, served at `/openapi.json`.
use serde_json::{json, Value};

fn op(summary: &str, tag: &str, body: Option<&str>, ok: &str) -> Value {
    let mut o = json!({
        "summary": summary,
        "tags": [tag],
        "responses": {
            ok: {"description": "success", "content": {"application/json": {"schema": {"type": "object"}}}},
            "default": {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        }
    });
    if let Some(schema) = body {
        o["requestBody"] = json!({
            "required": true,
            "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
        });
    }
    o
}

fn id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}})
}

fn with_params(mut v: Value, params: Vec<Value>) -> Value {
    if let Some(obj) = v.as_object_mut() {
        obj.insert("parameters".into(), Value::Array(params));
    }
    v
}

pub fn document() -> Value {
    let id = || vec![id_param()];
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "WorkManager",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Hosts user functions as workers. JSON follows the proto3 JSON mapping of \
                            virtufin.WorkManager (lowerCamelCase, bytes as base64). Errors are \
                            {code, message, correlationId}; send x-correlation-id to set the id."
        },
        "paths": {
            "/health": {"get": op("Overall health with checks recovery, statestore, pubsub, circuit", "health", None, "200")},
            "/health/live": {"get": op("The process is up", "health", None, "200")},
            "/health/ready": {"get": op("503 until recovery is done and backends are reachable", "health", None, "200")},
            "/metrics": {"get": {"summary": "Prometheus/OpenMetrics text", "tags": ["health"], "responses": {"200": {"description": "metrics"}}}},
            "/v1/workers": {
                "post": op("Create a worker", "workers", Some("CreateWorkerRequest"), "201"),
                "get": with_params(op("List workers; every ?tag=key=value filter must match", "workers", None, "200"),
                    vec![json!({"name": "tag", "in": "query", "required": false, "explode": true,
                                "schema": {"type": "array", "items": {"type": "string"}}})])
            },
            "/v1/workers/{id}": {
                "get": with_params(op("Get a worker", "workers", None, "200"), id()),
                "delete": with_params(op("Delete a worker (any status)", "workers", None, "200"), id())
            },
            "/v1/workers/{id}/start": {"post": with_params(op("Start (idempotent; retries a FAILED worker)", "workers", None, "200"), id())},
            "/v1/workers/{id}/stop": {"post": with_params(op("Stop (idempotent)", "workers", None, "200"), id())},
            "/v1/workers/{id}/invoke": {"post": with_params(op("Run one CloudEvent through the worker and return its output", "workers", Some("InvokeRequest"), "200"), id())},
            "/v1/workers/{id}/code": {"put": with_params(op("Hot-reload the worker's code", "workers", Some("LoadCodeRequest"), "200"), id())},
            "/v1/workers/{id}/history": {"get": with_params(op("Code load history, oldest first", "workers", None, "200"), id())},
            "/v1/workers/{id}/tags": {
                "get": with_params(op("All tags", "tags", None, "200"), id()),
                "put": with_params(op("Merge tags", "tags", Some("SetTagsRequest"), "200"), id())
            },
            "/v1/workers/{id}/tags/{key}": {
                "get": with_params(op("One tag (404 when missing)", "tags", None, "200"),
                    vec![id_param(), json!({"name": "key", "in": "path", "required": true, "schema": {"type": "string"}})]),
                "put": with_params(op("Set one tag", "tags", Some("SetTagRequest"), "200"),
                    vec![id_param(), json!({"name": "key", "in": "path", "required": true, "schema": {"type": "string"}})])
            },
            "/v1/recover": {"post": op("Recover persisted workers not hosted yet", "workers", None, "200")},
            "/v1/engines": {"get": op("Engines by MIME type", "engines", None, "200")},
            "/v1/topics/{topic}": {"post": with_params(
                op("Publish CloudEvents: structured (application/cloudevents+json), batch \
                    (application/cloudevents-batch+json) or binary mode (ce-* headers); 413 over \
                    Messaging:MaxEventBytes, 503 with Retry-After under backpressure", "topics", None, "202"),
                vec![json!({"name": "topic", "in": "path", "required": true, "schema": {"type": "string"}})])},
            "/v1/topics/{topic}/events": {"get": with_params(
                json!({"summary": "The topic's events as Server-Sent Events (event: cloudevent)", "tags": ["topics"],
                       "responses": {"200": {"description": "text/event-stream"}}}),
                vec![json!({"name": "topic", "in": "path", "required": true, "schema": {"type": "string"}})])}
        },
        "components": {"schemas": {
            "Error": {"type": "object", "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}, "correlationId": {"type": "string"}}},
            "CodeSource": {"type": "object", "properties": {
                "content": {"type": "string", "format": "byte"}, "url": {"type": "string"},
                "contentSha256": {"type": "string"}}},
            "CreateWorkerRequest": {"type": "object", "required": ["codeSource", "mimeType", "topics"], "properties": {
                "codeSource": {"$ref": "#/components/schemas/CodeSource"},
                "mimeType": {"type": "string", "example": "text/x-python"},
                "topics": {"type": "array", "items": {"type": "string"}},
                "config": {"type": "object", "additionalProperties": {"type": "string"}},
                "tags": {"type": "object", "additionalProperties": {"type": "string"}},
                "start": {"type": "boolean"},
                "maxConcurrency": {"type": "integer", "minimum": 0, "maximum": 64}}},
            "LoadCodeRequest": {"type": "object", "required": ["codeSource"], "properties": {
                "codeSource": {"$ref": "#/components/schemas/CodeSource"}}},
            "SetTagsRequest": {"type": "object", "properties": {
                "tags": {"type": "object", "additionalProperties": {"type": "string"}}}},
            "SetTagRequest": {"type": "object", "required": ["value"], "properties": {"value": {"type": "string"}}},
            "InvokeRequest": {"type": "object", "required": ["event"], "properties": {
                "event": {"type": "object", "description": "A CloudEvent in the CloudEvents JSON format"},
                "publish": {"type": "boolean"}}}
        }}
    })
}
