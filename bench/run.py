"""`make bench`: the benchmark suite, each figure measured side by side in one run and reported as ratios.

    .venv/bin/python bench/run.py [--quick] [--sections encode,ttft,decode,video,parallel,s2,mllama,mllama11b]
                                  [--threads 1,2]

Models (random weights, real shapes; built once and cached under the llama3v cache):
  vitl336   CLIP ViT-L/14-336 tower (feature layer -2) + mlp2x projector to 4096
  siglip    SigLIP-so400m-384 tower + mlp2x projector to 2048
  bunny-s2  Bunny v1.1's S2 tower: SigLIP-so400m-384 (feature layer -2) at 384/768/1152 (14 passes), the
            mlp2x projector from 3456 to 4096
  llava-1b  CLIP ViT-L/14-336 + projector to 2048 + a Llama-3.2-1B-shaped decoder (real Llama-3 vocabulary),
            the decoder in f16 and q4_k_m (`parallel`: 1, 2 and 4 clients at once on each decoder)
  mllama    a small Llama-3.2-Vision: 560-pixel tiles (4 x 1601 cross-attention rows per image, as the 11B
            model's) through a narrow 3-layer encoder, and a 1024-wide 10-layer f16 decoder whose layers 3 and 8
            cross-attend (one in five, as the 11B model's)
  mllama11b Llama-3.2-11B-Vision's vision encoder and projector: 560-pixel tiles of 1601 positions, 1280 wide,
            5120 FFN, 16 heads, 32 local + 8 global layers, intermediate layers 3, 7, 15, 23, 30, projector to
            4096 (a 2-layer decoder beside it); the mmproj in f16 (about 1.7 GB)
Each section runs in a process of its own (so its peak resident memory is its own) and compares paired,
interleaved runs (A B A B ... after a warm-up): medians with min and max (docs/benchmarks.md).
Results print as Markdown and append to bench/results/<date>.jsonl with the CPU's flags and the build.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from llama3v.paths import TEST_MEDIA, cache_dir  # noqa: E402

VITL = dict(vision_hidden=1024, vision_heads=16, vision_layers=24, vision_ff=4096, image_size=336, patch_size=14)
SIGLIP = dict(vision="siglip", vision_hidden=1152, vision_heads=16, vision_layers=27, vision_ff=4304, image_size=384,
              patch_size=14, feature_layer=-1)
LLAMA_1B = dict(text_hidden=2048, text_heads=32, text_kv_heads=8, text_layers=16, text_ff=8192, rope_theta=500000.0,
                rope_scaling={"factor": 32.0, "original_max_position_embeddings": 8192}, vocab="llama3", tied=True)
SMALL_TEXT = dict(text_heads=32, text_kv_heads=8, text_layers=1, text_ff=256)
QUESTION = ("Look at the picture carefully and tell me, in a few words, which objects you can see, "
            "what colours they have, and where they are placed.")  # about 32 tokens with the image marker


MLLAMA = dict(vision_hidden=32, vision_heads=2, vision_layers=2, global_layers=1, vision_ff=64,
              intermediate_layers=(0,), image_size=560, patch_size=14, text_hidden=1024, text_heads=16,
              text_kv_heads=4, text_layers=10, text_ff=4096, cross_layers=(3, 8))
MLLAMA_11B = dict(vision_hidden=1280, vision_heads=16, vision_layers=32, global_layers=8, vision_ff=5120,
                  intermediate_layers=(3, 7, 15, 23, 30), image_size=560, patch_size=14, text_hidden=4096,
                  text_heads=32, text_kv_heads=8, text_layers=2, text_ff=256, cross_layers=(1,))


def build(name: str) -> Path:
    """The cached GGUF directory of a bench model (built on first use)."""
    from llama3v.converters.convert import convert
    from llama3v.testing.factory import TinySpec, make_checkpoint

    root = cache_dir() / "bench" / name
    out = root / "gguf"
    marker = out / "complete"
    if marker.exists():
        return out
    if name in ("mllama", "mllama11b"):
        import shutil

        from llama3v.testing.mllama_factory import TinyMllamaSpec, make_mllama_checkpoint

        print(f"[bench] building {name} (once; cached in {root})", file=sys.stderr)
        make_mllama_checkpoint(root / "ckpt", TinyMllamaSpec(**(MLLAMA if name == "mllama" else MLLAMA_11B)))
        convert(root / "ckpt", out, "f16", "f32" if name == "mllama" else "f16", force=True)
        if name == "mllama11b":
            shutil.rmtree(root / "ckpt")  # 3.4 GB of f32 random weights, not needed again
        marker.write_text("ok")
        return out
    spec = {"vitl336": TinySpec(**VITL, text_hidden=4096, **SMALL_TEXT),
            "siglip": TinySpec(**SIGLIP, text_hidden=2048, **SMALL_TEXT),
            "bunny-s2": TinySpec(**{**SIGLIP, "feature_layer": -2}, text_hidden=4096, **SMALL_TEXT,
                                 s2_scales=(384, 768, 1152), preprocess_pad=True),
            "llava-1b": TinySpec(**VITL, **LLAMA_1B, weight_scale=0.5)}[name]
    print(f"[bench] building {name} (once; cached in {root})", file=sys.stderr)
    layout = "original" if spec.s2_scales else "hf-5"  # S2 exists only in Bunny's (original) layout
    make_checkpoint(root / "ckpt", spec, layout, dtype="f16" if name == "llava-1b" else "f32")
    convert(root / "ckpt", out, "f16" if name == "llava-1b" else "f32", "f32" if name != "llava-1b" else "f16",
            force=True)
    if name == "llava-1b":
        from llama3v.quant.llm import quantize_llm

        quantize_llm(out / "model-f16.gguf", out / "model-q4_k_m.gguf", "q4_k_m", force=True)
    marker.write_text("ok")
    return out


def mmproj(out: Path, mtype: str) -> Path:
    """The bench model's mmproj in `mtype`, requantized from its f32 or f16 one on first use."""
    from llama3v.quant.requantize import requantize_mmproj

    path = out / f"mmproj-{mtype}.gguf"
    if not path.exists():
        src = out / "mmproj-f32.gguf"
        requantize_mmproj(src if src.exists() else out / "mmproj-f16.gguf", path, mtype)
    return path


