"""Open a video with OpenCV, check it, and read the sampled frames as upright uint8 RGB arrays.

Frames are numbered from 0 in the order OpenCV returns them (presentation order); a frame's timestamp
is index / fps, the container's nominal rate (a variable-frame-rate clip gets its average rate), and
is measured from the start of the clip, also for a window. Sampling (`sample_indices`) is
pure arithmetic on the frame count and fps, so the PyTorch reference (llama3v/models/video.py)
computes the same indices:
  uniform  `frames` frames over the window, first and last included: first + round(k * (m - 1) / (n - 1))
           with halves rounded up (one frame: the middle one); every frame when the window holds fewer
  fps      one frame per 1/fps seconds from the window's start (the frame on screen at that time), capped
           at the video's own rate; when that needs more than `frames` frames, `frames` uniformly instead
The window is [start, end) in seconds: frames whose timestamps lie in it; `end` past the clip means
its end.

Reading keeps only the requested frames in memory: skipped frames are grabbed (decoded, never
converted) or jumped over by seeking (CAP_PROP_POS_FRAMES), whichever the measured costs say is
cheaper (`VideoReader.frames`): seek when the gap to the next wanted frame exceeds one seek's cost in
grabbed frames. A seek lands on a keyframe and decodes forward (OpenCV starts 16 frames early), so its
cost depends on the file (25-35 grabs here on mp4v and H.264, bench/video.py); the rule starts from
SEEK_COST_FRAMES and then uses this file's measured seek and grab times. Seeking is trusted only
after a probe: the first frame it would seek to is read sequentially and, on a second handle, by
seeking, and the two must be pixel-identical; a seek that lands elsewhere afterwards (OpenCV's frame
position disagrees) makes the reader reopen the file and read sequentially from then on.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from llama3v.errors import Llama3vError

DEFAULT_FRAMES = 16
MAX_FRAME_PIXELS = 36_000_000  # 8K UHD (7680x4320) fits
MAX_FRAME_COUNT = 10_000_000  # about 46 hours at 60 fps
MAX_FPS = 1000.0
MAX_SAMPLED_FRAMES = 256  # frames one read may ask for (the caller keeps and encodes each); a 1080p frame is 6 MB
# A seek's cost in grabbed frames until this file's own timings are known: a little under the 25-35 measured
# (bench/video.py), so that a gap near it is tried once and then decided by this file's measurements.
SEEK_COST_FRAMES = 24
_EPS = 1e-6  # in frames: timestamps computed in float may land a hair below a frame boundary
_MODES = ("auto", "grab", "seek")
# The container formats FFmpeg may open, by signature: (magic, offset, name). Only these reach FFmpeg: it also
# reads formats that open further files or URLs by name (concat lists, HLS and other playlists, SDP, image
# sequences), which would let a file or an upload read what its sender may not.
_MAGIC = ((b"RIFF", 0, "an AVI"), (b"ftyp", 4, "an MP4/MOV"), (b"moov", 4, "a QuickTime"), (b"mdat", 4, "a QuickTime"),
          (b"wide", 4, "a QuickTime"), (b"free", 4, "a QuickTime"), (b"\x1a\x45\xdf\xa3", 0, "a Matroska/WebM"),
          (b"FLV\x01", 0, "an FLV"), (b"OggS", 0, "an Ogg"), (b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", 0, "an ASF/WMV"),
          (b"\x00\x00\x01\xba", 0, "an MPEG-PS"))
# The FFmpeg demuxers of those formats, and the one protocol: a second line of defence, applied by FFmpeg itself.
_DEMUXERS = "mov,matroska,avi,flv,ogg,asf,mpeg,mpegts"
_IMAGES = ((b"\xff\xd8\xff", "a JPEG"), (b"\x89PNG", "a PNG"), (b"BM", "a BMP"))
# Users see our one-line errors, not FFmpeg's log lines: OpenCV reads this when it first loads FFmpeg, so it is
# set on import (a value the user set wins).
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
# OpenCV passes these options to FFmpeg's avformat_open_input on every capture it opens: local files only, and only
# the demuxers above.
os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", f"protocol_whitelist;file|format_whitelist;{_DEMUXERS}")


@dataclass(frozen=True)
class Limits:
    """Refusal thresholds for a video; the defaults are the module's MAX_* constants."""

    max_frame_pixels: int = MAX_FRAME_PIXELS
    max_frame_count: int = MAX_FRAME_COUNT
    max_fps: float = MAX_FPS
    max_sampled_frames: int = MAX_SAMPLED_FRAMES


LIMITS = Limits()


