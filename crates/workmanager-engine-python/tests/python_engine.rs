//! The Python engine against a real interpreter: loading, the Process
//! contract, errors, timeouts, crashes, restarts and crash loops.
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use workmanager_core::{
    CloudEvent, Engine, EngineError, LoadSpec, LoadedWorker, Metrics, WorkerId,
};
use workmanager_engine_python::{resolve_interpreter, PythonConfig, PythonEngine};

async fn engine_with(f: impl FnOnce(&mut PythonConfig)) -> PythonEngine {
    let interpreter = resolve_interpreter("python3")
        .await
        .expect("python3 must be installed for these tests");
    let mut cfg = PythonConfig::new(interpreter);
    f(&mut cfg);
    PythonEngine::new(cfg, Arc::new(Metrics::new())).expect("engine")
}

async fn load(engine: &PythonEngine, code: &str) -> Result<Arc<dyn LoadedWorker>, EngineError> {
    engine
        .load(LoadSpec {
            worker_id: WorkerId::new(),
            code: code.as_bytes().into(),
            max_concurrency: 1,
        })
        .await
}

fn event(data: Value) -> CloudEvent {
    CloudEvent::from_input(
        json!({"specversion":"1.0","id":"e1","source":"test","type":"t","data":data}),
    )
}

#[tokio::test]
async fn process_sees_the_event_and_globals_persist() {
    let e = engine_with(|_| {}).await;
    let w = load(
        &e,
        "count = 0\ndef Process(event):\n    global count\n    count += 1\n    print('hello from the worker')\n    \
         return {'type': 'out', 'data': {'n': count, 'x': event['data']['x'] * 2, 'src': event['source']}}\n",
    )
    .await
    .unwrap();
    for i in 1..=50 {
        let out = w.process(&event(json!({"x": i}))).await.unwrap().unwrap();
        assert_eq!(out["data"], json!({"n": i, "x": i * 2, "src": "test"}));
    }
}

#[tokio::test]
async fn none_means_no_output() {
    let e = engine_with(|_| {}).await;
    let w = load(&e, "def Process(event):\n    return None\n")
        .await
        .unwrap();
    assert_eq!(w.process(&event(json!(1))).await.unwrap(), None);
}

#[tokio::test]
async fn load_errors_carry_the_python_error() {
    let e = engine_with(|_| {}).await;
    let err = load(&e, "def Process(event)\n    return 1\n")
        .await
        .err()
        .unwrap();
    let EngineError::Load(msg) = err else {
        panic!("{err:?}")
    };
    assert!(msg.contains("SyntaxError"), "{msg}");
    assert!(msg.contains("line 1"), "{msg}");

    let err = load(&e, "def process(event):\n    return None\n")
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("Process(event)"), "{err}");

    let err = load(&e, "x = 1 / 0\ndef Process(e): pass\n")
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("ZeroDivisionError"), "{err}");
}

#[tokio::test]
async fn exceptions_and_bad_results_are_errors_and_the_child_survives() {
    let e = engine_with(|_| {}).await;
    let w = load(
        &e,
        "def Process(event):\n    k = event['data']\n    if k == 'raise': raise ValueError('bad price')\n    \
         if k == 'list': return [1]\n    if k == 'set': return {'type': 't', 'data': {1, 2}}\n    \
         return {'type': 'ok', 'data': k}\n",
    )
    .await
    .unwrap();
    match w.process(&event(json!("raise"))).await {
        Err(EngineError::Processing {
            error_type,
            message,
            traceback,
        }) => {
            assert_eq!(error_type, "ValueError");
            assert_eq!(message, "bad price");
            assert!(traceback.contains("<worker>"), "{traceback}");
        }
        other => panic!("{other:?}"),
    }
    let err = w.process(&event(json!("list"))).await.unwrap_err();
    assert!(
        matches!(&err, EngineError::BadOutput(m) if m.contains("a list")),
        "{err:?}"
    );
    let err = w.process(&event(json!("set"))).await.unwrap_err();
    assert!(
        matches!(&err, EngineError::BadOutput(m) if m.contains("JSON")),
        "{err:?}"
    );
    let out = w.process(&event(json!("fine"))).await.unwrap().unwrap();
    assert_eq!(out["data"], json!("fine"));
}

#[tokio::test]
async fn a_timeout_kills_the_child_and_the_next_message_restarts_it() {
    let e = engine_with(|c| c.execution_timeout = Duration::from_millis(700)).await;
    let w = load(
        &e,
        "calls = 0\ndef Process(event):\n    global calls\n    calls += 1\n    \
         if event['data'] == 'spin':\n        while True: pass\n    return {'type': 't', 'data': calls}\n",
    )
    .await
    .unwrap();
    assert_eq!(
        w.process(&event(json!("a"))).await.unwrap().unwrap()["data"],
        json!(1)
    );
    assert!(matches!(
        w.process(&event(json!("spin"))).await,
        Err(EngineError::Timeout(_))
    ));
    // A fresh process: module globals start again.
    assert_eq!(
        w.process(&event(json!("b"))).await.unwrap().unwrap()["data"],
        json!(1)
    );
}

