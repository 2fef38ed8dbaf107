//! The seed's Python protections, one test each: `-E -s` and a minimal
//! environment, the configurable block list, the package allow-list, code
//! over stdin with no file written, stderr as Warning logs, one persistent
//! child, and the sandbox modes.
use std::path::Path;

use serde_json::{json, Value};
use tonic::Code;
use workmanager_api::pb;

use crate::common::*;

/// Worker code that reaches `os` past the import guard, to look around.
const WITH_OS: &str = "def _real_import():\n    for cell in __import__.__closure__ or ():\n        v = cell.cell_contents\n        if getattr(v, '__name__', '') == '__import__':\n            return v\n_imp = _real_import()\nos = _imp('os')\nsys = _imp('sys')\n";

#[tokio::test]
async fn the_child_runs_with_e_s_and_a_minimal_environment() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("WM_TEST_SECRET_TOKEN", "must-not-leak");
    let svc = Service::start_ready(dir.path(), &[]).await;
    let mut c = svc.grpc().await;
    let code = format!(
        "{WITH_OS}def Process(event):\n    return {{'type': 't', 'data': {{'env': dict(os.environ), \
         'ignore_environment': sys.flags.ignore_environment, 'no_user_site': sys.flags.no_user_site, \
         'pid': os.getpid()}}}}\n"
    );
    let id = create(&mut c, &code, true).await;
    let first = invoke(&mut c, &id, json!(0)).await.unwrap();
    let data = &first["data"];
    assert_eq!(
        data["env"],
        json!({"LC_ALL": "C.UTF-8"}),
        "the service's environment leaked"
    );
    assert_eq!(
        (
            data["ignore_environment"].as_i64(),
            data["no_user_site"].as_i64()
        ),
        (Some(1), Some(1))
    );

    // One persistent child: the same process answers every message.
    for i in 0..100 {
        let out = invoke(&mut c, &id, json!(i)).await.unwrap();
        assert_eq!(
            out["data"]["pid"], data["pid"],
            "message {i} ran in another process"
        );
    }
}

#[tokio::test]
async fn the_block_list_refuses_imports_and_the_standard_library_works() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let mut c = svc.grpc().await;
    for module in [
        "os",
        "subprocess",
        "socket",
        "requests",
        "ctypes",
        "importlib",
        "shutil",
        "multiprocessing",
    ] {
        let err = c
            .create_worker(create_req(
                &format!("import {module}\ndef Process(event):\n    return None\n"),
                false,
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{module}");
        assert!(
            err.message()
                .contains(&format!("ImportError: {module} is not allowed")),
            "{module}: {}",
            err.message()
        );
    }
    let err = c
        .create_worker(create_req(
            "from os import path\ndef Process(event):\n    return None\n",
            false,
        ))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("os is not allowed"),
        "{}",
        err.message()
    );

    // The standard library's own internal imports (of os, ...) keep working.
    let code = "import random, json, datetime, decimal, statistics, collections, re, math, itertools, functools, \
                dataclasses, typing, time\n\
                @dataclasses.dataclass\nclass P:\n    px: decimal.Decimal\n\
                def Process(event):\n    xs = [random.Random(1).random() for _ in range(3)]\n    \
                return {'type': 't', 'data': {'mean': statistics.mean([1, 2, 3]), 'n': len(xs), \
                'day': datetime.date(2026, 1, 2).isoformat(), 'px': str(P(decimal.Decimal('1.5')).px), \
                'm': re.match(r'(\\d+)', '42x').group(1), 'c': dict(collections.Counter('aab'))}}\n";
    let id = create(&mut c, code, true).await;
    let out = invoke(&mut c, &id, json!(0)).await.unwrap();
    assert_eq!(
        out["data"],
        json!({"mean": 2, "n": 3, "day": "2026-01-02", "px": "1.5", "m": "42", "c": {"a": 2, "b": 1}})
    );
}

#[tokio::test]
async fn the_block_list_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &["Python:BlockedModules=json,decimal"]).await;
    let mut c = svc.grpc().await;
    let err = c
        .create_worker(create_req(
            "import json\ndef Process(e): return None\n",
            false,
        ))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("json is not allowed"),
        "{}",
        err.message()
    );
    let err = c
        .create_worker(create_req(
            "import decimal\ndef Process(e): return None\n",
            false,
        ))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("decimal is not allowed"),
        "{}",
        err.message()
    );
    // `time` is not in the configured list, so it imports.
    create(&mut c, "import time\ndef Process(e): return None\n", false).await;
}

