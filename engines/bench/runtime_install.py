"""`make runtime-check`: the runtime install, without PyTorch or transformers, runs a bundle.

A fresh virtual environment gets `ficoco-export[runtime]` from the checkout (numpy, ONNX Runtime,
tokenizers, jinja2, pillow, click, rich: no torch, no transformers), then, with the full install's bundle:

- the Python `Pipeline` answers questions in the new environment, and the token ids equal those of the
  full install (this process) on the same bundle, image and question;
- neither torch nor transformers is installed there, so nothing could have imported them;
- installed size of each environment and `ficoco-run` start-up time (a one-token answer, wall clock,
  median of 3) in both environments.

Writes reports/runtime-install.{json,md}. `tests/test_runtime_install.py` runs the same functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]

#: what runs inside the runtime-only environment: it answers, and says whether torch could be imported
_PROBE = """
import importlib.util, json, sys
from engines.runtime import Pipeline
from ficoco.sampling import SamplingConfig
spec = json.loads(sys.argv[1])
pipe = Pipeline.from_bundle(spec["bundle"], backend="onnxruntime", ort_provider="cpu")
rows = []
for q in spec["questions"]:
    a = pipe.generate(spec["image"], q, max_new_tokens=spec["max_new_tokens"], stop_token_ids=[])
    rows.append({"question": q, "token_ids": a.token_ids, "text": a.text})
s = pipe.generate(spec["image"], spec["questions"][0], max_new_tokens=spec["max_new_tokens"], stop_token_ids=[],
                  sampling=SamplingConfig(do_sample=True, temperature=1.3, top_k=20, top_p=0.9, seed=5, repetition_penalty=1.2))
print(json.dumps({"answers": rows, "sampled": s.token_ids,
                  "torch_installed": importlib.util.find_spec("torch") is not None,
                  "transformers_installed": importlib.util.find_spec("transformers") is not None,
                  "torch_imported": "torch" in sys.modules}))
"""


class InstallError(RuntimeError):
    """The runtime environment could not be made (the message has pip's last lines)."""


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


def make_runtime_env(venv: Path, source: Path = ROOT) -> float:
    """A fresh venv at `venv` with `source[runtime]` installed (no torch); returns the seconds it took."""
    t0 = time.perf_counter()
    r = _run([sys.executable, "-m", "venv", str(venv)])
    if r.returncode:
        raise InstallError(f"python -m venv failed: {r.stderr[-800:]}")
    r = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              f"{source}[runtime]"])
    if r.returncode:
        raise InstallError(f"pip install {source}[runtime] failed: {(r.stderr or r.stdout)[-1500:]}")
    return time.perf_counter() - t0


