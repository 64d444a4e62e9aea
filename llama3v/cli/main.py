"""The `llama3v` command line: thin subcommands over converters, runtime and evaluation.

Exit codes: 0 success, 1 a clean error (one line on stderr; traceback with --verbose), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

from llama3v import __version__
from llama3v.errors import Llama3vError
from llama3v.progress import Progress, bars
from llama3v.quant import types as quant_types
from llama3v.runtime.options import CONVERSATION_MAX_TOKENS, SAMPLING, TILE_SLOTS, SessionOptions
from llama3v.runtime.video import Sampling


class _Media(argparse.Action):
    """Collect --image and --video in command-line order, so markers keep their relative order."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, value: str, opt: str | None = None):
        ns.media = [*(getattr(ns, "media", None) or []), (self.dest, value)]


def _add_media(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", dest="image", action=_Media, metavar="PATH",
                   help="an image file (repeatable); goes at the next <image> marker of the prompt")
    p.add_argument("--video", dest="video", action=_Media, metavar="PATH",
                   help="a video file (repeatable); goes at the next <video> marker of the prompt")
    p.add_argument("--max-tiles", type=int, default=None, metavar="N",
                   help="high-resolution images: the largest tile grid (LLaVA-NeXT), or up to N slices plus a "
                   "global view for single-resolution models (default: the model's own behaviour, no slices)")
    p.add_argument("--image-layout", choices=("hf", "llama.cpp"), default=None,
                   help="LLaVA-NeXT embedding layout: 'hf' (unpadded, newline per row; the default when the "
                   "mmproj has the newline vector) or 'llama.cpp' (tiles, then the base view)")
    p.add_argument("--max-video-tokens", type=int, default=None, metavar="N",
                   help="rows each video may use; frames are pooled and pruned only as far as needed (default: what "
                   "the context leaves after the prompt and the answer; for `embed`, no limit)")
    p.add_argument("--video-frames", type=int, default=Sampling.frames, metavar="N",
                   help=f"frames sampled per video, uniformly ({Sampling.frames}), or the cap with --video-fps")
    p.add_argument("--video-fps", type=float, default=None, metavar="F", help="sample F frames per second instead")
    p.add_argument("--video-start", type=float, default=0.0, metavar="S", help="sample from S seconds (0)")
    p.add_argument("--video-end", type=float, default=None, metavar="S", help="sample until S seconds (the end)")
    p.set_defaults(media=[])


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: all available)")


def _add_model(p: argparse.ArgumentParser, env: bool = False) -> None:
    """--model, --mmproj and the context options shared by run, chat and serve."""
    model, mmproj = (os.environ.get("LLAMA3V_MODEL"), os.environ.get("LLAMA3V_MMPROJ")) if env else (None, None)
    p.add_argument("--model", type=Path, required=model is None, default=model,
                   help="LLM GGUF" + (" (env LLAMA3V_MODEL)" if env else ""))
    p.add_argument("--mmproj", type=Path, default=mmproj,
                   help="mmproj GGUF, needed for media" + (" (env LLAMA3V_MMPROJ)" if env else ""))
    p.add_argument("--n-ctx", type=int, default=SessionOptions.n_ctx,
                   help=f"context size in tokens ({SessionOptions.n_ctx})")
    p.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload on Metal/CUDA builds (0)")
    p.add_argument("--kv-type", choices=("f16", "f32"), default=SessionOptions.kv_type,
                   help=f"KV cache type ({SessionOptions.kv_type}; f32 for exact comparisons)")
    p.add_argument("--mllama-tiles", choices=TILE_SLOTS, default=SessionOptions.mllama_tile_slots,
                   help="Llama-3.2-Vision: encode 'all' tile slots as transformers does (real tiles attend to the "
                   "padding tiles), or only the 'real' tiles: several times cheaper for an image of few tiles, "
                   "not transformers' numbers (docs/mllama.md)")
    _add_chat_template(p, "instead of the GGUF's")


def _add_chat_template(p: argparse.ArgumentParser, what: str) -> None:
    from llama3v.chat_formats import FORMATS

    p.add_argument("--chat-template", metavar="NAME|FILE", default=None,
                   help=f"the prompt format to use {what}: {', '.join(FORMATS)}, or a Jinja template file "
                   "(docs/prompts.md)")


