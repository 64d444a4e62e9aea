"""`llama3v quant-report`: what each (mmproj type, model type) combination costs in size, speed and answers.

From an HF checkpoint SRC it writes DIR/gguf/model-f32.gguf and mmproj-f32.gguf with the
converter, then derives every other type from those f32 files: mmproj types with the converter's
requantizer, model types with llama.cpp's quantizer. f32 is the baseline because it is exact for
f32 checkpoints and lossless for f16/bf16 ones, so every type is one rounding away from the source.

For each mmproj type, on the given images (default: drawn scenes): file size, encode time per
image (median after a warm-up encode), and embedding NMSE and cosine against the PyTorch reference
(llama3v.evaluation.parity). For each combination, whole-model KL divergence against the f32 pair
over the answer positions: the f32 model answers `prompt` greedily for `n_predict` tokens per
image, then each combination scores that same answer (teacher forcing, Session.score), and the
distributions it returns (after the prompt and after each answer token) are compared (kl.py).
All sides run with an f32 KV cache and flash attention off, so only the weights differ.

With `task_scenes` N > 0 (meant for the embedded tiny model, which answers questions about drawn
scenes: docs/tiny-model.md), each combination also answers every held-out question about held-out
scenes 0..N-1 greedily, and the report gives its task accuracy (keyword scoring,
llama3v.training.questions) next to NMSE and KL: what a quant type costs in right answers.

Results are cached per mmproj type and per combination under DIR/cache/<settings>/, keyed by the
checkpoint's files, the images, the prompt and -n, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image

from llama3v.atomic import atomic_output
from llama3v.converters.convert import convert
from llama3v.errors import Llama3vError
from llama3v.evaluation.kl import compare
from llama3v.evaluation.quant_plot import Point, draw_encode_vs_size, draw_size_vs_kl, require_matplotlib
from llama3v.evaluation.scenes import scenes
from llama3v.progress import Progress, bars
from llama3v.quant import types as quant_types
from llama3v.quant.llm import quantize_llm
from llama3v.quant.requantize import requantize_mmproj
from llama3v.quant.storage import parse_outtype
from llama3v.quant.types import LLM_QUANT_TYPES
from llama3v.runtime.encoder import VisionEncoder
from llama3v.runtime.image_processing import ImageInput
from llama3v.runtime.session import Session

DEFAULT_MMPROJ_TYPES, DEFAULT_MODEL_TYPES = quant_types.REPORT_MMPROJ_TYPES, quant_types.REPORT_MODEL_TYPES
QUESTION = "Describe this image in detail."
N_PREDICT = 32
N_SCENES = 2  # a ViT-L encode takes ~5 s per image and type on 2 CPU cores
OUTPUTS = ("quant-report.md", "quant-report.csv", "quant-report.png", "quant-report-encode.png")
MIB = 1 << 20


@dataclass
class Row:
    """One combination's measurements (a row of the table and the CSV)."""

    mmproj_type: str
    model_type: str
    mmproj_bytes: int
    model_bytes: int
    encode_ms: float  # median per image, this mmproj type
    emb_nmse: float  # image embeddings against the PyTorch reference
    emb_cosine: float  # mean over rows
    kl_mean: float  # nats, over all answer positions of all images
    kl_max: float
    worst_image: int
    worst_step: int  # 0: the distribution after the prompt; k: after the k-th answer token
    top1_agree: float
    n_positions: int
    task_right: int | None = None  # held-out questions answered right (task_scenes > 0 only)
    task_total: int | None = None

    @property
    def task_accuracy(self) -> float | None:
        """Right answers over questions, when measured."""
        return None if not self.task_total else self.task_right / self.task_total