def paired(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved round by round after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summary(xs: list[float], scale: float = 1e3) -> dict:
    """Median, min and max, scaled (ms by default)."""
    return {"median": statistics.median(xs) * scale, "min": min(xs) * scale, "max": max(xs) * scale, "n": len(xs)}


def ratio(a: list[float], b: list[float]) -> dict:
    """Median, min and max of the per-round ratios a/b."""
    rs = [x / y for x, y in zip(a, b, strict=True)]
    return {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}


def _image() -> Path:
    photo = TEST_MEDIA / "photo.jpeg"
    if photo.is_file():
        return photo
    from llama3v.evaluation.scenes import scene

    path = cache_dir() / "bench" / "scene.png"
    scene(0, 640, 488).save(path)
    return path


# --- sections (each runs in its own process) -------------------------------------------------------

# k-quants leave SigLIP-so400m's blocks in f16 (1152 is not a multiple of 256): no point timing them there.
ENCODE_TYPES = {("vitl336", 2): ("f32", "f16", "bf16", "q8_0", "q4_k"), ("siglip", 2): ("f32", "q8_0"),
                ("vitl336", 1): ("q8_0",)}


def section_encode(threads: int, rounds: int, model: str) -> dict:
    """Image encode of one tile: llama3v (file to rows) and bare libmtmd (a prepared chunk) for each mmproj
    type, and the PyTorch reference in fp32 and bf16, all in the same interleaved rounds."""
    import ctypes

    import torch

    from llama3v.models.llava import LlavaReference
    from llama3v.runtime.encoder import VisionEncoder
    from llama3v.runtime.image_processing import load_image, prepare_tile
    from llama3v.runtime.media import EncodeCache, image_parts

    torch.set_num_threads(threads)
    out = build(model)
    reference = LlavaReference.from_checkpoint(out.parent / "ckpt")
    image = _image()
    fns: dict[str, Callable[[], object]] = {}
    for mtype in ENCODE_TYPES[model, threads]:
        encoder = VisionEncoder(mmproj(out, mtype), n_threads=threads)
        tile = prepare_tile(load_image(image), encoder.spec)
        m = encoder._mtmd
        # The bare-libmtmd side: a bitmap tokenized once, then only mtmd_encode_chunk per call.
        bitmap = m.mtmd_bitmap_init(tile.shape[1], tile.shape[0], tile.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        chunks = m.mtmd_input_chunks_init()
        part = m.mtmd_input_part(text=None, bitmap=bitmap)
        m.mtmd_tokenize_from_parts(encoder._ctx, chunks,
                                   (ctypes.POINTER(m.mtmd_input_part) * 1)(ctypes.pointer(part)), 1, False)
        chunk = m.mtmd_input_chunks_get(chunks, 0)
        fns[f"llama3v {mtype}"] = lambda e=encoder: image_parts(image, 0, e, EncodeCache())[0].data()
        fns[f"libmtmd {mtype}"] = lambda m=m, e=encoder, c=chunk: m.mtmd_encode_chunk(e._ctx, c)

    def bf16() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference.encode_tiles(tile[None])
    fns["torch fp32"] = lambda: reference.encode_tiles(tile[None])
    fns["torch bf16"] = bf16
    times = paired(fns, rounds)
    res = {k: summary(v) for k, v in times.items()}
    for mtype in ENCODE_TYPES[model, threads]:
        ours = times[f"llama3v {mtype}"]
        res[f"llama3v {mtype} / libmtmd {mtype}"] = ratio(ours, times[f"libmtmd {mtype}"])
        res[f"llama3v {mtype} / torch fp32"] = ratio(ours, times["torch fp32"])
        res[f"llama3v {mtype} / torch bf16"] = ratio(ours, times["torch bf16"])
    return res


def section_ttft(threads: int, rounds: int, model_type: str) -> dict:
    """Time to first token for an image + question, and for a follow-up about the same image:
    llama3v vs llama-cpp-python's own multimodal chat handler on the same files."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from llama3v.runtime.media import EncodeCache
    from llama3v.runtime.session import Session

    out = build("llava-1b")
    model, projector = out / f"model-{model_type}.gguf", mmproj(out, "q8_0")
    uri = "data:image/jpeg;base64," + base64.b64encode(_image().read_bytes()).decode()
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                          {"type": "text", "text": QUESTION}]}]
    follow = first + [{"role": "assistant", "content": "A few shapes."},
                      {"role": "user", "content": "And which one is the largest?"}]
    session = Session(model, projector, n_ctx=2048, n_threads=threads)
    from llama3v.runtime.openai_api import MediaPolicy, session_messages

    ours_first, ours_follow = (session_messages(m, MediaPolicy(), []) for m in (first, follow))
    llm = Llama(model_path=str(model), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False,
                chat_handler=MTMDChatHandler(str(projector), verbose=False))

    def llama3v_cold() -> None:
        session.reset()
        session.cache = EncodeCache(session.cache.max_bytes)  # a cold first turn encodes the image
        session.chat(ours_first, max_tokens=1, temperature=0).wait()

    def llama3v_follow() -> None:
        session.chat(ours_follow, max_tokens=1, temperature=0).wait()

    def handler(messages: list) -> Callable[[], None]:
        return lambda: llm.create_chat_completion(messages=messages, max_tokens=1, temperature=0)

    # The follow-up needs the first turn in the cache: time it right after a first turn.
    times = paired({"llama3v first": llama3v_cold, "llama3v follow-up": llama3v_follow,
                    "handler first": handler(first), "handler follow-up": handler(follow)}, rounds)
    res = {k: summary(v) for k, v in times.items()}
    res["first: llama3v / handler"] = ratio(times["llama3v first"], times["handler first"])
    res["follow-up: handler / llama3v"] = ratio(times["handler follow-up"], times["llama3v follow-up"])
    return res


def section_decode(threads: int, rounds: int, model_type: str) -> dict:
    """Decode tokens/s after a short prompt: llama3v vs bare llama-cpp-python, end of turn banned."""
    from llama_cpp import Llama

    from llama3v.runtime.session import Session

    out = build("llava-1b")
    model = out / f"model-{model_type}.gguf"
    n = 64
    session = Session(model, None, n_ctx=1024, n_threads=threads)
    ban = {session.model.tokenize(t)[0]: -100.0 for t in ("<|eot_id|>", "<|end_of_text|>")}
    llm = Llama(model_path=str(model), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt_ids = llm.tokenize(b"Once upon a time", add_bos=True)

    def ours() -> float:
        session.reset()
        return session.generate("Once upon a time", max_tokens=n, temperature=0, logit_bias=ban).wait() \
            .timings["decode_tokens_per_s"]

    def bare() -> float:
        llm.reset()
        it = llm.generate(prompt_ids, temp=0, logits_processor=None)
        next(it)  # the prompt and the first token
        t0 = time.perf_counter()
        for _ in range(n - 1):
            next(it)
        return (n - 1) / (time.perf_counter() - t0)

    ours(), bare()
    rates: dict[str, list[float]] = {"llama3v": [], "llama-cpp-python": []}
    for _ in range(rounds):
        rates["llama3v"].append(ours())
        rates["llama-cpp-python"].append(bare())
    res = {k: summary(v, 1.0) for k, v in rates.items()}
    res["llama3v / llama-cpp-python"] = ratio(rates["llama3v"], rates["llama-cpp-python"])
    return res


def section_mllama(threads: int, rounds: int) -> dict:
    """mllama: decode tokens/s with a 4-tile image attached (4 x 1601 cross-attention rows read from the cache), with
    a one-tile image in `real` tiles mode (1601 rows) and text only (cross-attention layers skipped), paired; the
    4-tile image's encode and cross-state times."""
    from llama3v.evaluation.scenes import scene
    from llama3v.runtime.session import Session

    out = build("mllama")
    n = 64
    session = Session(out / "model-f16.gguf", out / "mmproj-f32.gguf", n_ctx=1024, n_threads=threads)
    ban = {session.model.tokenize(t)[0]: -100.0 for t in ("<|eot_id|>", "<|end_of_text|>")}
    image, small = scene(1, 1120, 1120), scene(2, 560, 560)  # a 2 x 2 grid: 4 real tiles; one tile
    first = session.generate(QUESTION, images=[image], max_tokens=1, temperature=0).wait()

    def rate(images: list, slots: str = "all") -> float:
        # Only decoding is timed (prefix reuse, encodes and cross K/V are outside decode_tokens_per_s).
        session.options.mllama_tile_slots = slots
        return session.generate(QUESTION, images=images, max_tokens=n, temperature=0, logit_bias=ban).wait() \
            .timings["decode_tokens_per_s"]

    variants = {"with image (6404 rows)": lambda: rate([image]), "one tile, real (1601 rows)": lambda: rate([small],
                "real"), "text only": lambda: rate([])}
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    for _ in range(rounds):
        for k, fn in variants.items():
            rates[k].append(fn())
    res = {k: summary(v, 1.0) for k, v in rates.items()}
    res["with image / text only"] = ratio(rates["with image (6404 rows)"], rates["text only"])
    res["one tile real / text only"] = ratio(rates["one tile, real (1601 rows)"], rates["text only"])
    tiles = first.media[0].n_tiles
    res[f"encode ms ({tiles} tiles, once)"] = summary([first.media[0].encode_ms / 1e3])
    res[f"cross-state ms ({tiles} tiles, once)"] = summary([first.timings["cross_states_ms"] / 1e3])
    return res


def section_mllama11b(threads: int, rounds: int) -> dict:
    """Llama-3.2-11B-Vision's encoder (f16 mmproj): seconds per image with every tile slot computed (transformers'
    arithmetic, docs/mllama.md rule 1: the same cost for any image) and with the real tiles only (`--mllama-tiles
    real`), for a one-tile image and a 2 x 2 one; per real tile = the 2 x 2 image's real-tiles time / 4."""
    from llama3v.evaluation.scenes import scene
    from llama3v.runtime.mllama import MllamaEncoder

    out = build("mllama11b")
    t0 = time.perf_counter()
    encoder = MllamaEncoder(out / "mmproj-f16.gguf", n_threads=threads)
    load_s = time.perf_counter() - t0
    one, four = encoder.tiles(scene(1, 560, 560)), encoder.tiles(scene(1, 1120, 1120))
    times = paired({"encode s, all 4 slots (1 real tile)": lambda: encoder.encode(one, "all"),
                    "encode s, real tiles, 1 tile": lambda: encoder.encode(one, "real"),
                    "encode s, real tiles, 2 x 2": lambda: encoder.encode(four, "real")},
                   max(1, min(rounds, 2)), warmup=0)
    res = {k: summary(v, 1.0) for k, v in times.items()}
    res["s per real tile (2 x 2 / 4)"] = summary([t / 4 for t in times["encode s, real tiles, 2 x 2"]], 1.0)
    res["load s"] = load_s
    encoder.close()
    return res


PARALLEL_CLIENTS = (1, 2, 4)
PARALLEL_ANSWER = 32  # tokens per answer
PARALLEL_REQUESTS = 2  # questions each client asks, one after another


def section_parallel(threads: int, rounds: int, model_type: str) -> dict:
    """`serve --parallel 4` without HTTP: 1, 2 and 4 clients at once, each asking two text questions in turn
    (each its own, of different lengths) through the server's worker: aggregate tokens/s end to end (all answers'
    tokens over the wall time), aggregate decode tokens/s (the same tokens over the wall time less every request's
    encode and prompt time: the worker decodes nothing else meanwhile) and time to first token.
    Also the KV cache's resident memory per slot, from the process's RSS around contexts of 1 and 4 slots."""
    import threading

    from llama3v.runtime.context import Context
    from llama3v.runtime.server import Job, ServerConfig, Worker
    from llama3v.runtime.session import Session

    model = build("llava-1b") / f"model-{model_type}.gguf"
    res: dict = {}
    n_ctx = 4096  # the default context per slot, for the memory figure
    session = Session(model, None, n_ctx=1024, n_threads=threads, parallel=max(PARALLEL_CLIENTS))
    rss = {}
    for n_seq in (1, 4):
        before = _rss_bytes()
        ctx = Context(session.model, n_ctx=n_ctx, n_seq=n_seq, n_threads=threads)
        rss[n_seq] = _rss_bytes() - before
        ctx.close()
    res["kv_mib_per_slot"] = {f"n_ctx {n_ctx}, f16 KV": (rss[4] - rss[1]) / 3 / 2**20,
                              "context of 1 slot": rss[1] / 2**20, "context of 4 slots": rss[4] / 2**20}
    worker = Worker(session, ServerConfig())
    ban = {session.model.tokenize(t)[0]: -100.0 for t in ("<|eot_id|>", "<|end_of_text|>")}

    def client(k: int, ttft: list[float], prefill: list[float]) -> int:
        tokens = 0
        for j in range(PARALLEL_REQUESTS):
            question = f"Client {k}, question {j}: " + QUESTION[:40 + 30 * ((k + j) % 4)]
            done, first = threading.Event(), []
            t0 = time.perf_counter()

            def push(event: tuple, done: threading.Event = done, first: list = first) -> None:
                if event[0] == "piece" and not first:
                    first.append(time.perf_counter())
                elif event[0] in ("done", "error"):
                    first.append(event)
                    done.set()

            worker.submit(Job(messages=[{"role": "user", "content": question}], push=push, ticket=worker.admit(0),
                              options={"max_tokens": PARALLEL_ANSWER, "temperature": 0, "logit_bias": ban}))
            done.wait()
            assert first[-1][0] == "done", first[-1]
            ttft.append(first[0] - t0)
            result = first[-1][1]
            tokens += len(result.tokens)
            prefill.append((result.timings["encode_ms"] + result.timings["prompt_ms"]) / 1e3)
        return tokens

    def wave(n: int) -> tuple[float, float, int, list[float]]:
        """Seconds, seconds of prefill (the worker decodes nothing else meanwhile), tokens, times to first token."""
        ttft: list[float] = []
        prefill: list[float] = []
        counts = [0] * n
        threads_ = [threading.Thread(target=lambda k=k: counts.__setitem__(k, client(k, ttft, prefill)))
                    for k in range(n)]
        t0 = time.perf_counter()
        for t in threads_:
            t.start()
        for t in threads_:
            t.join()
        return time.perf_counter() - t0, sum(prefill), sum(counts), ttft

    for n in PARALLEL_CLIENTS:  # warm-up
        wave(n)
    rates: dict[int, list[float]] = {n: [] for n in PARALLEL_CLIENTS}
    decode: dict[int, list[float]] = {n: [] for n in PARALLEL_CLIENTS}
    ttfts: dict[int, list[float]] = {n: [] for n in PARALLEL_CLIENTS}
    for _ in range(rounds):
        for n in PARALLEL_CLIENTS:
            seconds, prefill, tokens, ttft = wave(n)
            rates[n].append(tokens / seconds)
            decode[n].append(tokens / (seconds - prefill))
            ttfts[n].extend(ttft)
    worker.stop()
    for n in PARALLEL_CLIENTS:
        res[f"{n} clients tokens/s end to end"] = summary(rates[n], 1.0)
        res[f"{n} clients decode tokens/s"] = summary(decode[n], 1.0)
        res[f"{n} clients / 1 client decode tokens/s"] = ratio(decode[n], decode[1])
        cut = statistics.quantiles(ttfts[n], n=20, method="inclusive")
        res[f"{n} clients ttft ms"] = {**summary(ttfts[n]), "p50": statistics.median(ttfts[n]) * 1e3,
                                       "p95": cut[18] * 1e3}
        res[f"{n} clients / 1 client tokens/s end to end"] = ratio(rates[n], rates[1])
    return res


def _rss_bytes() -> int:
    """The process's resident memory now (not the peak)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def section_video(threads: int, rounds: int) -> dict:
    """Video end to end (decode, sample, budget, encode) on the H.264 test clip or a made one."""
    from llama3v.runtime.encoder import VisionEncoder
    from llama3v.runtime.media import EncodeCache, Rows, sample_video, video_parts
    from llama3v.runtime.video import Sampling, VideoReader

    clip = TEST_MEDIA / "clip.mp4"
    if not clip.is_file():
        sys.path.insert(0, str(ROOT / "bench"))
        from video import make_clip

        (cache_dir() / "bench" / "video").mkdir(parents=True, exist_ok=True)
        clip = make_clip(cache_dir() / "bench" / "video" / "480p-4s.mp4", (854, 480), 4)
    encoder = VisionEncoder(mmproj(build("vitl336"), "q8_0"), n_threads=threads)
    frames, budget = 4, 1024
    times, rows_after, duration = [], 0, 0.0
    for _ in range(rounds):
        cache = EncodeCache()
        t0 = time.perf_counter()
        video = sample_video(clip, 0, encoder, Sampling(frames=frames))
        parts = video_parts(video, encoder, cache, None)
        rows_before = sum(p.data().shape[0] for p in parts if isinstance(p, Rows))
        times.append(time.perf_counter() - t0)
        # The budgeted layout reuses the cached frame encodes: only the budget's pooling is extra.
        rows_after = sum(p.data().shape[0] for p in video_parts(video, encoder, cache, budget) if isinstance(p, Rows))
    with VideoReader(clip) as r:
        duration = r.info.duration
    median = statistics.median(times)
    return {f"{frames} frames of a {duration:.1f} s clip": {
        **summary(times), "frames_per_s": frames / median, "rows": rows_before,
        f"rows within a {budget}-token budget": rows_after}}


def section_s2(threads: int, rounds: int) -> dict:
    """Bunny v1.1's S2 encode of one image (14 tower passes at 384/768/1152, merge, pooling, projector):
    llama3v (libmtmd per crop + numpy) against the PyTorch reference (the 14 crops as one batch)."""
    import torch

    from llama3v.models.llava import LlavaReference
    from llama3v.runtime.encoder import VisionEncoder
    from llama3v.runtime.image_processing import load_image, prepare_tile
    from llama3v.runtime.media import EncodeCache, image_parts

    torch.set_num_threads(threads)
    out = build("bunny-s2")
    reference = LlavaReference.from_checkpoint(out.parent / "ckpt")
    image = _image()
    encoder = VisionEncoder(mmproj(out, "q8_0"), n_threads=threads)
    tile = prepare_tile(load_image(image), encoder.spec)
    # One encode is 14 tower passes (minutes here): no warm-up round (the first call's setup is well under 1% of
    # it) and at most two paired rounds, so the suite stays usable.
    times = paired({"llama3v q8_0": lambda: image_parts(image, 0, encoder, EncodeCache())[0].data(),
                    "torch fp32": lambda: reference.encode_tiles(tile[None])}, min(rounds, 2), warmup=0)
    res = {k: summary(v) for k, v in times.items()}
    res["llama3v q8_0 / torch fp32"] = ratio(times["llama3v q8_0"], times["torch fp32"])
    return res


# What each section measures at 2 threads and at 1 (TTFT with the q4_k_m decoder only, 1 thread: the encode and
# decode scaling only, so that the suite stays near 15 minutes here).
PLAN = {("encode", 2): ("vitl336", "siglip"), ("ttft", 2): ("q4_k_m",), ("decode", 2): ("f16", "q4_k_m"),
        ("video", 2): ("",), ("parallel", 2): ("f16", "q4_k_m"), ("s2", 2): ("",), ("encode", 1): ("vitl336",),
        ("ttft", 1): (), ("decode", 1): ("q4_k_m",), ("video", 1): (), ("parallel", 1): (), ("s2", 1): (),
        ("mllama", 2): ("",), ("mllama", 1): (), ("mllama11b", 2): ("",), ("mllama11b", 1): ()}
SECTIONS = {"encode": section_encode, "ttft": section_ttft, "decode": section_decode, "video": section_video,
            "parallel": section_parallel, "s2": section_s2, "mllama": section_mllama,
            "mllama11b": section_mllama11b}


def environment() -> dict:
    """CPU flags, threads available, and the engine's build features."""
    import llama_cpp

    from llama3v.runtime import engine

    engine.libs()
    flags = []
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "f16c")))
                break
    return {"cpu": platform.processor() or platform.machine(), "flags": flags, "cpus": os.cpu_count(),
            "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
            "engine": os.environ.get("LLAMA_CPP_LIB_PATH") or str(Path(llama_cpp.__file__).parent / "lib")}


