//! The Python sandbox, attacked. Every attempt first bypasses the in-process
//! import guard (it is bypassable by design), then tries one way out; it
//! passes only if the attempt fails AND the service is still healthy AND a
//! control worker still answers. One test runs attempts with the sandbox off
//! to show that these tests can fail.
use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::net::UnixListener;
use std::path::Path;

use serde_json::{json, Value};
use tonic::Code;
use workmanager_api::pb;

use crate::common::*;

/// Reaches the real `__import__` through the guard's closure: the guard is
/// only the seed layer, so every attempt below starts past it.
const PRELUDE: &str = r#"
def _real_import():
    for cell in __import__.__closure__ or ():
        v = cell.cell_contents
        if getattr(v, '__name__', '') == '__import__':
            return v
    raise RuntimeError('import guard bypass failed')
_imp = _real_import()
os = _imp('os')
sys = _imp('sys')

def Process(event):
    d = event['data']
    try:
        r = attempt(d)
    except BaseException as e:
        return {'type': 'r', 'data': {'ran': False, 'detail': type(e).__name__ + ': ' + str(e)[:300]}}
    return {'type': 'r', 'data': {'ran': True, 'detail': repr(r)[:300]}}
"#;

fn worker(body: &str) -> String {
    let indented: String = body.lines().map(|l| format!("    {l}\n")).collect();
    format!("{PRELUDE}\ndef attempt(d):\n{indented}")
}

#[derive(Debug)]
enum Outcome {
    /// The attempt raised: the way out was closed.
    Denied(String),
    /// The attempt's code ran to the end.
    Ran(String),
    /// The worker failed as a whole (killed, timed out, refused output).
    Failed(Code, String),
}

struct Lab {
    svc: Service,
    c: workmanager_api::pb::work_manager_client::WorkManagerClient<tonic::transport::Channel>,
    control: String,
    dir: tempfile::TempDir,
    data: Value,
}

impl Lab {
    async fn new(settings: &[&str]) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let svc = Service::start_ready(dir.path(), settings).await;
        let mut c = svc.grpc().await;
        let control = create(&mut c, &versioned("control"), true).await;
        let secret = dir.path().join("secret.txt");
        std::fs::write(&secret, "TOPSECRET-d41d8cd9").unwrap();
        let marker = format!("/tmp/wm-escape-{}", uuid::Uuid::new_v4());
        let data = json!({
            "secret": secret, "marker": marker, "service_pid": svc.pid(),
            "state": dir.path().join("state.redb"), "cwd_file": "escape.txt",
        });
        Lab {
            svc,
            c,
            control,
            dir,
            data,
        }
    }

    async fn attempt(&mut self, name: &str, body: &str, extra: Value) -> Outcome {
        self.attempt_code(name, &worker(body), extra).await
    }

    /// As `attempt`, with the worker's whole code given.
    async fn attempt_code(&mut self, name: &str, code: &str, extra: Value) -> Outcome {
        let mut data = self.data.clone();
        if let (Some(d), Some(e)) = (data.as_object_mut(), extra.as_object()) {
            d.extend(e.clone());
        }
        let outcome = match self.c.create_worker(create_req(code, true)).await {
            Err(s) => Outcome::Failed(s.code(), s.message().to_string()),
            Ok(r) => {
                let id = r.into_inner().id;
                let out = match invoke(&mut self.c, &id, data).await {
                    Ok(v) if v["data"]["ran"] == json!(true) => {
                        Outcome::Ran(v["data"]["detail"].to_string())
                    }
                    Ok(v) => Outcome::Denied(v["data"]["detail"].to_string()),
                    Err(s) => Outcome::Failed(s.code(), s.message().to_string()),
                };
                let _ = self.c.delete_worker(pb::DeleteWorkerRequest { id }).await;
                out
            }
        };
        self.assert_unharmed(name).await;
        assert!(
            !format!("{outcome:?}").contains("TOPSECRET"),
            "{name}: the secret leaked: {outcome:?}"
        );
        outcome
    }

    /// The service is healthy and the control worker answers.
    async fn assert_unharmed(&mut self, name: &str) {
        let health = reqwest::get(self.svc.url("/health")).await;
        assert!(
            matches!(&health, Ok(r) if r.status() == 200),
            "{name}: service unhealthy after the attempt"
        );
        let out = invoke(&mut self.c, &self.control, json!(1)).await;
        assert_eq!(
            out.map(|v| v["data"]["version"].clone()).ok(),
            Some(json!("control")),
            "{name}: the control worker stopped answering"
        );
    }

    fn marker(&self) -> &str {
        self.data["marker"].as_str().unwrap()
    }
}

