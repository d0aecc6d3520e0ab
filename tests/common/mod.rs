//! Shared helpers of the end-to-end serving tests: start real `switchyard` processes,
//! wait for the line that says they are ready, and make sure none outlives the tests.

#![allow(dead_code)] // each test file uses a different subset

pub mod delay_proxy;
pub mod etcd;
pub mod fabric;
pub mod http;
pub mod load;
pub mod netns;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchyard_engine::tokenizer::Tokenizer;
use switchyard_engine::verify::{GoldenPrompt, read_golden};

use http::{Client, Response};

/// How long a process may take to print its ready line.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_switchyard")
}

/// The checkpoint `up` bundles, with its reference outputs.
pub fn tiny_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mixtral-tiny")
}

pub fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&tiny_model()).expect("loading the fixture tokenizer")
}

/// Prompts and greedy continuations computed by transformers (tests/fixtures/README.md).
pub fn golden() -> Vec<GoldenPrompt> {
    read_golden(&tiny_model().join("golden.safetensors"), 4, 512, 2)
        .expect("reading golden.safetensors")
}

/// `greedy_text` of every prompt in golden.json: transformers' own decoding.
pub fn golden_texts() -> Vec<String> {
    let raw = std::fs::read(tiny_model().join("golden.json")).expect("reading golden.json");
    let v: Value = serde_json::from_slice(&raw).expect("golden.json is JSON");
    v["prompts"]
        .as_array()
        .expect("golden.json has prompts")
        .iter()
        .map(|p| p["greedy_text"].as_str().expect("greedy_text").to_owned())
        .collect()
}

/// Greedy continuation computed by the engine alone, in this process: no scheduler, no
/// batching, no wire, no HTTP (what `switchyard generate` does, on token ids).
pub fn engine_greedy(prompt: &[u32], n: usize) -> Vec<u32> {
    engine_greedy_of(&tiny_model(), prompt, n)
}

/// [`engine_greedy`] on the checkpoint in `dir`.
pub fn engine_greedy_of(dir: &Path, prompt: &[u32], n: usize) -> Vec<u32> {
    engine_greedy_margins_of(dir, prompt, n)
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// [`engine_greedy_of`] with each step's margin: the gap between the best and second-best
/// logit, relative to the largest |logit|. A random model's greedy path can pass near-ties
/// that a different (equally exact) summation order flips.
pub fn engine_greedy_margins_of(dir: &Path, prompt: &[u32], n: usize) -> Vec<(u32, f32)> {
    use switchyard_engine::{
        ExpertSelection, ExpertStore, LogitsFor, Model, PagedKvCache, SeqCache, SeqChunk,
    };
    let (model, ckpt) = Model::load(dir).expect("loading the model");
    let cfg = model.config().clone();
    let experts = ExpertStore::load(&ckpt, &cfg, &ExpertSelection::All).expect("experts");
    let block = 16;
    let blocks = (prompt.len() + n).div_ceil(block);
    let mut kv = model.new_kv_cache(block, PagedKvCache::model_block_bytes(&cfg, block) * blocks);
    let mut seq = SeqCache::new();
    let mut input = prompt.to_vec();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let logits = model
            .forward(
                &mut kv,
                &experts,
                &mut [SeqChunk {
                    tokens: &input,
                    cache: &mut seq,
                }],
                LogitsFor::LastToken,
                false,
            )
            .expect("forward");
        let row = logits.row(0);
        let id = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .expect("logits") as u32;
        let second = (0..row.len())
            .filter(|&i| i != id as usize)
            .map(|i| row[i])
            .fold(f32::NEG_INFINITY, f32::max);
        let scale = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        out.push((id, (row[id as usize] - second) / scale));
        input = vec![id];
    }
    out
}

/// Token prompts (BOS first) on which a bf16 wire changed at least one of 64 greedy
/// tokens when these tests were written (60 of 300 random prompts did): their greedy
/// paths pass near-ties, so they tell an exact wire from a rounding one.
pub const SENSITIVE_PROMPTS: [&[u32]; 4] = [
    &[
        1, 508, 468, 275, 506, 364, 417, 311, 464, 78, 161, 53, 376, 40, 463, 438, 353, 172, 244,
    ],
    &[
        1, 347, 186, 305, 487, 459, 327, 440, 320, 70, 369, 161, 201, 386, 215, 427, 336, 44, 3,
        307, 101,
    ],
    &[1, 431, 374, 69, 508, 10, 208, 489],
    &[
        1, 164, 4, 112, 10, 370, 389, 4, 504, 424, 348, 273, 316, 53, 100, 63, 314, 335, 104, 450,
        157, 146, 355, 503, 96, 54, 246, 440, 475,
    ],
];

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped, and that the
/// kernel kills if the test binary dies first (see `spawn_kept`). Its stderr goes to a
/// temporary file, shown when a test fails.
pub struct Proc {
    pub child: Child,
    name: String,
    log: tempfile::NamedTempFile,
}

