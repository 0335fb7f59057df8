"""`make gpu-bench` (engines/bench/gpu_bench.py) as a CPU smoke run on the tiny model: the script runs end to
end without CUDA, says so, and its report has one row per ratio with the speedups computed against the
unreduced row. The real numbers need a GPU; nothing here measures one."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from engines.bench.gpu_bench import SMOKE_NOTE, main  # noqa: E402


def test_cpu_smoke_run_writes_a_report_that_says_so(tmp_path):
    js, md = tmp_path / "gpu-bench.json", tmp_path / "gpu-bench.md"
    threads = torch.get_num_threads()
    rc = main(["--device", "cpu", "--model", "tiny", "--warmup", "1", "--repeats", "2", "--decode-steps", "4",
               "--ratios", "1.0,0.25,0.11", "--json", str(js), "--md", str(md)])
    assert rc == 0
    report = json.loads(js.read_text())
    text = md.read_text()
    assert report["smoke"] is True and report["smoke_note"] == SMOKE_NOTE
    assert SMOKE_NOTE.upper() in text and report["device"]["kind"] == "cpu"
    assert report["options"]["timer"] == "time.perf_counter" and report["options"]["dtype"] == "fp32"
    rows = report["configs"]
    assert [r["label"] for r in rows] == ["unreduced (1.0)", "VL 0.25", "VL 0.11"]
    assert [r["visual_tokens"]["final"] for r in rows] == [576, 144, 63]
    for r in rows:
        assert r["error"] is None and len(r["runs"]) == 2
        for k in ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms"):
            assert r["timings"][k]["n"] == 2 and r["timings"][k]["min"] > 0
        assert r["timings"]["ttft_ms"]["median"] >= r["timings"]["vision_ms"]["median"]
        assert r["timings"]["decode_tokens_per_s"]["median"] > 0
        assert len(r["tokens"]) == 5  # the first token and 4 decode steps
        assert r["label"] in text
    ref = rows[0]
    assert ref["ttft_speedup"] == 1.0 and ref["flops_speedup"] == 1.0 and ref["efficiency"] == 1.0
    assert ref["first_token_agrees"] is True
    for r in rows[1:]:
        assert r["flops_speedup"] > 1.0 and r["ttft_speedup"] > 0
        assert math.isclose(r["efficiency"], r["ttft_speedup"] / r["flops_speedup"], rel_tol=1e-9)
        assert math.isclose(r["flops_speedup"], ref["flops_tflops"]["total"] / r["flops_tflops"]["total"], rel_tol=1e-9)
    assert rows[2]["flops_speedup"] > rows[1]["flops_speedup"]
    assert torch.get_num_threads() == threads  # the smoke run's one-thread setting was handed back


def test_bad_ratio_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--ratios", "0"])
    assert exc.value.code == 2
    assert "outside (0, 1]" in capsys.readouterr().err
