//! `layerskip serve` end to end: the real server on a loopback port, driven over HTTP by `ureq`
//! (and by the official `openai` Python package when it is installed), compared with what
//! `layerskip infer` prints for the same prompt and options.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
#[path = "common/server.rs"]
mod server;
use server::{Server, infer_text, response};

const TEMPLATE: &str = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

/// The shipped model with a chat template added, in a fresh directory.
fn chat_model(tag: &str) -> common::Scratch {
    let dir = common::Scratch::new("serve", tag);
    common::copy_shipped_model(&dir);
    let config = json!({ "chat_template": TEMPLATE, "eos_token": "<|endoftext|>" });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

/// The text of streamed completion or chat chunks, and the last chunk before `[DONE]`.
fn streamed_text(events: &[String]) -> (String, Value) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text = chunks
        .iter()
        .map(|c| {
            let choice = &c["choices"][0];
            choice["text"]
                .as_str()
                .or(choice["delta"]["content"].as_str())
                .unwrap_or("")
                .to_string()
        })
        .collect();
    (text, chunks.last().unwrap().clone())
}

/// The `layerskip.tokens` entries of a stream's chunks (`layerskip.provenance`), in order.
fn provenance(events: &[String]) -> Vec<Value> {
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .flat_map(|c| {
            c["layerskip"]["tokens"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

const PROMPT: &str = "def add(a, b):";

#[test]
fn completions_and_chat_give_the_text_infer_prints_streamed_or_not() {
    let model = chat_model("text");
    let server = Server::start(&model, &[]);
    let greedy = infer_text(&model, PROMPT, &["--max-new-tokens", "24"]);
    assert!(!greedy.is_empty());
    let body =
        json!({"model": "ignored-below", "prompt": PROMPT, "max_tokens": 24, "temperature": 0});
    let mut body_ok = body.clone();
    body_ok.as_object_mut().unwrap().remove("model");

    let (status, r) = server.post("/v1/completions", &body_ok);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], greedy, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert!(r["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(r["layerskip"]["acceptance_rate"].is_null(), "{r}");

    let (text, last) = streamed_text(&server.stream("/v1/completions", &body_ok));
    assert_eq!(text, greedy);
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    assert!(
        last["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{last}"
    );

    // Self-speculation per request: the same greedy text, with its acceptance.
    let mut ss = body_ok.clone();
    ss["layerskip"] = json!({"strategy": "self-spec", "exit_layer": 4, "speculations": 3});
    let (status, r) = server.post("/v1/completions", &ss);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], greedy);
    assert_eq!(r["layerskip"]["strategy"], "self-spec");
    assert!(r["layerskip"]["acceptance_rate"].as_f64().is_some(), "{r}");
    let (text, _) = streamed_text(&server.stream("/v1/completions", &ss));
    assert_eq!(text, greedy);
    // Adaptive self-speculation chooses its exits: the same greedy text, with the exits used.
    let mut adaptive = body_ok.clone();
    adaptive["layerskip"] = json!({"strategy": "adaptive", "speculations": 4});
    let (status, r) = server.post("/v1/completions", &adaptive);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], greedy);
    assert_eq!(r["layerskip"]["strategy"], "adaptive");
    assert!(r["layerskip"]["exit_histogram"].is_array(), "{r}");
    adaptive["layerskip"]["exit_layer"] = json!(2);
    let (status, r) = server.post("/v1/completions", &adaptive);
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["error"]["param"], "layerskip.exit_layer", "{r}");
    // Drafting options change the speed, never the text.
    ss["layerskip"]["draft_vocab"] = json!(1024);
    ss["layerskip"]["draft_confidence"] = json!(0.5);
    let (status, r) = server.post("/v1/completions", &ss);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], greedy);

    // Seeded sampling: the same draws as infer with that seed.
    let sampled = infer_text(
        &model,
        PROMPT,
        &[
            "--max-new-tokens",
            "24",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--seed",
            "5",
        ],
    );
    let body =
        json!({"prompt": PROMPT, "max_tokens": 24, "temperature": 0.8, "top_p": 0.9, "seed": 5});
    let (_, r) = server.post("/v1/completions", &body);
    assert_eq!(r["choices"][0]["text"], sampled);
    let (text, _) = streamed_text(&server.stream("/v1/completions", &body));
    assert_eq!(text, sampled);

    // A stop string ends the text before it, with finish_reason "stop".
    let stop: String = greedy.trim_start().chars().skip(2).take(3).collect();
    let body = json!({"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stop": [stop]});
    let (_, r) = server.post("/v1/completions", &body);
    let text = r["choices"][0]["text"].as_str().unwrap();
    assert!(greedy.starts_with(text) && !text.contains(&stop), "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");

    // Chat: the checkpoint's template, as infer --chat renders it.
    let chat = infer_text(
        &model,
        "Write a function.",
        &["--chat", "--max-new-tokens", "16"],
    );
    let body = json!({"messages": [{"role": "user", "content": "Write a function."}],
                      "max_tokens": 16, "temperature": 0});
    let (status, r) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["choices"][0]["message"]["content"], chat);
    let events = server.stream("/v1/chat/completions", &body);
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(streamed_text(&events).0, chat);

    // The other endpoints.
    let models: Value = serde_json::from_str(&server.get_text("/v1/models")).unwrap();
    let id = models["data"][0]["id"].as_str().unwrap().to_string();
    let mut named = body_ok.clone();
    named["model"] = json!(id);
    assert_eq!(server.post("/v1/completions", &named).0, 200);
    assert_eq!(server.get_text("/health"), r#"{"status":"ok"}"#);
    let metrics = server.get_text("/metrics");
    for name in [
        "layerskip_requests_total",
        "layerskip_tokens_generated_total",
        "layerskip_acceptance_rate",
        "layerskip_tokens_per_second",
        "layerskip_queue_depth 0",
        "layerskip_time_to_first_token_seconds_bucket",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
}

#[test]
fn bad_requests_get_openai_shaped_errors() {
    let model = chat_model("errors");
    let server = Server::start(&model, &["--max-body-bytes", "65536"]);
    let long_prompt = "word ".repeat(3000);
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "/v1/completions",
            json!({"prompt": "x", "model": "gpt-4"}),
            404,
            "model_not_found",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": -3}),
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": long_prompt}),
            400,
            "context_length_exceeded",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 5000}),
            400,
            "context_length_exceeded",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "n": 2}),
            400,
            "n = 1",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "temperature": 3}),
            400,
            "temperature",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "layerskip": {"strategy": "self-spec", "exit_layer": 99}}),
            400,
            "exit layer 99 is out of range",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "layerskip": {"strategy": "ar", "exit_layer": 2}}),
            400,
            "exit_layer",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "layerskip": {"strategy": "fast"}}),
            400,
            "unknown strategy",
        ),
        ("/v1/completions", json!({"max_tokens": 3}), 400, "prompt"),
        (
            "/v1/completions",
            json!({"prompt": "x", "logprobs": 3}),
            400,
            "logprobs is not supported",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "frequency_penalty": 0.5}),
            400,
            "frequency_penalty",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": []}),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            400,
            "roles",
        ),
    ];
    for (path, body, status, needle) in cases {
        let (got, r) = server.post(path, &body);
        assert_eq!(got, status, "{body} -> {r}");
        assert_eq!(r["error"]["type"], "invalid_request_error", "{r}");
        assert!(r["error"].to_string().contains(needle), "{body} -> {r}");
    }
    // Not JSON, too large, no such endpoint, wrong method.
    let raw = |body: &str| response(ureq::post(&server.url("/v1/completions")).send_string(body));
    let (status, r) = raw("{\"prompt\": ");
    assert_eq!(status, 400, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid request body")
    );
    // A body over the limit is refused from its Content-Length, before it is read (a raw
    // socket: the server answers and closes while an HTTP client would still be sending).
    let address = server.base.trim_start_matches("http://").to_string();
    let mut socket = std::net::TcpStream::connect(&address).unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n{{\"prompt\": \""
    );
    std::io::Write::write_all(&mut socket, head.as_bytes()).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&answer).contains("invalid_request_error") {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("invalid_request_error"), "{answer}");
    let (status, _) = response(ureq::get(&server.url("/v1/nothing")).call());
    assert_eq!(status, 404);
    let (status, _) = response(ureq::get(&server.url("/v1/completions")).call());
    assert_eq!(status, 405);
    // After all that, the server still serves.
    let (status, _) = server.post("/v1/completions", &json!({"prompt": "x", "max_tokens": 2}));
    assert_eq!(status, 200);
    let metrics = server.get_text("/metrics");
    assert!(
        metrics.contains("layerskip_requests_rejected_total 16"),
        "{metrics}"
    );
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_the_engine_and_others_get_the_same_text() {
    let model = chat_model("disconnect");
    // Two engines: requests run side by side, each on its own KV cache.
    let server = Server::start(&model, &["--engines", "2"]);
    let body = json!({"prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "stream": true});
    let reader = ureq::post(&server.url("/v1/completions"))
        .send_json(body)
        .unwrap()
        .into_reader();
    let mut reader = BufReader::new(reader);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("data: "), "{line}");
    drop(reader);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = server.get_text("/metrics");
        if metrics.contains("layerskip_requests_cancelled_total 1") {
            // The 1000-token generation did not run to the end.
            assert!(
                !metrics.contains("layerskip_tokens_generated_total 1000"),
                "{metrics}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "not cancelled:\n{metrics}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Several clients at once: queued fairly, run two at a time, each gets the single-client text.
    let body = json!({"prompt": PROMPT, "max_tokens": 20, "temperature": 0});
    let (_, alone) = server.post("/v1/completions", &body);
    let alone = alone["choices"][0]["text"].as_str().unwrap().to_string();
    let texts: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..6)
            .map(|i| {
                let server = &server;
                let body = body.clone();
                s.spawn(move || {
                    if i % 2 == 0 {
                        streamed_text(&server.stream("/v1/completions", &body)).0
                    } else {
                        let (_, r) = server.post("/v1/completions", &body);
                        r["choices"][0]["text"].as_str().unwrap().to_string()
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    assert!(texts.iter().all(|t| *t == alone), "{texts:?} vs {alone:?}");
}

#[test]
fn concurrent_requests_decoded_in_one_batch_each_get_their_single_client_text() {
    let model = chat_model("batch");
    // One engine decoding up to four autoregressive requests together; self-speculative ones
    // wait for the batch to drain and run alone.
    let server = Server::start(&model, &["--engines", "1", "--batch", "4"]);
    let bodies: Vec<Value> = (0..10)
        .map(|i| match i % 5 {
            0 | 1 => json!({"prompt": PROMPT, "max_tokens": 12 + i, "temperature": 0}),
            2 => json!({"prompt": "import os\n", "max_tokens": 16, "temperature": 0.9,
                        "top_p": 0.95, "seed": i}),
            3 => json!({"prompt": "class A:", "max_tokens": 10, "temperature": 0,
                        "layerskip": {"strategy": "self-spec", "exit_layer": 3, "speculations": 2}}),
            _ => json!({"prompt": "x = ", "max_tokens": 1, "temperature": 0}),
        })
        .collect();
    let text = |r: &Value| r["choices"][0]["text"].as_str().unwrap().to_string();
    let alone: Vec<String> = bodies
        .iter()
        .map(|b| {
            let (status, r) = server.post("/v1/completions", b);
            assert_eq!(status, 200, "{r}");
            text(&r)
        })
        .collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| {
                let server = &server;
                s.spawn(move || {
                    if i % 2 == 0 {
                        streamed_text(&server.stream("/v1/completions", body)).0
                    } else {
                        text(&server.post("/v1/completions", body).1)
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    // Some steps decoded several requests together.
    let metrics = server.get_text("/metrics");
    let value = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(name)).unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let (sum, count) = (
        value("layerskip_batch_size_sum"),
        value("layerskip_batch_size_count"),
    );
    assert!(count > 0.0 && sum > count, "{metrics}");
    // The greedy ones are also `layerskip infer`'s text.
    assert_eq!(
        alone[0],
        infer_text(&model, PROMPT, &["--max-new-tokens", "12"])
    );
}

/// Greedy self-speculative requests: one alone runs self-speculation; several at once on one
/// engine are decoded in its batch as autoregressive decoding (the response says so), and every
/// one gets the text it gets alone, which is `layerskip infer`'s self-speculative text.
#[test]
fn greedy_self_speculative_requests_batch_when_others_wait_with_the_same_text() {
    let model = chat_model("ss-batch");
    let server = Server::start(&model, &["--engines", "1", "--batch", "8"]);
    let spec = json!({"strategy": "self-spec", "exit_layer": 3, "speculations": 3});
    let body = json!({"prompt": PROMPT, "max_tokens": 32, "temperature": 0, "layerskip": spec});
    let (status, alone) = server.post("/v1/completions", &body);
    assert_eq!(status, 200, "{alone}");
    assert_eq!(alone["layerskip"]["strategy"], "self-spec", "{alone}");
    assert!(
        alone["layerskip"]["drafted"].as_u64().unwrap() > 0,
        "{alone}"
    );
    assert!(
        alone["layerskip"]["requested_strategy"].is_null(),
        "{alone}"
    );
    let text = alone["choices"][0]["text"].as_str().unwrap().to_string();
    let flags = [
        "--max-new-tokens",
        "32",
        "--strategy",
        "self-spec",
        "--exit-layer",
        "3",
        "--speculations",
        "3",
    ];
    assert_eq!(text, infer_text(&model, PROMPT, &flags));

    let responses: Vec<Value> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|_| s.spawn(|| server.post("/v1/completions", &body).1))
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for r in &responses {
        assert_eq!(r["choices"][0]["text"], text, "{r}");
    }
    let batched: Vec<&Value> = responses
        .iter()
        .filter(|r| r["layerskip"]["requested_strategy"] == "self-spec")
        .collect();
    assert!(!batched.is_empty(), "none batched: {responses:?}");
    for r in batched {
        assert_eq!(r["layerskip"]["strategy"], "ar", "{r}");
        assert_eq!(r["layerskip"]["drafted"], 0, "{r}");
    }
}

/// The official `openai` Python package against the server: completions, chat and streaming.
/// It runs where `python3` can import `openai` (`LAYERSKIP_OPENAI_PYTHON` names another
/// interpreter, e.g. a virtualenv's; CI installs one).
#[test]
fn the_openai_python_client_drives_the_server() {
    let python = std::env::var("LAYERSKIP_OPENAI_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_openai = Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_openai {
        eprintln!("SKIPPED: {python} cannot import openai (bash scripts/install_openai_client.sh)");
        return;
    }
    let model = chat_model("openai");
    let server = Server::start(&model, &[]);
    let greedy = infer_text(&model, PROMPT, &["--max-new-tokens", "24"]);
    let chat = infer_text(
        &model,
        "Write a function.",
        &["--chat", "--max-new-tokens", "16"],
    );
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/openai_client_check.py");
    let out = Command::new(&python)
        .arg(script)
        .arg(format!("{}/v1", server.base))
        .arg(PROMPT)
        .output()
        .unwrap();
    let mut stdout = String::new();
    out.stdout.as_slice().read_to_string(&mut stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["completion"], greedy, "{r}");
    assert_eq!(r["completion_stream"], greedy, "{r}");
    assert_eq!(r["self_spec"], greedy, "{r}");
    assert_eq!(r["chat"], chat, "{r}");
    assert_eq!(r["chat_stream"], chat, "{r}");
    assert_eq!(r["bad_model_status"], 404, "{r}");
}

/// SIGTERM while a response streams: the server stops accepting, finishes the stream (to its
/// `[DONE]`), and exits 0.
#[cfg(unix)]
#[test]
fn sigterm_finishes_the_streams_in_flight_and_exits() {
    let model = chat_model("sigterm");
    let mut server = Server::start(&model, &[]);
    let body = json!({"prompt": PROMPT, "max_tokens": 300, "temperature": 0, "stream": true});
    let reader = ureq::post(&server.url("/v1/completions"))
        .send_json(body)
        .unwrap()
        .into_reader();
    let mut lines = BufReader::new(reader).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("data: "), "{first}");
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGTERM);
    }
    let rest: Vec<String> = lines
        .map(Result::unwrap)
        .filter_map(|l| l.strip_prefix("data: ").map(String::from))
        .collect();
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "{rest:?}");
    let last: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    assert!(
        last["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{last}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    // New connections are refused once it has gone.
    assert!(ureq::get(&server.url("/health")).call().is_err());
}

/// `layerskip.provenance`: each streamed chunk lists how its tokens were made; their texts put
/// together are the text `layerskip infer` prints, self-speculation's tokens are accepted drafts
/// from the asked exit, corrections (with the rejected draft's text) and bonus tokens, and
/// their counts agree with the final statistics (drafts accepted; one verifier token per
/// step). Without the option a chunk carries nothing new (what OpenAI clients see).
#[test]
fn streamed_chunks_say_how_each_token_was_made_when_asked() {
    let model = common::shipped_model();
    let server = Server::start(&model, &[]);
    let greedy = infer_text(&model, PROMPT, &["--max-new-tokens", "32"]);
    let body = json!({"prompt": PROMPT, "max_tokens": 32, "temperature": 0,
        "layerskip": {"strategy": "self-spec", "exit_layer": 3, "speculations": 3, "provenance": true}});
    let events = server.stream("/v1/completions", &body);
    let (text, last) = streamed_text(&events);
    assert_eq!(text, greedy);
    let tokens = provenance(&events);
    let joined: String = tokens.iter().map(|t| t["text"].as_str().unwrap()).collect();
    assert_eq!(joined, greedy);
    let count = |source: &str| tokens.iter().filter(|t| t["source"] == source).count();
    let stats = &last["layerskip"];
    assert_eq!(
        count("draft") as u64,
        stats["accepted"].as_u64().unwrap(),
        "{stats}"
    );
    // The prompt's token is the full model's; every step ends with the verifier's token, but
    // for a last step whose accepted drafts reached the end-of-sequence token (the shipped
    // model ends this function with one): generation stops there, before the verifier's token.
    assert_eq!(count("ar"), 1, "{tokens:?}");
    let stopped_in_drafts = tokens.last().unwrap()["source"] == "draft";
    assert_eq!(
        (count("correction") + count("bonus") + usize::from(stopped_in_drafts)) as u64,
        stats["steps"].as_u64().unwrap(),
        "{stats}"
    );
    if stopped_in_drafts {
        assert_eq!(last["choices"][0]["finish_reason"], "stop", "{last}");
    }
    assert!(count("correction") > 0 && count("draft") > 0, "{tokens:?}");
    for t in &tokens {
        match t["source"].as_str().unwrap() {
            "draft" => assert_eq!(t["exit_layer"], 3, "{t}"),
            "correction" => assert!(t["rejected"].is_string(), "{t}"),
            "bonus" | "ar" => assert!(t.get("rejected").is_none(), "{t}"),
            other => panic!("unexpected source {other}"),
        }
    }
    // Early exit's own tokens say so; without the option no chunk has a `layerskip` field
    // before the last.
    let mut early = body.clone();
    early["layerskip"] = json!({"strategy": "early-exit", "exit_layer": 2, "provenance": true});
    let events = server.stream("/v1/completions", &early);
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(
        first["layerskip"]["tokens"][0]["source"], "early-exit",
        "{first}"
    );
    assert_eq!(first["layerskip"]["tokens"][0]["exit_layer"], 2, "{first}");
    let mut plain = body.clone();
    plain["layerskip"]["provenance"] = json!(false);
    let events = server.stream("/v1/completions", &plain);
    for e in &events[..events.len() - 2] {
        let chunk: Value = serde_json::from_str(e).unwrap();
        assert!(chunk.get("layerskip").is_none(), "{chunk}");
    }
}

/// `layerskip.heal`: a prompt that ends with a newline gets the body `infer --heal` prints
/// (the shipped model answers it unhealed with EOS at once), whole or streamed, and the
/// streamed tokens' provenance texts put together are that body too (the first token's
/// healed newline taken off).
#[test]
fn healed_requests_continue_the_prompt_as_infer_heal_does() {
    let model = common::shipped_model();
    let server = Server::start(&model, &[]);
    let prompt = "def read_lines(path):\n    \"\"\"Return the lines of the file at path.\"\"\"\n";
    let healed = infer_text(&model, prompt, &["--max-new-tokens", "32", "--heal"]);
    assert!(healed.starts_with("    "), "{healed:?}");
    let body = |heal: bool| {
        json!({"prompt": prompt, "max_tokens": 32, "temperature": 0,
            "layerskip": {"heal": heal, "provenance": true}})
    };
    let (status, r) = server.post("/v1/completions", &body(false));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], "", "{r}");
    let (status, r) = server.post("/v1/completions", &body(true));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], healed, "{r}");
    let events = server.stream("/v1/completions", &body(true));
    let (text, _) = streamed_text(&events);
    assert_eq!(text, healed);
    let joined: String = provenance(&events)
        .iter()
        .map(|t| t["text"].as_str().unwrap())
        .collect();
    assert_eq!(joined, healed);
    let (status, r) = server.post(
        "/v1/completions",
        &json!({"prompt": prompt, "layerskip": {"heal": "yes"}}),
    );
    assert_eq!(status, 400, "{r}");
}
