"""The check's levels beyond the stage comparison (`bundle.compare.compare_stages`, level 1) and the
token agreement (`bundle.compare.token_agreement`, level 2):

- level 3, what the reduction costs: the reduced PyTorch model against the unreduced transformers model
  (first-token KL, top-1 agreement, greedy token agreement);
- level 4, answers: easy-vqa accuracy of the bundle and of the reduced PyTorch model;
- the selection flips of every reduction step (`exporter.selection`), for information.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundle.compare import TokenAgreement, token_agreement

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# level 3: the reduction's cost
# ---------------------------------------------------------------------------------------------------------


def _log_softmax(x: Any) -> np.ndarray:
    x = np.asarray(x.detach().double().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64).reshape(-1)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def first_token_kl(unreduced_logits: Any, reduced_logits: Any) -> float:
    """KL(p_unreduced || p_reduced) in nats of the next-token distributions (logits [V] or [1, V])."""
    lp, lq = _log_softmax(unreduced_logits), _log_softmax(reduced_logits)
    return max(0.0, float(np.sum(np.exp(lp) * (lp - lq))))


@dataclass
class ReductionCost:
    """Level 3 of one sample: the reduced PyTorch model against the unreduced transformers model."""

    kl: float
    top1_agree: bool
    tokens: TokenAgreement

    def to_dict(self) -> dict[str, Any]:
        return {"kl": self.kl, "top1_agree": self.top1_agree, **{f"token_{k}": v for k, v in self.tokens.to_dict().items()}}


def reduction_cost(
    loaded: Any, pixel_values: Any, input_ids: Any, image_offset: int,
    reduced_logits: Any, reduced_tokens: Sequence[int], max_new_tokens: int,
) -> ReductionCost:
    """Run the unreduced transformers LLaVA on the same inputs (one sample, batch 1)."""
    import torch

    from ficoco.inputs import PromptInputs, hf_input_ids

    prompt = PromptInputs(text_ids=input_ids, image_offset=int(image_offset))
    ids = hf_input_ids(prompt, loaded.image_token_id, loaded.geometry.visual_tokens)
    hf = loaded.model
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids, pixel_values=pixel_values, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, eos_token_id=None,
            pad_token_id=0, num_beams=1, return_dict_in_generate=True, output_logits=True,
        )
    gen = out.sequences[0, ids.shape[1]:]
    logits = out.logits[0][0].float()  # the raw first-step logits (before any logits processor)
    return ReductionCost(
        kl=first_token_kl(logits, reduced_logits),
        top1_agree=bool(int(torch.argmax(logits)) == int(np.argmax(_log_softmax(reduced_logits)))),
        tokens=token_agreement(reduced_tokens, gen.tolist()),
    )


# ---------------------------------------------------------------------------------------------------------
# level 4: answers
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    """Level 4 on one split: answer accuracy of the bundle and of the reduced PyTorch model, same questions."""

    split: str
    n: int
    bundle_accuracy: float
    reference_accuracy: float
    same_answers: int


#: Level 4's default: easy-vqa test images per split (each with its ~10 or 6 questions).
TASK_IMAGES = 4
#: Models trained on easy-vqa, for which level 4 is on by default.
TASK_MODELS = ("shapes",)


def check_task(pipe: Any, ref_stages: Any, loaded: Any, n_images: int) -> list[TaskResult]:
    """Answer the questions of the first `n_images` images of each easy-vqa test split with both models."""
    from ficoco import vqa
    from ficoco.answering import Prompting, answer_split

    out = []
    for name in vqa.SPLITS:
        split = vqa.test_split(name).limit(n_images)
        got = answer_split(pipe.stages, Prompting.of_frontend(pipe), split, max_batch=pipe.max_decoder_batch)
        ref = answer_split(ref_stages, Prompting.of_model(loaded), split)
        same = sum(vqa.normalize_answer(a) == vqa.normalize_answer(b) for a, b in zip(got, ref, strict=True))
        out.append(TaskResult(name, len(split.questions), vqa.score(split.questions, got).accuracy,
                              vqa.score(split.questions, ref).accuracy, same))
    return out


# ---------------------------------------------------------------------------------------------------------
# selection flips (information)
# ---------------------------------------------------------------------------------------------------------


def selection_checker(bundle: Path, threads: int | None) -> tuple[Any, str]:
    """The kept-set probes over the bundle's ONNX graphs, or (None, why not)."""
    from bundle.layout import ONNX_DIR
    from exporter.selection import SelectionChecker

    try:
        return SelectionChecker(Path(bundle) / ONNX_DIR, threads), ""
    except Exception as err:  # a graph ONNX Runtime cannot load on CPU (e.g. a TensorRT-only plugin): say so
        log.warning("selection flips not measured: %s", err)
        return None, f"not measured ({type(err).__name__}: {err})"