#[tokio::test]
async fn a_crash_restarts_and_a_crash_loop_fails_the_worker() {
    let e = engine_with(|c| c.crash_loop_threshold = 3).await;
    let w = load(&e, "def Process(event):\n    if event['data'] == 'exit': raise SystemExit(3)\n    return {'type': 't', 'data': 'ok'}\n")
        .await
        .unwrap();
    let err = w.process(&event(json!("exit"))).await.unwrap_err();
    assert!(
        matches!(&err, EngineError::Crashed(m) if m.contains("exit")),
        "{err:?}"
    );
    assert_eq!(
        w.process(&event(json!("x"))).await.unwrap().unwrap()["data"],
        json!("ok")
    );
    let _ = w.process(&event(json!("exit"))).await;
    let err = w.process(&event(json!("exit"))).await.unwrap_err();
    assert!(matches!(err, EngineError::Failed(_)), "{err:?}");
    assert!(matches!(
        w.process(&event(json!("x"))).await,
        Err(EngineError::Failed(_))
    ));
}

#[tokio::test]
async fn print_does_not_corrupt_the_channel() {
    // The block list (which refuses `sys`) is bypassable by design; the
    // protocol must hold even for code that reaches the real streams.
    let e = engine_with(|c| c.blocked_modules.clear()).await;
    let w = load(
        &e,
        "import sys\ndef Process(event):\n    print('{\"op\":\"result\",\"id\":999,\"event\":null}')\n    \
         sys.stdout.write('noise\\n')\n    sys.__stdout__.write('more noise\\n')\n    return {'type': 't', 'data': 1}\n",
    )
    .await
    .unwrap();
    for _ in 0..5 {
        assert_eq!(
            w.process(&event(json!(0))).await.unwrap().unwrap()["data"],
            json!(1)
        );
    }
}

#[tokio::test]
async fn oversized_results_are_refused() {
    let e = engine_with(|c| c.max_result_bytes = 10_000).await;
    let w = load(
        &e,
        "def Process(event):\n    return {'type': 't', 'data': 'x' * event['data']}\n",
    )
    .await
    .unwrap();
    assert!(matches!(
        w.process(&event(json!(20_000))).await,
        Err(EngineError::BadOutput(_))
    ));
    assert_eq!(
        w.process(&event(json!(3))).await.unwrap().unwrap()["data"],
        json!("xxx")
    );
}

#[tokio::test]
async fn installed_packages_import_without_the_site_module() {
    let e = engine_with(|c| {
        c.blocked_modules.clear();
        c.allowed_packages = vec!["pip".into()];
    })
    .await;
    // pip lives in site-packages of every CPython install with pip; children
    // run with -S, so it is importable only through the paths the host passes.
    let w = load(
        &e,
        "import sys, pip\ndef Process(event):\n    return {'type': 't', 'data': ['site' in sys.modules, pip.__name__]}\n",
    )
    .await
    .unwrap();
    assert_eq!(
        w.process(&event(json!(0))).await.unwrap().unwrap()["data"],
        json!([false, "pip"])
    );
}

#[tokio::test]
async fn strict_mode_refuses_workers_when_a_layer_is_missing() {
    // No launcher binary here, so no OS layer can apply.
    let e = engine_with(|c| c.sandbox = workmanager_engine_python::SandboxMode::Strict).await;
    let applied = e.probe().await.unwrap();
    assert!(!applied.missing().is_empty());
    let err = load(&e, "def Process(event):\n    return None\n")
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, EngineError::Internal(m) if m.contains("strict")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_batch_runs_in_order_and_stops_at_the_first_failure() {
    let e = engine_with(|_| {}).await;
    let w = load(
        &e,
        "seen = []\ndef Process(event):\n    n = event['data']\n    seen.append(n)\n    \
         if n == 'boom': raise ValueError('boom')\n    if n == 'exit': raise SystemExit(1)\n    \
         return {'type': 't', 'data': list(seen)}\n",
    )
    .await
    .unwrap();
    let evs: Vec<CloudEvent> = [json!(1), json!(2), json!("boom"), json!(4), json!(5)]
        .into_iter()
        .map(event)
        .collect();
    let refs: Vec<&CloudEvent> = evs.iter().collect();
    let results = w.process_batch(&refs).await;
    assert_eq!(results.len(), 3, "events after the failure must not run");
    assert_eq!(
        results[1].as_ref().unwrap().as_ref().unwrap()["data"],
        json!([1, 2])
    );
    assert!(
        matches!(&results[2], Err(EngineError::Processing { error_type, .. }) if error_type == "ValueError")
    );
    // The channel is still in step: the skipped events run next, in order.
    let rest: Vec<&CloudEvent> = evs[3..].iter().collect();
    let results = w.process_batch(&rest).await;
    assert_eq!(results.len(), 2);
    assert_eq!(
        results[1].as_ref().unwrap().as_ref().unwrap()["data"],
        json!([1, 2, "boom", 4, 5])
    );

    // A crash mid-batch: the crashed event errs, the rest are not run, and
    // the next batch gets a fresh process.
    let evs: Vec<CloudEvent> = [json!(6), json!("exit"), json!(7)]
        .into_iter()
        .map(event)
        .collect();
    let refs: Vec<&CloudEvent> = evs.iter().collect();
    let results = w.process_batch(&refs).await;
    assert_eq!(results.len(), 2);
    assert!(
        matches!(&results[1], Err(EngineError::Crashed(_))),
        "{:?}",
        results[1]
    );
    let again = [event(json!(8))];
    let refs: Vec<&CloudEvent> = again.iter().collect();
    let results = w.process_batch(&refs).await;
    assert_eq!(
        results[0].as_ref().unwrap().as_ref().unwrap()["data"],
        json!([8])
    );
}