def quant_report(src: str | Path, outdir: str | Path, mmproj_types: list[str] | tuple[str, ...] = DEFAULT_MMPROJ_TYPES,
                 model_types: list[str] | tuple[str, ...] = DEFAULT_MODEL_TYPES,
                 images: list[ImageInput] | None = None, prompt: str = QUESTION, n_predict: int = N_PREDICT,
                 n_threads: int | None = None, progress: Progress | None = None, task_scenes: int = 0) -> list[Row]:
    """Measure every combination and write the Markdown table, CSV and PNGs into `outdir`; returns the rows."""
    require_matplotlib()  # before hours of measuring, not after
    mmproj_types = list(dict.fromkeys(t.lower() for t in mmproj_types))  # in order, each once
    model_types = list(dict.fromkeys(t.lower() for t in model_types))
    for t in mmproj_types:
        parse_outtype(t)
    for t in model_types:
        if t not in LLM_QUANT_TYPES:
            raise Llama3vError(f"unknown model type {t!r}; choose from {', '.join(LLM_QUANT_TYPES)}")
    if n_predict < 1:
        raise Llama3vError("-n must be at least 1")
    if task_scenes < 0:
        raise Llama3vError("--task-scenes must be 0 or more")
    if not mmproj_types or not model_types:
        raise Llama3vError("give at least one mmproj type and one model type")
    src, outdir = Path(src), Path(outdir)
    images = list(images) if images else list(scenes(N_SCENES))
    gguf = _GGUFs(src, outdir / "gguf", n_threads, progress)
    settings = {"source": _source_fingerprint(src), "images": [_image_digest(i) for i in images],
                "prompt": prompt, "n_predict": n_predict}
    cache = outdir / "cache" / hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "settings.json").write_text(json.dumps(settings, indent=1))

    embeddings = _EmbeddingMeasure(src, images, n_threads)
    vision = {}
    for i, t in enumerate(mmproj_types):
        _step(progress, "measuring mmproj types", i, len(mmproj_types))
        vision[t] = _cached(cache / f"mmproj-{t}.json", lambda t=t: embeddings.measure(gguf.mmproj(t)))
    baseline = _baseline(cache / "baseline.npz", gguf, images, prompt, n_predict, n_threads, progress)

    rows = []
    combos = list(product(mmproj_types, model_types))
    for i, (m, t) in enumerate(combos):
        _step(progress, "measuring combinations", i, len(combos))
        div = _cached(cache / f"combo-{m}+{t}.json",
                      lambda m=m, t=t: _divergence(gguf.model(t), gguf.mmproj(m), images, prompt, baseline, n_threads))
        if task_scenes:
            div |= _cached(cache / f"task-{task_scenes}-{m}+{t}.json",
                           lambda m=m, t=t: _task(gguf.model(t), gguf.mmproj(m), task_scenes, n_threads))
        v = vision[m]
        rows.append(Row(m, t, gguf.mmproj(m).stat().st_size, gguf.model(t).stat().st_size, v["encode_ms"],
                        v["nmse"], v["cosine"], **div))
    _step(progress, "measuring combinations", len(combos), len(combos))
    write_report(rows, outdir, src, len(images), prompt, n_predict)
    return rows


class _GGUFs:
    """The f32 pair converted from the checkpoint, and every other type derived from it on first use."""

    def __init__(self, src: Path, out: Path, n_threads: int | None, progress: Progress | None):
        self.out, self.n_threads, self.progress = out, n_threads, progress
        out.mkdir(parents=True, exist_ok=True)
        stamp, fingerprint = out / "source.json", _source_fingerprint(src)
        if stamp.is_file() and json.loads(stamp.read_text()) != fingerprint:
            raise Llama3vError(f"{out} holds files converted from another checkpoint (or {src} changed since); "
                               "use another output directory or delete it")
        stamp.write_text(json.dumps(fingerprint, indent=1))
        if not (self.model("f32").is_file() and self.mmproj("f32").is_file()):
            convert(src, out, "f32", "f32", force=True, progress=progress)

    def mmproj(self, t: str) -> Path:
        """The mmproj of type `t`, requantized from the f32 one if not there yet."""
        path = self.out / f"mmproj-{t}.gguf"
        if t != "f32" and not path.is_file():
            requantize_mmproj(self.out / "mmproj-f32.gguf", path, t, progress=self.progress)
        return path

    def model(self, t: str) -> Path:
        """The LLM of type `t`, quantized by llama.cpp from the f32 one if not there yet."""
        path = self.out / f"model-{t}.gguf"
        if t != "f32" and not path.is_file():
            _step(self.progress, f"writing {path.name} (llama.cpp's quantizer)", 0, 1)
            quantize_llm(self.out / "model-f32.gguf", path, t, n_threads=self.n_threads)
        return path


class _EmbeddingMeasure:
    """Encodes the images with one mmproj after another; the reference's rows are computed once, on first need."""

    def __init__(self, src: Path, images: list[ImageInput], n_threads: int | None):
        self.src, self.images, self.n_threads = src, images, n_threads
        self._reference_rows: np.ndarray | None = None

    def measure(self, mmproj: Path) -> dict:
        """NMSE, cosine and median encode milliseconds per image of `mmproj`."""
        # parity imports torch. Imported here, after llama3v.runtime set OMP_WAIT_POLICY: torch loads
        # libgomp, which reads it once, and ggml then shares that libgomp (spinning, an encode of a tiny
        # tower took 450 ms instead of 1 ms on 2 cores). A fully cached run never loads torch.
        from llama3v.evaluation.parity import mean_row_cosine, nmse, tiles_of

        encoder = VisionEncoder(mmproj, n_threads=self.n_threads, flash_attn=False)
        try:
            tiles = tiles_of(self.images, encoder)
            encoder.encode(tiles[0])  # warm-up: the first encode allocates the graph
            rows, times = [], []
            for tile in tiles:
                t0 = time.perf_counter()
                rows.append(encoder.encode(tile))
                times.append((time.perf_counter() - t0) * 1e3)
        finally:
            encoder.close()
        ours, ref = np.concatenate(rows), self._reference(tiles)
        return {"nmse": nmse(ours, ref), "cosine": mean_row_cosine(ours, ref), "encode_ms": statistics.median(times)}

    def _reference(self, tiles: np.ndarray) -> np.ndarray:
        if self._reference_rows is None:
            from llama3v.models.llava import LlavaReference

            self._reference_rows = LlavaReference.from_checkpoint(self.src).encode_tiles(tiles)
        return self._reference_rows


