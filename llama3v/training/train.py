"""Train the tiny model's vision tower + projector on drawn scenes (torch, seeded, resumable).

    nice -n 19 python -m llama3v.training.train WORKDIR [--steps N] [--batch B] [--train-scenes N]

The LM (SmolLM2-135M-Instruct, not Llama-3) stays frozen and is never run here. The projector's
second layer is frozen to the LM's input embeddings of the caption tokens (column k = token k, the
other columns zero); the tower and the projector's first layer learn to make, at image row i, a
GELU activation that is 1 for the caption's i-th token and ~0 for every other one, so row i comes
out as that token's embedding (captions are left-aligned and padded, see `PAD`). Training therefore
costs a small ViT's steps, not the LM's. Held-out scenes (seeds below TRAIN_SEED0) are never trained on.
Every `--save-every` steps the state is written atomically; a rerun resumes from it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llama3v.hf.config import VisionConfig
from llama3v.models.vision import Projector, VisionTower
from llama3v.progress import step_bar
from llama3v.runtime.image_processing import ImageSpec, prepare_tile
from llama3v.training import tiny_llava as tiny
from llama3v.training.caption import COUNT_WIDTH, SLOT_WIDTH, WORD_WIDTH, caption_parts
from llama3v.training.scenes import COLORS, SHAPES, SIZES, SLOTS, WORDS, Box, Scene, Shape, draw_scene, make_example

TRAIN_SEED0 = 1_000_000  # training scenes use seeds from here; held-out scenes use 0..TRAIN_SEED0-1
PAD = "\n"  # rows after the caption spell newlines
NEG = -4.0  # non-target pre-activations are pushed below this (GELU(-4) = -1.3e-4)
FIT_WEIGHT = 0.1


def _gelu_one() -> float:
    lo, hi = 0.5, 2.0  # solve GELU(x) = 1 by bisection
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if F.gelu(torch.tensor(mid, dtype=torch.float64)) < 1 else (lo, mid)
    return lo


POS = _gelu_one()


class TokenSet:
    """The LM tokens a caption can use, and captions as rows of indices into them."""

    def __init__(self, gguf: Path) -> None:
        import llama_cpp

        self._lm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
        texts = [PAD] + [t for scene in _every_value() for t, _ in caption_parts(scene)]
        self.ids = sorted({t for text in texts for t in self.tokenize(text)})
        self.index = {t: i for i, t in enumerate(self.ids)}
        (self.pad_id,) = self.tokenize(PAD)

    def tokenize(self, text: str) -> list[int]:
        """LM token ids of `text` (no BOS)."""
        return self._lm.tokenize(text.encode(), add_bos=False, special=False)

    def caption_ids(self, scene: Scene, n_rows: int) -> list[int]:
        """The caption as `n_rows` LM token ids: each part padded to its width, then PAD to the end."""
        out: list[int] = []
        for text, width in caption_parts(scene):
            toks = self.tokenize(text)
            if len(toks) > width:
                raise ValueError(f"caption part {text!r} has {len(toks)} tokens, more than its width {width}")
            out += toks + [self.pad_id] * (width - len(toks))
        if len(out) > n_rows:
            raise ValueError(f"a caption of {len(out)} tokens does not fit {n_rows} rows")
        return out + [self.pad_id] * (n_rows - len(out))

    def rows(self, scene: Scene, n_rows: int) -> np.ndarray:
        """The caption as indices into the token set."""
        return np.array([self.index[t] for t in self.caption_ids(scene, n_rows)], np.int16)


def _every_value() -> list[Scene]:
    """Scenes that together show every size, colour, shape, slot and word (and none) in captions."""
    out = [Scene(tuple(Shape(SHAPES[k], list(COLORS)[k], list(SLOTS)[k], "big") for k in range(n)))
           for n in range(1, 5)]
    for i, color in enumerate(COLORS):
        for size in SIZES:
            out.append(Scene((Shape(SHAPES[i % len(SHAPES)], color, "left", size),), WORDS[i], "right"))
    out += [Scene((Shape(shape, "red", "left", "big"),), word, "top") for shape in SHAPES for word in WORDS]
    return out


# Per-patch labels (auxiliary heads): colour, shape, size, word of the object under each patch, 0 = none.
HEADS = {"color": len(COLORS) + 1, "shape": len(SHAPES) + 1, "size": len(SIZES) + 1, "word": len(WORDS) + 1}


def patch_labels(scene: Scene, boxes: list[Box], size: tuple[int, int]) -> np.ndarray:
    """[n_rows, 4] labels of the object under each patch centre, for a picture of `size` prepared by `pad`."""
    w, h = size
    side = max(w, h)
    ox, oy = (side - w) // 2, (side - h) // 2  # as expand_to_square pads
    grid = tiny.IMAGE_SIZE // tiny.PATCH_SIZE
    out = np.zeros((grid * grid, len(HEADS)), np.int16)
    for r in range(grid * grid):
        x = ((r % grid) + 0.5) * tiny.PATCH_SIZE * side / tiny.IMAGE_SIZE - ox
        y = ((r // grid) + 0.5) * tiny.PATCH_SIZE * side / tiny.IMAGE_SIZE - oy
        for b in boxes:
            shrink = 1.0 if b.index < 0 else 0.8  # a patch centre near a star's tip may be background
            if abs(x - b.cx) < b.half_w * shrink and abs(y - b.cy) < b.half_h * shrink:
                if b.index < 0:
                    out[r, 3] = WORDS.index(scene.word) + 1
                else:
                    s = scene.shapes[b.index]
                    out[r, :3] = (list(COLORS).index(s.color) + 1, SHAPES.index(s.shape) + 1,
                                  list(SIZES).index(s.size) + 1)
    return out


IMAGE_SPEC = ImageSpec(size=tiny.IMAGE_SIZE, mode=tiny.PREPROCESS, mean=tiny.IMAGE_MEAN)  # as the runtime prepares it
_MEAN = torch.tensor(tiny.IMAGE_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(tiny.IMAGE_STD).view(1, 3, 1, 1)


def tower_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S, 3] pixels (prepared with IMAGE_SPEC) -> the tower's normalised float input [B, 3, S, S]."""
    return (pixels.permute(0, 3, 1, 2).float() / 255.0 - _MEAN) / _STD


