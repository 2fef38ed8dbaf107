"""CloudEvents over HTTP with the official CloudEvents Python SDK: events in
structured and binary mode go to POST /v1/topics/{topic}; a worker doubles
them; a plain SSE client reads the outputs from GET /v1/topics/{topic}/events."""
import base64
import json
import queue
import threading

import requests
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent

WORKER = b"""
def Process(event):
    return {"type": "quotes.priced", "data": {"px": event["data"]["px"] * 2, "via": event["id"]}}
"""


def _sse_events(url, out, ready):
    try:
        with requests.get(url, stream=True, timeout=30) as r:
            ready.set()
            for raw in r.iter_lines(chunk_size=1, decode_unicode=True):
                if raw and raw.startswith("data:"):
                    out.put(json.loads(raw[len("data:"):].strip()))
    except requests.RequestException:
        pass  # the service stopped at the end of the test


def test_sdk_events_in_both_modes_reach_the_worker_and_the_sse_reader(service):
    created = requests.post(service.http + "/v1/workers", json={
        "codeSource": {"content": base64.b64encode(WORKER).decode()},
        "mimeType": "text/x-python",
        "topics": ["quotes"],
        "start": True,
    })
    assert created.status_code == 201, created.text
    worker_id = created.json()["id"]

    outputs, ready = queue.Queue(), threading.Event()
    reader = threading.Thread(
        target=_sse_events, args=(service.http + "/v1/topics/quotes.priced/events", outputs, ready), daemon=True)
    reader.start()
    assert ready.wait(10)

    structured = CloudEvent({"type": "quote", "source": "urn:test:sdk", "id": "s-1"}, {"px": 21})
    headers, body = to_structured(structured)
    r = requests.post(service.http + "/v1/topics/quotes", data=body, headers=headers)
    assert r.status_code == 202, r.text

    binary = CloudEvent({"type": "quote", "source": "urn:test:sdk", "id": "b-1"}, {"px": 50})
    headers, body = to_binary(binary)
    r = requests.post(service.http + "/v1/topics/quotes", data=body, headers=headers)
    assert r.status_code == 202, r.text

    got = [outputs.get(timeout=15), outputs.get(timeout=15)]
    assert [e["data"] for e in got] == [{"px": 42, "via": "s-1"}, {"px": 100, "via": "b-1"}]
    for e in got:
        assert e["type"] == "quotes.priced"
        assert e["source"] == "urn:com.virtufin.workmanager:worker:" + worker_id
        assert e["specversion"] == "1.0"


def test_malformed_and_oversized_events_are_refused(service):
    r = requests.post(service.http + "/v1/topics/quotes", data=b'{"specversion": "1.0"',
                      headers={"content-type": "application/cloudevents+json"})
    assert r.status_code == 400
    assert "malformed CloudEvent JSON" in r.json()["message"]
    big = CloudEvent({"type": "quote", "source": "urn:test"}, {"blob": "x" * (2 * 1024 * 1024)})
    headers, body = to_structured(big)
    r = requests.post(service.http + "/v1/topics/quotes", data=body, headers=headers)
    assert r.status_code == 413
