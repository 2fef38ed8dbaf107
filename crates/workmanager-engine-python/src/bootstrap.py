# WorkManager Python worker bootstrap.
#
# Runs as `python3 -E -s -S -c <this file> <policy JSON> <sandbox report JSON>`,
# normally exec'd by the sandbox launcher (see sandbox.rs). The worker's code arrives over stdin
# in a "load" message and is compiled in memory: nothing is written to disk.
# Host and child exchange one JSON object per line: host -> child "load",
# "process", "ping", "shutdown"; child -> host "ready", "result", "error",
# "pong". The protocol uses private duplicates of fds 0 and 1; the user's
# stdin is /dev/null and the user's stdout is stderr, so print() cannot
# corrupt the channel.
import builtins
import json
import os
import sys


def _setup_channel():
    # Buffered: readline on a raw file would cost one read() per byte.
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdin = open(os.devnull, "r")
    sys.stdout = sys.stderr
    sys.__stdout__ = sys.stderr
    sys.__stdin__ = sys.stdin
    return proto_in, proto_out


# argv[1]: the policy from the host (site-packages dirs, blocked modules,
# allowed packages); argv[2]: the sandbox layers the launcher applied.
_POLICY = json.loads(sys.argv[1])
_SANDBOX = json.loads(sys.argv[2])
sys.argv = [""]
# -S skipped the site module (no .pth file runs here); installed packages
# stay importable through the site-packages directories the host passes.
sys.path.extend(p for p in _POLICY["site"] if p not in sys.path)
_IN, _OUT = _setup_channel()


def _install_import_guard(blocked, allowed):
    """Seed layer: imports made by worker code are checked against the block
    list, and packages outside the standard library against the allow-list.
    The standard library's own imports are not checked. This is bypassable
    by design (object graph walks reach anything already loaded); the OS
    layer is the boundary."""
    stdlib = set(getattr(sys, "stdlib_module_names", ())) | set(sys.builtin_module_names)
    site_dirs = tuple(os.path.realpath(p) + os.sep for p in _POLICY["site"])
    real_import = builtins.__import__

    def is_third_party(top):
        if top in stdlib:
            return False
        if stdlib:
            return True
        import importlib.util  # Python 3.9: no stdlib_module_names
        spec = importlib.util.find_spec(top)
        origin = getattr(spec, "origin", None) or ""
        return os.path.realpath(origin).startswith(site_dirs)

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        importer = (globals or {}).get("__name__")
        if importer == "__worker__" and level == 0:
            top = name.partition(".")[0]
            if top in blocked or name in blocked:
                raise ImportError("%s is not allowed" % name)
            if top not in allowed and is_third_party(top):
                raise ImportError(
                    "%s is not allowed: it is not in Python:AllowedPackages" % name)
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = guarded_import


_install_import_guard(frozenset(_POLICY["blocked"]), frozenset(_POLICY["allowed"]))
_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def _send_raw(text):
    _OUT.write(text.encode("utf-8") + b"\n")


def _send(obj):
    _send_raw(_dumps(obj))


def _error(msg_id, exc, skip_frames=1):
    import traceback  # only on the error path: keeps start-up fast

    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None:
            tb = tb.tb_next
    if isinstance(exc, SyntaxError):
        text = "".join(traceback.format_exception_only(type(exc), exc))
    else:
        # Only the worker's frames: the bootstrap's own ("<string>") are noise.
        frames = [f for f in traceback.extract_tb(tb) if f.filename != "<string>"]
        text = "".join(
            ["Traceback (most recent call last):\n"]
            + traceback.format_list(frames)
            + traceback.format_exception_only(type(exc), exc))
    return {
        "op": "error",
        "id": msg_id,
        "error_type": type(exc).__name__,
        "message": str(exc),
        "traceback": text,
    }


def _load(code):
    namespace = {"__name__": "__worker__", "__builtins__": builtins}
    try:
        exec(compile(code, "<worker>", "exec"), namespace)
    except BaseException as exc:  # SystemExit at import time is a load error too
        return None, _error(None, exc)
    process = namespace.get("Process")
    if not callable(process):
        return None, {
            "op": "error",
            "id": None,
            "error_type": "LoadError",
            "message": "the code does not define a top-level function Process(event)",
            "traceback": "",
        }
    return process, None


def _kind(value):
    return {list: "a list", str: "a string", int: "an int", float: "a float", bool: "a bool",
            tuple: "a tuple"}.get(type(value), type(value).__name__)


def _run_one(process, msg_id, event):
    """Runs one event and writes its answer; returns False on an error."""
    if process is None:
        _send({"op": "error", "id": msg_id, "error_type": "LoadError",
               "message": "no code loaded", "traceback": ""})
        return False
    try:
        result = process(event)
    except Exception as exc:
        _send(_error(msg_id, exc))
        return False
    if result is not None and not isinstance(result, dict):
        _send({"op": "error", "id": msg_id, "error_type": "BadResult",
               "message": "Process must return a dict or None, not %s" % _kind(result),
               "traceback": ""})
        return False
    try:
        text = _dumps({"op": "result", "id": msg_id, "event": result})
    except (TypeError, ValueError) as exc:
        _send({"op": "error", "id": msg_id, "error_type": "BadResult",
               "message": "the result is not JSON-serialisable: %s" % exc, "traceback": ""})
        return False
    _send_raw(text)
    return True


def main():
    process = None
    readline = _IN.readline
    while True:
        line = readline()
        if not line:
            return
        msg = json.loads(line)
        op = msg.get("op")
        if op == "process":
            _run_one(process, msg.get("id"), msg.get("event"))
        elif op == "batch":
            # Several events in order, one answer line each, so the host can
            # time each one. The first failure ends the batch (order is kept:
            # the host retries it before the rest), and the rest are skipped.
            items = msg.get("items") or []
            for i, item in enumerate(items):
                if not _run_one(process, item.get("id"), item.get("event")):
                    if i + 1 < len(items):
                        _send({"op": "skipped", "count": len(items) - i - 1})
                    break
        elif op == "ping":
            _send({"op": "pong"})
        elif op == "load":
            process, err = _load(msg.get("code", ""))
            _send(err if err is not None else {"op": "ready", "sandbox": _SANDBOX})
        elif op == "shutdown":
            return


main()
