"""Rebuild the tiny model from scratch and compare with the committed eval.json.

    python load_tests/rebuild_tiny_model.py [--tolerance 0.05] [--json rebuild.json]

Runs the build (minutes on 2 cores) into a temporary directory with the
committed build configuration, prints committed vs rebuilt held-out greedy
accuracy per family, writes JSON, and exits 1 when a family differs by more
than the tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from shared.models.build_tiny import BuildConfig, build

COMMITTED_DIR = Path(__file__).resolve().parents[1] / "shared" / "models" / "clora-tiny"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--committed", type=Path, default=COMMITTED_DIR)
    parser.add_argument("--tolerance", type=float, default=0.05, help="max accuracy difference per family")
    parser.add_argument("--json", type=Path, default=Path("rebuild_tiny_model.json"))
    args = parser.parse_args(argv)
    committed = json.loads((args.committed / "eval.json").read_text())
    config = BuildConfig(**committed["build_config"])
    with tempfile.TemporaryDirectory(prefix="clora-tiny-") as out:
        rebuilt = build(Path(out), config)
    rows, ok = [], True
    print(f"\n{'family':8s} {'committed':>10s} {'rebuilt':>10s} {'diff':>7s}")
    for name, numbers in committed["families"].items():
        before, after = numbers["greedy_accuracy"], rebuilt["families"][name]["greedy_accuracy"]
        ok &= abs(after - before) <= args.tolerance
        rows.append({"family": name, "committed": before, "rebuilt": after})
        print(f"{name:8s} {before:10.1%} {after:10.1%} {after - before:+7.1%}")
    print(f"build_s committed {committed['build_s']} rebuilt {rebuilt['build_s']}; within tolerance: {ok}")
    result = {"families": rows, "within_tolerance": ok, "build_s": rebuilt["build_s"]}
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