def _add_temperature(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temp", type=float, default=SAMPLING.temperature,
                   help=f"temperature; 0 is greedy ({SAMPLING.temperature})")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="llama3v", description="LLaVA-style vision-language models on llama.cpp.")
    parser.add_argument("--version", action="version", version=f"llama3v {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log and tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress output on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", parents=[common],
                       help="convert a Hugging Face LLaVA or Llama-3.2-Vision checkpoint to GGUF",
                       description="Convert a LLaVA-style or Llama-3.2-Vision (mllama) Hugging Face checkpoint "
                       "into OUTDIR/model-<type>.gguf (Llama-3 decoder, tokenizer, chat template) and "
                       "OUTDIR/mmproj-<type>.gguf (vision tower + projector in llama.cpp's mmproj format; "
                       "docs/formats.md).")
    p.add_argument("src", help="checkpoint directory (config.json + safetensors or .bin), or a Hugging Face Hub id "
                   "(org/name; fetched into the Hugging Face cache, only the files the converter reads)")
    p.add_argument("--revision", help="Hub ids: a branch, tag or commit (default: main)")
    p.add_argument("-o", "--outdir", type=Path, required=True, help="output directory")
    p.add_argument("--outtype", default="f16", choices=quant_types.CONVERT_LLM_TYPES,
                   help="type of both files (f16)")
    p.add_argument("--model-outtype", choices=quant_types.CONVERT_LLM_TYPES,
                   help="type of the LLM file (other LLM types: `llama3v quantize`)")
    p.add_argument("--mmproj-outtype", choices=quant_types.MMPROJ_TYPES, help="type of the mmproj file")
    p.add_argument("--vision-tower", help="directory (or Hub id) of the vision tower when it is not in SRC")
    _add_chat_template(p, "instead of the one the checkpoint ships or its family was trained with")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")

    p = sub.add_parser("embed", parents=[common], help="write the media embeddings that enter the context",
                       description="Encode media with libmtmd and write the float32 rows that enter the LLM's "
                       "context, in prompt order, to OUT.npy, and their layout to OUT.json.")
    p.add_argument("--mmproj", type=Path, required=True, help="mmproj GGUF")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .npy file")
    _add_media(p)
    _add_runtime(p)

    p = sub.add_parser("run", parents=[common], help="answer a prompt about images and videos",
                       description="Run one user turn: media go at the <image>/<video> markers in the prompt "
                       "(or before the text when it has none), wrapped in the model's chat template.")
    _add_model(p)
    p.add_argument("-p", "--prompt", required=True, help="the user's message")
    p.add_argument("--system", help="a system message (none by default)")
    p.add_argument("-n", "--n-predict", type=int, default=SAMPLING.max_tokens, metavar="N",
                   help=f"most tokens to generate ({SAMPLING.max_tokens})")
    _add_temperature(p)
    p.add_argument("--top-k", type=int, default=SAMPLING.top_k, help=f"top-k ({SAMPLING.top_k})")
    p.add_argument("--top-p", type=float, default=SAMPLING.top_p, help=f"top-p ({SAMPLING.top_p})")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (random by default)")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, timings)")
    _add_media(p)
    _add_runtime(p)

    p = sub.add_parser("chat", parents=[common], help="chat in the terminal, with /image and /video",
                       description="An interactive chat: type messages; /image PATH and /video PATH attach media "
                       "to your next message; /reset starts over; /quit leaves. Each image is encoded once and "
                       "follow-ups decode only their new tokens. With --verbose, a line of statistics per turn.")
    _add_model(p)
    p.add_argument("--system", help="a system message")
    p.add_argument("-n", "--n-predict", type=int, default=CONVERSATION_MAX_TOKENS, metavar="N",
                   help=f"most tokens per answer ({CONVERSATION_MAX_TOKENS})")
    _add_temperature(p)
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--max-tiles", type=int, default=None, metavar="N", help="as for `run`")
    _add_runtime(p)

    # Defaults from the environment stay strings: argparse converts them with `type` only when `serve` is
    # parsed, so a bad value is a usage error there, not a traceback while building every command's parser.
    env = os.environ.get
    p = sub.add_parser("serve", parents=[common], help="serve an OpenAI-compatible HTTP API",
                       description="Serve /v1/chat/completions (text, image_url and video_url parts; streaming), "
                       "/v1/completions, /v1/models, /health, and a chat page at /. Loopback only unless --host says "
                       "otherwise. Up to --parallel requests decode together; more queue, and a full queue "
                       "answers 503. Options also come from LLAMA3V_* variables.")
    _add_model(p, env=True)
    p.add_argument("--host", default=env("LLAMA3V_HOST", "127.0.0.1"), help="bind address (127.0.0.1; LLAMA3V_HOST)")
    p.add_argument("--port", type=int, default=env("LLAMA3V_PORT", "8080"), help="port (8080; LLAMA3V_PORT)")
    p.add_argument("--api-key", default=env("LLAMA3V_API_KEY"), help="require 'Authorization: Bearer KEY' "
                   "(LLAMA3V_API_KEY)")
    p.add_argument("--model-name", default=env("LLAMA3V_MODEL_NAME"), help="the id /v1/models reports "
                   "(default: the model file's name)")
    p.add_argument("--allowed-root", type=Path, action="append", default=[Path(r) for r in
                   env("LLAMA3V_ALLOWED_ROOTS", "").split(os.pathsep) if r],
                   help="a directory whose files requests may name as media (repeatable; LLAMA3V_ALLOWED_ROOTS)")
    p.add_argument("--allow-remote", action="store_true", default=env("LLAMA3V_ALLOW_REMOTE") == "1",
                   help="let requests name http(s) media URLs for the server to fetch (off)")
    p.add_argument("--max-body-mb", type=int, default=env("LLAMA3V_MAX_BODY_MB", "64"),
                   help="largest request body in MiB (64)")
    p.add_argument("--max-queue", type=int, default=env("LLAMA3V_MAX_QUEUE", "16"),
                   help="requests that may wait for the model before 503 (16)")
    p.add_argument("--timeout", type=float, default=env("LLAMA3V_TIMEOUT", "600"),
                   help="seconds a request may take, queueing included (600)")
    p.add_argument("--body-timeout", type=float, default=env("LLAMA3V_BODY_TIMEOUT", "30"),
                   help="seconds a client may take to send its request body (30)")
    p.add_argument("--header-timeout", type=float, default=float(env("LLAMA3V_HEADER_TIMEOUT", "10")),
                   help="seconds a client may take to send its request line and headers (10)")
    p.add_argument("--max-pending-mb", type=int, default=int(env("LLAMA3V_MAX_PENDING_MB", "256")),
                   help="MiB of request bodies that may wait for the model together before 503 (256)")
    p.add_argument("--allowed-host", action="append", default=[h for h in env("LLAMA3V_ALLOWED_HOSTS", "").split(",")
                                                                 if h],
                   help="a Host name the server answers to besides IP addresses, localhost and --host "
                   "(repeatable; '*' for any; LLAMA3V_ALLOWED_HOSTS, comma-separated)")
    p.add_argument("--fetch-timeout", type=float, default=float(env("LLAMA3V_FETCH_TIMEOUT", "20")),
                   help="seconds one --allow-remote fetch may take in all (20)")
    p.add_argument("--max-tiles", type=int, default=None, metavar="N", help="as for `run`")
    p.add_argument("--parallel", type=int, default=env("LLAMA3V_PARALLEL", "1"), metavar="N",
                   help="requests decoded together, each with --n-ctx positions of its own KV cache "
                   "(1; LLAMA3V_PARALLEL)")
    _add_runtime(p)

    p = sub.add_parser("quantize", parents=[common], help="write an mmproj or LLM GGUF in another type",
                       description="Quantize an existing GGUF. An mmproj (f32/f16/bf16) is rewritten with the "
                       "converter's rule for which tensors keep precision; an LLM (f32/f16/bf16) goes through "
                       "llama.cpp's own quantizer (llama-quantize's per-tensor mixes). The output is written "
                       "atomically and an existing file is kept unless --force.")
    p.add_argument("src", type=Path, help="mmproj or model GGUF")
    p.add_argument("type", help=f"mmproj: {', '.join(quant_types.MMPROJ_TYPES)}; "
                   f"model: {', '.join(quant_types.LLM_QUANT_TYPES)}")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="output file (default: mmproj-<type>.gguf or model-<type>.gguf beside SRC)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--allow-requantize", action="store_true",
                   help="accept an mmproj that is already quantized (its error adds to the new type's)")
    _add_runtime(p)

    p = sub.add_parser("fix-mmproj", parents=[common], help="add the feature layer key an upstream mmproj lacks",
                       description="An mmproj without clip.vision.feature_layer (as llama.cpp's legacy LLaVA "
                       "converter writes) runs one vision block short in libmtmd (llama.cpp #25817). This adds "
                       "feature_layer = [block_count], so every block the file holds runs; tensors are copied "
                       "byte for byte. The file is rewritten atomically in place unless -o is given.")
    p.add_argument("mmproj", type=Path, help="mmproj GGUF")
    p.add_argument("-o", "--output", type=Path, default=None, help="write the fixed file here instead")

    p = sub.add_parser("quant-report", parents=[common], help="measure every quantization combination",
                       description="Convert SRC to f32 GGUFs in OUTDIR/gguf, derive each mmproj and model type, "
                       "and measure per combination: file sizes, encode time per image, image-embedding NMSE "
                       "and cosine against the PyTorch reference, and KL divergence of the next-token "
                       "distribution against the f32 pair over its greedy answer. Writes quant-report.md, .csv "
                       "and .png into OUTDIR; results are cached there, so an interrupted run resumes.")
    p.add_argument("src", type=Path, help="Hugging Face checkpoint directory")
    p.add_argument("--mmproj-types", metavar="A,B",
                   help=f"comma-separated, from {', '.join(quant_types.MMPROJ_TYPES)} "
                   f"(default: {','.join(quant_types.REPORT_MMPROJ_TYPES)})")
    p.add_argument("--model-types", metavar="C,D",
                   help=f"comma-separated, from {', '.join(quant_types.LLM_QUANT_TYPES)} "
                   f"(default: {','.join(quant_types.REPORT_MODEL_TYPES)})")
    p.add_argument("--image", type=Path, action="append", default=None, metavar="PATH",
                   help="an image (repeatable; default: two built-in drawn scenes)")
    p.add_argument("-p", "--prompt", help="the question (default: 'Describe this image in detail.')")
    p.add_argument("-n", "--n-predict", type=int, default=32, metavar="N",
                   help="answer tokens the f32 model generates, over which KL is measured (32)")
    p.add_argument("-o", "--outdir", type=Path, required=True, help="output and cache directory")
    p.add_argument("--task-scenes", type=int, default=0, metavar="N",
                   help="for the embedded tiny model (its checkpoint: `llama3v demo` prints it): also ask every "
                   "held-out question about held-out drawn scenes 0..N-1 per combination and report the task "
                   "accuracy (default 0: off)")
    _add_runtime(p)

    p = sub.add_parser("demo", parents=[common], help="run the embedded tiny model (or the parity demo) end to end",
                       description="Assemble the embedded tiny model (a vision tower trained by this project on "
                       "drawn scenes + SmolLM2-135M-Instruct, which is not Llama-3), convert it, and ask it about a "
                       "drawn scene and the test photo through llama.cpp. With --parity: build a small random-weight "
                       "LLaVA-Llama-3 instead and show how closely llama.cpp follows the PyTorch reference.")
    p.add_argument("--parity", action="store_true",
                   help="the random-weight LLaVA-Llama-3 demo: noise answers, llama.cpp vs reference agreement")
    p.add_argument("--workdir", type=Path, default=None, help="where to build (default: the llama3v cache)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `llama3v` console script."""
    args = build_parser().parse_args(argv)
    from llama3v.runtime import engine

    engine.set_verbose(args.verbose)
    warnings.formatwarning = _one_line_warning
    try:
        return _COMMANDS[args.command](args)
    except Llama3vError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"llama3v: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llama3v: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the file system refused (a read-only or full destination): the user's to fix
        if args.verbose:
            traceback.print_exc()
        print(f"llama3v: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line unless asked for the traceback
        if args.verbose:
            traceback.print_exc()
        print(f"llama3v: internal error: {type(e).__name__}: {e} (rerun with --verbose for details)",
              file=sys.stderr)
        return 1


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    """Warnings (e.g. a context past the model's trained length) as one line, like our errors."""
    return f"llama3v: warning: {message}\n"


def _session(args: argparse.Namespace, progress=None, **media: object):  # -> llama3v.runtime.session.Session
    """The session of `run`, `chat` and `serve`: --model, --mmproj and the options they share, plus `media` options."""
    from llama3v.runtime.session import Session

    options = SessionOptions(n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                             max_tiles=args.max_tiles, kv_type=args.kv_type, parallel=getattr(args, "parallel", 1),
                             chat_template=args.chat_template, mllama_tile_slots=args.mllama_tiles, **media)
    return Session(args.model, args.mmproj, options, progress=progress)


def _convert(args: argparse.Namespace) -> int:
    from llama3v.converters.convert import convert

    model, mmproj = convert(args.src, args.outdir, args.model_outtype or args.outtype,
                            args.mmproj_outtype or args.outtype, vision_tower=args.vision_tower, force=args.force,
                            revision=args.revision, progress=bars(args.quiet), chat_template=args.chat_template)
    print(model)
    print(mmproj)
    return 0


def _sampling(args: argparse.Namespace) -> Sampling:
    return Sampling(frames=args.video_frames, fps=args.video_fps, start=args.video_start, end=args.video_end)


def _progress(args: argparse.Namespace) -> Progress | None:
    """Bars on stderr for encodes and video sampling, unless --quiet or --json."""
    return bars(args.quiet or getattr(args, "json", False))


def _embed(args: argparse.Namespace) -> int:
    from llama3v.cli.embed import embed_to_files

    embed_to_files(args.mmproj, args.media, args.output, n_threads=args.threads, progress=_progress(args),
                   max_tiles=args.max_tiles, image_layout=args.image_layout, sampling=_sampling(args),
                   max_video_tokens=args.max_video_tokens)
    return 0


def _run(args: argparse.Namespace) -> int:
    with _session(args, _progress(args), image_layout=args.image_layout, max_video_tokens=args.max_video_tokens,
                  video_sampling=_sampling(args)) as session:
        gen = session.generate(args.prompt, media=args.media, system=args.system, max_tokens=args.n_predict,
                               temperature=args.temp, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        for piece in gen:
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        result = gen.result
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        sys.stdout.write("\n")
        if args.verbose:
            t = result.timings
            for m in result.media:
                per_tile = ", ".join(f"{ms:.0f}" for ms in m.tile_encode_ms)
                shape = (f"{m.frames_kept}/{m.n_frames} frames kept, pooled {m.pooled}" if m.kind == "video"
                         else f"{m.layout} grid {m.grid}, {m.n_tiles} tiles")
                print(f"{m.kind} {m.media}: {shape}, {m.rows} rows, encode ms per tile/frame [{per_tile}]",
                      file=sys.stderr)
            print(f"prompt {result.n_prompt_tokens} tokens, encode {t['encode_ms']:.0f} ms, "
                  f"prompt {t['prompt_ms']:.0f} ms, decode {len(result.tokens)} tokens "
                  f"at {t['decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from llama3v.cli.repl import run_repl

    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    with _session(args) as session:
        return run_repl(session, verbose=args.verbose, system=args.system, max_tokens=args.n_predict,
                        temperature=args.temp, seed=args.seed)


def _serve(args: argparse.Namespace) -> int:
    from llama3v.runtime.openai_api import MediaPolicy
    from llama3v.runtime.server import ServerConfig, serve

    config = ServerConfig(
        model_name=args.model_name or args.model.stem, api_key=args.api_key,
        media=MediaPolicy(roots=tuple(args.allowed_root), allow_remote=args.allow_remote,
                          max_bytes=args.max_body_mb << 20, timeout_s=args.fetch_timeout),
        max_body_bytes=args.max_body_mb << 20, max_queue=args.max_queue, request_timeout_s=args.timeout,
        body_timeout_s=args.body_timeout, header_timeout_s=args.header_timeout,
        max_pending_bytes=args.max_pending_mb << 20, allowed_hosts=tuple(args.allowed_host))
    with _session(args) as session:
        serve(session, config, args.host, args.port, "debug" if args.verbose else "warning" if args.quiet else "info")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from llama3v.evaluation.demo import run_demo

    return run_demo(args.workdir, quiet=args.quiet, parity=args.parity)


def _quantize(args: argparse.Namespace) -> int:
    from llama3v.cli.quantize import quantize_command

    return quantize_command(args)


def _fix_mmproj(args: argparse.Namespace) -> int:
    from llama3v.converters.fix_mmproj import fix_mmproj

    path, added = fix_mmproj(args.mmproj, args.output)
    if not args.quiet:
        print(f"{path}: added clip.vision.feature_layer = {added}" if added else
              f"{path} already has clip.vision.feature_layer; nothing to do", file=sys.stderr)
    print(path)
    return 0


def _quant_report(args: argparse.Namespace) -> int:
    from llama3v.evaluation.quant_report import quant_report_command

    return quant_report_command(args)


_COMMANDS = {"convert": _convert, "embed": _embed, "run": _run, "chat": _chat, "serve": _serve, "demo": _demo,
             "quantize": _quantize, "fix-mmproj": _fix_mmproj, "quant-report": _quant_report}
