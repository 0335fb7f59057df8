"""`make gpu-bench`: the reduced PyTorch model timed on a GPU, unreduced against FiCoCo-VL 0.25 / 0.11.

    python -m engines.bench.gpu_bench [--model bench] [--ratios 1.0,0.25,0.11] [--warmup 3] [--repeats 10]

It needs PyTorch with CUDA and nothing else of the GPU stack: no TensorRT, no onnxruntime-gpu. The model
is `ficoco.reduced_llava.ReducedLlava` itself (the accuracy reference of every export), in fp16, on the
built-in `bench` model (CLIP ViT-L/14-336 and 4 decoder blocks of LLaVA-1.5-7B width, random weights;
FiCoCo-L steps in blocks 1..2 as in `make bench`). One model is loaded; every ratio is a `ReducedLlava`
over the same weights with its own schedule.

One timed run, on the model's own tensor methods so that nothing waits for the host inside it:
``encode_image`` (vision), ``embed_text`` + ``prefill`` (prefill), the argmax of the first token; TTFT is
the span from the first to the last of these, measured with CUDA events on the stream. Then ``decode
steps`` greedy tokens (embed, decode_step, argmax, all on the device) timed the same way -> tokens/s.
Also recorded: the host-side TTFT (up to the first token's id on the host) and the time the host took
to enqueue the TTFT work (close to the TTFT itself means the GPU was waiting for Python's kernel
launches).

Theoretical FLOPs are `ficoco.flops.flops_report` at the prompt's real text length (vision + decoder
prefill, lm_head excluded), the same figure `ficoco-bench` uses, so efficiency = TTFT speedup / FLOPs
speedup is comparable with the CPU bench's.

Without CUDA it runs on the CPU (fp32, `tiny` model, wall-clock timers) as a smoke test of the script
and says so in its report; that report goes to out/ unless --json / --md say otherwise, so that a CPU
run never stands in reports/ for a GPU measurement. A time budget (--budget-s, default 270 s including
the model load) cuts the timed repeats when a configuration runs slow; the report says when it did.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engines.bench.common import (
    DEFAULT_IMAGE,
    DEFAULT_PROMPT,
    TARGET_EFFICIENCY,
    BenchInputError,
    resolve_image,
)
from engines.bench.profiling import summarize
from engines.bench.report import finite, token_agreement
from engines.bench.sweep import parse_ratios
from ficoco.atomic import write_atomic
from ficoco.tower_steps import PlanError

log = logging.getLogger(__name__)

REPORT_SCHEMA = 1
DEFAULT_RATIOS: tuple[float, ...] = (1.0, 0.25, 0.11)
#: FiCoCo-L's decoder steps on the 4-block `bench` model, as `make bench` exports it
BENCH_LAYERS: dict[str, int] = {"l_start": 1, "l_end": 2}
GPU_REPORTS = (Path("reports/gpu-bench.json"), Path("reports/gpu-bench.md"))
SMOKE_REPORTS = (Path("out/gpu-bench-smoke.json"), Path("out/gpu-bench-smoke.md"))
TIMED = ("vision_ms", "prefill_ms", "ttft_ms", "ttft_host_ms", "enqueue_ms", "decode_ms", "decode_tokens_per_s")
SMOKE_NOTE = "smoke run on CPU, not a GPU measurement"


@dataclass(frozen=True)
class GpuBenchOptions:
    """One run's choices; None means the device's default (`resolved` fills them in)."""

    model: str | None = None  # bench on CUDA, tiny on CPU
    device: str = "auto"  # auto | cuda | cpu
    dtype: str | None = None  # fp16 on CUDA, fp32 on CPU
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    variant: str = "VL"
    method: str = "ficoco"
    warmup: int | None = None  # 3 on CUDA, 1 on CPU
    repeats: int | None = None  # 10 on CUDA, 3 on CPU
    decode_steps: int | None = None  # 32 on CUDA, 8 on CPU
    l_start: int | None = None  # bench: 1
    l_end: int | None = None  # bench: 2
    image: str = DEFAULT_IMAGE
    prompt: str = DEFAULT_PROMPT
    budget_s: float = 270.0
    threads: int = 1  # CPU only: intra-op threads of the smoke run
    json_path: Path | None = None
    md_path: Path | None = None

    def resolved(self, cuda: bool) -> GpuBenchOptions:
        """A copy with every default filled in for the device (and the unreduced ratio first)."""
        def pick(value: Any, gpu: Any, cpu: Any) -> Any:
            return value if value is not None else (gpu if cuda else cpu)

        paths = GPU_REPORTS if cuda else SMOKE_REPORTS
        return replace(self, model=pick(self.model, "bench", "tiny"), device="cuda" if cuda else "cpu",
                       dtype=pick(self.dtype, "fp16", "fp32"), ratios=(1.0, *[r for r in self.ratios if r < 1.0]),
                       warmup=pick(self.warmup, 3, 1), repeats=pick(self.repeats, 10, 3),
                       decode_steps=pick(self.decode_steps, 32, 8), json_path=self.json_path or paths[0],
                       md_path=self.md_path or paths[1])

    @property
    def layers(self) -> dict[str, int]:
        """The decoder block range of the reduced requests: --l-start / --l-end, over the bench default."""
        given = {k: v for k, v in (("l_start", self.l_start), ("l_end", self.l_end)) if v is not None}
        return {**BENCH_LAYERS, **given} if self.model == "bench" else given


class Clock:
    """Marks on the CUDA stream (events) or on the host clock (CPU, where every op is synchronous)."""

    def __init__(self, cuda: bool) -> None:
        import torch

        self.cuda = cuda
        self._torch = torch

    def mark(self) -> Any:
        if self.cuda:
            ev = self._torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            self._torch.cuda.synchronize()

    def ms(self, a: Any, b: Any) -> float:
        """Milliseconds from mark a to mark b (call after `sync`)."""
        return float(a.elapsed_time(b)) if self.cuda else (b - a) * 1e3


def device_info(cuda: bool) -> dict[str, Any]:
    """The GPU (name, capability, memory, driver when nvidia-smi answers) and the software versions."""
    import torch

    info: dict[str, Any] = {"kind": "cuda" if cuda else "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
                            "python": platform.python_version(), "platform": platform.platform(),
                            "processor": platform.processor() or platform.machine()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip().splitlines()
            info["nvidia_smi"] = out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = None
    else:
        info["name"] = f"CPU ({info['processor']}, {torch.get_num_threads()} threads)"
    return info


def time_run(model: Any, px: Any, ids: Any, offset: Any, steps: int, clock: Clock) -> dict[str, Any]:
    """One greedy run: TTFT (vision, embed + prefill, first argmax) and `steps` decode tokens, all enqueued
    without a host sync except the first token's id; the marks are read after one sync at the end."""
    import torch

    clock.sync()
    host0 = time.perf_counter()
    m0 = clock.mark()
    visual = model.encode_image(px).visual
    m1 = clock.mark()
    out = model.prefill(model.embed_text(ids), visual, offset)
    m2 = clock.mark()
    tok = out.logits.argmax(-1)
    m3 = clock.mark()
    enqueue_ms = (time.perf_counter() - host0) * 1e3
    first = int(tok[0].item())  # the one host sync TTFT needs
    ttft_host_ms = (time.perf_counter() - host0) * 1e3
    position = torch.full((ids.shape[0],), ids.shape[1] + visual.shape[1], dtype=torch.long, device=ids.device)
    cache, toks = out.cache, [tok]
    d0 = clock.mark()
    for _ in range(steps):
        logits, cache = model.decode_step(model.embed_text(tok[:, None]), position, cache)
        tok = logits.argmax(-1)
        toks.append(tok)
        position = position + 1
    d1 = clock.mark()
    clock.sync()
    decode_ms = clock.ms(d0, d1)
    return {
        "vision_ms": clock.ms(m0, m1), "prefill_ms": clock.ms(m1, m2), "ttft_ms": clock.ms(m0, m3),
        "ttft_host_ms": ttft_host_ms, "enqueue_ms": enqueue_ms, "decode_ms": decode_ms,
        "decode_tokens_per_s": steps / (decode_ms / 1e3) if decode_ms > 0 else float("nan"),
        "first_token": first, "tokens": [int(t) for t in torch.stack(toks, 1)[0].tolist()],
    }


