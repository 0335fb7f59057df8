"""Static lint of exported ONNX graphs for what TensorRT's ONNX parser would reject (or we must not ship).

TensorRT cannot be installed on the development machines (docs/export-notes.md: no TensorRT where the
graphs are made), so this lint is how graphs that TensorRT 10 / 11 would refuse are caught before a GPU
machine sees them. Everything is static: the graph is read without its weights (``load_external_data=False``),
ONNX shape inference fills in types where it can, and a small constant folder resolves index/shape inputs
such as TopK's ``K``.

Targets: ``"trt10"`` (default; TensorRT 10.x, including JetPack's older 10.x parsers) and ``"trt11"``.
No operator table for TensorRT 11 was available; trt11 reuses the 10.15 table (the newest one read) and only
its opset ceiling differs (documented in :data:`TARGETS`).

What the lint cannot see: numeric problems. The dynamo exporter silently lowers
``scatter_reduce(reduce="mean")`` to ``ScatterElements(reduction="none")`` (docs/export-notes.md:
ScatterElements mean reduction): that graph is valid and lints clean, and only a numeric comparison against
PyTorch finds it.

Layout: ``tables`` (sources, targets, operator tables), ``rules`` (:data:`RULES`, the rules as data),
``checks`` / ``checks_qdq`` (the checks behind them), ``graph`` (value facts and constant folding per
scope), ``linter`` (the walk and the entry points) and ``report`` (:class:`LintFinding` and its helpers).
"""

from exporter.lint.linter import lint_files, lint_model
from exporter.lint.report import LintFinding, format_findings, has_errors
from exporter.lint.rules import RULES, Rule
from exporter.lint.tables import TARGETS, TargetSpec

__all__ = [
    "RULES",
    "TARGETS",
    "LintFinding",
    "Rule",
    "TargetSpec",
    "format_findings",
    "has_errors",
    "lint_files",
    "lint_model",
]
