//! `virtufin.WorkManager` over gRPC: each RPC validates its wire input,
//! calls the core `Manager`, and maps the result back. The REST mirror calls
//! these same methods.
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use workmanager_core::dispatch::LIFECYCLE_TOPIC;
use workmanager_core::{CodeInput, Manager, RequestContext};

use crate::convert::{
    code_input, engine_info, event_from_proto, event_into_proto, history_entry, worker_info,
};
use crate::correlation::CorrelationId;
use crate::error::status;
use crate::forward::{Forwarded, Forwarder};
use crate::pb;
use crate::pb::work_manager_server::WorkManager;

#[derive(Clone)]
pub struct WorkManagerService {
    manager: Manager,
    forwarder: Arc<Forwarder>,
}

impl WorkManagerService {
    pub fn new(manager: Manager, forwarder: Arc<Forwarder>) -> Self {
        Self { manager, forwarder }
    }

    pub fn manager(&self) -> &Manager {
        &self.manager
    }
}

/// The request context (correlation id; caller once authentication exists).
pub fn context<T>(req: &Request<T>) -> RequestContext {
    let mut ctx = match req.extensions().get::<CorrelationId>() {
        Some(c) => RequestContext::new(c.0.clone()),
        None => RequestContext::new(uuid::Uuid::new_v4().to_string()),
    };
    if let Some(c) = req.extensions().get::<crate::auth::Caller>() {
        ctx.caller = c.principal.name.clone();
        ctx.source = c.source.map(|s| s.to_string()).unwrap_or_default();
    }
    ctx
}