def render_set(seeds: range) -> tuple[np.ndarray, np.ndarray]:
    """Pixels uint8 [N, S, S, 3] prepared as the runtime prepares them, and per-patch labels [N, n_rows, 4]."""
    pixels = np.empty((len(seeds), tiny.IMAGE_SIZE, tiny.IMAGE_SIZE, 3), np.uint8)
    labels = np.empty((len(seeds), tiny.N_ROWS, len(HEADS)), np.int16)
    for i, seed in enumerate(seeds):
        boxes: list[Box] = []
        scene, image = make_example(seed, boxes)
        pixels[i] = prepare_tile(image, IMAGE_SPEC)
        labels[i] = patch_labels(scene, boxes, image.size)
    return pixels, labels


def dataset(workdir: Path, name: str, seeds: range, tokens: TokenSet, chunk: int = 2000) -> tuple[np.ndarray, ...]:
    """Pixels and patch labels rendered once into chunk files under workdir/data (resumable), and the
    caption rows [N, n_rows]."""
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    pixels, labels = [], []
    for start in range(seeds.start, seeds.stop, chunk):
        part = data / f"{name}-{start}-{min(start + chunk, seeds.stop)}.npz"
        if not part.is_file():
            t0 = time.perf_counter()
            px, lab = render_set(range(start, min(start + chunk, seeds.stop)))
            tmp = part.with_suffix(".partial.npz")
            np.savez(tmp, pixels=px, labels=lab)
            tmp.replace(part)
            print(f"[data] {part.name}: {len(px)} scenes in {time.perf_counter() - t0:.0f} s", flush=True)
        with np.load(part) as z:
            pixels.append(z["pixels"])
            labels.append(z["labels"])
    # A scene's content is the first draw from its seed's generator (make_example), so rows need no picture.
    rows = np.stack([tokens.rows(draw_scene(np.random.default_rng(s)), tiny.N_ROWS) for s in seeds])
    return np.concatenate(pixels), rows, np.concatenate(labels)