def _time_config(model: Any, inputs: tuple[Any, Any, Any], o: GpuBenchOptions, clock: Clock, share_end: float,
                 runs: list[dict[str, Any]]) -> bool:
    """Warm-up and timed runs of one configuration into `runs`; True when its share of the budget (ending at
    `share_end`, perf_counter) cut them short. The warm-up goes first, and at least one timed run stays."""
    import torch

    last_s, cut = 0.0, False
    with torch.inference_mode():
        for k in range(o.warmup + o.repeats):
            timed = k >= o.warmup
            if k > 0 and time.perf_counter() + last_s > share_end and (runs or not timed):
                cut = True
                if timed:
                    break
                continue
            r0 = time.perf_counter()
            run = time_run(model, *inputs, o.decode_steps, clock)
            last_s = time.perf_counter() - r0
            if timed:
                runs.append(run)
    return cut


def plan_requests(opts: GpuBenchOptions, text_tokens: int) -> list[tuple[str, Any]]:
    """(label, ScheduleRequest) per ratio, unreduced first (variant none), as `ficoco-bench` plans its sweep."""
    from ficoco.planner import ScheduleRequest

    out: list[tuple[str, Any]] = []
    for r in opts.ratios:
        if r >= 1.0:
            out.append(("unreduced (1.0)", ScheduleRequest(variant="none", method=opts.method, ratio=None, text_tokens=text_tokens)))
        else:
            out.append((f"{opts.variant} {r:g}", ScheduleRequest(variant=opts.variant, method=opts.method, ratio=r,
                                                                  layers=dict(opts.layers), text_tokens=text_tokens)))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a != a or b != b or b == 0:
        return None
    return a / b


