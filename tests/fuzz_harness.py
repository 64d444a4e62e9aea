"""Fuzz llama3v's loaders with mutated valid inputs, each case run in a worker subprocess.

Every case must end in success or a clean Llama3vError; a signal (llama.cpp aborting, a segfault)
or a hang is a finding. A worker process runs cases one after another (starting Python and
llama.cpp per case would make a 1000-case run take an hour); when it dies or hangs, the case is
recorded, the input saved under the findings directory and a fresh worker started.

    .venv/bin/python tests/fuzz_harness.py --cases 5000 [--kinds gguf-model,gguf-mmproj,image,video,values]

Two kinds of mutation: byte edits of each file (hypothesis-driven), and, for the GGUFs (kind `values`),
plausible wrong values per key: every metadata key of the valid files, plus keys llama.cpp reads that
they lack, set to counts that are zero, off by one, doubled or huge, floats that are not finite, and
strings that are other names or none llama.cpp knows; each file is rewritten with gguf-py, so the
result is a well-formed GGUF whose only fault is that value.

`tests/test_fuzz.py` runs a short version in `make test`; `make fuzz` the long one.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

KINDS = ("gguf-model", "gguf-mmproj", "image", "video", "values")
GOOD: dict[str, Path] = {}  # valid files the CLI cases pair a mutated file with
CASE_TIMEOUT_S = 30.0
EXTREMES = [0, 1, 2, 3, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1]


# --- the worker: runs one case per input line, answers one JSON line ------------------------------

def _load_case(kind: str, path: str) -> None:
    from llama3v.runtime.context import Context, TextModel
    from llama3v.runtime.encoder import VisionEncoder
    from llama3v.runtime.image_processing import ImageSpec, load_image, process_image

    if kind == "gguf-model":
        model = TextModel(path)
        ctx_ = Context(model, n_ctx=256, n_batch=64)
        ctx_.decode_tokens([1, 2, 3])
        ctx_.close()
        model.close()
    elif kind == "gguf-mmproj":
        enc = VisionEncoder(path, check_engine=False)
        enc.encode(np.zeros((enc.spec.size, enc.spec.size, 3), np.uint8))
        enc.close()
    elif kind == "image":
        image = load_image(path)
        process_image(image, ImageSpec(56, "pad", max_tiles=4))
        process_image(image, ImageSpec(56, "squash", grid_pinpoints=((56, 112), (112, 56), (112, 112))))
    elif kind == "video":
        from llama3v.runtime.video import Sampling, read_video

        _, frames = read_video(path, Sampling(frames=4))
        for frame in frames:
            process_image(load_image(frame.rgb), ImageSpec(56, "resize"))
    else:
        raise ValueError(kind)


def worker() -> None:
    """Read `kind<TAB>path` lines from stdin; print {"ok": ...} or {"error": ...} per line."""
    from llama3v.errors import Llama3vError

    # Replies get the original stdout; whatever C code prints to stdout goes to stderr instead.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        kind, path = line.rstrip("\n").split("\t")
        try:
            _load_case(kind, path)
            reply = {"ok": ""}
        except Llama3vError as e:
            reply = {"error": str(e)[:300]}
        except Exception as e:  # a Python exception that is not a clean error is a finding too
            reply = {"unclean": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(reply), file=replies, flush=True)


# --- the parent: mutates inputs, feeds the worker, watches for signals and hangs -------------------

@dataclass
class Outcomes:
    """Counts per kind and outcome, and the saved findings."""

    counts: Counter = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)


class Runner:
    """Keeps one worker process alive and runs cases through it; every `cli_every`-th case also runs
    through the `llama3v` command in a process of its own."""

    def __init__(self, findings_dir: Path, good: dict[str, Path], cli_every: int = 0):
        self.findings_dir, self.good, self.cli_every = findings_dir, good, cli_every
        self.proc: subprocess.Popen | None = None
        self.outcomes = Outcomes()
        self.n = 0

    def _start(self) -> None:
        env = {**os.environ, "LLAMA3V_SKIP_ENGINE_CHECK": "1"}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                     cwd=Path(__file__).resolve().parents[1])

    def run(self, kind: str, data: bytes, suffix: str, label: str | None = None, note: str = "") -> str:
        """Run one case (recorded under `label`, default `kind`, with `note` on a finding); returns 'ok',
        'error', 'unclean', 'signal' or 'hang'."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as f:
            f.write(data)
        self.n += 1
        if self.cli_every and self.n % self.cli_every == 0:
            self._record(kind + "-cli", self._cli(kind, f.name), f.name, suffix, "")
        try:
            self.proc.stdin.write(f"{kind}\t{f.name}\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], CASE_TIMEOUT_S)
            line = self.proc.stdout.readline() if ready else ""
            if not ready:
                outcome = "hang"
                self.proc.kill()
                self.proc.wait()
            elif not line:
                self.proc.wait()
                outcome = f"signal {-self.proc.returncode}" if self.proc.returncode < 0 else "died"
            else:
                outcome = next(iter(json.loads(line)))
            detail = json.loads(line).get(outcome, "") if outcome == "unclean" else ""
            self._record(label or kind, outcome, f.name, suffix, f"{note} {detail}".strip())
            return outcome
        finally:
            os.unlink(f.name)

    def _record(self, kind: str, outcome: str, path: str, suffix: str, detail: str) -> None:
        if outcome not in ("ok", "error"):
            self.findings_dir.mkdir(parents=True, exist_ok=True)
            saved = self.findings_dir / f"{kind}-{len(self.outcomes.findings)}{suffix}"
            shutil.copy(path, saved)
            self.outcomes.findings.append(f"{kind}: {outcome} {detail} ({saved})")
        self.outcomes.counts[kind, outcome.split()[0]] += 1

    def _cli(self, kind: str, path: str) -> str:
        """The case through the command line: exit 0 or 1 with one line on stderr, never a signal."""
        out = Path(path).with_suffix(".npy")
        args = {"gguf-model": ["run", "--model", path, "-p", "hi", "-n", "2", "--n-ctx", "256"],
                "gguf-mmproj": ["embed", "--mmproj", path, "--image", str(self.good["image"]), "-o", str(out)],
                "image": ["embed", "--mmproj", str(self.good["mmproj"]), "--image", path, "-o", str(out)],
                "video": ["embed", "--mmproj", str(self.good["mmproj"]), "--video", path, "-o", str(out),
                          "--video-frames", "4"]}[kind]
        env = {**os.environ, "LLAMA3V_SKIP_ENGINE_CHECK": "1"}
        try:
            r = subprocess.run([sys.executable, "-m", "llama3v.cli", *args], capture_output=True, text=True,
                               timeout=CASE_TIMEOUT_S * 2, env=env, cwd=Path(__file__).resolve().parents[1])
        except subprocess.TimeoutExpired:
            return "hang"
        finally:
            out.unlink(missing_ok=True)
            out.with_suffix(".json").unlink(missing_ok=True)
        if r.returncode < 0:
            return f"signal {-r.returncode}"
        clean = r.returncode == 0 or (r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1)
        return ("ok" if r.returncode == 0 else "error") if clean else "unclean"

    def close(self) -> None:
        """Stop the worker."""
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@st.composite
def mutations(draw: st.DrawFn, size: int, header: int) -> list[tuple]:
    """A few edits of a file of `size` bytes, aimed at its first `header` bytes half of the time."""
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        limit = header if draw(st.booleans()) else size
        pos = draw(st.integers(0, max(0, limit - 1)))
        op = draw(st.sampled_from(["flip", "byte", "int32", "int64", "truncate", "insert", "delete"]))
        value = draw(st.sampled_from(EXTREMES)) if op in ("int32", "int64") else draw(st.integers(0, 255))
        ops.append((op, pos, value))
    return ops


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    """Apply edits in order."""
    b = bytearray(data)
    for op, pos, value in ops:
        pos = min(pos, max(0, len(b) - 1))
        if op == "flip" and b:
            b[pos] ^= 1 << (value % 8)
        elif op == "byte" and b:
            b[pos] = value
        elif op == "int32":
            b[pos:pos + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
        elif op == "int64":
            b[pos:pos + 8] = value.to_bytes(8, "little")
        elif op == "truncate":
            del b[pos:]
        elif op == "insert":
            b[pos:pos] = bytes([value]) * (1 + value % 64)
        elif op == "delete":
            del b[pos:pos + 1 + value]
    return bytes(b)


# Keys llama.cpp reads that valid llama3v files do not carry, with the type they are written as.
EXTRA_KEYS = {
    "gguf-model": {"llama.expert_count": "UINT32", "llama.expert_used_count": "UINT32",
                   "llama.expert_group_count": "UINT32", "llama.nextn_predict_layers": "UINT32",
                   "llama.rope.scaling.type": "STRING", "llama.rope.scaling.factor": "FLOAT32",
                   "llama.attention.key_length": "UINT32", "llama.attention.value_length": "UINT32"},
    "gguf-mmproj": {"clip.vision.image_grid_pinpoints": "ARRAY", "clip.vision.mm_patch_merge_type": "STRING"},
}
NAMES = ["", "bogus", "none", "linear", "yarn", "longrope", "mlp", "ldp", "gpt2", "llama", "spm", "clip",
         "spatial_unpad", "flat"]


def plausible_wrong(value: object, vtype: str) -> list[object]:
    """Values a careless or hostile writer might put in a key of this type instead of `value`."""
    if vtype == "STRING":
        return [n for n in NAMES if n != value]
    if vtype == "BOOL":
        return [not value]
    if vtype.startswith("FLOAT"):
        v = float(value or 1.0)
        return [0.0, -v, 2 * v, 1e30, float("nan"), float("inf"), -float("inf")]
    if vtype == "ARRAY":
        items = list(value or [336, 672])
        return [[], items[:-1], items + items[-1:], [0] * len(items), [7] * len(items), [112000, 112000],
                [-1] * len(items)]
    v = int(value or 1)
    signed = vtype.startswith("INT")
    bits = int(vtype.removeprefix("U").removeprefix("INT"))
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    out = {0, 1, 2, 3, 7, v - 1, v + 1, 2 * v, v // 2, 100 * v, 600, 100000, 1 << 31, hi, -1}
    return sorted(x for x in out if lo <= x <= hi and x != v)


def value_cases(path: Path, kind: str) -> list[tuple[str, str, object]]:
    """(key, type name, wrong value) for every scalar or small-array key of a GGUF and the extra keys."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    keys: dict[str, tuple[str, object]] = {}
    for name, fld in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.alignment":
            continue
        vtype = GGUFValueType(fld.types[0])
        if vtype == GGUFValueType.ARRAY and (len(fld.data) > 16 or fld.types[-1] == GGUFValueType.STRING):
            continue
        keys[name] = (vtype.name, fld.contents())
    for name, vtype in EXTRA_KEYS[kind].items():
        keys.setdefault(name, (vtype, None))
    return [(name, vtype, wrong) for name, (vtype, value) in keys.items() for wrong in plausible_wrong(value, vtype)]


def with_value(path: Path, key: str, vtype: str, value: object, out: Path) -> bytes:
    """The GGUF at `path` rewritten with `key` set to `value` (typed `vtype`), everything else kept."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(path)
    fields = {name: (GGUFValueType(f.types[0]), f.contents(), GGUFValueType(f.types[-1]) if len(f.types) > 1
                     else None) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    sub = GGUFValueType.INT32 if vtype == "ARRAY" and all(isinstance(v, int) for v in value) else \
        GGUFValueType.FLOAT32 if vtype == "ARRAY" else None
    if key in fields and vtype == "ARRAY":
        sub = fields[key][2] if value and all(isinstance(v, int) for v in value) else sub
    fields[key] = (GGUFValueType[vtype], value, sub)
    arch = fields.pop("general.architecture")[1]
    writer = GGUFWriter(out, arch)
    for name, (t, v, s) in fields.items():
        if name == "general.alignment":
            continue
        if t == GGUFValueType.ARRAY and s in (GGUFValueType.UINT32, GGUFValueType.UINT64):
            v = [x & 0xFFFFFFFF for x in v]  # a negative value read back as a huge one
        writer.add_key_value(name, v, t, sub_type=s)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=list(reversed([int(d) for d in t.shape])),
                          raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out.read_bytes()


def seeds(workdir: Path) -> dict[str, tuple[bytes, str, int]]:
    """Valid inputs per kind: (bytes, suffix, size of the region worth aiming at)."""
    from llama3v.converters.convert import convert
    from llama3v.evaluation.scenes import scene
    from llama3v.gguf_header import read_gguf
    from llama3v.testing.factory import TinySpec, make_checkpoint

    ckpt = make_checkpoint(workdir / "ckpt", TinySpec(vision_layers=1, feature_layer=-1, text_layers=1), "hf-5")
    model, mmproj = convert(ckpt, workdir / "gguf", "f16", "f16", force=True)
    scene(1, 120, 90).save(workdir / "scene.png")
    scene(2, 160, 120).save(workdir / "scene.jpg", quality=85)
    videos = {name: _video(workdir / f"clip.{ext}", fourcc) for name, ext, fourcc in
              (("video-mp4v", "mp4", "mp4v"), ("video-mjpg", "avi", "MJPG"))}

    def header_size(path: Path) -> int:
        info = read_gguf(path)
        return min(t.offset for t in info.tensors.values())

    GOOD.update(mmproj=mmproj, image=workdir / "scene.png", model=model)
    return {
        "gguf-model": (model.read_bytes(), ".gguf", header_size(model)),
        "gguf-mmproj": (mmproj.read_bytes(), ".gguf", header_size(mmproj)),
        "image-png": ((workdir / "scene.png").read_bytes(), ".png", 200),
        "image-jpeg": ((workdir / "scene.jpg").read_bytes(), ".jpg", 700),
        **{name: (path.read_bytes(), path.suffix, 2000) for name, path in videos.items()},
    }


def _video(path: Path, fourcc: str) -> Path:
    import cv2

    from llama3v.evaluation.scenes import scene

    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*fourcc), 10, (64, 48))
    for i in range(12):
        writer.write(np.asarray(scene(i % 3, 64, 48))[:, :, ::-1].copy())
    writer.release()
    return path


def _cases(runner: Runner, kind: str, data: bytes, suffix: str, header: int, n: int):  # noqa: ANN202
    """A hypothesis-driven function that runs `n` mutated cases of one input."""
    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(mutations(len(data), header))
    def case(ops: list[tuple]) -> None:
        runner.run(kind, mutate(data, ops), suffix)

    return case


def fuzz(n_cases: int, kinds: tuple[str, ...], workdir: Path, findings: Path, cli_every: int = 0) -> Outcomes:
    """Run `n_cases` mutated cases per kind (plus each unmutated input first); return the outcomes."""
    inputs = seeds(workdir)
    runner = Runner(findings, GOOD, cli_every)
    try:
        if "values" in kinds:
            _value_run(runner, workdir, n_cases)
        for name, (data, suffix, header) in inputs.items():
            kind = name.split("-")[0] if name.startswith(("image", "video")) else name
            if kind not in kinds:
                continue
            assert runner.run(kind, data, suffix) == "ok", f"the unmutated {name} must load"
            per_input = n_cases // sum(1 for n in inputs if n.startswith(kind))
            started = time.monotonic()
            _cases(runner, kind, data, suffix, header, per_input)()
            print(f"{name}: {per_input} cases in {time.monotonic() - started:.0f} s", file=sys.stderr)
    finally:
        runner.close()
    return runner.outcomes


def _value_run(runner: Runner, workdir: Path, n_cases: int) -> None:
    """Up to `n_cases` value mutations, spread evenly over both GGUFs' keys and wrong values."""
    started = time.monotonic()
    for kind in ("gguf-model", "gguf-mmproj"):
        good = GOOD[kind.removeprefix("gguf-")]
        cases = value_cases(good, kind)
        step = max(1, len(cases) // max(1, n_cases // 2))
        for key, vtype, value in cases[::step]:
            try:
                data = with_value(good, key, vtype, value, workdir / "value.gguf")
            except (ValueError, TypeError, OverflowError, struct.error):  # gguf-py cannot write that value
                continue
            runner.run(kind, data, ".gguf", label="values-" + kind.removeprefix("gguf-"), note=f"{key}={value!r}")
    print(f"values: {sum(n for (k, _), n in runner.outcomes.counts.items() if k.startswith('values'))} cases in "
          f"{time.monotonic() - started:.0f} s", file=sys.stderr)


def main() -> None:
    """Command-line entry: run the fuzz suite and print counts and findings."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cases", type=int, default=5000, help="cases per kind (5000)")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--findings", type=Path, default=Path("fuzz-findings"))
    ap.add_argument("--cli-every", type=int, default=50, help="also run every Nth case through the CLI (50)")
    args = ap.parse_args()
    if args.worker:
        worker()
        return
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = fuzz(args.cases, tuple(args.kinds.split(",")), Path(tmp), args.findings, args.cli_every)
    for (kind, outcome), n in sorted(outcomes.counts.items()):
        print(f"{kind:12} {outcome:8} {n}")
    for f in outcomes.findings:
        print("FINDING", f)
    sys.exit(1 if outcomes.findings else 0)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
