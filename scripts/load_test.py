"""A bounded loopback load test of `layerskip serve`: C concurrent streaming clients send N
requests in all (greedy, the same prompt), and the script reports requests/s, tokens/s,
p50/p99 time to first token and per-token latency, and checks that every response completed and
equals the single-client output. A benchmark that prints figures, not a pass/fail timing.

usage: python3 scripts/load_test.py http://127.0.0.1:8000 [--clients 8] [--requests 32]
       [--max-tokens 64] [--layerskip '{"strategy": "self-spec", "exit_layer": 4}']
Only the Python standard library is needed.
"""
import argparse
import json
import statistics
import threading
import time
import urllib.request


def stream(base, body):
    """Sends one streaming completion; returns (text, ttft_s, per-chunk gaps, tokens, finish)."""
    request = urllib.request.Request(
        base + "/v1/completions",
        data=json.dumps(dict(body, stream=True)).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    first, last, gaps, text, tokens, finish = None, None, [], [], 0, None
    with urllib.request.urlopen(request) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            now = time.perf_counter()
            piece = chunk["choices"][0]["text"]
            if piece:
                if first is None:
                    first = now - start
                elif last is not None:
                    gaps.append(now - last)
                last = now
                text.append(piece)
            if chunk["choices"][0]["finish_reason"]:
                finish = chunk["choices"][0]["finish_reason"]
                tokens = chunk["usage"]["completion_tokens"]
    return "".join(text), first, gaps, tokens, finish


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="def fibonacci(n):")
    ap.add_argument("--layerskip", default=None, help="JSON of the request's layerskip field")
    args = ap.parse_args()
    body = dict(prompt=args.prompt, max_tokens=args.max_tokens, temperature=0)
    if args.layerskip:
        body["layerskip"] = json.loads(args.layerskip)
    reference, _, _, _, _ = stream(args.base, body)
    results, lock, queue = [], threading.Lock(), list(range(args.requests))

    def client():
        while True:
            with lock:
                if not queue:
                    return
                queue.pop()
            r = stream(args.base, body)
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [r[1] for r in results if r[1] is not None]
    gaps = [g for r in results for g in r[2]]
    tokens = sum(r[3] for r in results)
    same = sum(r[0] == reference for r in results)
    complete = sum(r[4] is not None for r in results)
    print(json.dumps(dict(
        clients=args.clients, requests=len(results), completed=complete, equal_to_single_client=same,
        wall_s=round(wall, 3), requests_per_s=round(len(results) / wall, 2), tokens_per_s=round(tokens / wall, 1),
        ttft_ms_p50=round(1e3 * percentile(ttft, 50), 1), ttft_ms_p99=round(1e3 * percentile(ttft, 99), 1),
        chunk_gap_ms_p50=round(1e3 * percentile(gaps, 50), 2), chunk_gap_ms_p99=round(1e3 * percentile(gaps, 99), 2),
        layerskip=body.get("layerskip"),
    )))
    if complete != len(results) or same != len(results):
        raise SystemExit("some responses were incomplete or differed from the single-client output")


if __name__ == "__main__":
    main()
