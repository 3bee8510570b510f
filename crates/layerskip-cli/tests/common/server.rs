//! A real `layerskip serve` for the tests that drive it over HTTP.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A running `layerskip serve` on a free loopback port, stopped (SIGTERM, then kill) on drop.
pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl Server {
    pub fn start(model: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_layerskip"))
            .args(["serve", "--port", "0", "--model", model.to_str().unwrap()])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let base = loop {
            let line = lines
                .next()
                .expect("the server printed its address")
                .unwrap();
            if let Some(i) = line.find("http://") {
                let rest = &line[i..];
                break rest[..rest.find(' ').unwrap_or(rest.len())].to_string();
            }
        };
        // Keep draining stderr so the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Self { child, base }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs JSON; returns the status and the body as JSON.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        response(ureq::post(&self.url(path)).send_json(body.clone()))
    }

    pub fn get_text(&self, path: &str) -> String {
        ureq::get(&self.url(path))
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    }

    /// A streamed request: the `data:` payloads in order.
    pub fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let mut body = body.clone();
        body["stream"] = json!(true);
        let reader = ureq::post(&self.url(path))
            .send_json(body)
            .unwrap()
            .into_reader();
        BufReader::new(reader)
            .lines()
            .map(Result::unwrap)
            .filter_map(|l| l.strip_prefix("data: ").map(String::from))
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM: the server finishes what is in flight and exits.
        #[cfg(unix)]
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
    }
}

pub fn response(result: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    match result {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

/// `layerskip infer --json`'s text for the same prompt and options.
pub fn infer_text(model: &Path, prompt: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--json",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = crate::common::layerskip(&args);
    assert_eq!(code, 0, "{err}");
    let json: Value = serde_json::from_str(&out).unwrap();
    json["text"].as_str().unwrap().to_string()
}