impl Proc {
    /// Starts `cmd` and waits until it prints a stdout line starting with `ready`;
    /// returns the rest of that line. stdout keeps being drained afterwards.
    pub fn start(name: &str, mut cmd: Command, ready: &str) -> (Proc, String) {
        let log = tempfile::NamedTempFile::new().expect("creating a log file");
        let stderr = log.reopen().expect("reopening the log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        let mut child = spawn_kept(cmd).unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let proc = Proc {
            child,
            name: name.to_owned(),
            log,
        };
        let (tx, rx) = mpsc::channel();
        let prefix = ready.to_owned();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix(&prefix)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(rest.to_owned());
                }
            }
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(rest) => (proc, rest),
            Err(e) => panic!(
                "{name} did not print {ready:?} ({e:?}); its stderr ends with:\n{}",
                proc.log_tail()
            ),
        }
    }

    /// Starts `cmd` without waiting for any line (stdout is discarded).
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        let log = tempfile::NamedTempFile::new().expect("creating a log file");
        let stderr = log.reopen().expect("reopening the log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        let child = spawn_kept(cmd).unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            child,
            name: name.to_owned(),
            log,
        }
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last few KiB of the process's stderr.
    pub fn log_tail(&self) -> String {
        let bytes = std::fs::read(self.log.path()).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let start = text.len().saturating_sub(4000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        format!("[{}] {}", self.name, &text[start..])
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SIGTERM first so that `up` stops its nodes itself; SIGKILL if it will not.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }
}

/// Spawns `cmd` so that the kernel SIGKILLs it when this test binary exits, even for a
/// cluster kept in a `static` (statics are never dropped). PR_SET_PDEATHSIG fires when
/// the spawning *thread* exits, and libtest runs each test on its own short-lived thread,
/// so every spawn happens on one keeper thread that lives as long as the process.
fn spawn_kept(mut cmd: Command) -> std::io::Result<Child> {
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static KEEPER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("process-keeper".into())
            .spawn(move || {
                // The sender sits in a static, so this loop never ends.
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the keeper thread");
        tx
    });
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl and getppid are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let (tx, rx) = mpsc::channel();
    keeper
        .send((cmd, tx))
        .map_err(|_| std::io::Error::other("keeper thread gone"))?;
    rx.recv()
        .map_err(|_| std::io::Error::other("keeper thread gone"))?
}

/// A serving HTTP API: `switchyard up` or `switchyard coordinator`.
pub struct Cluster {
    pub proc: Proc,
    pub url: String,
    pub model: String,
}

impl Cluster {
    /// `switchyard up --port 0 ARGS...` (3 nodes and the bundled model unless ARGS say
    /// otherwise).
    pub fn up(args: &[&str]) -> Cluster {
        let mut cmd = Command::new(exe());
        cmd.args(["up", "--port", "0"]).args(args);
        Cluster::start("up", cmd)
    }

    /// [`Cluster::up`] with extra environment variables.
    pub fn up_env(args: &[&str], env: &[(&str, &str)]) -> Cluster {
        let mut cmd = Command::new(exe());
        cmd.args(["up", "--port", "0"]).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Cluster::start("up", cmd)
    }

    /// `switchyard coordinator --port 0 --model DIR --nodes A,B,.. ARGS...`.
    pub fn coordinator(nodes: &[String], args: &[&str]) -> Cluster {
        let mut cmd = Command::new(exe());
        cmd.args(["coordinator", "--port", "0", "--model"])
            .arg(tiny_model())
            .arg("--nodes")
            .arg(nodes.join(","))
            .args(args);
        Cluster::start("coordinator", cmd)
    }

    /// `switchyard coordinator --port 0 --model DIR --etcd URL ARGS...` on the bundled model.
    pub fn cluster_coordinator(etcd: &str, id: &str, args: &[&str]) -> Cluster {
        Self::cluster_coordinator_of(&tiny_model(), etcd, id, args)
    }

    /// [`Cluster::cluster_coordinator`] serving the checkpoint in `model`.
    pub fn cluster_coordinator_of(model: &Path, etcd: &str, id: &str, args: &[&str]) -> Cluster {
        let mut cmd = Command::new(exe());
        cmd.args(["coordinator", "--port", "0", "--model"])
            .arg(model)
            .args(["--etcd", etcd, "--coordinator-id", id, "--lease-ttl-s", "2"])
            .args(args);
        Cluster::start(&format!("coordinator-{id}"), cmd)
    }

    fn start(name: &str, cmd: Command) -> Cluster {
        // "serving MODEL on http://127.0.0.1:PORT (...)"
        let (proc, rest) = Proc::start(name, cmd, "serving ");
        let (model, after) = rest
            .split_once(" on ")
            .unwrap_or_else(|| panic!("unexpected ready line: serving {rest}"));
        let url = after.split_whitespace().next().unwrap_or("").to_owned();
        assert!(url.starts_with("http://127.0.0.1:"), "ready line: {rest}");
        Cluster {
            proc,
            url,
            model: model.to_owned(),
        }
    }