/// Denied by the operating system: the error is one the OS layer produces
/// (not, say, a failure of the attempt's own set-up code).
fn denied(name: &str, o: &Outcome) {
    let Outcome::Denied(detail) = o else {
        panic!("{name}: expected the attempt to be denied, got {o:?}")
    };
    let os_errors = [
        "PermissionError",
        "OSError",
        "MemoryError",
        "ValueError: not allowed to raise",
    ];
    assert!(
        os_errors.iter().any(|e| detail.contains(e)),
        "{name}: denied, but not by the OS layer: {detail}"
    );
}

fn stopped(name: &str, o: &Outcome) {
    assert!(
        !matches!(o, Outcome::Ran(_)),
        "{name}: the attempt ran to the end: {o:?}"
    );
}

#[tokio::test]
async fn filesystem_escapes_fail() {
    let mut lab = Lab::new(&[]).await;
    let cases = [
        ("read a secret file", "return open(d['secret']).read()"),
        (
            "mmap a secret file",
            "mm = _imp('mmap')\nf = open(d['secret'], 'rb')\nreturn mm.mmap(f.fileno(), 0)[:]",
        ),
        ("write a file in /tmp", "open(d['marker'], 'w').write('x')"),
        (
            "write in the working directory",
            "open(d['cwd_file'], 'w').write('x')",
        ),
        (
            "create a file in /dev/shm",
            "os.open('/dev/shm/wm-escape', os.O_CREAT | os.O_WRONLY, 0o600)",
        ),
        (
            "read the service's environment",
            "return open('/proc/%d/environ' % d['service_pid']).read()",
        ),
        (
            "read the service's memory",
            "f = open('/proc/%d/mem' % d['service_pid'], 'rb')\nreturn f.read(16)",
        ),
        (
            "read the state file",
            "return open(d['state'], 'rb').read(64)",
        ),
        ("list the root directory", "return os.listdir('/')"),
        ("read /etc/passwd", "return open('/etc/passwd').read()"),
    ];
    for (name, body) in cases {
        let o = lab.attempt(name, body, json!({})).await;
        denied(name, &o);
    }
    assert!(
        !Path::new(lab.marker()).exists(),
        "a file was written to /tmp"
    );
    assert!(
        !Path::new("/dev/shm/wm-escape").exists(),
        "a file was written to /dev/shm"
    );
    assert!(!lab.dir.path().join("escape.txt").exists());
}

#[tokio::test]
async fn network_escapes_fail_and_nothing_connects() {
    let mut lab = Lab::new(&[]).await;
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    tcp.set_nonblocking(true).unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_nonblocking(true).unwrap();
    let unix_path = lab.dir.path().join("listener.sock");
    let unix = UnixListener::bind(&unix_path).unwrap();
    unix.set_nonblocking(true).unwrap();
    let extra = json!({
        "tcp": tcp.local_addr().unwrap().port(), "udp": udp.local_addr().unwrap().port(), "unix": unix_path,
    });
    let cases = [
        ("TCP connect to loopback", "s = _imp('socket')\nc = s.create_connection(('127.0.0.1', d['tcp']), timeout=2)\nreturn c.getpeername()"),
        ("UDP send to loopback", "s = _imp('socket')\nu = s.socket(s.AF_INET, s.SOCK_DGRAM)\nreturn u.sendto(b'x', ('127.0.0.1', d['udp']))"),
        ("Unix socket connect", "s = _imp('socket')\nu = s.socket(s.AF_UNIX)\nu.connect(d['unix'])\nreturn 'connected'"),
        ("raw socket", "s = _imp('socket')\nreturn s.socket(s.AF_INET, s.SOCK_RAW, 1)"),
        ("socket via __builtins__", "m = __builtins__.__import__('socket', None)\nreturn m.socket()"),
        ("socket via importlib", "return _imp('importlib').import_module('socket').socket()"),
    ];
    for (name, body) in cases {
        let o = lab.attempt(name, body, extra.clone()).await;
        denied(name, &o);
    }
    assert!(
        tcp.accept().is_err(),
        "something connected to the TCP listener"
    );
    let mut buf = [0u8; 16];
    assert!(udp.recv_from(&mut buf).is_err(), "a datagram arrived");
    assert!(
        unix.accept().is_err(),
        "something connected to the Unix listener"
    );
}