def _baseline(path: Path, gguf: _GGUFs, images: list[ImageInput], prompt: str, n_predict: int,
              n_threads: int | None, progress: Progress | None) -> list[tuple[list[int], np.ndarray]]:
    """Per image: the f32 pair's greedy answer and its scored logits [len + 1, n_vocab] (cached in `path`)."""
    if path.is_file():
        with np.load(path) as z:
            return [(z[f"tokens{i}"].tolist(), z[f"logits{i}"]) for i in range(len(images))]
    out = []
    with _session(gguf.model("f32"), gguf.mmproj("f32"), n_threads) as session:
        for i, image in enumerate(images):
            _step(progress, "f32 answers", i, len(images))
            tokens = session.generate(prompt, images=[image], temperature=0, max_tokens=n_predict).wait().tokens
            out.append((tokens, _score(session, prompt, tokens, image)))
    arrays = {}
    for i, (tokens, logits) in enumerate(out):
        arrays[f"tokens{i}"], arrays[f"logits{i}"] = np.asarray(tokens, np.int64), logits
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return out


def _divergence(model: Path, mmproj: Path, images: list[ImageInput], prompt: str,
                baseline: list[tuple[list[int], np.ndarray]], n_threads: int | None) -> dict:
    """KL and top-1 agreement of one combination against the f32 pair, over every answer position."""
    with _session(model, mmproj, n_threads) as session:
        logits = [_score(session, prompt, tokens, image) for image, (tokens, _) in zip(images, baseline, strict=True)]
    div = compare(np.concatenate([b for _, b in baseline]), np.concatenate(logits))
    lengths = np.cumsum([0] + [len(b) for _, b in baseline])
    image = int(np.searchsorted(lengths, div.worst, side="right")) - 1
    return {"kl_mean": div.kl_mean, "kl_max": div.kl_max, "worst_image": image,
            "worst_step": div.worst - int(lengths[image]), "top1_agree": div.top1_agree,
            "n_positions": div.n_positions}


def _task(model: Path, mmproj: Path, n_scenes: int, n_threads: int | None) -> dict:
    """Right answers to the held-out questions about held-out drawn scenes 0..n_scenes-1."""
    from llama3v.evaluation.tiny_accuracy import evaluate, heldout_questions

    with _session(model, mmproj, n_threads) as session:
        acc, _ = evaluate(session, heldout_questions(range(n_scenes)))
    return {"task_right": sum(acc.right.values()), "task_total": sum(acc.total.values())}


def _score(session: Session, prompt: str, tokens: list[int], image: ImageInput) -> np.ndarray:
    """Teacher-forced logits from an empty KV cache: a reused prefix would be decoded in other batches, and
    batch boundaries change float rounding (KL ~1e-12 instead of 0 for the f32 pair against itself)."""
    session.reset()
    return session.score(prompt, tokens, images=[image])


def _step(progress: Progress | None, what: str, done: int, total: int) -> None:
    if progress:
        progress(what, done, total)


def _session(model: Path, mmproj: Path, n_threads: int | None) -> Session:
    return Session(model, mmproj, n_threads=n_threads, kv_type="f32", flash_attn=False)