def run_probe(venv: Path, bundle: Path, image: Path, questions: list[str], max_new_tokens: int) -> dict[str, Any]:
    """Answer `questions` about `image` with the runtime environment's `Pipeline` (outside the checkout)."""
    spec = {"bundle": str(bundle), "image": str(image), "questions": questions, "max_new_tokens": max_new_tokens}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with tempfile.TemporaryDirectory() as cwd:  # not the checkout: the installed package must be what runs
        r = _run([str(venv / "bin" / "python"), "-c", _PROBE, json.dumps(spec)], cwd=cwd, env=env)
    if r.returncode:
        raise RuntimeError(f"the runtime environment failed to run the bundle:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def reference_answers(bundle: Path, image: Path, questions: list[str], max_new_tokens: int) -> dict[str, Any]:
    """The same probe in this (full) install."""
    from engines.runtime import Pipeline
    from ficoco.sampling import SamplingConfig

    pipe = Pipeline.from_bundle(bundle, backend="onnxruntime", ort_provider="cpu")
    rows = [{"question": q, "token_ids": (a := pipe.generate(image, q, max_new_tokens=max_new_tokens, stop_token_ids=[])).token_ids,
             "text": a.text} for q in questions]
    s = pipe.generate(image, questions[0], max_new_tokens=max_new_tokens, stop_token_ids=[],
                      sampling=SamplingConfig(do_sample=True, temperature=1.3, top_k=20, top_p=0.9, seed=5, repetition_penalty=1.2))
    return {"answers": rows, "sampled": s.token_ids}


def site_bytes(venv: Path) -> int:
    """Bytes under the environment's directory (its interpreter links are not followed)."""
    total = 0
    for dirpath, _, files in os.walk(venv):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def startup_seconds(venv: Path, bundle: Path, image: Path, repeats: int = 3) -> float:
    """Median wall-clock seconds of `ficoco-run BUNDLE --max-new-tokens 1` from `venv` (start-up dominated)."""
    exe = venv / "bin" / "ficoco-run"
    times = []
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = _run([str(exe), str(bundle), "--image", str(image), "--prompt", "what shape is this?", "--max-new-tokens", "1",
                  "--backend", "onnxruntime", "--ort-provider", "cpu", "--no-verify"], env=env, cwd=tempfile.gettempdir())
        if r.returncode:
            raise RuntimeError(f"{exe} failed: {r.stderr[-1500:]}")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("out/demo-shapes-VL-r0.25"),
                    help="bundle to run (exported with the shapes model when missing) [default: the demo's]")
    ap.add_argument("--venv", type=Path, default=Path("out/runtime-venv"), help="where the runtime environment goes (remade)")
    ap.add_argument("--json", type=Path, default=Path("reports/runtime-install.json"))
    ap.add_argument("--md", type=Path, default=Path("reports/runtime-install.md"))
    args = ap.parse_args()
    shown = str(args.bundle)
    args.venv, args.bundle = args.venv.resolve(), args.bundle.resolve()  # the runs happen outside the checkout
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ficoco import vqa
    from ficoco.atomic import write_atomic

    if not (args.bundle / "manifest.json").is_file():
        from exporter.export import ExportOptions
        from exporter.pipeline import export_bundle
        from ficoco.models import load_model
        from ficoco.planner import ScheduleRequest

        log.info("exporting %s", args.bundle)
        export_bundle(load_model("shapes"), ScheduleRequest(variant="VL", method="ficoco", ratio=0.25), args.bundle,
                      ExportOptions(max_batch_size=8), force=True)
    split = vqa.test_split("easy-vqa")
    image = args.venv.parent / "runtime-check.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    split.image(split.questions[0].image_key).save(image)
    questions = ["what shape is in the image?", "what color is the shape?"]
    if args.venv.exists():
        import shutil

        shutil.rmtree(args.venv)
    log.info("making the runtime environment %s", args.venv)
    install_s = make_runtime_env(args.venv.resolve())
    got = run_probe(args.venv.resolve(), args.bundle.resolve(), image.resolve(), questions, 8)
    ref = reference_answers(args.bundle, image, questions, 8)
    full_venv = Path(sys.prefix)
    report = {
        "bundle": shown,
        "install_seconds": round(install_s, 1),
        "torch_installed": got["torch_installed"], "transformers_installed": got["transformers_installed"],
        "same_greedy_tokens": [g["token_ids"] for g in got["answers"]] == [r["token_ids"] for r in ref["answers"]],
        "same_sampled_tokens": got["sampled"] == ref["sampled"],
        "answers": got["answers"],
        "runtime_env_mib": round(site_bytes(args.venv) / 2**20, 1),
        "full_env_mib": round(site_bytes(full_venv) / 2**20, 1),
        "startup_s_runtime": round(startup_seconds(args.venv, args.bundle.resolve(), image.resolve()), 2),
        "startup_s_full": round(startup_seconds(full_venv, args.bundle.resolve(), image.resolve()), 2),
        "loadavg_1min": os.getloadavg()[0],
        "command": "make runtime-check",
    }
    lines = [
        "# The runtime install without PyTorch", "",
        f"Command: `{report['command']}`. Bundle: `{report['bundle']}`; 1-minute load average at the end: {report['loadavg_1min']:.2f}.", "",
        "| | runtime install (`ficoco-export[runtime]`) | full install (`[export,dev]`) |",
        "|---|---:|---:|",
        f"| environment size | {report['runtime_env_mib']:.0f} MiB | {report['full_env_mib']:.0f} MiB |",
        f"| `ficoco-run` start-up + 1 token (median of 3) | {report['startup_s_runtime']:.2f} s | {report['startup_s_full']:.2f} s |",
        f"| torch / transformers installed | {got['torch_installed']} / {got['transformers_installed']} | True / True |", "",
        f"Greedy tokens equal to the full install's: {report['same_greedy_tokens']}; seeded sampled tokens "
        f"(temperature 1.3, top-k 20, top-p 0.9, repetition penalty 1.2): {report['same_sampled_tokens']}.", "",
    ]
    lines += [f"- {a['question']!r} -> {a['text']!r}" for a in got["answers"]]
    write_atomic(args.json, json.dumps(report, indent=1) + "\n", make_parents=True)
    write_atomic(args.md, "\n".join(lines) + "\n", make_parents=True)
    print("\n".join(lines))
    if not (report["same_greedy_tokens"] and report["same_sampled_tokens"]) or got["torch_installed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