    pub fn client(&self) -> Client {
        Client::new(&self.url)
    }

    /// GET /health as JSON (any status).
    pub fn health(&self) -> Response {
        self.client().get("/health").expect("GET /health")
    }
}

/// `switchyard expert-node` on a free loopback port; returns it and its address.
pub fn expert_node(index: usize) -> (Proc, String) {
    let mut cmd = Command::new(exe());
    cmd.args(["expert-node", "--listen", "127.0.0.1:0", "--model"])
        .arg(tiny_model());
    Proc::start(&format!("expert-node-{index}"), cmd, "listening on ")
}

/// Runs `call` with a plaintext gRPC client of the node at `addr`. The connection is
/// closed on return, so a later shutdown of the node need not wait out its drain time-out.
pub fn node_rpc<T, F: std::future::Future<Output = T>>(
    addr: &str,
    call: impl FnOnce(switchyard_proto::ExpertServiceClient<tonic::transport::Channel>) -> F,
) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the gRPC client");
    runtime.block_on(async {
        let client = switchyard_proto::ExpertServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connecting to the node");
        call(client).await
    })
}

/// The node at `addr`'s answer to Describe.
pub fn describe_node(addr: &str) -> switchyard_proto::pb::NodeInfo {
    node_rpc(addr, |mut client| async move {
        client
            .describe(switchyard_proto::pb::DescribeRequest {})
            .await
            .expect("Describe")
            .into_inner()
    })
}

/// `switchyard expert-node` registered in the cluster at `etcd` as `id`.
pub fn cluster_node(etcd: &str, id: &str, args: &[&str]) -> Proc {
    cluster_node_of(&tiny_model(), etcd, id, args)
}

/// [`cluster_node`] holding experts of the checkpoint in `model`.
pub fn cluster_node_of(model: &Path, etcd: &str, id: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(exe());
    cmd.args(["expert-node", "--listen", "127.0.0.1:0", "--model"])
        .arg(model)
        .args(["--etcd", etcd, "--node-id", id])
        .args(args);
    if !args.contains(&"--lease-ttl-s") {
        cmd.args(["--lease-ttl-s", "2"]);
    }
    Proc::start(&format!("expert-node-{id}"), cmd, "listening on ").0
}

/// Runs `cmd` to its end (at most `timeout`) and returns its status and stderr; for
/// commands that must refuse to start.
pub fn run_to_exit(mut cmd: Command, timeout: Duration) -> (std::process::ExitStatus, String) {
    let log = tempfile::NamedTempFile::new().expect("creating a log file");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log.reopen().expect("reopening the log file")));
    let mut child = spawn_kept(cmd).expect("starting the command");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "still running after {timeout:?}; stderr:\n{}",
                std::fs::read_to_string(log.path()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status,
        std::fs::read_to_string(log.path()).unwrap_or_default(),
    )
}

/// POSTs `body` and requires 200; returns the JSON body.
pub fn post_ok(client: &Client, path: &str, body: &Value) -> Value {
    let resp = client
        .post_json(path, body)
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    assert_eq!(resp.status, 200, "POST {path} {body}: {}", resp.text());
    resp.json()
}

/// A greedy completion of `prompt` (text or token ids) that ignores EOS: always exactly
/// `max_tokens` tokens.
pub fn greedy(model: &str, prompt: Value, max_tokens: usize) -> Value {
    json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
    })
}

/// `choices[0].text` of a completion.
pub fn text_of(v: &Value) -> String {
    v["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no choices[0].text in {v}"))
        .to_owned()
}

/// Checks OpenAI's error shape and the status; returns `error`.
pub fn assert_error(resp: &Response, status: u16, what: &str) -> Value {
    assert_eq!(resp.status, status, "{what}: body {}", resp.text());
    let v = resp.json();
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: error.message missing in {v}"
    );
    assert!(e["type"].is_string(), "{what}: error.type missing in {v}");
    for key in ["param", "code"] {
        let f = e.get(key);
        assert!(
            f.is_some_and(|f| f.is_string() || f.is_null()),
            "{what}: error.{key} must be a string or null in {v}"
        );
    }
    e.clone()
}

/// Calls `f` until it returns true or `timeout` passes; false on time-out.
pub fn poll(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pids whose parent is `pid`, from /proc.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| proc_stat(p).is_some_and(|(_, ppid)| ppid == pid))
        .collect()
}

/// True when `pid` no longer runs (gone, or a zombie nobody has reaped yet).
pub fn is_gone(pid: u32) -> bool {
    proc_stat(pid).is_none_or(|(state, _)| state == 'Z' || state == 'X')
}

/// (state, parent pid) from /proc/PID/stat. The command name may hold spaces and
/// parentheses, so fields are counted from the last ')'.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}