def _cached(path: Path, compute: Callable[[], dict]) -> dict:
    """The JSON object stored at `path`, or `compute()`'s, stored there atomically."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(value))
    return value


def _source_fingerprint(src: Path) -> dict:
    """The checkpoint's top-level files (name, size, modification time): a changed checkpoint is noticed."""
    if not src.is_dir():
        raise Llama3vError(f"{src}: not a checkpoint directory")
    files = sorted(p for p in src.iterdir() if p.is_file())
    return {"path": str(src.resolve()), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def _image_digest(image: ImageInput) -> str:
    """A content hash of an image given as a path, bytes, PIL image or array."""
    h = hashlib.sha256()
    if isinstance(image, str | Path):
        if not Path(image).is_file():
            raise Llama3vError(f"{image}: no such file")
        h.update(Path(image).read_bytes())
    elif isinstance(image, bytes):
        h.update(image)
    elif isinstance(image, Image.Image):
        h.update(f"{image.mode}{image.size}".encode() + image.tobytes())
    else:
        a = np.ascontiguousarray(image)
        h.update(f"{a.dtype}{a.shape}".encode() + a.tobytes())
    return h.hexdigest()


def write_report(rows: list[Row], outdir: Path, src: Path, n_images: int, prompt: str, n_predict: int) -> None:
    """Write quant-report.md, .csv, .png (size against KL) and -encode.png (encode time against size) into `outdir`."""
    md, csv_path, png, encode_png = (outdir / name for name in OUTPUTS)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Row)] + ["task_accuracy"])
        writer.writeheader()
        writer.writerows(asdict(r) | {"task_accuracy": r.task_accuracy} for r in rows)
    md.write_text(markdown_table(rows, src, n_images, prompt, n_predict))
    points = [Point((r.mmproj_bytes + r.model_bytes) / MIB, r.kl_mean, r.mmproj_type, r.model_type, r.task_accuracy)
              for r in rows]
    draw_size_vs_kl(points, png, f"{src.name}: size against KL to the f32 pair")
    per_mmproj = {r.mmproj_type: (r.mmproj_bytes / MIB, r.encode_ms) for r in rows}
    draw_encode_vs_size(per_mmproj, encode_png, f"{src.name}: mmproj size against encode time per image")


def markdown_table(rows: list[Row], src: Path, n_images: int, prompt: str, n_predict: int) -> str:
    """The report as Markdown: the settings, then one table row per combination."""
    task = any(r.task_total for r in rows)
    lines = [f"# quant-report: {src.name}", "",
             f"{n_images} image{'s' if n_images != 1 else ''}; prompt {prompt!r}; KL over the f32 pair's greedy "
             f"answer of up to {n_predict} tokens per image (positions: after the prompt and after each answer "
             "token). Embedding NMSE and cosine against the PyTorch reference; encode time: median per image. "
             "f32 KV cache, flash attention off."
             + (" Task accuracy: held-out questions about held-out drawn scenes, greedy, keyword scoring "
                "(docs/tiny-model.md)." if task else ""), "",
             "| mmproj | model | mmproj MiB | model MiB | total MiB | encode ms/image | emb NMSE | emb cosine "
             "| KL mean | KL max (image, step) | top-1 agree |" + (" task accuracy |" if task else ""),
             "| --- | --- |" + " ---: |" * (9 + task)]
    for r in rows:
        lines.append(
            f"| {r.mmproj_type} | {r.model_type} | {r.mmproj_bytes / MIB:.1f} | {r.model_bytes / MIB:.1f} | "
            f"{(r.mmproj_bytes + r.model_bytes) / MIB:.1f} | {r.encode_ms:.0f} | {r.emb_nmse:.2e} | "
            f"{r.emb_cosine:.6f} | {r.kl_mean:.2e} | {r.kl_max:.2e} ({r.worst_image}, {r.worst_step}) | "
            f"{r.top1_agree:.1%} ({round(r.top1_agree * r.n_positions)}/{r.n_positions}) |"
            + (f" {r.task_accuracy:.1%} ({r.task_right}/{r.task_total}) |" if task else ""))
    return "\n".join(lines) + "\n"


def quant_report_command(args: argparse.Namespace) -> int:
    """`llama3v quant-report SRC [--mmproj-types a,b] [--model-types c,d] [--image P]... [-p TEXT] [-n N] -o DIR`.

    argparse arguments: `src` (Path); `--mmproj-types`, `--model-types` (str, comma-separated, default None:
    DEFAULT_MMPROJ_TYPES, DEFAULT_MODEL_TYPES); `--image` (Path, action="append", default None: drawn scenes);
    `-p/--prompt` (str, default None: QUESTION); `-n/--n-predict` (int, default 32); `-o/--outdir` (Path,
    required); `--threads` (int, default None: all CPUs); `--task-scenes` (int, default 0: no task accuracy);
    `-q/--quiet` from the common options. Prints the
    Markdown report on stdout; progress bars go to stderr when it is a terminal.
    """
    quant_report(args.src, args.outdir, _types(args.mmproj_types, DEFAULT_MMPROJ_TYPES),
                 _types(args.model_types, DEFAULT_MODEL_TYPES), images=args.image,
                 prompt=QUESTION if args.prompt is None else args.prompt, n_predict=args.n_predict,
                 n_threads=args.threads, progress=bars(args.quiet), task_scenes=args.task_scenes)
    print((Path(args.outdir) / OUTPUTS[0]).read_text(), end="")
    return 0


def _types(text: str | None, default: tuple[str, ...]) -> list[str]:
    return list(default) if text is None else [t.strip() for t in text.split(",") if t.strip()]
