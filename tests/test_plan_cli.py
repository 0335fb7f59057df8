"""`ficoco-plan` (ficoco.cli.plan_main).

The tests marked "real models" use ficoco.models.load_config and the configs shipped in ficoco/configs;
the others swap in a stub `ficoco.models` so they test only the CLI's own behaviour.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import LlavaConfig

from ficoco.cli import plan_main
from ficoco.schedule import Schedule


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def stub_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in ficoco.models: 'llava-1.5-7b' -> LlavaConfig() defaults, anything else not found."""
    mod = types.ModuleType("ficoco.models")

    class ModelNotFoundError(LookupError):
        pass

    def load_config(name: str) -> LlavaConfig:
        if name != "llava-1.5-7b":
            raise ModelNotFoundError(f"unknown model {name!r}; known: llava-1.5-7b")
        return LlavaConfig()

    mod.ModelNotFoundError = ModelNotFoundError  # type: ignore[attr-defined]
    mod.load_config = load_config  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ficoco.models", mod)
    import ficoco

    monkeypatch.setattr(ficoco, "models", mod, raising=False)


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


# ---------------------------------------------------------------------------------------- stubbed models
def test_json_stub(runner: CliRunner, stub_models: None) -> None:
    result = runner.invoke(plan_main, ["--variant", "VL", "--ratio", "0.25", "--format", "json"])
    assert result.exit_code == 0, result.output
    s = Schedule.from_dict(json.loads(result.stdout))
    assert s.visual_tokens_final == 144 and s.visual_tokens_to_decoder == 288


@pytest.mark.parametrize("method", ["random", "pool"])
def test_baseline_methods_stub(runner: CliRunner, stub_models: None, method: str) -> None:
    result = runner.invoke(plan_main, ["--variant", "V", "--method", method, "--keep-tokens", "64", "--format", "json"])
    assert result.exit_code == 0, result.output
    s = Schedule.from_dict(json.loads(result.stdout))
    assert s.vision.method == method and s.visual_tokens_final == 64 and s.vision.steps[0].layer == 12


def test_table_stub(runner: CliRunner, stub_models: None) -> None:
    result = runner.invoke(plan_main, ["--variant", "v", "--keep-tokens", "192"])
    assert result.exit_code == 0, result.output
    assert "192" in result.stdout and "prefill" in result.stdout and "3.297" in result.stdout


def test_output_file_atomic(runner: CliRunner, stub_models: None, tmp_path: Path) -> None:
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
def test_errors_are_one_red_line(runner: CliRunner, stub_models: None, args: list[str]) -> None:
    _one_red_line(runner.invoke(plan_main, args))


def test_unwritable_output(runner: CliRunner, stub_models: None, tmp_path: Path) -> None:
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
