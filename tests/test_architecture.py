"""The rooms and their import rules (docs/architecture.md), checked by scripts/import_graph.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "import_graph.py"


def _graph(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_the_package_keeps_its_import_rules_and_the_docs_show_its_graph():
    r = _graph()
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("flowchart TD\n") and "    converters --> hf\n" in r.stdout
    assert r.stdout.strip() in (ROOT / "docs" / "architecture.md").read_text(), \
        "docs/architecture.md shows an outdated graph: paste `python3 scripts/import_graph.py` into it"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_forbidden_imports_and_circles(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/errors.py": "",
        "pkg/runtime/__init__.py": "",
        "pkg/runtime/a.py": "import torch\nfrom pkg.runtime import b\n",
        "pkg/runtime/b.py": "def f():\n    from pkg.runtime.a import x  # a late import is still an edge\n",
        "pkg/runtime/c.py": "from pkg.models.m import Model\n",
        "pkg/models/__init__.py": "",
        "pkg/models/m.py": "import torch\nfrom pkg.errors import E\n",
        "pkg/converters/__init__.py": "",
        "pkg/converters/w.py": "from ..errors import E\nfrom ..hf import config\n",
        "pkg/hf/__init__.py": "",
        "pkg/hf/config.py": "",
    })
    r = _graph("--root", str(tmp_path), "--package", "pkg")
    assert r.returncode == 1
    assert sorted(r.stderr.splitlines()) == [
        "forbidden import: pkg.runtime.a (runtime) -> torch",
        "forbidden import: pkg.runtime.c (runtime) -> pkg.models.m (models)",
        "import circle: pkg.runtime.a -> pkg.runtime.b",
    ]
    assert "    converters --> hf\n" in r.stdout and "    models --> base\n" in r.stdout


def test_a_package_that_keeps_the_rules_passes(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.runtime.a import x\n",
        "pkg/errors.py": "",
        "pkg/runtime/__init__.py": "",
        "pkg/runtime/a.py": "import numpy\nfrom pkg.errors import E\n",
        "pkg/models/__init__.py": "",
        "pkg/models/m.py": "import torch\nfrom pkg.hf.config import C\n",
        "pkg/hf/__init__.py": "",
        "pkg/hf/config.py": "",
    })
    r = _graph("--root", str(tmp_path), "--package", "pkg", "--modules")
    assert r.returncode == 0, r.stderr
    assert "pkg.models.m -> pkg.hf.config\n" in r.stdout and "pkg.runtime.a -> pkg.errors\n" in r.stdout