class TinyVision(torch.nn.Module):
    """Tower + projector as the checkpoint holds them; `pre` gives the projector's hidden pre-activations."""

    def __init__(self, embeddings: torch.Tensor, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        cfg = VisionConfig.from_dict(tiny.VISION_CONFIG)
        self.tower = VisionTower(cfg)
        self.projector = Projector(cfg.hidden_size, embeddings.shape[1], "mlp2x_gelu")
        k = embeddings.shape[0]
        with torch.no_grad():
            for m in self.tower.modules():  # ViT-style initialisation
                if isinstance(m, torch.nn.Linear):
                    torch.nn.init.trunc_normal_(m.weight, std=0.02)
                    torch.nn.init.zeros_(m.bias)
            torch.nn.init.normal_(self.tower.embeddings.class_embedding, std=0.02)
            torch.nn.init.normal_(self.tower.embeddings.position_embedding.weight, std=0.02)
            w2 = torch.zeros_like(self.projector.linear_2.weight)
            w2[:, :k] = embeddings.T
            self.projector.linear_2.weight.copy_(w2)
            self.projector.linear_2.bias.zero_()
            self.projector.linear_1.weight[k:] = 0
            self.projector.linear_1.bias[k:] = 0
        self.projector.linear_2.requires_grad_(False)
        self.k = k
        self.aux = torch.nn.Linear(cfg.hidden_size, sum(HEADS.values()))  # training only, never exported

    def pre(self, pixels: torch.Tensor, with_aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, S, S, 3] -> pre-activations of the caption tokens [B, n_rows, K] (and the aux logits)."""
        feats = self.tower(tower_input(pixels))
        pre = self.projector.linear_1(feats)[..., :self.k]
        return (pre, self.aux(feats)) if with_aux else pre


def aux_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the per-patch heads."""
    total, start = 0.0, 0
    for i, n in enumerate(HEADS.values()):
        head = logits[..., start:start + n].flatten(0, 1).float()
        total = total + F.cross_entropy(head, labels[..., i].flatten().long())
        start += n
    return total / len(HEADS)


def loss_fn(pre: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the token set, plus FIT_WEIGHT times the push of the target's pre-activation to
    GELU = 1 and of the others below NEG (measured: with the push at full weight it swamped the
    cross-entropy and the tower learned almost nothing in 300 steps)."""
    ce = F.cross_entropy(pre.flatten(0, 1).float(), target.flatten().long())
    onehot = F.one_hot(target.long(), pre.shape[-1]).bool()
    fit = ((pre[onehot] - POS) ** 2).mean() + (F.relu(pre[~onehot] - NEG) ** 2).mean()
    acc = (pre.argmax(-1) == target).float().mean()
    return ce + FIT_WEIGHT * fit, acc


@torch.no_grad()
def evaluate(model: TinyVision, pixels: np.ndarray, rows: np.ndarray, batch: int = 128) -> dict:
    """Held-out row accuracy, whole parts right (count, a slot, the word) and whole captions right."""
    model.eval()
    oks, worst = [], []
    for i in range(0, len(rows), batch):
        pre = model.pre(torch.from_numpy(pixels[i:i + batch]))
        target = torch.from_numpy(rows[i:i + batch]).long()
        oks.append(pre.argmax(-1) == target)
        worst.append((F.gelu(pre) - F.one_hot(target, pre.shape[-1])).abs().amax(-1).flatten())
    model.train()
    ok = torch.cat(oks)
    bounds = np.cumsum([0, COUNT_WIDTH] + [SLOT_WIDTH] * len(SLOTS) + [WORD_WIDTH])
    part = [ok[:, a:b].all(-1).float().mean().item() for a, b in zip(bounds, bounds[1:], strict=False)]
    return {"row_acc": ok.float().mean().item(), "caption_exact": ok.all(-1).float().mean().item(),
            "count_exact": part[0], "slot_exact": float(np.mean(part[1:-1])), "word_part_exact": part[-1],
            "max_code_error_p99": float(torch.quantile(torch.cat(worst), 0.99))}


def lm_embeddings(gguf: Path, ids: list[int]) -> torch.Tensor:
    """The LM's input embeddings of `ids`, dequantized from the GGUF."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    t = next(t for t in GGUFReader(gguf).tensors if t.name == "token_embd.weight")
    return torch.from_numpy(dequantize(t.data[ids], t.tensor_type).astype(np.float32))


def main(argv: list[str] | None = None) -> int:
    """Train (or resume) and export the tower + projector."""
    from llama3v.training.export import export
    from llama3v.training.smollm2 import wheel_gguf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-scenes", type=int, default=20000)
    ap.add_argument("--eval-scenes", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the tower")
    ap.add_argument("--export-only", action="store_true", help="export the last saved state and stop")
    ap.add_argument("--aux-weight", type=float, default=1.0, help="weight of the per-patch attribute heads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    gguf = wheel_gguf()
    tokens = TokenSet(gguf)
    print(f"[train] {len(tokens.ids)} caption tokens; {tiny.N_ROWS} image rows", flush=True)
    eval_px, eval_rows, _ = dataset(work, "heldout", range(0, args.eval_scenes), tokens)
    train_px, train_rows, train_labels = dataset(work, "train", range(TRAIN_SEED0, TRAIN_SEED0 + args.train_scenes),
                                                 tokens)

    model = TinyVision(lm_embeddings(gguf, tokens.ids), args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    state_file = work / "state.pt"
    step, log = 0, []
    if state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
        print(f"[train] resumed at step {step}", flush=True)
    if args.export_only:
        print(f"[eval] step {step}: {evaluate(model, eval_px, eval_rows)}", flush=True)
        export(model, tokens, work / "export", log)
        print(f"[train] exported step {step} to {work / 'export'}", flush=True)
        return 0
    rng = np.random.default_rng(args.seed + step)
    bar = step_bar("stage 1 (tower)", args.steps, step)
    warmup = min(200, args.steps // 10)
    t_start, t_last, seen_since = time.perf_counter(), time.perf_counter(), 0
    wall = log[-1]["wall_s"] if log else 0.0
    while step < args.steps:
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(0, len(train_rows), args.batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            pre, aux = model.pre(torch.from_numpy(train_px[idx]), with_aux=True)
        loss, acc = loss_fn(pre.float(), torch.from_numpy(train_rows[idx]))
        loss = loss + args.aux_weight * aux_loss(aux, torch.from_numpy(train_labels[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        seen_since += 1
        now = time.perf_counter()
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", heldout_caption=log[-1].get("caption_exact") if log else None)
        if step % 10 == 0:
            rate = (now - t_last) / seen_since
            t_last, seen_since = now, 0
            print(f"step {step}/{args.steps} loss {loss.item():.4f} row-acc {acc.item():.3f} lr {lr:.2e} "
                  f"{rate:.2f} s/step", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            ev = evaluate(model, eval_px, eval_rows)
            log.append({"step": step, "wall_s": wall + now - t_start, "loss": loss.item(), **ev})
            print(f"[eval] step {step}: held-out row-acc {ev['row_acc']:.4f} caption-exact {ev['caption_exact']:.3f} "
                  f"count {ev['count_exact']:.3f} slot {ev['slot_exact']:.3f} word {ev['word_part_exact']:.3f} "
                  f"code-error p99 {ev['max_code_error_p99']:.3f}", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            entry = {"step": step, "wall_s": wall + time.perf_counter() - t_start}
            if not log or log[-1]["step"] != step:
                log.append(entry)
            tmp = state_file.with_suffix(".partial")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log,
                        "args": vars(args) | {"workdir": str(work)}}, tmp)
            tmp.replace(state_file)
    if bar:
        bar.close()
    export(model, tokens, work / "export", log)
    print(f"[train] done: {step} steps; exported to {work / 'export'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