#[tokio::test]
async fn third_party_packages_need_the_allow_list() {
    // pip is a real third-party package in every CPython install with pip.
    let dir = tempfile::tempdir().unwrap();
    let code = "import pip\ndef Process(event):\n    return {'type': 't', 'data': pip.__name__}\n";
    {
        let svc = Service::start_ready(dir.path(), &[]).await;
        let mut c = svc.grpc().await;
        let err = c.create_worker(create_req(code, true)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains("pip is not allowed"),
            "{}",
            err.message()
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &["Python:AllowedPackages=pip"]).await;
    let mut c = svc.grpc().await;
    let id = create(&mut c, code, true).await;
    assert_eq!(invoke(&mut c, &id, json!(0)).await.unwrap()["data"], "pip");
}

fn files_containing(root: &Path, needle: &str, found: &mut Vec<String>, depth: usize) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() && depth > 0 {
            files_containing(&p, needle, found, depth - 1);
        } else if meta.is_file() && meta.len() < 1 << 20 {
            if let Ok(text) = std::fs::read(&p) {
                if text.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    found.push(p.display().to_string());
                }
            }
        }
    }
}

#[tokio::test]
async fn code_arrives_over_stdin_and_no_file_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let mut c = svc.grpc().await;
    let needle = format!("unique-marker-{}", uuid::Uuid::new_v4().simple());
    let code = format!(
        "# {needle}\ndef Process(event):\n    return {{'type': 't', 'data': '{needle}'[:6]}}\n"
    );
    let id = create(&mut c, &code, true).await;
    invoke(&mut c, &id, json!(0)).await.unwrap();
    let mut found = Vec::new();
    for root in ["/tmp", "/var/tmp", "/dev/shm"] {
        files_containing(Path::new(root), &needle, &mut found, 4);
    }
    // The service's own data directory holds the state file, whose content
    // is base64 JSON; nothing else may hold the code in clear.
    files_containing(dir.path(), &needle, &mut found, 4);
    assert!(
        found.is_empty(),
        "the worker code was written to disk: {found:?}"
    );
}

#[tokio::test]
async fn worker_output_becomes_warning_logs_not_errors() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &[]).await;
    let mut c = svc.grpc().await;
    let code =
        "def Process(event):\n    print('hello-from-print')\n    return {'type': 't', 'data': 1}\n";
    let id = create(&mut c, code, true).await;
    let out = invoke(&mut c, &id, json!(0)).await.unwrap();
    assert_eq!(out["data"], 1, "output on stderr is not an error");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let line = svc
        .logs()
        .lines()
        .find(|l| l.contains("hello-from-print"))
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .expect("the print reached the log");
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["worker_id"], id.as_str());
}

#[tokio::test]
async fn sandbox_modes_are_reported_and_strict_runs_with_the_full_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let svc = Service::start_ready(dir.path(), &["Python:Sandbox=strict"]).await;
    let mut c = svc.grpc().await;
    let engines = c
        .list_engines(pb::ListEnginesRequest {})
        .await
        .unwrap()
        .into_inner()
        .engines;
    let isolation = &engines[0].isolation;
    assert!(isolation.contains("sandbox strict"), "{isolation}");
    for layer in ["rlimits", "no_new_privs", "landlock", "seccomp"] {
        assert!(
            isolation.contains(layer),
            "{layer} missing from {isolation}"
        );
    }
    // The network namespace and the capability drop need root (CI runs as
    // root): without them strict mode must refuse workers, with them it runs.
    let full = isolation.contains("netns") && isolation.contains("nocaps");
    let created = c
        .create_worker(create_req(&versioned("strict"), true))
        .await;
    if full {
        let id = created
            .expect("strict mode with the full sandbox runs workers")
            .into_inner()
            .id;
        assert_eq!(
            invoke(&mut c, &id, json!(0)).await.unwrap()["data"]["version"],
            "strict"
        );
        assert!(
            svc.logs().contains("Python sandbox fully applied"),
            "no start-up line reports the sandbox"
        );
    } else {
        let err = created.expect_err("strict mode ran a worker without the full sandbox");
        assert!(err.message().contains("strict"), "{}", err.message());
    }
    let health: Value = svc.get_json("/health").await;
    assert!(
        health["checks"]["sandbox"]["description"]
            .as_str()
            .unwrap_or("")
            .contains("seccomp"),
        "{health}"
    );
}