#[tokio::test]
async fn process_escapes_fail() {
    let mut lab = Lab::new(&[]).await;
    let cases = [
        ("os.system", "rc = os.system('touch ' + d['marker'])\nif rc != 0: raise OSError('system returned %d' % rc)"),
        ("subprocess", "_imp('subprocess').run(['/bin/sh', '-c', 'touch ' + d['marker']], check=True)"),
        ("fork", "return os.fork()"),
        ("fork bomb", "while True:\n    os.fork()"),
        ("posix_spawn", "return os.posix_spawn('/bin/sh', ['sh', '-c', 'touch ' + d['marker']], {})"),
        ("execv a shell", "os.execv('/bin/sh', ['sh', '-c', 'touch ' + d['marker']])"),
        ("execv the interpreter", "os.execv(sys.executable, [sys.executable, '-c', 'open(%r, \"w\")' % d['marker']])"),
        ("ctypes system()", "c = _imp('ctypes')\nrc = c.CDLL(None).system(('touch ' + d['marker']).encode())\nif rc != 0: raise OSError('system returned %d' % rc)"),
        ("ctypes raw fork syscall", "c = _imp('ctypes')\nlibc = c.CDLL(None, use_errno=True)\nr = libc.syscall(57)\nif r < 0: raise OSError(c.get_errno(), 'fork syscall failed')\nreturn r"),
        ("kill the service", "os.kill(d['service_pid'], 9)"),
        ("kill every process", "os.kill(-1, 9)"),
        ("ptrace the service", "c = _imp('ctypes')\nlibc = c.CDLL(None, use_errno=True)\nif libc.ptrace(16, d['service_pid'], 0, 0) != 0: raise OSError(c.get_errno(), 'ptrace failed')"),
    ];
    for (name, body) in cases {
        let o = lab.attempt(name, body, json!({})).await;
        denied(name, &o);
    }
    assert!(
        !Path::new(lab.marker()).exists(),
        "a spawned process wrote the marker"
    );
}

#[tokio::test]
async fn resource_and_interpreter_escapes_fail() {
    let mut lab = Lab::new(&["Python:ExecutionTimeoutSeconds=3"]).await;
    let reach_os_then_read = "g = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0].__init__.__globals__\nreturn g['open'](d['secret'], 0)";
    let cases = [
        ("8 GiB allocation", "b = bytearray(8 * 1024 ** 3)\nb[-1] = 1\nreturn len(b)"),
        ("raise the memory limit", "r = _imp('resource')\nr.setrlimit(r.RLIMIT_AS, (r.RLIM_INFINITY, r.RLIM_INFINITY))"),
        ("os via __subclasses__", reach_os_then_read),
        ("os via str.format", "W = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]\nassert 'sys' in '{0.__init__.__globals__[sys]}'.format(W)\nreturn open(d['secret']).read()"),
        ("bootstrap globals via frames", "try:\n    raise Exception\nexcept Exception as e:\n    f = e.__traceback__.tb_frame\nwhile f.f_back: f = f.f_back\nreturn f.f_globals['os'].open(d['secret'], 0)"),
        ("sys.modules", "rc = sys.modules['os'].system('touch ' + d['marker'])\nif rc != 0: raise OSError('system returned %d' % rc)"),
    ];
    for (name, body) in cases {
        let o = lab.attempt(name, body, json!({})).await;
        denied(name, &o);
    }
    let o = lab.attempt("CPU burn", "while True: pass", json!({})).await;
    assert!(
        matches!(&o, Outcome::Failed(Code::DeadlineExceeded, _)),
        "CPU burn: {o:?}"
    );
    assert!(!Path::new(lab.marker()).exists());
}