/// A worker-scoped RPC starts here: the owner's answer when the worker is
/// hosted by a live peer (returned at once), else the request to serve here.
macro_rules! owner_or_here {
    ($self:ident, $req:ident, $method:ident) => {
        match $self
            .forwarder
            .route(&$self.manager, $req, |mut c, r| async move {
                c.$method(r).await
            })
            .await?
        {
            Forwarded::Done(answer) => return Ok(answer),
            Forwarded::Here(r) => r,
        }
    };
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl WorkManager for WorkManagerService {
    async fn create_worker(
        &self,
        req: Request<pb::CreateWorkerRequest>,
    ) -> Result<Response<pb::CreateWorkerResponse>, Status> {
        let ctx = context(&req);
        let r = req.into_inner();
        let code = code_input(r.code_source)?;
        let created = self
            .manager
            .create(
                &ctx,
                workmanager_core::CreateWorker {
                    code,
                    mime_type: r.mime_type,
                    topics: r.topics,
                    config: r.config,
                    tags: r.tags,
                    start: r.start,
                    max_concurrency: r.max_concurrency,
                },
            )
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CreateWorkerResponse {
            id: created.record.id.to_string(),
        }))
    }

    async fn start_worker(
        &self,
        req: Request<pb::StartWorkerRequest>,
    ) -> Result<Response<pb::StartWorkerResponse>, Status> {
        let req = owner_or_here!(self, req, start_worker);
        let ctx = context(&req);
        let s = self
            .manager
            .start(&ctx, &req.get_ref().id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::StartWorkerResponse {
            worker: Some(worker_info(&s)),
        }))
    }

    async fn stop_worker(
        &self,
        req: Request<pb::StopWorkerRequest>,
    ) -> Result<Response<pb::StopWorkerResponse>, Status> {
        let req = owner_or_here!(self, req, stop_worker);
        let ctx = context(&req);
        let s = self
            .manager
            .stop(&ctx, &req.get_ref().id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::StopWorkerResponse {
            worker: Some(worker_info(&s)),
        }))
    }

    async fn load_code(
        &self,
        req: Request<pb::LoadCodeRequest>,
    ) -> Result<Response<pb::LoadCodeResponse>, Status> {
        let req = owner_or_here!(self, req, load_code);
        let ctx = context(&req);
        let r = req.into_inner();
        let code = code_input(r.code_source)?;
        self.load(&ctx, "LoadCode", &r.id, code).await
    }

    async fn load_code_from_content(
        &self,
        req: Request<pb::LoadCodeFromContentRequest>,
    ) -> Result<Response<pb::LoadCodeResponse>, Status> {
        let req = owner_or_here!(self, req, load_code_from_content);
        let ctx = context(&req);
        let r = req.into_inner();
        self.load(
            &ctx,
            "LoadCodeFromContent",
            &r.id,
            CodeInput::Content(r.content),
        )
        .await
    }

    async fn load_code_from_url(
        &self,
        req: Request<pb::LoadCodeFromUrlRequest>,
    ) -> Result<Response<pb::LoadCodeResponse>, Status> {
        let req = owner_or_here!(self, req, load_code_from_url);
        let ctx = context(&req);
        let r = req.into_inner();
        let code = CodeInput::Url {
            url: r.url,
            content_sha256: Some(r.content_sha256).filter(|s| !s.is_empty()),
            credential_name: None,
            raw_credential: None,
        };
        self.load(&ctx, "LoadCodeFromUrl", &r.id, code).await
    }

    async fn delete_worker(
        &self,
        req: Request<pb::DeleteWorkerRequest>,
    ) -> Result<Response<pb::DeleteWorkerResponse>, Status> {
        let req = owner_or_here!(self, req, delete_worker);
        let ctx = context(&req);
        self.manager
            .delete(&ctx, &req.get_ref().id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteWorkerResponse {}))
    }

    async fn list_workers(
        &self,
        req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let filters: Vec<(String, String)> = req
            .get_ref()
            .filters
            .iter()
            .map(|f| (f.key.clone(), f.value.clone()))
            .collect();
        // A peer asking for our own workers gets only those.
        if req.metadata().contains_key(crate::forward::FORWARDED_BY) {
            let workers = self
                .manager
                .list(&filters)
                .iter()
                .map(worker_info)
                .collect();
            return Ok(Response::new(pb::ListWorkersResponse { workers }));
        }
        let mut workers: Vec<pb::WorkerInfo> = self
            .manager
            .list_all(&filters)
            .await
            .map_err(status)?
            .iter()
            .map(worker_info)
            .collect();
        // Workers hosted elsewhere: their owners' live view (counters).
        let me = self.manager.instance_id();
        if workers.iter().any(|w| w.instance_id != me) {
            let peers = self.manager.live_peers().await.map_err(status)?;
            let ctx = context(&req);
            let live: std::collections::HashMap<String, pb::WorkerInfo> = self
                .forwarder
                .peer_lists(&req, &ctx.correlation_id, peers)
                .await
                .into_iter()
                .map(|w| (w.id.clone(), w))
                .collect();
            for w in workers.iter_mut() {
                if w.instance_id != me {
                    if let Some(l) = live.get(&w.id) {
                        *w = l.clone();
                    }
                }
            }
        }
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn get_worker_history(
        &self,
        req: Request<pb::GetWorkerHistoryRequest>,
    ) -> Result<Response<pb::GetWorkerHistoryResponse>, Status> {
        let req = owner_or_here!(self, req, get_worker_history);
        let entries = self.manager.history(&req.get_ref().id).map_err(status)?;
        Ok(Response::new(pb::GetWorkerHistoryResponse {
            entries: entries.into_iter().map(history_entry).collect(),
        }))
    }

    async fn recover_workers(
        &self,
        req: Request<pb::RecoverWorkersRequest>,
    ) -> Result<Response<pb::RecoverWorkersResponse>, Status> {
        let ctx = context(&req);
        let n = self.manager.recover(&ctx).await.map_err(status)?;
        Ok(Response::new(pb::RecoverWorkersResponse {
            recovered_count: i32::try_from(n).unwrap_or(i32::MAX),
        }))
    }

    async fn set_tag(
        &self,
        req: Request<pb::SetTagRequest>,
    ) -> Result<Response<pb::SetTagResponse>, Status> {
        let req = owner_or_here!(self, req, set_tag);
        let ctx = context(&req);
        let r = req.into_inner();
        let tags = [(r.key, r.value)].into_iter().collect();
        self.manager
            .set_tags(&ctx, "SetTag", &r.id, tags)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SetTagResponse {}))
    }

    async fn set_tags(
        &self,
        req: Request<pb::SetTagsRequest>,
    ) -> Result<Response<pb::SetTagsResponse>, Status> {
        let req = owner_or_here!(self, req, set_tags);
        let ctx = context(&req);
        let r = req.into_inner();
        self.manager
            .set_tags(&ctx, "SetTags", &r.id, r.tags)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SetTagsResponse {}))
    }

    async fn get_tag(
        &self,
        req: Request<pb::GetTagRequest>,
    ) -> Result<Response<pb::GetTagResponse>, Status> {
        let req = owner_or_here!(self, req, get_tag);
        let r = req.get_ref();
        let value = self.manager.get_tag(&r.id, &r.key).map_err(status)?;
        Ok(Response::new(pb::GetTagResponse { value }))
    }

    async fn get_tags(
        &self,
        req: Request<pb::GetTagsRequest>,
    ) -> Result<Response<pb::GetTagsResponse>, Status> {
        let req = owner_or_here!(self, req, get_tags);
        let tags = self.manager.get_tags(&req.get_ref().id).map_err(status)?;
        Ok(Response::new(pb::GetTagsResponse { tags }))
    }

    async fn get_worker(
        &self,
        req: Request<pb::GetWorkerRequest>,
    ) -> Result<Response<pb::WorkerInfo>, Status> {
        let req = owner_or_here!(self, req, get_worker);
        let s = self.manager.get(&req.get_ref().id).map_err(status)?;
        Ok(Response::new(worker_info(&s)))
    }

    async fn list_engines(
        &self,
        _req: Request<pb::ListEnginesRequest>,
    ) -> Result<Response<pb::ListEnginesResponse>, Status> {
        let engines = self
            .manager
            .engines()
            .into_iter()
            .map(engine_info)
            .collect();
        Ok(Response::new(pb::ListEnginesResponse { engines }))
    }

    async fn invoke_worker(
        &self,
        req: Request<pb::InvokeWorkerRequest>,
    ) -> Result<Response<pb::InvokeWorkerResponse>, Status> {
        let req = owner_or_here!(self, req, invoke_worker);
        let r = req.into_inner();
        let event = r.event.ok_or_else(|| {
            Status::invalid_argument(
                "event is missing; send the CloudEvent to run through the worker",
            )
        })?;
        let event = event_from_proto(event)?;
        let out = self.invoke(&r.id, event, r.publish).await?;
        Ok(Response::new(pb::InvokeWorkerResponse {
            event: out.map(event_into_proto),
        }))
    }

    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let r = req.into_inner();
        let event = r.event.ok_or_else(|| {
            Status::invalid_argument("event is missing; send the CloudEvent to publish")
        })?;
        let event = event_from_proto(event)?;
        self.manager
            .publish(&r.topic, event)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PublishResponse {}))
    }

    type SubscribeStream = EventStream<pb::CloudEventMessage>;

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let topic = req.into_inner().topic;
        let rx = self.manager.watch(&topic).map_err(status)?;
        let stream = BroadcastStream::new(rx).filter_map(move |item| match item {
            Ok(e) => Some(Ok(pb::CloudEventMessage { topic: topic.clone(), event: Some(event_into_proto(Arc::unwrap_or_clone(e))) })),
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                tracing::warn!(topic = %topic, skipped = n, "a subscriber fell behind; events skipped");
                None
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type WatchWorkersStream = EventStream<pb::WorkerEvent>;

    async fn watch_workers(
        &self,
        req: Request<pb::WatchWorkersRequest>,
    ) -> Result<Response<Self::WatchWorkersStream>, Status> {
        let only = req.into_inner().worker_id;
        let rx = self.manager.watch(LIFECYCLE_TOPIC).map_err(status)?;
        let stream = BroadcastStream::new(rx).filter_map(move |item| {
            let e = item.ok()?;
            let worker_id = e.0.get("data")?.get("worker_id")?.as_str()?.to_string();
            if !only.is_empty() && only != worker_id {
                return None;
            }
            let kind = e.get_str("type")?.rsplit('.').next()?.to_string();
            Some(Ok(pb::WorkerEvent {
                worker_id,
                kind,
                event: Some(event_into_proto(Arc::unwrap_or_clone(e))),
            }))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

impl WorkManagerService {
    async fn load(
        &self,
        ctx: &RequestContext,
        operation: &str,
        id: &str,
        code: CodeInput,
    ) -> Result<Response<pb::LoadCodeResponse>, Status> {
        let s = self
            .manager
            .load_code(ctx, operation, id, code)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::LoadCodeResponse {
            worker: Some(worker_info(&s)),
        }))
    }

    /// InvokeWorker for both APIs, on the JSON form of the event. With
    /// `publish`, the output is also routed and published as the message
    /// path would.
    pub async fn invoke(
        &self,
        id: &str,
        event: workmanager_core::CloudEvent,
        publish: bool,
    ) -> Result<Option<workmanager_core::CloudEvent>, Status> {
        let out = self
            .manager
            .invoke(id, event.clone())
            .await
            .map_err(status)?;
        if let (true, Some(o)) = (publish, &out) {
            self.manager
                .publish_output(&event, o)
                .await
                .map_err(status)?;
        }
        Ok(out)
    }
}
