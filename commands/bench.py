"""`ficoco-bench`: its flags, checked into `engines.bench.BenchOptions`, then `run_bench` with progress on stderr."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from commands.common import CONTEXT, VERBOSE_HELP, run_command
from commands.options import layer_options
from engines.bench.common import DEFAULT_IMAGE, DEFAULT_PROMPT, DEFAULT_RATIOS, BenchInputError, BenchOptions
from engines.bench.report import target_summary
from engines.bench.sweep import parse_ratios, parse_variants, run_bench


@click.command(context_settings=CONTEXT)
@click.version_option(package_name="ficoco-export")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS), show_default=True,
              help="Comma-separated fractions of the visual tokens kept, in (0, 1]; 1.0 is the unreduced model.")
@click.option("--variants", help="Comma-separated variants to sweep: V, L, VL [default: BUNDLE's variant].")
@click.option("--also", "also", multiple=True, type=click.Path(path_type=Path),
              help="An extra bundle to time on the same inputs (e.g. a quantized copy of BUNDLE); repeatable.")
@click.option("--work-dir", type=click.Path(path_type=Path),
              help="Where the sweep's bundles are exported and cached, and the workers' logs and traces go "
                   "[default: BUNDLE/../.bench-<BUNDLE name>]. Several GB per bundle for large models.")
@click.option("--report-dir", type=click.Path(path_type=Path), help="Where bench.json/.md/.png go [default: BUNDLE/reports].")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed runs per configuration before the timed ones.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs per configuration (median and min/max are reported).")
@click.option("--max-new-tokens", type=int, default=16, show_default=True, help="Tokens generated per run (greedy, EOS ignored); at most BUNDLE's limit.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="ONNX Runtime intra-op threads and torch.set_num_threads for every configuration [0: every available core].")
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="Image file, or the name of a built-in test photo (astronaut, chelsea, coffee, ...).")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="The question asked about the image.")
@layer_options(default="BUNDLE's schedule")
@click.option("--no-pytorch", is_flag=True, help="Skip transformers' PyTorch generate reference.")
@click.option("--no-profile", is_flag=True, help="Skip the ONNX Runtime profiled pass (no reduction share).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundles' files (large models).")
@click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP)
def main(bundle: Path, **kw: Any) -> None:
    """Benchmark BUNDLE on this machine: a ratio sweep of sibling bundles, --also bundles and transformers'
    PyTorch generate, timed in one run; writes bench.json, bench.md and bench.png to BUNDLE/reports/.

    Reports per configuration: vision / prefill / TTFT ms (median and min–max over --repeats), decode
    tokens/s, peak RSS, theoretical TFLOPs and the FLOPs ratio, the TTFT speedup vs the unreduced bundle and
    vs PyTorch, the share of stage time in the reduction ops (ONNX Runtime profile) and greedy token
    agreement with the unreduced bundle.

    Example: ficoco-bench out/bench-vl25 --ratios 1.0,0.5,0.25,0.11 --variants VL
    """
    run_command(bool(kw["verbose"]), lambda: _main(bundle, kw))


def options_from_cli(bundle: Path, kw: dict[str, Any]) -> BenchOptions:
    """Check the flags (BenchInputError naming the flag and the fix) and build BenchOptions."""
    for flag, value, lo in (("--warmup", kw["warmup"], 0), ("--repeats", kw["repeats"], 1), ("--max-new-tokens", kw["max_new_tokens"], 1)):
        if value < lo:
            raise BenchInputError(f"{flag} must be at least {lo} (got {value})")
    for extra in kw["also"]:
        if not Path(extra).is_dir():
            raise BenchInputError(f"--also {extra}: no bundle directory there")
    return BenchOptions(
        bundle=bundle, ratios=parse_ratios(kw["ratios"]), variants=parse_variants(kw["variants"]), also=tuple(kw["also"]),
        work_dir=kw["work_dir"], report_dir=kw["report_dir"], warmup=kw["warmup"], repeats=kw["repeats"],
        max_new_tokens=kw["max_new_tokens"], threads=kw["threads"], image=kw["image"], prompt=kw["prompt"],
        pytorch=not kw["no_pytorch"], profile=not kw["no_profile"], verify=not kw["no_verify"],
        layers={k: kw[k] for k in ("v_start", "v_end", "l_start", "l_end")},
    )


def _main(bundle: Path, kw: dict[str, Any]) -> None:
    opts = options_from_cli(bundle, kw)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        click.echo(f"[{time.perf_counter() - t0:7.1f}s] {msg}", err=True)

    report, paths = run_bench(opts, say)
    target = target_summary(report)
    if target:
        say(target)
    for kind, p in paths.items():
        click.secho(f"{kind}: {p}", fg="green", err=True)


if __name__ == "__main__":
    main()
