"""`ficoco-serve` under a bounded load (`make serve-load`, not in CI).

    python -m engines.bench.serve_load BUNDLE [--requests 200] [--concurrency 8] [--max-tokens 16] [--stream]
                                              [--md reports/serve-load.md] [--json reports/serve-load.json]

Starts the real command (`python -m commands.serve BUNDLE --port 0`) as a child process, waits for it to
print its address, then sends `--requests` chat completions from `--concurrency` client threads (each with
its own keep-alive connection; standard library `http.client`, no OpenAI client needed). The image of each
request is a base64 PNG data URL (scikit-image's test photos, in turn) and the question one of a few, in
turn. Latency is measured per request from sending it to the last byte of the answer (with `--stream`, also
to the first content chunk). Then SIGTERM, and the server's exit status is recorded.

The report: requests, concurrency, p50 / p95 / p99 latency (ms), throughput (requests/s), errors by status,
generated tokens/s, and the load average before and after (`os.getloadavg()`; other jobs on the machine
slow the server down, so read the numbers with it).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

QUESTIONS = ("What is in the picture?", "What colour is the main object?", "Is there a person in the image?")
IMAGES = ("chelsea", "astronaut")


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between the sorted values; None when empty."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _bodies(max_tokens: int, stream: bool, model: str | None) -> list[bytes]:
    from ficoco.images import test_image

    urls = []
    for name in IMAGES:
        buf = io.BytesIO()
        test_image(name).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    bodies = []
    for i in range(len(urls) * len(QUESTIONS)):
        content = [{"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
                   {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]
        body: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if model:
            body["model"] = model
        bodies.append(json.dumps(body).encode())
    return bodies


def _one(conn: http.client.HTTPConnection, body: bytes, stream: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    first: float | None = None
    tokens = 0
    if stream and resp.status == 200:
        while line := resp.readline():
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise ValueError(f"error event: {event['error'].get('message')}")
            if first is None and any(c["delta"].get("content") for c in event.get("choices", [])):
                first = time.perf_counter()
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
    else:
        payload = resp.read()
        if resp.status == 200:
            tokens = int(json.loads(payload)["usage"]["completion_tokens"])
    end = time.perf_counter()
    return {"status": resp.status, "ms": (end - t0) * 1e3, "ttft_ms": None if first is None else (first - t0) * 1e3,
            "tokens": tokens}


def run_load(host: str, port: int, bodies: list[bytes], requests: int, concurrency: int, stream: bool) -> dict[str, Any]:
    """Send `requests` requests from `concurrency` threads; per-request results and the wall time."""
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=600)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            try:
                r = _one(conn, bodies[i % len(bodies)], stream)
            except (OSError, http.client.HTTPException, ValueError, KeyError) as err:
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=600)
                r = {"status": f"{type(err).__name__}", "ms": None, "ttft_ms": None, "tokens": 0}
            with lock:
                results.append(r)
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, name=f"load-client-{k}") for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"results": results, "wall_s": time.perf_counter() - t0}


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in run["results"] if r["status"] == 200]
    errors: dict[str, int] = {}
    for r in run["results"]:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    ms = [r["ms"] for r in ok]
    ttft = [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]
    wall = run["wall_s"]

    def rnd(x: float | None) -> float | None:
        return None if x is None else round(x, 1)

    return {
        "ok": len(ok), "errors": sum(errors.values()), "errors_by_status": errors, "wall_s": round(wall, 2),
        "throughput_req_s": round(len(ok) / wall, 2) if wall > 0 else None,
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1) if wall > 0 else None,
        "mean_completion_tokens": round(sum(r["tokens"] for r in ok) / len(ok), 2) if ok else None,
        "latency_ms": {f"p{q}": rnd(percentile(ms, q)) for q in (50, 95, 99)},
        "ttft_ms": {f"p{q}": rnd(percentile(ttft, q)) for q in (50, 95, 99)} if ttft else None,
    }


def to_markdown(report: dict[str, Any]) -> str:
    s, lat = report["summary"], report["summary"]["latency_ms"]
    la = report["loadavg_before"], report["loadavg_after"]
    lines = [
        "# serve-load: ficoco-serve under a bounded load",
        "",
        f"Machine: {report['machine']}. Command: `make serve-load` (`python -m engines.bench.serve_load`). "
        f"Bundle: `{report['bundle']}` (model `{report['model']}`), server: `{' '.join(report['server_command'][2:])}`.",
        "",
        f"Load average (1, 5, 15 min) before: {la[0]}, after: {la[1]} — other processes on the machine compete "
        "with the server's one worker; read the numbers with it.",
        "",
        "| requests | concurrency | max_tokens | stream | p50 ms | p95 ms | p99 ms | throughput req/s | tokens/s | errors |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        f"| {report['requests']} | {report['concurrency']} | {report['max_tokens']} | {'yes' if report['stream'] else 'no'} "
        f"| {lat['p50']} | {lat['p95']} | {lat['p99']} | {s['throughput_req_s']} | {s['tokens_per_s']} | {s['errors']} |",
        "",
        f"Latency runs from sending a request to the last byte of its answer, queueing included (one worker "
        f"generates one request at a time). Mean completion tokens per answer: {s['mean_completion_tokens']}. "
        f"Wall time {s['wall_s']} s. Errors by status: {s['errors_by_status'] or 'none'}. "
        f"Server exit status after SIGTERM: {report['server_exit']}.",
    ]
    if s.get("ttft_ms"):
        t = s["ttft_ms"]
        lines += ["", f"Time to the first content chunk (streamed): p50 {t['p50']} ms, p95 {t['p95']} ms, p99 {t['p99']} ms."]
    return "\n".join(lines) + "\n"


def _start_server(bundle: Path, extra: list[str]) -> tuple[subprocess.Popen[str], list[str], str, int]:
    cmd = [sys.executable, "-m", "commands.serve", str(bundle), "--port", "0", "--no-verify", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        m = re.search(r"http://([^\s/]+):(\d+)", line)
        if m:
            return proc, cmd, m.group(1).strip("[]"), int(m.group(2))
    proc.wait()
    raise RuntimeError(f"ficoco-serve exited {proc.returncode} before listening:\n{''.join(seen)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--requests", type=int, default=200, help="requests in all [default: 200]")
    ap.add_argument("--concurrency", type=int, default=8, help="client threads sending at once [default: 8]")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request [default: 16]")
    ap.add_argument("--stream", action="store_true", help="stream every answer (also measures time to first chunk)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra ficoco-serve option (repeatable), e.g. --server-arg=--threads=2")
    ap.add_argument("--json", type=Path, default=Path("reports/serve-load.json"))
    ap.add_argument("--md", type=Path, default=Path("reports/serve-load.md"))
    args = ap.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        ap.error("--requests, --concurrency and --max-tokens must be at least 1")
    if not (args.bundle / "manifest.json").is_file():
        ap.error(f"{args.bundle} has no manifest.json; export a bundle first (make serve-load does)")
    from ficoco.atomic import write_atomic

    # the queue must hold every client's request, or the load test measures 503s
    extra = ["--max-queue", str(max(16, args.concurrency)), *args.server_arg]
    bodies = _bodies(args.max_tokens, args.stream, None)
    before = _loadavg()
    proc, cmd, host, port = _start_server(args.bundle, extra)
    drain = threading.Thread(target=lambda: proc.stderr and proc.stderr.read(), daemon=True)  # keep the pipe flowing
    drain.start()
    try:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("GET", "/v1/models")
        model = json.loads(conn.getresponse().read())["data"][0]["id"]
        conn.close()
        run = run_load(host, port, bodies, args.requests, args.concurrency, args.stream)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code: int | str = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = f"killed after 60 s (exit {proc.wait()})"
    report = {
        "machine": f"{os.cpu_count()} cores", "bundle": str(args.bundle), "model": model, "server_command": cmd,
        "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens, "stream": args.stream,
        "loadavg_before": before, "loadavg_after": _loadavg(), "server_exit": code, "summary": summarize(run),
        "latencies_ms": [round(r["ms"], 2) for r in run["results"] if r["ms"] is not None],
    }
    write_atomic(args.json, json.dumps(report, indent=2) + "\n", make_parents=True)
    write_atomic(args.md, to_markdown(report), make_parents=True)
    print(to_markdown(report))
    return 0 if report["summary"]["errors"] == 0 and code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
