//! The `layerskip` binary end to end: clear one-line errors with a non-zero exit for bad input,
//! and (when SmolLM2 is prepared) the same greedy text from every strategy.

use std::path::PathBuf;
use std::process::Command;

fn layerskip(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_layerskip"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn smollm2() -> Option<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/smollm2-135m");
    if dir.join("model.safetensors").is_file() {
        Some(dir.to_string_lossy().into_owned())
    } else {
        eprintln!("SKIPPED: no converted SmolLM2 (run `bash scripts/prepare_smollm2.sh`)");
        None
    }
}

fn assert_one_error_line(code: i32, stderr: &str, needle: &str) {
    assert_eq!(code, 1, "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "{stderr}"
    );
}

#[test]
fn bad_paths_and_devices_are_one_line_errors() {
    let (code, _, err) = layerskip(&["infer", "--model", "/nonexistent", "--prompt", "x"]);
    assert_one_error_line(code, &err, "/nonexistent");
    let (code, _, err) = layerskip(&["convert", "--gguf", "/nonexistent.gguf", "--out", "/tmp/x"]);
    assert_one_error_line(code, &err, "/nonexistent.gguf");
    let (code, _, err) = layerskip(&[
        "infer",
        "--model",
        "/nonexistent",
        "--prompt",
        "x",
        "--device",
        "tpu",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown device"), "{err}");
}

#[test]
fn strategies_agree_and_bad_exit_layers_are_rejected() {
    let Some(model) = smollm2() else { return };
    let text = |extra: &[&str]| {
        let mut args = vec![
            "infer",
            "--model",
            &model,
            "--prompt",
            "def add(a, b):",
            "--max-new-tokens",
            "12",
            "--json",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = layerskip(&args);
        assert_eq!(code, 0, "{err}");
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        json["text"].as_str().unwrap().to_string()
    };
    let ar = text(&[]);
    assert!(!ar.is_empty());
    assert_eq!(
        text(&[
            "--strategy",
            "self-spec",
            "--exit-layer",
            "10",
            "--speculations",
            "3"
        ]),
        ar
    );
    assert_eq!(
        text(&["--strategy", "early-exit", "--exit-layer", "30"]),
        ar
    );
    // Each bad combination: one error line naming the problem, exit code 1.
    let self_spec = ["--strategy", "self-spec"];
    let cases: [(&[&str], &str); 4] = [
        (
            &[&self_spec[..], &["--exit-layer", "0"]].concat(),
            "exit layer",
        ),
        (
            &[&self_spec[..], &["--exit-layer", "30"]].concat(),
            "exit layer",
        ),
        (
            &[
                &self_spec[..],
                &["--exit-layer", "4", "--speculations", "0"],
            ]
            .concat(),
            "speculations",
        ),
        (&["--temperature", "-1"], "temperature"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["infer", "--model", &model, "--prompt", "x"];
        args.extend_from_slice(extra);
        let (code, _, err) = layerskip(&args);
        assert_one_error_line(code, &err, needle);
    }
}
