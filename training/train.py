"""Training recipe of the `shapes` built-in model (see docs/shapes-model.md for the why).

One step: `images_per_step` images (half single 64×64 tiles, half 2×2 mosaics; each tile a real easy-vqa
*train* image or, with probability `synthetic`, one drawn the way easy-vqa draws them), each encoded once by
the vision tower, then `questions_per_image` questions answered from one shared KV cache of its prefix
``<s> USER : <image>×576``. Losses:

* answer: cross-entropy of the answer word and of ``</s>`` after it (teacher forcing, the chat template's
  own token sequence "... ASSISTANT : answer </s>");
* [CLS]: binary cross-entropy of which shapes and colours the image holds, from the last layer's pooled
  [CLS] (so [CLS] attention, which FiCoCo-V and EViT score tokens by, looks at the shapes);
* patches: per-patch cross-entropy of the shape and colour covering it (or background), from the features
  the projector reads (layer −2), so every visual token says what it shows;
* [CLS] attention: in blocks `cls_attn_from`..select layer, −log of the mass of [CLS]'s head-mean attention
  (softmax over the patches of l_0j = mean_h q_h0·k_hj/√d) that lands on the shapes' patches. Without it
  the pooled [CLS] learned the image-level labels while attending to the background, so FiCoCo-V and EViT,
  which keep what [CLS] attends to, kept background and dropped the shapes (docs/shapes-model.md).

The auxiliary heads are dropped when the model is saved. Deterministic for a given seed and device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from transformers import LlavaForConditionalGeneration
from transformers.cache_utils import DynamicCache

from ficoco import vqa
from ficoco.models import _quiet_transformers
from training.shapes_model import build_config, build_tokenizer

logger = logging.getLogger(__name__)

SIDE = 336
GRID = 24
PATCH = 14


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    #: phase 1: the vision tower alone on the [CLS] and patch tasks (cheap: no decoder)
    vision_steps: int = 500
    #: phase 2: everything, answers and both auxiliary tasks
    steps: int = 600
    images_per_step: int = 8
    questions_per_image: int = 8
    lr: float = 1.5e-3
    warmup: int = 60
    weight_decay: float = 0.01
    synthetic: float = 0.5
    aux_cls: float = 0.5
    aux_patch: float = 0.5
    #: weight of the [CLS]-attention guidance: -log of the attention mass [CLS] puts on the shapes' patches
    aux_cls_attn: float = 0.5
    #: first CLIP block whose [CLS] attention is guided (through the last block the projector reads)
    cls_attn_from: int = 6
    eval_every: int = 150
    #: test images per split in the evaluations during training (first answer token)
    eval_images: int = 60
    threads: int = 2


# ----------------------------------------------------------------------------------------------------------------
# Images: real tiles, drawn tiles, mosaics, per-patch labels
# ----------------------------------------------------------------------------------------------------------------


def draw_tile(rng: random.Random, shape: str, color: str) -> Image.Image:
    """A 64×64 image as easy-vqa draws them: light background, one solid shape 8–34 px, anywhere (may be clipped)."""
    bg = tuple(rng.randint(230, 255) for _ in range(3))
    s = 4  # supersampling for anti-aliased edges
    im = Image.new("RGB", (64 * s, 64 * s), bg)
    d = ImageDraw.Draw(im)
    w = rng.uniform(8, 34)
    h = rng.uniform(8, 34) if shape == "rectangle" else w
    cx, cy = rng.uniform(w / 3, 64 - w / 3), rng.uniform(h / 3, 64 - h / 3)
    rgb = vqa.COLORS[color]
    if shape == "circle":
        d.ellipse([s * (cx - w / 2), s * (cy - w / 2), s * (cx + w / 2), s * (cy + w / 2)], fill=rgb)
    elif shape == "rectangle":
        d.rectangle([s * (cx - w / 2), s * (cy - h / 2), s * (cx + w / 2), s * (cy + h / 2)], fill=rgb)
    else:
        r = w / math.sqrt(3)
        pts = [(cx, cy - r), (cx - w / 2, cy + r / 2), (cx + w / 2, cy + r / 2)]
        d.polygon([(s * x, s * y) for x, y in pts], fill=rgb)
    return im.resize((64, 64), Image.Resampling.BOX)


def patch_labels(image: Image.Image, tiles: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch shape (0 background, 1.. SHAPES) and colour (0 background, 1.. COLORS) on the 24×24 grid.

    `tiles` are the (shape, colour) of the image's 1 or 4 tiles (mosaic order). A patch is labelled with a
    tile's shape when at least 30 % of it shows that tile's colour."""
    n = 1 if len(tiles) == 1 else 2
    arr = np.asarray(image).astype(np.int16)
    size = arr.shape[0] // n
    shape_lab = np.zeros((GRID, GRID), np.int64)
    color_lab = np.zeros((GRID, GRID), np.int64)
    cell = GRID // n
    for q, (shape, color) in enumerate(tiles):
        r, c = divmod(q, n)
        sub = arr[r * size:(r + 1) * size, c * size:(c + 1) * size]
        mask = (np.abs(sub - np.array(vqa.COLORS[color], np.int16)).sum(-1) < 96).astype(np.float32)
        m = Image.fromarray(mask * 255).convert("L").resize((cell * PATCH, cell * PATCH), Image.Resampling.BILINEAR)
        frac = np.asarray(m, np.float32).reshape(cell, PATCH, cell, PATCH).mean((1, 3)) / 255.0
        on = frac >= 0.3
        shape_lab[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell][on] = vqa.SHAPES.index(shape) + 1
        color_lab[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell][on] = list(vqa.COLORS).index(color) + 1
    return shape_lab.reshape(-1), color_lab.reshape(-1)


MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def pixels(image: Image.Image) -> torch.Tensor:
    """CLIPImageProcessor's output for a square image: PIL bicubic resize to 336, rescale, normalize."""
    arr = np.asarray(image.resize((SIDE, SIDE), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    return (torch.from_numpy(arr).permute(2, 0, 1) - MEAN) / STD


class Sampler:
    """Draws training images and their questions (train images of easy-vqa only, plus drawn tiles)."""

    def __init__(self, cfg: TrainConfig, rng: random.Random):
        self.cfg = cfg
        self.rng = rng
        self.train = vqa.tiles("train")
        self.images = {t.image_id: vqa.load_tile_image("train", t.image_id) for t in self.train}
        self.templates = sorted({q for q, _, _ in vqa._read_questions("train")})

    def tile(self) -> tuple[Image.Image, str, str]:
        if self.rng.random() < self.cfg.synthetic:
            shape, color = self.rng.choice(vqa.SHAPES), self.rng.choice(list(vqa.COLORS))
            return draw_tile(self.rng, shape, color), shape, color
        t = self.rng.choice(self.train)
        return self.images[t.image_id], t.shape, t.color

    def single_questions(self, shape: str, color: str, n: int) -> list[tuple[str, str]]:
        """`n` template questions, about a third each on shape, colour and yes/no (yes and no equally often)."""
        out: list[tuple[str, str]] = []
        want = ["shape", "color", "yes", "no"]
        tries = 0
        while len(out) < n and tries < 2000:
            tries += 1
            q = self.rng.choice(self.templates)
            a = vqa.answer_single(q, shape, color)
            if a is None:
                continue
            kind = a if a in ("yes", "no") else vqa.qtype_single(q, a)
            if kind == want[len(out) % 4]:
                out.append((q, a))
        return out

    def sample(self, mosaic: bool) -> tuple[Image.Image, list[tuple[str, str]], list[tuple[str, str]]]:
        """(image, [(shape, colour)] per tile, [(question, answer)])."""
        n = self.cfg.questions_per_image
        if not mosaic:
            im, s, c = self.tile()
            return im, [(s, c)], self.single_questions(s, c, n)
        four = [self.tile() for _ in range(4)]
        labels = [(s, c) for _, s, c in four]
        qs = [(q, a) for q, a, _ in vqa.mosaic_questions(labels, self.rng, n)]
        return vqa.mosaic_image([im for im, _, _ in four]), labels, qs


# ----------------------------------------------------------------------------------------------------------------
# The model with its training-only heads
# ----------------------------------------------------------------------------------------------------------------


class Trainee(nn.Module):
    def __init__(self, model: LlavaForConditionalGeneration, tokenizer):
        super().__init__()
        self.llava = model
        width = model.config.vision_config.hidden_size
        self.cls_head = nn.Linear(width, len(vqa.SHAPES) + len(vqa.COLORS))
        self.patch_shape = nn.Linear(width, len(vqa.SHAPES) + 1)
        self.patch_color = nn.Linear(width, len(vqa.COLORS) + 1)
        self.tok = tokenizer
        self.prefix = torch.tensor(tokenizer("USER:", add_special_tokens=True).input_ids)  # <s> user :
        tail = tokenizer(" ASSISTANT:", add_special_tokens=False).input_ids
        self.tail = tail

    def encode_question(self, q: str) -> list[int]:
        return self.tok(q, add_special_tokens=False).input_ids + list(self.tail)

    def vision(self, pix: torch.Tensor):
        vo = self.llava.model.vision_tower(pixel_values=pix, output_hidden_states=True)
        return vo, vo.hidden_states[self.llava.config.vision_feature_layer][:, 1:]

    def cls_attention(self, hidden_states: tuple[torch.Tensor, ...], first: int) -> torch.Tensor:
        """[B, L, N]: [CLS]'s attention over the N patches in blocks first..select layer, from the softmax
        of its head-mean scaled logits (the quantity FiCoCo-V and EViT score tokens by)."""
        tower = self.llava.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        last = len(layers) + self.llava.config.vision_feature_layer  # -2 -> block 22 of 24
        out = []
        for i in range(first, last + 1):
            attn = layers[i].self_attn
            x = layers[i].layer_norm1(hidden_states[i])  # hidden_states[i] is block i's input
            b, n, _ = x.shape
            q = attn.q_proj(x[:, :1]).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x[:, 1:]).view(b, n - 1, attn.num_heads, attn.head_dim).transpose(1, 2)
            logits = (q @ k.transpose(-1, -2))[:, :, 0].mean(dim=1) * attn.scale  # [B, N]
            out.append(torch.softmax(logits, dim=-1))
        return torch.stack(out, dim=1)

    def forward(self, pix: torch.Tensor, questions: list[list[int]], owner: list[int], answers: list[int] | None,
                with_vision: bool = False):
        m = self.llava.model
        vo, feats = self.vision(pix)
        vis = m.multi_modal_projector(feats)
        lm = m.language_model
        b = pix.shape[0]
        pre = torch.cat([lm.embed_tokens(self.prefix).unsqueeze(0).expand(b, -1, -1), vis], 1)
        cache = DynamicCache(config=lm.config)
        lm(inputs_embeds=pre, past_key_values=cache, use_cache=True)
        cache.batch_select_indices(torch.tensor(owner))
        n = len(questions)
        extra = 1 if answers is not None else 0
        lens = [len(t) + extra for t in questions]
        ids = torch.full((n, max(lens)), self.tok.pad_token_id, dtype=torch.long)
        for j, t in enumerate(questions):
            seq = t + ([answers[j]] if answers is not None else [])
            ids[j, : len(seq)] = torch.tensor(seq)
        offset = pre.shape[1]
        pos = torch.arange(offset, offset + ids.shape[1]).unsqueeze(0).expand(n, -1)
        # right padding + causal attention: real tokens never attend to the pads after them
        h = lm(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True).last_hidden_state
        rows = torch.arange(n)
        last_q = torch.tensor([len(t) - 1 for t in questions])
        logits_answer = self.llava.lm_head(h[rows, last_q])
        logits_eos = self.llava.lm_head(h[rows, last_q + 1]) if answers is not None else None
        if with_vision:
            return logits_answer, logits_eos, self.cls_head(vo.pooler_output), feats, vo
        return logits_answer, logits_eos, self.cls_head(vo.pooler_output), feats


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """[grid², dim] fixed 2-D sine-cosine embedding: the first half of the channels encode the row, the second
    half the column, each as sin/cos at frequencies 1/10000^(2i/(dim/2)) (as in ViT/MAE's fixed embeddings)."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angle = coord[:, None] * omega[None, :]
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1).float()


def _spatial_init_(model: LlavaForConditionalGeneration, amplitude: float = 0.5) -> None:
    """Start CLIP's learned position embedding at a 2-D sine-cosine code ([CLS] row zero): a tower trained
    from scratch then knows which patches are neighbours from step 0 instead of learning it from data."""
    tower = model.model.vision_tower
    emb = getattr(tower, "vision_model", tower).embeddings.position_embedding.weight
    grid = int(round((emb.shape[0] - 1) ** 0.5))
    with torch.no_grad():
        emb.zero_()
        emb[1:] = amplitude * sincos_2d(grid, emb.shape[1])


def _near_identity_(model: LlavaForConditionalGeneration) -> None:
    """Scale each residual branch's output projection by 1/sqrt(2·depth): a deep, narrow stack starts close to
    the identity and trains stably at a high learning rate."""
    for tower, depth in ((model.model.vision_tower, model.config.vision_config.num_hidden_layers),
                         (model.model.language_model, model.config.text_config.num_hidden_layers)):
        for name, p in tower.named_parameters():
            if name.endswith(("out_proj.weight", "fc2.weight", "o_proj.weight", "down_proj.weight")):
                with torch.no_grad():
                    p.mul_(1.0 / math.sqrt(2 * depth))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation during training (first answer token, argmax)
# ----------------------------------------------------------------------------------------------------------------


def quick_eval(trainee: Trainee, n_images: int = 60) -> dict[str, float]:
    """Answer accuracy (argmax of the first answer token) on the first `n_images` images of each test split."""
    out: dict[str, float] = {}
    trainee.eval()
    with torch.no_grad():
        for name in vqa.SPLITS:
            split = vqa.test_split(name).limit(n_images)
            keys = split.image_keys()
            preds: list[str] = []
            for k0 in range(0, len(keys), 10):
                ks = keys[k0:k0 + 10]
                pix = torch.stack([pixels(split.image(k)) for k in ks])
                qs = [q for q in split.questions if q.image_key in set(ks)]
                owner = [ks.index(q.image_key) for q in qs]
                la, _, _, _ = trainee(pix, [trainee.encode_question(q.question) for q in qs], owner, None)
                preds += [trainee.tok.convert_ids_to_tokens(int(i)) for i in la.argmax(-1)]
            sc = vqa.score(split.questions, preds)
            out[name] = sc.accuracy
            for t, a in sc.type_accuracy().items():
                out[f"{name}/{t}"] = a
    trainee.train()
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def state_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def train(cfg: TrainConfig, out: Path, progress=None) -> dict:
    """Train from `cfg.seed` and write the llava-hf directory to `out` (plus training_log.json). Returns the log."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = build_tokenizer()
    with _quiet_transformers():
        model = LlavaForConditionalGeneration(build_config(tokenizer))
    model.set_attn_implementation("sdpa")
    _near_identity_(model)
    _spatial_init_(model)
    trainee = Trainee(model, tokenizer).to(device)
    trainee.prefix = trainee.prefix.to(device)
    sampler = Sampler(cfg, rng)
    decay = [p for n, p in trainee.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in trainee.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    eos = tokenizer.eos_token_id
    log: dict = {"config": asdict(cfg), "device": device.type, "evals": [], "losses": []}
    t0 = time.time()
    total = cfg.vision_steps + cfg.steps
    run_loss = 0.0
    for step in range(total):
        vision_only = step < cfg.vision_steps
        i, n = (step, cfg.vision_steps) if vision_only else (step - cfg.vision_steps, cfg.steps)
        lr = cfg.lr * min(1.0, (i + 1) / cfg.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * i / n)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = [sampler.sample(mosaic=(j % 2 == 1)) for j in range(cfg.images_per_step)]
        pix = torch.stack([pixels(im) for im, _, _ in batch]).to(device)
        qs, owner, ans = [], [], []
        cls_t = torch.zeros(len(batch), len(vqa.SHAPES) + len(vqa.COLORS))
        ps, pc = [], []
        for j, (im, labels, questions) in enumerate(batch):
            for q, a in questions:
                qs.append(trainee.encode_question(q))
                owner.append(j)
                ans.append(tokenizer.convert_tokens_to_ids(a))
            for s, c in labels:
                cls_t[j, vqa.SHAPES.index(s)] = 1
                cls_t[j, len(vqa.SHAPES) + list(vqa.COLORS).index(c)] = 1
            a_s, a_c = patch_labels(im, labels)
            ps.append(torch.from_numpy(a_s))
            pc.append(torch.from_numpy(a_c))
        ps_t, pc_t = torch.cat(ps).to(device), torch.cat(pc).to(device)
        if vision_only:
            vo, feats = trainee.vision(pix)
            lcls = trainee.cls_head(vo.pooler_output)
            loss_answer = torch.zeros(())
        else:
            la, le, lcls, feats, vo = trainee(pix, qs, owner, ans, with_vision=True)
            y = torch.tensor(ans, device=device)
            loss_answer = F.cross_entropy(la, y) + F.cross_entropy(le, torch.full_like(y, eos))
        fg_mask = (ps_t > 0).view(len(batch), 1, -1).float()  # [B, 1, N] patches covered by a shape
        mass = (trainee.cls_attention(vo.hidden_states, cfg.cls_attn_from) * fg_mask).sum(-1)  # [B, L]
        has_fg = fg_mask.sum(-1) > 0  # [B, 1]: an image whose shapes cover no patch has nothing to look at
        loss_attn = -(torch.log(mass + 1e-6) * has_fg).sum() / (has_fg.sum() * mass.shape[1]).clamp_min(1)
        loss_cls = F.binary_cross_entropy_with_logits(lcls, cls_t.to(device))
        lps, lpc = trainee.patch_shape(feats).flatten(0, 1), trainee.patch_color(feats).flatten(0, 1)
        loss_patch = F.cross_entropy(lps, ps_t) + F.cross_entropy(lpc, pc_t)
        loss = loss_answer + cfg.aux_cls * loss_cls + cfg.aux_patch * loss_patch + cfg.aux_cls_attn * loss_attn
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainee.parameters(), 1.0)
        opt.step()
        run_loss += float(loss_answer.detach())
        if (step + 1) % 10 == 0:
            with torch.no_grad():
                fg = ps_t > 0
                patch_acc = float((lps.argmax(-1)[fg] == ps_t[fg]).float().mean()) if fg.any() else float("nan")
                cls_acc = float(((lcls > 0).float() == cls_t.to(device)).all(-1).float().mean())
            rec = {"step": step + 1, "phase": 1 if vision_only else 2, "answer": run_loss / 10,
                   "cls": float(loss_cls.detach()), "patch": float(loss_patch.detach()), "patch_shape_acc_fg": patch_acc,
                   "cls_attn_fg_mass": float(mass.detach().mean()), "fg_fraction": float(fg_mask.mean()),
                   "cls_exact": cls_acc, "lr": lr, "elapsed_s": time.time() - t0}
            log["losses"].append(rec)
            logger.info("%s", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}))
            run_loss = 0.0
        if not vision_only and ((i + 1) % cfg.eval_every == 0 or i + 1 == cfg.steps):
            acc = quick_eval(trainee, cfg.eval_images)
            acc.update({"step": step + 1, "elapsed_s": time.time() - t0})
            log["evals"].append(acc)
            logger.info("eval %s", json.dumps({k: round(v, 3) for k, v in acc.items()}))
            save(trainee, tokenizer, out, log)
        if progress is not None:
            progress(step + 1, total)
    log["train_seconds"] = time.time() - t0
    log["weights_sha256"] = save(trainee, tokenizer, out, log)
    return log


def save(trainee: Trainee, tokenizer, out: Path, log: dict) -> str:
    """Write the llava-hf directory atomically (temp dir, then rename); record the weights' sha256 in the log."""
    from training.shapes_model import write_processor_files

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir()
    model = trainee.llava
    with _quiet_transformers():
        model.to("cpu").save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    model.to(trainee.prefix.device)
    write_processor_files(tmp)
    sha = state_sha256(tmp / "model.safetensors")
    log = dict(log, weights_sha256=sha)
    (tmp / "training_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    if out.exists():
        import shutil

        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return sha