def run_section(name: str, threads: int, rounds: int, extra: str) -> dict:
    """Run one section in a child process; returns its results with its peak RSS."""
    cmd = [sys.executable, __file__, "--child", name, "--threads", str(threads), "--rounds", str(rounds),
           "--extra", extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"section {name} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def child(name: str, threads: int, rounds: int, extra: str) -> None:
    """The child process: run the section, print one JSON line."""
    from llama3v.runtime import engine

    engine.libs()
    args = (threads, rounds) + ((extra,) if name in ("encode", "ttft", "decode", "parallel") else ())
    results = SECTIONS[name](*args)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(results))


def _print(res: dict, path: str = "") -> None:
    """One line per measurement: median (min, max) and any extra figures."""
    for name, value in res.items():
        if not isinstance(value, dict):
            if path:  # a figure inside a group (top-level scalars are the section's RSS and wall time)
                print(f"- {path}{name}: {value:.4g}")
            continue
        if "median" in value:
            extra = "".join(f", {k} {v:.4g}" for k, v in value.items() if k not in ("median", "min", "max", "n"))
            print(f"- {path}{name}: median {value['median']:.4g} (min {value['min']:.4g}, max {value['max']:.4g})"
                  + extra)
        else:
            _print(value, f"{path}{name}: ")


