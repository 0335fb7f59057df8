"""Attention statistics for the reduction steps, computed in fp32 from the layer's own Q and K.

The layers keep fused SDPA attention; a step recomputes only the rows/blocks it needs (docs/method-spec.md A2).
All inputs are per-head tensors [B, H, n, d] with the key/value heads already repeated to H (GQA).
Statistics are per sample, never averaged over the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def head_mean_logits(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """l_ij = (1/H) sum_h (q_hi . k_hj) * scale  ->  [B, n_q, n_k] fp32.

    The head mean of the pre-softmax scaled logits is one GEMM over the concatenated heads:
    l = (Q_cat K_cat^T) * scale / H with Q_cat = [q_1 | ... | q_H].
    """
    b, h, nq, d = q.shape
    qc = q.float().transpose(1, 2).reshape(b, nq, h * d)
    kc = k.float().transpose(1, 2).reshape(b, k.shape[2], h * d)
    return (qc @ kc.transpose(1, 2)) * (scale / h)


def head_mean_attention_row(q_row: Tensor, k: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """a_j = (1/H) sum_h softmax_j(q_h . k_hj * scale + bias_j) for one query per sample -> [B, n_k] fp32.

    q_row: [B, H, 1, d]. Used for EViT's [CLS] row and FastV's last-token row (the last query is
    causal-valid for every key). `bias` [B, n_k] is an additive logit bias (ToMe-style log-size).
    """
    logits = (q_row.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, 1, n_k]
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    return torch.softmax(logits, dim=-1).mean(dim=1)[:, 0]


def head_mean_keys(k: Tensor) -> Tensor:
    """k_bar_i = (1/H) sum_h k_hi -> [B, n, d] fp32 (ToMe's matching metric)."""
    return k.float().mean(dim=1)
