"""`llama3v chat`: an interactive terminal chat with images and videos, streaming, and caches across turns."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from llama3v.errors import Llama3vError
from llama3v.runtime.session import Session

HELP = """commands:
  /image PATH   attach an image to your next message (repeatable)
  /video PATH   attach a video to your next message (repeatable)
  /reset        start a new conversation
  /quit         leave (or Ctrl-D)"""


def run_repl(session: Session, read: Callable[[str], str] = input, out: TextIO = sys.stdout,
             err: TextIO = sys.stderr, verbose: bool = False, system: str | None = None,
             **sampling: object) -> int:
    """Read messages and commands until /quit or end of input; returns the exit code."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    pending: list[dict] = []
    print("llama3v chat. Type a message, or /help.", file=err)
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            print(file=err)
            return 0
        except KeyboardInterrupt:
            print("\n(interrupted: /quit to leave)", file=err)
            continue
        if not line:
            continue
        command, _, arg = line.partition(" ")
        if command in ("/quit", "/exit"):
            return 0
        if command == "/help":
            print(HELP, file=err)
        elif command == "/reset":
            history, pending = history[:1] if system else [], []
            session.reset()
            print("(new conversation)", file=err)
        elif command in ("/image", "/video"):
            kind, path = command[1:], Path(arg.strip()).expanduser()
            if not path.is_file():
                print(f"no such file: {path}", file=err)
                continue
            pending.append({"type": kind, kind: str(path)})
            print(f"({kind} attached to your next message: {path.name})", file=err)
        elif command.startswith("/"):
            print(f"unknown command {command}; /help lists them", file=err)
        else:
            message = {"role": "user", "content": [*pending, {"type": "text", "text": line}]}
            try:
                gen = session.chat([*history, message], **sampling)
                for piece in gen:
                    out.write(piece)
                    out.flush()
            except Llama3vError as e:
                print(f"\nerror: {e}", file=err)
                continue
            except KeyboardInterrupt:
                gen.close()
                print("\n(stopped)", file=err)
                continue
            out.write("\n")
            result = gen.result
            history += [message, {"role": "assistant", "content": result.text}]
            pending = []
            if verbose:
                print(f"[{result.n_prompt_tokens} prompt positions, {result.n_reused} reused, "
                      f"{result.n_encodes} tile encodes, {result.timings['decode_tokens_per_s']:.1f} tokens/s]",
                      file=err)
