//! The seed's fire-and-forget rule: a failing log sink never crashes the
//! service or fails a request.
use serde_json::json;
use workmanager_api::pb;

use crate::common::*;

#[tokio::test]
async fn a_closed_log_sink_never_fails_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut svc = Service::start_with(dir.path(), &["Logging:LogLevel:Default=Trace"], true);
    svc.wait_ready().await;
    let mut c = svc.grpc().await;
    let id = create(
        &mut c,
        "def Process(event):\n    print('chatty worker ' * 100)\n    return {'type': 'out', 'data': event['data']}\n",
        true,
    )
    .await;
    for i in 0..200 {
        assert_eq!(
            invoke(&mut c, &id, json!(i)).await.unwrap()["data"],
            json!(i)
        );
    }
    c.stop_worker(pb::StopWorkerRequest { id: id.clone() })
        .await
        .unwrap();
    c.delete_worker(pb::DeleteWorkerRequest { id })
        .await
        .unwrap();
    let health = reqwest::get(svc.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(
        svc.terminate().success(),
        "the service should still shut down cleanly"
    );
}
