"""`ficoco-plan` (commands.plan.main).

The model configs come from ficoco.models.load_config (the configs shipped in ficoco/configs): no weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from commands.plan import main as plan_main
from ficoco.schedule import Schedule


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _one_red_line(result) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in result.output + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_help(runner: CliRunner) -> None:
    result = runner.invoke(plan_main, ["--help"])
    assert result.exit_code == 0
    for flag in ("--model", "--variant", "--method", "--ratio", "--keep-tokens", "--target-tflops", "--preset",
                 "--positions", "--v-start", "--v-end", "--l-start", "--l-end", "--vl-split", "--text-tokens",
                 "--format", "--output"):
        assert flag in result.output
    assert "KEPT" in result.output and "TFLOPs" in result.output and "llava-1.5-7b" in result.output


# ------------------------------------------------------------------------------- the llava-1.5-7b config
def test_json(runner: CliRunner) -> None:
    result = runner.invoke(plan_main, ["--variant", "VL", "--ratio", "0.25", "--format", "json"])
    assert result.exit_code == 0, result.output
    s = Schedule.from_dict(json.loads(result.stdout))
    assert s.visual_tokens_final == 144 and s.visual_tokens_to_decoder == 288


@pytest.mark.parametrize("method", ["random", "pool"])
def test_baseline_methods(runner: CliRunner, method: str) -> None:
    result = runner.invoke(plan_main, ["--variant", "V", "--method", method, "--keep-tokens", "64", "--format", "json"])
    assert result.exit_code == 0, result.output
    s = Schedule.from_dict(json.loads(result.stdout))
    assert s.vision.method == method and s.visual_tokens_final == 64 and s.vision.steps[0].layer == 12


def test_table(runner: CliRunner) -> None:
    result = runner.invoke(plan_main, ["--variant", "v", "--keep-tokens", "192"])
    assert result.exit_code == 0, result.output
    assert "192" in result.stdout and "prefill" in result.stdout and "3.297" in result.stdout


def test_output_file_atomic(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    result = runner.invoke(plan_main, ["--variant", "L", "--method", "fastv", "--keep-tokens", "288", "-o", str(out)])
    assert result.exit_code == 0, result.output
    s = Schedule.from_dict(json.loads(out.read_text()))
    assert s.decoder.steps[0].layer == 1 and s.visual_tokens_final == 288
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary file left behind


@pytest.mark.parametrize(
    "args",
    [
        ["--variant", "VL", "--method", "tome", "--ratio", "0.25"],
        ["--variant", "VL", "--method", "random", "--ratio", "0.25"],
        ["--variant", "L", "--method", "pool", "--ratio", "0.25"],
        ["--variant", "V"],
        ["--variant", "V", "--ratio", "1.5"],
        ["--variant", "V", "--ratio", "nan"],
        ["--variant", "none", "--ratio", "0.5"],
        ["--variant", "V", "--ratio", "0.25", "--v-end", "23"],
        ["--variant", "L", "--target-tflops", "1.0"],
        ["--model", "no-such-model", "--variant", "V", "--ratio", "0.25"],
    ],
)
def test_errors_are_one_red_line(runner: CliRunner, args: list[str]) -> None:
    _one_red_line(runner.invoke(plan_main, args))


def test_unwritable_output(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "missing-dir" / "plan.json"
    _one_red_line(runner.invoke(plan_main, ["--variant", "V", "--ratio", "0.5", "-o", str(bad)]))


# ------------------------------------------------------------------------------------------- real models
def test_real_llava_7b_vl_json(runner: CliRunner) -> None:
    result = runner.invoke(
        plan_main, ["--model", "llava-1.5-7b", "--variant", "VL", "--ratio", "0.25", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    s = Schedule.from_dict(d)
    assert s.variant == "VL" and s.visual_tokens_final == 144 and s.visual_tokens_to_decoder == 288
    assert d["flops"]["prefill"] < 8.45


def test_real_unknown_model_is_one_red_line(runner: CliRunner) -> None:
    _one_red_line(runner.invoke(plan_main, ["--model", "definitely-not-a-model", "--variant", "V", "--ratio", "0.5"]))
