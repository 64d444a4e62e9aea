"""A short fuzz run in `make test` (`make fuzz` runs 5000 cases per kind, ~5 min): mutated GGUFs and images end in
success or a clean error, never a signal, a hang or an unclean exception."""

from __future__ import annotations

from fuzz_harness import KINDS, fuzz


def test_short_fuzz_run(tmp_path):
    outcomes = fuzz(60, KINDS, tmp_path / "work", tmp_path / "findings", cli_every=20)
    assert outcomes.findings == []
    for kind in [k for k in KINDS if k != "values"]:
        assert outcomes.counts[kind, "ok"] >= 2, f"{kind}: the valid input and some benign mutations load"
        assert outcomes.counts[kind, "error"] >= 20, f"{kind}: most mutations are refused cleanly"
        assert outcomes.counts[kind + "-cli", "error"] + outcomes.counts[kind + "-cli", "ok"] >= 2
    for label in ("values-model", "values-mmproj"):  # wrong values of single keys: most refused, some harmless
        assert outcomes.counts[label, "error"] >= 10 and outcomes.counts[label, "ok"] >= 1, label