def main() -> None:
    """Run the suite, print the tables, append the results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="encode,ttft,decode,video,parallel,s2,mllama,mllama11b")
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 rounds, 2 threads only")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--extra", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, int(args.threads), args.rounds, args.extra)
        return
    if args.quick:
        args.rounds, args.threads = 2, "2"
    env = environment()
    started = time.perf_counter()
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "env": env, "results": {}}
    print(f"# llama3v benchmarks\n\n{env['cpu']}, {env['cpus']} CPUs; flags: {' '.join(env['flags'])}\n"
          f"engine: {env['llama_cpp_system_info']}\n")
    plan = [(s, t, extra) for t in (int(x) for x in args.threads.split(",")) for s in args.sections.split(",")
            for extra in PLAN[s, t]]
    for name, t, extra in plan:
        t0 = time.perf_counter()
        res = run_section(name, t, args.rounds, extra)
        res["wall_s"] = time.perf_counter() - t0
        key = f"{name} {extra} {t}t".replace("  ", " ")
        record["results"][key] = res
        print(f"## {key} (peak RSS {res['peak_rss_mb']:.0f} MB, {res['wall_s']:.0f} s)\n")
        _print(res)
        print(flush=True)
    record["wall_s"] = time.perf_counter() - started
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    with open(results / f"{datetime.now(UTC):%Y-%m-%d}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"suite took {record['wall_s'] / 60:.1f} min; results appended to bench/results/")


if __name__ == "__main__":
    main()
