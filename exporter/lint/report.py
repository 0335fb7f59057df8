"""What the lint reports: :class:`LintFinding`, and the helpers that judge and print a list of them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LintFinding:
    """One rule that failed on one node, tensor or model; ``source`` is where the rule's fact comes from."""

    rule_id: str
    severity: str  # "error" | "warning"
    node_name: str
    op_type: str
    reason: str
    source: str
    graph_file: str


def has_errors(findings: Iterable[LintFinding]) -> bool:
    return any(f.severity == "error" for f in findings)


def format_findings(findings: Sequence[LintFinding], *, with_source: bool = False) -> str:
    """One line per finding: ``file: severity [rule] node 'name' (Op): reason``."""
    lines = []
    for f in findings:
        line = f"{f.graph_file}: {f.severity} [{f.rule_id}] node '{f.node_name}' ({f.op_type}): {f.reason}"
        if with_source:
            line += f"  [source: {f.source}]"
        lines.append(line)
    return "\n".join(lines)
