"""`ficoco-bench`: measured speed, memory and theoretical FLOPs of a ratio sweep over bundles.

The package's face. `sweep` plans the sweep and runs one worker process per configuration (the module
docstring there describes a whole run), `worker` is that process, `profiling` its measuring, `report`
the aggregation and the bench.json/.md/.png files; the click command is `commands.bench`.
"""

from __future__ import annotations

from engines.bench.common import BenchFailed, BenchInputError, BenchOptions, ConfigSpec, layer_ranges
from engines.bench.profiling import graph_node_of, load_trace, node_times, reduction_share, summarize
from engines.bench.report import build_report, render_markdown, token_agreement, write_reports
from engines.bench.sweep import (
    parse_ratios,
    parse_variants,
    plan_configs,
    run_bench,
    run_worker,
    sibling_request,
)

__all__ = [
    "BenchFailed", "BenchInputError", "BenchOptions", "ConfigSpec", "build_report", "graph_node_of", "layer_ranges",
    "load_trace", "node_times", "parse_ratios", "parse_variants", "plan_configs", "reduction_share",
    "render_markdown", "run_bench", "run_worker", "sibling_request", "summarize", "token_agreement", "write_reports",
]

