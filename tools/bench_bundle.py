"""What verifying a bundle on import costs: ``patternstore import`` (every
entry regenerated from its spec and compared byte for byte) against
``patternstore import --trust`` (format, checksums and keys only).

    PYTHONPATH=. python tools/bench_bundle.py [--repeats N]

Bundles: the ``default`` preset (many small entries), and one bigbird layout
(8 heads, each its own layout) at 16K, 128K and 1M tokens. Each import goes
into a fresh store directory, so both columns include the writes. The two
ways alternate (verify, trust, verify, trust, ...); figures are medians of
``--repeats`` imports, in seconds. Writes tools/results/bundle_import.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from patternstore import SparseSpec, maintenance  # noqa: E402
from patternstore.presets import PRESETS  # noqa: E402


def bundles() -> dict[str, list]:
    """Bundle name -> its specs."""
    bigbird = {f"bigbird-{n // 1024}K": [SparseSpec("bigbird", n, 128, 8, different_layout_per_head=True)]
               for n in (16 << 10, 128 << 10, 1 << 20)}
    return {"default-preset": list(PRESETS["default"].specs), **bigbird}


def timed_import(bundle: Path, root: Path, trust: bool) -> float:
    """Seconds of one import of ``bundle`` into a fresh store under ``root``."""
    target = Path(tempfile.mkdtemp(dir=root))
    store = maintenance.open_store(target, writable=True)
    start = time.perf_counter()
    result = maintenance.import_bundle(store, bundle, trust=trust)
    seconds = time.perf_counter() - start
    assert result.failed == [] and result.imported > 0
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for name, specs in bundles().items():
            source = maintenance.open_store(root / f"source-{name}", writable=True)
            maintenance.precompute(source, specs)
            bundle = root / f"{name}.bundle"
            size = maintenance.export(source, bundle).bytes
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats):
                for trust in (False, True):  # alternated: drift hits both alike
                    times[trust].append(timed_import(bundle, root, trust))
            verify, trust = statistics.median(times[False]), statistics.median(times[True])
            rows.append({"bundle": name, "entries": len(specs), "bundle_bytes": size,
                         "verify_s": round(verify, 4), "trust_s": round(trust, 4),
                         "verify_over_trust": round(verify / trust, 2)})
            print(f"{name:<16} {len(specs):>3} entries {size / 2**20:8.2f} MiB  "
                  f"verify {verify:8.4f} s  trust {trust:8.4f} s  x{verify / trust:.2f}")
    report = {
        "what": "patternstore import: regenerate-and-compare (verify) vs --trust; medians, seconds",
        "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_1min_after": round(os.getloadavg()[0], 2)},  # other work on the machine
        "cases": rows,
    }
    out = REPO / "tools" / "results" / "bundle_import.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
