//! Multi-node training: real `layerskip train` processes on loopback, joined through
//! burn-collective, checked against single-process training of the same global batch.

#[allow(dead_code)] // the helpers other test files use
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::layerskip;

/// LayerSkip training (layer dropout up to 0.5, early-exit loss, two micro-batches per step) on
/// a model small enough for four processes on two cores.
const PRESET: &str = r#"
steps = 4
eval_every = 0
save_every = 2
eval_batches = 2
seed = 11
[model]
vocab_size = 300
num_layers = 3
hidden_size = 32
intermediate_size = 64
num_heads = 2
num_kv_heads = 1
max_position_embeddings = 64
[data]
paths = []
seq_len = 32
[optim]
lr = 1e-3
warmup_steps = 1
batch_size = 4
grad_accum = 2
[layer_dropout]
p_max = 0.5
[early_exit]
e_scale = 1.0
"#;

/// A run must end within this (a hang guard, far above the seconds a run takes).
const HANG: Duration = Duration::from_secs(300);

fn tmp(name: &str) -> common::Scratch {
    let dir = common::Scratch::new("mn", name);
    std::fs::write(dir.join("preset.toml"), PRESET).unwrap();
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn train_args(dir: &Path, out: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "train".into(),
        "--data".into(),
        "/usr/lib/python3.11/ast.py".into(),
        "--out".into(),
        dir.join(out).to_string_lossy().into_owned(),
    ];
    if !extra.contains(&"--resume") {
        args.push("--config".into());
        args.push(dir.join("preset.toml").to_string_lossy().into_owned());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The processes of one multi-node run, each with its stderr in a file.
struct Nodes {
    children: Vec<Child>,
    logs: Vec<PathBuf>,
}

impl Nodes {
    /// Starts `nodes` processes of `layerskip train` on loopback; `per_rank` adds flags by rank.
    fn start(
        dir: &Path,
        out: &str,
        nodes: usize,
        extra: &[&str],
        per_rank: impl Fn(usize) -> Vec<String>,
    ) -> Self {
        let coordinator = format!("127.0.0.1:{}", free_port());
        let (mut children, mut logs) = (Vec::new(), Vec::new());
        for rank in 0..nodes {
            let mut args = train_args(dir, out, extra);
            args.extend(
                [
                    "--nodes".to_string(),
                    nodes.to_string(),
                    "--node-rank".into(),
                    rank.to_string(),
                    "--coordinator".into(),
                    coordinator.clone(),
                    "--node-address".into(),
                    format!("127.0.0.1:{}", free_port()),
                    "--collective-timeout".into(),
                    "120".into(),
                ]
                .into_iter()
                .chain(per_rank(rank)),
            );
            let log = dir.join(format!("{out}-rank{rank}.log"));
            let child = Command::new(env!("CARGO_BIN_EXE_layerskip"))
                .args(&args)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            children.push(child);
            logs.push(log);
        }
        Self { children, logs }
    }

    /// Waits for every process: (exit code, stderr) by rank.
    fn wait(mut self) -> Vec<(i32, String)> {
        let start = Instant::now();
        let mut codes = vec![None; self.children.len()];
        while codes.iter().any(Option::is_none) {
            for (code, child) in codes.iter_mut().zip(&mut self.children) {
                if code.is_none()
                    && let Some(status) = child.try_wait().unwrap()
                {
                    *code = Some(status.code().unwrap_or(-1));
                }
            }
            if start.elapsed() > HANG {
                for child in &mut self.children {
                    child.kill().ok();
                }
                panic!("a node hung; logs: {:?}", self.logs);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        codes
            .into_iter()
            .zip(&self.logs)
            .map(|(c, log)| (c.unwrap(), std::fs::read_to_string(log).unwrap()))
            .collect()
    }
}

fn assert_all_succeeded(results: &[(i32, String)]) {
    for (rank, (code, err)) in results.iter().enumerate() {
        assert_eq!(*code, 0, "rank {rank}: {err}");
        assert!(!err.contains("panicked"), "rank {rank}: {err}");
    }
}

/// The f32 tensor values of a checkpoint's model.safetensors (header skipped).
fn weights(checkpoint: &Path) -> Vec<f32> {
    let bytes = std::fs::read(checkpoint.join("model.safetensors")).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The held-out loss at every exit of a checkpoint's last evaluation.
fn eval_losses(checkpoint: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(checkpoint.join("trainer_state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    let evals = state["evals"].as_array().unwrap();
    evals.last().unwrap()["loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// Same weights and held-out losses up to float summation order: the bounds of the in-process
/// data-parallel test (1e-4 of the largest weight, 1e-5 relative on losses).
fn assert_same_training(reference: &Path, other: &Path, what: &str) {
    let (a, b) = (weights(reference), weights(other));
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(worst <= 1e-4 * scale, "{what}: weights differ by {worst}");
    for (x, y) in eval_losses(reference).iter().zip(eval_losses(other)) {
        assert!(
            (x - y).abs() <= 1e-5 * x,
            "{what}: held-out loss {y} vs {x}"
        );
    }
}

#[test]
fn two_and_four_nodes_train_what_one_process_trains() {
    let dir = tmp("equal");
    let (code, _, err) = layerskip(
        &train_args(&dir, "single", &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(code, 0, "{err}");
    let reference = dir.join("single/checkpoint-000004");
    let before = weights(&dir.join("single/checkpoint-000002"));
    assert!(before != weights(&reference), "training moved the weights");
    for nodes in [2, 4] {
        let out = format!("nodes{nodes}");
        let results = Nodes::start(&dir, &out, nodes, &[], |_| Vec::new()).wait();
        assert_all_succeeded(&results);
        assert!(
            results[0].1.contains(&format!("split into {nodes} shards")),
            "{}",
            results[0].1
        );
        // Only rank 0 writes: the other ranks share --out here and found it locked by no one.
        assert_same_training(&reference, &dir.join(&out).join("checkpoint-000004"), &out);
    }
}

#[test]
fn a_killed_node_stops_the_others_and_the_run_resumes_on_another_node_count() {
    let dir = tmp("kill");
    let steps = ["--steps", "6"];
    let (code, _, err) = layerskip(
        &train_args(&dir, "single", &steps)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(code, 0, "{err}");

    let mut run = Nodes::start(&dir, "run", 2, &steps, |_| Vec::new());
    let first = dir.join("run/checkpoint-000002/trainer_state.json");
    let start = Instant::now();
    while !first.is_file() {
        assert!(start.elapsed() < HANG, "no checkpoint was written");
        std::thread::sleep(Duration::from_millis(20));
    }
    run.children[1].kill().unwrap();
    let results = run.wait();
    let (code, err) = &results[0];
    assert_eq!(*code, 1, "{err}");
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("error: multi-node training: node 0:")
            && last.contains("not answering: node 1 (127.0.0.1:"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("stack backtrace"),
        "the documented error alone, no panic before it:\n{err}"
    );
    // The checkpoint rank 0 pointed `latest` at is whole, and the run goes on from it on four
    // nodes (another count than it was started with) to the single-process result.
    let latest = std::fs::read_to_string(dir.join("run/latest")).unwrap();
    let resumed_from = eval_losses(&dir.join("run").join(latest.trim()));
    assert!(!resumed_from.is_empty());
    let results = Nodes::start(&dir, "run", 4, &["--resume"], |_| Vec::new()).wait();
    assert_all_succeeded(&results);
    assert!(results[0].1.contains("resuming from"), "{}", results[0].1);
    assert_same_training(
        &dir.join("single/checkpoint-000006"),
        &dir.join("run/checkpoint-000006"),
        "killed and resumed on 4 nodes",
    );
}

#[test]
fn nodes_that_disagree_or_cannot_meet_are_refused() {
    let dir = tmp("refuse");
    // Rank 1 would train for 5 steps instead of 4: both refuse, naming it.
    let results = Nodes::start(&dir, "mismatch", 2, &[], |rank| {
        if rank == 1 {
            vec!["--steps".into(), "5".into()]
        } else {
            Vec::new()
        }
    })
    .wait();
    for (rank, (code, err)) in results.iter().enumerate() {
        assert_eq!(*code, 1, "rank {rank}: {err}");
        assert!(
            err.lines().last().unwrap().contains("node 1 (127.0.0.1:")
                && err.contains("would train another run"),
            "rank {rank}: {err}"
        );
    }
    // Nobody hosts the coordinator: rank 1 gives up after its timeout, naming it.
    let coordinator = format!("127.0.0.1:{}", free_port());
    let args = train_args(
        &dir,
        "alone",
        &[
            "--nodes",
            "2",
            "--node-rank",
            "1",
            "--coordinator",
            &coordinator,
            "--collective-timeout",
            "3",
        ],
    );
    let (code, _, err) = layerskip(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("joining 2 nodes through the coordinator")
            && err.contains(&format!("not answering: the coordinator ({coordinator})")),
        "{err}"
    );
    // Flags checked before anything starts.
    for (flags, needle) in [
        (
            vec![
                "--nodes",
                "2",
                "--node-rank",
                "2",
                "--coordinator",
                "127.0.0.1:1",
            ],
            "out of range",
        ),
        (
            vec!["--nodes", "2", "--coordinator", "127.0.0.1:1"],
            "--node-rank is required",
        ),
        (
            vec!["--nodes", "2", "--node-rank", "1"],
            "--coordinator HOST:PORT is required",
        ),
        (
            vec![
                "--nodes",
                "2",
                "--node-rank",
                "1",
                "--coordinator",
                "nowhere",
            ],
            "is not a reachable host:port",
        ),
    ] {
        let args = train_args(&dir, "flags", &flags);
        let (code, _, err) = layerskip(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(code, 1, "{flags:?}: {err}");
        assert!(err.contains(needle), "{flags:?}: {err}");
    }
}
