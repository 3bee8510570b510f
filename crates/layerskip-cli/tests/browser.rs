//! The web page of `layerskip serve`, in a real browser: headless Chromium, driven over the
//! Chrome DevTools Protocol, loads the page from a real server on loopback, runs a greedy
//! comparison (autoregressive, then self-speculation) and a request the server refuses, and the
//! test reads the rendered DOM.
//!
//! Needs Chromium (`bash scripts/install_chromium.sh`; `LAYERSKIP_CHROMIUM` names another
//! binary), so it is `#[ignore]`d in `cargo test --workspace`; `.ci/run` installs Chromium and
//! runs it with `cargo test -p layerskip-cli --test browser -- --ignored`.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

// Helpers shared with the other test files, not all used here.
#[allow(dead_code)]
mod common;
#[allow(dead_code)]
#[path = "common/server.rs"]
mod server;
use server::{Server, infer_text};

/// Headless Chromium with the DevTools Protocol on a free port, killed on drop.
struct Browser {
    child: Child,
    profile: PathBuf,
    socket: WebSocket<TcpStream>,
    next_id: u64,
}

impl Browser {
    fn start() -> Self {
        let binary = std::env::var("LAYERSKIP_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let profile =
            std::env::temp_dir().join(format!("layerskip-chromium-{}", std::process::id()));
        let mut child = Command::new(&binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--window-size=1200,1400",
                "--remote-debugging-port=0",
                &format!("--user-data-dir={}", profile.display()),
                "about:blank",
            ])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {binary} ({e}): bash scripts/install_chromium.sh")
            });
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let browser_ws = loop {
            let line = lines
                .next()
                .expect("Chromium printed its DevTools address")
                .unwrap();
            if let Some(i) = line.find("ws://") {
                break line[i..].trim().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        // The page target's own socket, from the DevTools HTTP endpoint.
        let host = browser_ws
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let targets: Value = ureq::get(&format!("http://{host}/json/list"))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        let page_ws = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .expect("a page target")["webSocketDebuggerUrl"]
            .as_str()
            .unwrap()
            .to_string();
        let stream = TcpStream::connect(&host).unwrap();
        let (socket, _) = tungstenite::client(page_ws.as_str(), stream).unwrap();
        Self {
            child,
            profile,
            socket,
            next_id: 1,
        }
    }

    /// Sends a DevTools command and returns its result (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket.send(Message::text(message)).unwrap();
        loop {
            let Message::Text(text) = self.socket.read().unwrap() else {
                continue;
            };
            let reply: Value = serde_json::from_str(text.as_str()).unwrap();
            if reply["id"] == id {
                assert!(reply.get("error").is_none(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page (`null` while the page is loading).
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        result["result"]["value"].clone()
    }

    /// Loads `url` and waits until the page has read the model's description.
    fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
        self.wait_for(
            "document.getElementById('exit') && document.getElementById('exit').max !== ''",
        );
    }

    /// Waits (up to 3 minutes) until `condition` is true in the page.
    fn wait_for(&mut self, condition: &str) {
        let deadline = Instant::now() + Duration::from_secs(180);
        while self.eval(&format!("!!({condition})")) != true {
            assert!(Instant::now() < deadline, "the page never met {condition}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sets a form field as typing would (and tells the page it changed).
    fn fill(&mut self, id: &str, value: &str) {
        let value = serde_json::to_string(value).unwrap();
        self.eval(&format!(
            "(() => {{ const e = document.getElementById('{id}'); e.value = {value}; \
             e.dispatchEvent(new Event('input', {{bubbles: true}})); }})()"
        ));
    }

    /// Waits until the page says it finished `what` (`generate` or `compare`).
    fn finished(&mut self, what: &str) {
        self.wait_for(&format!("document.body.dataset.done === '{what}'"));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The rendered tokens of the output element `selector`: `[text, source, rejected]` each.
const SPANS: &str = "(sel) => [...document.querySelectorAll(sel + ' .tok')]\
    .map((s) => [s.textContent, s.dataset.source, s.dataset.rejected ?? null])";

fn spans(browser: &mut Browser, selector: &str) -> Vec<(String, String, Option<String>)> {
    let value = browser.eval(&format!("({SPANS})('{selector}')"));
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s[0].as_str().unwrap().to_string(),
                s[1].as_str().unwrap().to_string(),
                s[2].as_str().map(String::from),
            )
        })
        .collect()
}

fn text(spans: &[(String, String, Option<String>)]) -> String {
    spans.iter().map(|s| s.0.as_str()).collect()
}

#[test]
#[ignore = "needs Chromium: bash scripts/install_chromium.sh; .ci/run runs it with --ignored"]
fn the_page_shows_self_speculation_token_by_token_and_compares_it_with_autoregressive() {
    let server = Server::start(&common::shipped_model(), &[]);
    let mut browser = Browser::start();
    // The page's own example prompt (the shipped model was fine-tuned on signature + docstring).
    let prompt = "def read_lines(path):\n    \"\"\"Return the lines of the file at path, without their newlines.\"\"\"";
    let greedy = infer_text(
        &common::shipped_model(),
        prompt,
        &["--max-new-tokens", "40"],
    );
    assert!(!greedy.is_empty());
    // As a user would: the form filled in, then the Compare button.
    browser.open(&server.url("/"));
    assert_eq!(
        browser.eval("document.getElementById('prompt').value"),
        prompt
    );
    browser.fill("prompt", prompt);
    browser.fill("strategy", "self-spec");
    browser.fill("exit", "3");
    browser.fill("drafts", "3");
    browser.fill("max-tokens", "40");
    browser.fill("temperature", "0");
    browser.eval("document.getElementById('compare').click()");
    browser.finished("compare");
    assert_eq!(
        browser.eval("document.getElementById('error').hidden"),
        true
    );

    // Both texts equal `layerskip infer`'s; the page says they are identical.
    let ar = spans(&mut browser, "#compare-ar");
    let ss = spans(&mut browser, "#compare-strategy");
    assert_eq!(text(&ar), greedy);
    assert_eq!(text(&ss), greedy);
    let verdict = browser.eval("document.getElementById('compare-verdict').dataset.same");
    assert_eq!(verdict, "true");
    let verdict_text = browser.eval("document.getElementById('compare-verdict').textContent");
    assert!(
        verdict_text
            .as_str()
            .unwrap()
            .starts_with("identical texts"),
        "{verdict_text}"
    );

    // Every token carries its source: autoregressive decoding's are the full model's; the
    // self-speculative ones are accepted drafts, corrections (with the rejected draft) and
    // bonus tokens, after the prompt's own token.
    assert!(ar.iter().all(|s| s.1 == "ar"), "{ar:?}");
    assert_eq!(ss[0].1, "ar", "{ss:?}");
    let count = |source: &str| ss.iter().filter(|s| s.1 == source).count();
    assert!(count("draft") > 0, "{ss:?}");
    assert!(count("correction") + count("bonus") > 0, "{ss:?}");
    for (_, source, rejected) in &ss {
        assert_eq!(source == "correction", rejected.is_some(), "{ss:?}");
    }
    // The statistics panel shows the server's figures.
    let acceptance = browser.eval("document.getElementById('stat-acceptance').textContent");
    assert!(acceptance.as_str().unwrap().ends_with('%'), "{acceptance}");
    let bars = browser.eval("document.querySelectorAll('#histogram div').length");
    assert_eq!(bars, 4, "one bar per accepted count 0..=3");

    // On a phone-width screen nothing runs past the right edge (the columns stack).
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": true}),
    );
    let width = browser.eval("document.documentElement.scrollWidth");
    assert!(width.as_u64().unwrap() <= 390, "{width}");
    browser.call("Emulation.clearDeviceMetricsOverride", json!({}));

    let shot = browser.call("Page.captureScreenshot", json!({"format": "png"}));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve-page.png");
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    std::fs::write(&out, png).unwrap();
    eprintln!("screenshot: {}", out.display());

    // A request the server refuses, sent with the Enter key from the prompt box (a link fills
    // the form): its message in the page, not a blank.
    browser.open(&server.url("/?prompt=x&strategy=self-spec&exit=99&drafts=3"));
    browser.eval("document.getElementById('prompt').focus()");
    for kind in ["keyDown", "keyUp"] {
        browser.call(
            "Input.dispatchKeyEvent",
            json!({"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}),
        );
    }
    browser.finished("generate");
    assert_eq!(
        browser.eval("document.getElementById('error').hidden"),
        false
    );
    let error = browser.eval("document.getElementById('error').textContent");
    let error = error.as_str().unwrap();
    assert!(
        error.contains("exit layer 99 is out of range") && error.contains("HTTP 400"),
        "{error}"
    );

    // "Heal the prompt's end" (from a link): a prompt that ends with a newline gets the body
    // `infer --heal` prints, after the prompt's echo (the shipped model answers it unhealed
    // with EOS at once).
    let ended = format!("{prompt}\n");
    let healed = infer_text(
        &common::shipped_model(),
        &ended,
        &["--max-new-tokens", "40", "--heal"],
    );
    assert!(healed.starts_with("    "), "{healed:?}");
    // Every byte but letters and digits percent-encoded, as URLSearchParams reads it.
    let encoded: String = ended
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    browser.open(&server.url(&format!(
        "/?prompt={encoded}&max_tokens=40&heal=1&run=generate"
    )));
    browser.finished("generate");
    assert_eq!(
        browser.eval("document.getElementById('heal').checked"),
        true
    );
    let output = spans(&mut browser, "#output");
    assert_eq!(text(&output), healed);
    let echo = browser.eval("document.querySelector('#output .prompt-echo').textContent");
    assert_eq!(echo, ended.as_str());
}