def run_gpu_bench(opts: GpuBenchOptions, say: Callable[[str], None] | None = None, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Load the model, time every ratio, and return the report (`write_report` writes it)."""
    import torch

    say = say or log.info
    t_start = time.perf_counter()
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise BenchInputError("--device cuda: torch.cuda.is_available() is False (a CPU build of torch, or no GPU visible)")
    cuda = opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available())
    o = opts.resolved(cuda)
    if not cuda:
        say(f"no CUDA device: {SMOKE_NOTE} (model {o.model}, {o.dtype}, {o.threads} thread(s))")
    threads_before = torch.get_num_threads()
    if not cuda:  # a smoke run: one thread keeps it quick beside other jobs (spinning threads on a busy CPU stall)
        torch.set_num_threads(o.threads)
    try:
        return _run(o, cuda, say, argv, t_start)
    finally:
        torch.set_num_threads(threads_before)


def _run(o: GpuBenchOptions, cuda: bool, say: Callable[[str], None], argv: Sequence[str], t_start: float) -> dict[str, Any]:
    import torch

    from ficoco.flops import flops_report
    from ficoco.inputs import encode_prompt, format_prompt
    from ficoco.models import load_model
    from ficoco.preprocess import preprocess_image
    from ficoco.reduced_llava import ReducedLlava

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if o.dtype not in dtypes:
        raise BenchInputError(f"--dtype {o.dtype!r}: choose one of {', '.join(dtypes)}")
    dev = torch.device("cuda" if cuda else "cpu")
    image = resolve_image(o.image)
    say(f"loading {o.model} ({o.dtype}) onto {dev}")
    t0 = time.perf_counter()
    loaded = load_model(o.model, dtype=dtypes[o.dtype])
    hf = loaded.model.to(dev).eval()
    load_s = time.perf_counter() - t0
    say(f"loaded in {load_s:.1f} s")
    px = preprocess_image(image, loaded.processor_config).to(dev, dtypes[o.dtype])
    prompt = encode_prompt(loaded.tokenizer, format_prompt(loaded.chat_template, o.prompt), loaded.image_token_id)
    ids = prompt.text_ids.to(dev)
    offset = torch.tensor([prompt.image_offset], dtype=torch.long, device=dev)
    text_tokens = prompt.num_text_tokens
    geometry = loaded.geometry
    clock = Clock(cuda)
    planned = [(label, req, req.make(geometry)) for label, req in plan_requests(o, text_tokens)]  # PlanError before timing
    deadline = t_start + o.budget_s
    configs: list[dict[str, Any]] = []
    for i, (label, request, schedule) in enumerate(planned):
        flops = flops_report(geometry, schedule.vision, schedule.decoder, text_tokens=text_tokens)
        entry: dict[str, Any] = {
            "label": label, "variant": schedule.variant, "method": schedule.method, "ratio": request.ratio or 1.0,
            "visual_tokens": {"to_decoder": schedule.visual_tokens_to_decoder, "final": schedule.visual_tokens_final},
            "layers": dict(request.layers), "flops_tflops": {k: flops[k] for k in ("vision", "prefill", "total", "decode_per_token")},
            "runs": [], "error": None, "budget_cut": False,
        }
        share_end = time.perf_counter() + max(0.0, deadline - time.perf_counter()) / (len(planned) - i)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            entry["budget_cut"] = _time_config(ReducedLlava(hf, schedule).eval(), (px, ids, offset), o, clock, share_end, entry["runs"])
        except (RuntimeError, ValueError) as err:  # e.g. CUDA out of memory: report it, time the others
            entry["error"] = f"{type(err).__name__}: {err}"
            say(f"{label}: FAILED: {entry['error'].splitlines()[0]}")
        entry["timings"] = {k: summarize([r[k] for r in entry["runs"] if r[k] == r[k]]) for k in TIMED}
        entry["tokens"] = entry["runs"][-1]["tokens"] if entry["runs"] else []
        for run in entry["runs"]:
            del run["tokens"]
        entry["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None
        configs.append(entry)
        med = entry["timings"]["ttft_ms"].get("median", float("nan"))
        say(f"{label}: {len(entry['runs'])} timed runs, TTFT median {med:.2f} ms" + (" (budget cut)" if entry["budget_cut"] else ""))
    _compare(configs)
    target = next((e for e in configs if e["variant"] == "VL" and abs(e["ratio"] - 0.25) < 1e-9), None)
    return {
        "schema": REPORT_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m engines.bench.gpu_bench" + "".join(" " + shlex.quote(a) for a in argv),
        "smoke": not cuda,
        "smoke_note": None if cuda else SMOKE_NOTE,
        "device": device_info(cuda),
        "model": {"name": loaded.name, "source": loaded.source, "revision": loaded.revision,
                  "decoder_layers": geometry.decoder.num_layers, "decoder_width": geometry.decoder.hidden_size,
                  "vision_width": geometry.vision.hidden_size},
        "options": {"dtype": o.dtype, "ratios": list(o.ratios), "variant": o.variant, "method": o.method, "layers": o.layers,
                    "warmup": o.warmup, "repeats": o.repeats, "decode_steps": o.decode_steps, "image": o.image,
                    "prompt": o.prompt, "budget_s": o.budget_s, "threads": None if cuda else o.threads,
                    "timer": "torch.cuda.Event (enable_timing)" if cuda else "time.perf_counter"},
        "outputs": {"json": str(o.json_path), "md": str(o.md_path)},
        "text_tokens": text_tokens,
        "load_s": round(load_s, 2),
        "wall_s": round(time.perf_counter() - t_start, 2),
        "target": {"rule": f"efficiency >= {TARGET_EFFICIENCY} at VL 0.25 (the CPU bench's target; information here)",
                   "efficiency": target.get("efficiency") if target else None},
        "configs": configs,
    }


def _compare(configs: list[dict[str, Any]]) -> None:
    """Speedups against the unreduced entry (the first), FLOPs speedups, efficiency, token agreement."""
    ref = configs[0]

    def med(e: dict[str, Any], k: str) -> float | None:
        s = e["timings"].get(k) or {}
        return s.get("median") if s.get("n") else None

    for e in configs:
        f, rf = e["flops_tflops"], ref["flops_tflops"]
        e["ttft_speedup"] = _ratio(med(ref, "ttft_ms"), med(e, "ttft_ms"))
        e["flops_speedup"] = _ratio(rf["total"], f["total"])
        e["efficiency"] = _ratio(e["ttft_speedup"], e["flops_speedup"])
        e["stage_speedups"] = {s: {"measured": _ratio(med(ref, f"{s}_ms"), med(e, f"{s}_ms")), "flops": _ratio(rf[s], f[s])}
                               for s in ("vision", "prefill")}
        e["decode_speedup"] = _ratio(med(e, "decode_tokens_per_s"), med(ref, "decode_tokens_per_s"))
        e["launch_share"] = _ratio(med(e, "enqueue_ms"), med(e, "ttft_ms"))
        e["first_token_agrees"] = (e["tokens"][:1] == ref["tokens"][:1]) if e["tokens"] and ref["tokens"] else None
        e["agreement"] = token_agreement(e["tokens"], ref["tokens"]) if e["tokens"] and ref["tokens"] else None


def _fmt(x: Any, spec: str, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    return format(x, spec) + suffix


def _ms(s: dict[str, Any] | None) -> str:
    if not s or not s.get("n"):
        return "–"
    return f"{s['median']:.2f} [{s['min']:.2f}–{s['max']:.2f}]"


def render_markdown(report: dict[str, Any]) -> str:
    """gpu-bench.md: the device, the options, one row per ratio, the per-stage speedups and the notes."""
    d, o, m = report["device"], report["options"], report["model"]
    lines = ["# GPU benchmark: the reduced PyTorch model, unreduced vs " + ", ".join(e["label"] for e in report["configs"][1:]), ""]
    if report["smoke"]:
        lines += [f"> **{SMOKE_NOTE.upper()}.** No CUDA device was visible, so this ran on {d['name']} in {o['dtype']} "
                  "to check the script; none of its numbers says anything about a GPU.", ""]
    gpu = f"{d['name']}" + (f" (compute capability {d['capability']}, {d['memory_gib']} GiB)" if d["kind"] == "cuda" else "")
    lines += [
        f"Device: {gpu}; torch {d['torch']}, CUDA {d['cuda'] or '–'}. Model `{m['name']}` ({m['source']}: vision width "
        f"{m['vision_width']}, {m['decoder_layers']} decoder blocks of width {m['decoder_width']}) in {o['dtype']}, "
        f"{report['text_tokens']} text tokens, image `{o['image']}`; {o['warmup']} warm-up + up to {o['repeats']} timed runs "
        f"per configuration, {o['decode_steps']} decode steps per run; timer {o['timer']}. Times: median [min–max] ms. "
        f"Model load {report['load_s']:.1f} s, whole run {report['wall_s']:.1f} s.",
        "",
        f"Command: `{report['command']}` (created {report['created']})",
        "",
        "| config | visual tokens | TFLOPs | vision ms | prefill ms | TTFT ms | TTFT speedup | FLOPs speedup "
        "| efficiency | decode tok/s | first token = unreduced | runs | peak GPU GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in report["configs"]:
        vt = e["visual_tokens"]
        vts = str(vt["final"]) if vt["to_decoder"] == vt["final"] else f"{vt['to_decoder']} → {vt['final']}"
        agree = {True: "yes", False: "no", None: "–"}[e["first_token_agrees"]]
        lines.append("| " + " | ".join([
            e["label"] + (f" ({e['error'].splitlines()[0][:60]})" if e["error"] else ""), vts,
            _fmt(e["flops_tflops"]["total"], ".3f"), _ms(e["timings"]["vision_ms"]), _ms(e["timings"]["prefill_ms"]),
            _ms(e["timings"]["ttft_ms"]), _fmt(e["ttft_speedup"], ".2f", "×"), _fmt(e["flops_speedup"], ".2f", "×"),
            _fmt(e["efficiency"], ".2f"), _fmt((e["timings"]["decode_tokens_per_s"] or {}).get("median"), ".1f"), agree,
            f"{len(e['runs'])}" + (" (budget cut)" if e["budget_cut"] else ""), _fmt(e["peak_gpu_mem_gib"], ".2f"),
        ]) + " |")
    lines += ["", "Per stage, measured / FLOPs speedup vs unreduced, and the host's share of TTFT spent enqueuing:", "",
              "| config | vision | prefill (embed + decoder) | decode tok/s vs unreduced | host TTFT ms | enqueue / TTFT |",
              "|---|---|---|---|---|---|"]
    for e in report["configs"]:
        ss = e["stage_speedups"]
        cells = [f"{_fmt(ss[s]['measured'], '.2f', '×')} / {_fmt(ss[s]['flops'], '.2f', '×')}" for s in ("vision", "prefill")]
        lines.append(f"| {e['label']} | {cells[0]} | {cells[1]} | {_fmt(e['decode_speedup'], '.2f', '×')} "
                     f"| {_ms(e['timings']['ttft_host_ms'])} | {_fmt(e['launch_share'], '.0%')} |")
    t = report["target"]
    lines += ["", f"Target ({t['rule']}): {_fmt(t['efficiency'], '.2f')}.", "", "Notes:", "",
              "- TFLOPs: ficoco.flops.flops_report at the prompt's real text length (vision + decoder prefill, lm_head "
              "excluded), as ficoco-bench; FLOPs speedup = unreduced / reduced; efficiency = TTFT speedup / FLOPs speedup.",
              "- TTFT = vision + embed + prefill + the first token's argmax, between two marks on the stream; host TTFT "
              "adds reading the token id back. Enqueue / TTFT near 100 % means the GPU waited on Python's kernel launches.",
              "- Decode: greedy steps on the device after the first token, no host sync between them; tokens/s = steps / time.",
              "- The weights are random: first-token agreement is recorded as information only."]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], json_path: Path, md_path: Path) -> None:
    write_atomic(json_path, json.dumps(finite(report), indent=2, allow_nan=False) + "\n", make_parents=True)
    write_atomic(md_path, render_markdown(report), make_parents=True)


def parse_args(argv: Sequence[str]) -> GpuBenchOptions:
    ap = argparse.ArgumentParser(prog="python -m engines.bench.gpu_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model name for load_model [default: bench on CUDA, tiny on CPU]")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="[default: fp16 on CUDA, fp32 on CPU]")
    ap.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS), help="fractions of visual tokens kept; 1.0 is always run")
    ap.add_argument("--variant", default="VL", choices=("V", "L", "VL"))
    ap.add_argument("--method", default="ficoco")
    ap.add_argument("--warmup", type=int, help="[default: 3 on CUDA, 1 on CPU]")
    ap.add_argument("--repeats", type=int, help="[default: 10 on CUDA, 3 on CPU]")
    ap.add_argument("--decode-steps", type=int, help="[default: 32 on CUDA, 8 on CPU]")
    ap.add_argument("--l-start", type=int, help="first decoder block with a step [bench: 1]")
    ap.add_argument("--l-end", type=int, help="last decoder block with a step [bench: 2]")
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--budget-s", type=float, default=270.0, help="whole-run time budget incl. the load; cuts repeats [default: 270]")
    ap.add_argument("--threads", type=int, default=1, help="CPU smoke run only: torch intra-op threads [default: 1]")
    ap.add_argument("--json", type=Path, help="[default: reports/gpu-bench.json on CUDA, out/gpu-bench-smoke.json on CPU]")
    ap.add_argument("--md", type=Path, help="[default: reports/gpu-bench.md on CUDA, out/gpu-bench-smoke.md on CPU]")
    a = ap.parse_args(list(argv))
    for name in ("warmup", "repeats", "decode_steps"):
        v = getattr(a, name)
        if v is not None and v < (1 if name == "repeats" else 0):
            ap.error(f"--{name.replace('_', '-')} {v} is too small")
    try:
        ratios = parse_ratios(a.ratios)
    except BenchInputError as err:
        ap.error(str(err))
    return GpuBenchOptions(model=a.model, device=a.device, dtype=a.dtype, ratios=ratios, variant=a.variant, method=a.method,
                           warmup=a.warmup, repeats=a.repeats, decode_steps=a.decode_steps, l_start=a.l_start, l_end=a.l_end,
                           image=a.image, prompt=a.prompt, budget_s=a.budget_s, threads=a.threads, json_path=a.json, md_path=a.md)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def say(msg: str) -> None:
        print(f"gpu-bench: {msg}", file=sys.stderr, flush=True)

    try:
        report = run_gpu_bench(opts, say, argv)
    except (BenchInputError, PlanError) as err:
        say(f"error: {err}")
        return 2
    json_path, md_path = Path(report["outputs"]["json"]), Path(report["outputs"]["md"])
    write_report(report, json_path, md_path)
    for e in report["configs"]:
        say(f"{e['label']:>16}: TTFT {_ms(e['timings']['ttft_ms'])} ms, speedup {_fmt(e['ttft_speedup'], '.2f')}x, "
            f"FLOPs speedup {_fmt(e['flops_speedup'], '.2f')}x, efficiency {_fmt(e['efficiency'], '.2f')}")
    say(f"{'SMOKE RUN ON CPU, NOT A GPU MEASUREMENT; ' if report['smoke'] else ''}report: {md_path} and {json_path} "
        f"({report['wall_s']:.0f} s)")
    return 1 if any(e["error"] for e in report["configs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
