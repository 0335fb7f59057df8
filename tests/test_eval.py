"""ficoco-eval on a fixed small subset (the full grid is `make eval`), and the check's answer gate."""

from __future__ import annotations

import json

from click.testing import CliRunner

from commands.eval import main as eval_main
from evaluation.grid import GRID_METHODS, grid


def test_grid_covers_every_method_at_the_paper_budgets() -> None:
    rows = grid()
    assert rows[0].label == "unreduced"
    budgets = {r.keep_tokens for r in rows[1:]}
    assert budgets == {192, 128, 64}
    assert len(rows) == 1 + 3 * len([m for m in GRID_METHODS if m[1] in {r.method for r in rows}])


def test_eval_cli_writes_the_report(tmp_path) -> None:
    out = tmp_path / "reports"
    res = CliRunner().invoke(eval_main, ["--limit", "1", "--budgets", "64", "--methods", "FiCoCo-VL (paper)",
                                         "--threads", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "eval.json").read_text())
    labels = {(r["label"], r["split"]) for r in data["results"]}
    for split in ("easy-vqa", "mosaic"):
        assert {("unreduced", split), ("question only (blind)", split), ("FiCoCo-VL (paper)", split)} <= labels
    vl = next(r for r in data["results"] if r["label"] == "FiCoCo-VL (paper)")
    assert vl["visual_tokens"] == 64 and 0 < vl["tflops"]
    assert (out / "eval.md").read_text().count("FiCoCo-VL (paper)") >= 2
    assert (out / "eval.png").stat().st_size > 1000


def test_eval_cli_bad_input_exit_2(tmp_path) -> None:
    r = CliRunner().invoke(eval_main, ["--splits", "nope", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "unknown split" in r.output
    r = CliRunner().invoke(eval_main, ["--bundle", str(tmp_path), "-o", str(tmp_path)])
    assert r.exit_code == 2 and "not a bundle" in r.output
    r = CliRunner().invoke(eval_main, ["--budgets", "0", "-o", str(tmp_path)])
    assert r.exit_code == 2


def test_check_answer_gate_on_a_bundle(tiny_bundle) -> None:
    """Level 4 on the session's tiny bundle: fp32 ONNX Runtime gives PyTorch's answers to every question."""
    from engines.check import CheckOptions, run_check

    rep = run_check(tiny_bundle, CheckOptions(num_samples=1, max_new_tokens=2, task_images=1))
    assert [t.split for t in rep.task] == ["easy-vqa", "mosaic"]
    for t in rep.task:
        assert t.same_answers == t.n > 0 and t.bundle_accuracy == t.reference_accuracy
    assert rep.to_dict()["aggregate"]["task"][0]["n"] == rep.task[0].n
    assert "answers (easy-vqa test" in rep.to_markdown()


def test_check_answer_gate_options_are_validated() -> None:
    import pytest

    from engines.check import CheckInputError, CheckOptions

    with pytest.raises(CheckInputError, match="--task-images"):
        CheckOptions(task_images=-1).validate()
    with pytest.raises(CheckInputError, match="--max-accuracy-drop"):
        CheckOptions(max_accuracy_drop=2.0).validate()


def test_train_cli_bad_input_exit_2(tmp_path) -> None:
    from commands.train import main as train_main

    r = CliRunner().invoke(train_main, ["--steps", "0", "-o", str(tmp_path / "m")])
    assert r.exit_code == 2 and not (tmp_path / "m").exists()
    r = CliRunner().invoke(train_main, ["--lr", "-1", "-o", str(tmp_path / "m")])
    assert r.exit_code == 2 and not (tmp_path / "m").exists()


def test_eval_bundles_share_one_reference_run(tiny_bundle, tmp_path) -> None:
    """Two bundles with one schedule: each answered through ONNX Runtime, one PyTorch reference row."""
    out = tmp_path / "reports"
    res = CliRunner().invoke(eval_main, ["--bundle", str(tiny_bundle), "--bundle", str(tiny_bundle), "--splits", "easy-vqa",
                                         "--limit", "1", "--threads", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "eval.json").read_text())
    labels = [r["label"] for r in data["results"]]
    assert labels.count("bundle tiny-vl25 (onnxruntime, fp32)") == 2
    assert labels.count("PyTorch, schedule of tiny-vl25") == 1
    for a in data["meta"]["agreement"]:
        assert a["n"] > 0 and a["same"] == a["n"] and a["bundle_accuracy"] == a["reference_accuracy"]


def test_calibration_set_is_drawn_from_train_images(tmp_path) -> None:
    from commands.calib_set import main as calib_main

    out = tmp_path / "calib"
    res = CliRunner().invoke(calib_main, [str(out), "--images", "3"])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["mosaic-m0000.png", "tile-0000.png", "tile-0001.png"]
    prompts = (out / "prompts.txt").read_text().splitlines()
    assert prompts and len(prompts) == len(set(prompts)) and all(p.strip() for p in prompts)
    again = CliRunner().invoke(calib_main, [str(out)])
    assert again.exit_code == 2 and "exists" in again.output
    assert [p.name for p in tmp_path.iterdir()] == ["calib"]  # no partial left behind