@dataclass(frozen=True)
class Sampling:
    """Which frames to take: `frames` uniformly over [start, end), or `fps` per second capped at `frames`."""

    frames: int = DEFAULT_FRAMES
    fps: float | None = None
    start: float = 0.0
    end: float | None = None

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise Llama3vError(f"the number of video frames must be at least 1, got {self.frames}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise Llama3vError(f"the sampling rate must be a positive number of frames per second, got {self.fps}")
        if not (math.isfinite(self.start) and self.start >= 0):
            raise Llama3vError(f"the video window must start at 0 s or later, got {self.start}")
        if self.end is not None and not (self.end > self.start):
            raise Llama3vError(f"the video window must end after it starts, got [{self.start}, {self.end})")


@dataclass(frozen=True)
class VideoInfo:
    """A video's checked metadata; width and height are of the upright frames."""

    path: Path
    width: int
    height: int
    fps: float
    frame_count: int  # frames that decode, which may be fewer than the container lists
    rotation: int  # degrees clockwise from the container's display matrix, already applied to frames
    codec: str

    @property
    def duration(self) -> float:
        """Seconds: frame_count / fps."""
        return self.frame_count / self.fps


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its index, its timestamp in seconds and its pixels, uint8 RGB [H, W, 3]."""

    index: int
    timestamp: float
    rgb: np.ndarray


def window_range(frame_count: int, fps: float, start: float = 0.0, end: float | None = None) -> tuple[int, int]:
    """First and last (inclusive) frame index whose timestamp lies in [start, end)."""
    duration = frame_count / fps
    if start >= duration:
        raise Llama3vError(f"the video window starts at {start:g} s, but the clip ends at {duration:.3f} s")
    first = math.ceil(start * fps - _EPS)
    last = frame_count - 1 if end is None else min(frame_count - 1, math.ceil(end * fps - _EPS) - 1)
    if last < first:
        raise Llama3vError(f"the video window [{start:g}, {end:g}) s holds no frame (one every {1 / fps:.3f} s)")
    return first, last


def sample_indices(frame_count: int, fps: float, sampling: Sampling) -> list[int]:
    """The frame indices a sampling takes, ascending and unique (see the module docstring)."""
    first, last = window_range(frame_count, fps, sampling.start, sampling.end)
    m = last - first + 1
    if sampling.fps is not None:
        step = max(fps / sampling.fps, 1.0)  # in frames; never faster than the video itself
        n = math.floor((m - 1) / step + _EPS) + 1
        if n <= sampling.frames:
            return [first + math.floor(k * step + _EPS) for k in range(n)]
    n = min(sampling.frames, m)
    if n == 1:
        return [first + (m - 1) // 2]
    return [first + (2 * k * (m - 1) + n - 1) // (2 * (n - 1)) for k in range(n)]


class VideoReader:
    """An open video: checked metadata in `info`, frames by index from `frames`; close it (or use `with`)."""

    def __init__(self, path: str | Path, limits: Limits = LIMITS):
        self.path = Path(path)  # as given, for messages
        self._file = _check_file(self.path)
        self.limits = limits
        self._cap = None
        self._pos = 0  # index of the frame the next grab() decodes
        self._last = -1  # index of the frame retrieve() would return (-1: none)
        self._seek_ok: bool | None = None  # None: not probed yet
        self._grab_s = self._seek_s = 0.0
        self._n_grabs = self._n_seeks = 0
        try:
            self._cap = _open(self._file, self.path)
            self.info = self._probe()
        except BaseException:
            self.close()
            raise

    def indices(self, sampling: Sampling) -> list[int]:
        """The frame indices `sampling` takes from this video."""
        try:
            return sample_indices(self.info.frame_count, self.info.fps, sampling)
        except Llama3vError as e:
            raise Llama3vError(f"{self.path}: {e}") from None

    def frames(self, indices: Sequence[int], mode: str = "auto") -> Iterator[Frame]:
        """Yield the frames at `indices` (ascending, unique) as upright RGB.

        `mode`: "auto" grabs or seeks as the measured costs say (seeking only once verified),
        "grab" never seeks, "seek" seeks to every frame that is not next (unverified; for tests
        and benchmarks). A clip whose stream ends a little before its listed frame count stops early.
        """
        if mode not in _MODES:
            raise Llama3vError(f"unknown video read mode {mode!r}; choose one of {', '.join(_MODES)}")
        indices = [int(i) for i in indices]
        if len(indices) > self.limits.max_sampled_frames:
            raise Llama3vError(f"{self.path}: {len(indices)} frames requested, more than the limit of "
                               f"{self.limits.max_sampled_frames}")
        ascending = all(a < b for a, b in zip(indices, indices[1:], strict=False))
        if indices and not (ascending and 0 <= indices[0] and indices[-1] < self.info.frame_count):
            raise Llama3vError(f"{self.path}: frame indices must be ascending, unique and below "
                               f"{self.info.frame_count}")
        fps = self.info.fps
        for i in indices:
            bgr = self._read(i, mode)
            if bgr is None:
                return
            if bgr.shape[0] * bgr.shape[1] > self.limits.max_frame_pixels:  # the size may change mid-stream
                raise Llama3vError(f"{self.path}: frame {i} is {bgr.shape[1]}x{bgr.shape[0]}, over the "
                                   f"{self.limits.max_frame_pixels:,}-pixel limit")
            yield Frame(i, i / fps, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def close(self) -> None:
        """Release the file."""
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _probe(self) -> VideoInfo:
        cap = self._cap
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = cap.get(cv2.CAP_PROP_FPS)
        codec = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode("latin-1").strip("\x00 ")
        if w < 1 or h < 1:
            raise Llama3vError(f"{self.path}: no video stream")
        if w * h > self.limits.max_frame_pixels:
            raise Llama3vError(f"{self.path}: {w}x{h} frames exceed the {self.limits.max_frame_pixels:,}-pixel limit")
        if not (math.isfinite(fps) and 0 < fps <= self.limits.max_fps):
            raise Llama3vError(f"{self.path}: implausible frame rate {fps:g} (the limit is {self.limits.max_fps:g})")
        if not cap.grab():
            raise Llama3vError(f"{self.path}: no frame decodes (codec {codec!r} unsupported, or the file is corrupt)")
        self._pos, self._last = 1, 0
        rotation = int(cap.get(cv2.CAP_PROP_ORIENTATION_META)) % 360
        return VideoInfo(self.path, w, h, fps, self._count(cap.get(cv2.CAP_PROP_FRAME_COUNT)), rotation, codec)

    def _count(self, listed: float) -> int:
        """The number of frames that decode: checked at the listed end, counted where the container lies."""
        limit = self.limits.max_frame_count
        if math.isfinite(listed) and listed > limit:
            raise Llama3vError(f"{self.path}: lists {listed:,.0f} frames, more than the limit of {limit:,}")
        cap = _open(self._file, self.path)
        try:
            if not (math.isfinite(listed) and listed >= 1):  # no usable count: decode through
                end = 0
            else:
                n, back = int(listed), 0
                while True:  # the last frame that decodes, stepping back from the listed end
                    end = max(n - 1 - back, 0)
                    cap.set(cv2.CAP_PROP_POS_FRAMES, end)
                    if cap.grab() or end == 0:
                        break
                    back = 2 * back or 1
                end = int(cap.get(cv2.CAP_PROP_POS_FRAMES))
            while cap.grab():
                end += 1
                if end > limit:
                    raise Llama3vError(f"{self.path}: more than the limit of {limit:,} frames")
        finally:
            cap.release()
        if math.isfinite(listed) and listed >= 1 and listed - end > _slack(int(listed)):
            raise Llama3vError(f"{self.path}: truncated or corrupt: the container lists {int(listed)} frames, "
                               f"but the stream ends after {end}")
        return max(end, 1)

    def _read(self, i: int, mode: str) -> np.ndarray | None:
        """Frame i as BGR, or None where the stream ends early (within the count's slack)."""
        if i != self._last:
            gap = i - self._pos
            seek = gap < 0 or (mode == "seek" and gap > 0) or (mode == "auto" and gap > self._seek_cost())
            if seek and mode == "auto" and self._seek_ok is None and gap > 0:
                if not self._grab_to(i):
                    return None
                return self._probe_seek(i)
            if seek and (mode == "seek" or self._seek_ok):
                self._seek(i)
            elif gap < 0:
                self._reopen()
            if self._last != i and not self._grab_to(i):
                return None
        ok, bgr = self._cap.retrieve()
        if not ok:
            raise Llama3vError(f"{self.path}: frame {i} does not decode (corrupt file)")
        return bgr

    def _grab_to(self, i: int) -> bool:
        """Decode forward to frame i; False if the stream ends near its listed end first."""
        t0, n = time.perf_counter(), 0
        while self._last < i:
            if not self._cap.grab():
                if self.info.frame_count - self._pos > _slack(self.info.frame_count):
                    raise Llama3vError(f"{self.path}: frame {self._pos} of {self.info.frame_count} does not "
                                       "decode (corrupt or truncated file)")
                return False
            self._last, self._pos, n = self._pos, self._pos + 1, n + 1
        self._grab_s += time.perf_counter() - t0
        self._n_grabs += n
        return True

    def _seek(self, i: int) -> None:
        t0 = time.perf_counter()
        self._cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        ok = self._cap.grab()
        self._seek_s += time.perf_counter() - t0
        self._n_seeks += 1
        if ok and int(self._cap.get(cv2.CAP_PROP_POS_FRAMES)) == i + 1:
            self._pos, self._last = i + 1, i
            return
        # OpenCV lost its place: read sequentially from the start, now and from now on.
        self._seek_ok = False
        self._reopen()

    def _probe_seek(self, i: int) -> np.ndarray:
        """Frame i, read sequentially, compared with the same frame read by seeking on a second handle."""
        ok, seq = self._cap.retrieve()
        if not ok:
            raise Llama3vError(f"{self.path}: frame {i} does not decode (corrupt file)")
        cap = _open(self._file, self.path)
        try:  # not timed: a fresh handle's first seek also decodes frame 0 and costs 20-40% more than later ones
            cap.set(cv2.CAP_PROP_POS_FRAMES, i)
            ok, sought = cap.read()
            self._seek_ok = ok and int(cap.get(cv2.CAP_PROP_POS_FRAMES)) == i + 1 and np.array_equal(seq, sought)
        finally:
            cap.release()
        return seq

    def _seek_cost(self) -> float:
        """One seek's cost in grabbed frames: measured on this file once both have been timed."""
        if self._n_seeks and self._n_grabs and self._grab_s > 0:
            return (self._seek_s / self._n_seeks) / (self._grab_s / self._n_grabs)
        return SEEK_COST_FRAMES

    def _reopen(self) -> None:
        self._cap.release()
        self._cap = _open(self._file, self.path)
        self._pos, self._last = 0, -1


def read_video(path: str | Path, sampling: Sampling = Sampling(), limits: Limits = LIMITS,
               mode: str = "auto") -> tuple[VideoInfo, list[Frame]]:
    """Open, sample and read a video in one go: its metadata and the sampled frames (all held in memory)."""
    with VideoReader(path, limits) as reader:
        return reader.info, list(reader.frames(reader.indices(sampling), mode))


def _slack(listed: int) -> int:
    """How many frames a container's count may overstate before the file counts as truncated."""
    return max(2, listed // 50)


def _check_file(path: Path) -> Path:
    """The resolved path of a plausible video file, or a clean error saying what it is instead."""
    if path.is_dir():
        raise Llama3vError(f"{path}: is a directory, not a video file")
    if not path.is_file():
        raise Llama3vError(f"{path}: no such video file")
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise Llama3vError(f"{path}: empty file (0 bytes)")
    for magic, name in _IMAGES:
        if head.startswith(magic):
            raise Llama3vError(f"{path}: {name} image, not a video (pass it as an image)")
    if container_kind(head) is None:
        raise Llama3vError(f"{path}: not a video container llama3v reads (MP4/MOV, Matroska/WebM, AVI, FLV, Ogg, "
                           "ASF, MPEG-PS/TS): playlists, concat lists and other text files are refused")
    return path.resolve()  # absolute, so FFmpeg never reads a "proto:" prefix as a protocol


def container_kind(head: bytes) -> str | None:
    """The container format whose signature starts `head` (a file's first 512 bytes), or None."""
    if head[:4] == b"RIFF" and head[8:12] != b"AVI ":
        return None
    if len(head) > 188 and head[0] == head[188] == 0x47:  # MPEG-TS: a sync byte every 188-byte packet
        return "an MPEG-TS"
    return next((name for magic, at, name in _MAGIC if head[at:at + len(magic)] == magic), None)


def _open(path: Path, name: Path) -> cv2.VideoCapture:
    """A capture of `path` on FFmpeg with frames rotated upright, or a clean error (about `name`) saying what the
    file looks like."""
    level = cv2.utils.logging.getLogLevel()  # OpenCV's own warnings about a file it cannot open
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    finally:
        cv2.utils.logging.setLogLevel(level)
    if not cap.isOpened():
        cap.release()
        with open(path, "rb") as f:
            head = f.read(512)
        kind = container_kind(head)
        if kind:
            raise Llama3vError(f"{name}: {kind} file OpenCV cannot open (unsupported codec, or truncated or corrupt)")
        raise Llama3vError(f"{name}: not a video OpenCV can read (unknown format, or truncated or corrupt)")
    cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)  # OpenCV applies the display matrix; on by default, made explicit
    return cap