#[tokio::test]
async fn protocol_attacks_fail() {
    let mut lab = Lab::new(&["Python:ExecutionTimeoutSeconds=10"]).await;
    let find_bootstrap = "try:\n    raise Exception\nexcept Exception as e:\n    f = e.__traceback__.tb_frame\nwhile f.f_back: f = f.f_back\ng = f.f_globals\n";
    let forge = format!("{find_bootstrap}g['_OUT'].write(b'{{\"op\":\"result\",\"id\":999999,\"event\":null}}\\n')\nreturn 'forged'");
    let o = lab.attempt("forge a result line", &forge, json!({})).await;
    assert!(
        matches!(&o, Outcome::Failed(Code::Unknown, m) if m.contains("out of turn")),
        "forge: {o:?}"
    );

    let garbage = format!("{find_bootstrap}g['_OUT'].write(b'garbage\\n')\nreturn 'garbage'");
    let o = lab
        .attempt("raw bytes on the protocol", &garbage, json!({}))
        .await;
    assert!(
        matches!(&o, Outcome::Failed(Code::Unknown, m) if m.contains("corrupted")),
        "garbage: {o:?}"
    );

    let o = lab
        .attempt(
            "write to fd 1",
            "os.write(1, b'garbage\\n')\nreturn 'written'",
            json!({}),
        )
        .await;
    assert!(
        matches!(&o, Outcome::Ran(_)),
        "fd 1 is stderr for the worker; the answer must still arrive: {o:?}"
    );

    let close = format!("{find_bootstrap}g['_OUT'].close()\ng['_IN'].close()\nfor fd in range(0, 3): os.close(fd)\nreturn 'closed'");
    let o = lab
        .attempt("close the protocol fds", &close, json!({}))
        .await;
    stopped("close fds", &o);

    let big = "def Process(event):\n    return {'type': 'big', 'data': 'x' * 100_000_000}\n";
    let o = lab.attempt_code("100 MB result", big, json!({})).await;
    assert!(
        matches!(&o, Outcome::Failed(Code::Unknown, m) if m.contains("larger than")),
        "100 MB: {o:?}"
    );

    let o = lab
        .attempt(
            "stderr flood",
            "while True:\n    sys.stderr.write('flood-line\\n')",
            json!({}),
        )
        .await;
    assert!(
        matches!(&o, Outcome::Failed(Code::DeadlineExceeded, _)),
        "flood: {o:?}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut logs = String::new();
    std::fs::File::open(&lab.svc.log)
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    let lines = logs.lines().filter(|l| l.contains("flood-line")).count();
    assert!(lines < 2_000, "the flood reached the log {lines} times");
    assert!(
        logs.contains("lines dropped"),
        "the dropped lines were not reported"
    );
}

#[tokio::test]
async fn without_the_os_layer_the_same_attempts_succeed() {
    // Shows the suite can fail: with Python:Sandbox=off the same code gets out.
    let mut lab = Lab::new(&["Python:Sandbox=off"]).await;
    let o = lab
        .attempt(
            "read a secret file (sandbox off)",
            "return len(open(d['secret']).read())",
            json!({}),
        )
        .await;
    assert!(
        matches!(&o, Outcome::Ran(len) if len.contains("18")),
        "{o:?}"
    );
    let o = lab
        .attempt(
            "socket (sandbox off)",
            "s = _imp('socket')\nreturn s.socket().fileno() > 0",
            json!({}),
        )
        .await;
    assert!(matches!(&o, Outcome::Ran(r) if r.contains("True")), "{o:?}");
    let engines = lab
        .c
        .list_engines(pb::ListEnginesRequest {})
        .await
        .unwrap()
        .into_inner()
        .engines;
    assert!(
        engines[0].isolation.contains("sandbox off"),
        "{}",
        engines[0].isolation
    );
}
