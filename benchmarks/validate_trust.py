"""Run the slow half of the differential suite (every tiny family x every scenario) and
save a pass/skip/fail table.

    python benchmarks/validate_trust.py            # all slow tests
    python benchmarks/validate_trust.py -k lumina2 # a subset (pytest -k expression)

Writes benchmarks/results/validate_trust.{json,md}. CI runs the fast half
(``python -m pytest tests``); this is the sweep too slow for it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

logger = logging.getLogger("adacorr_compile.validate")
ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default=None, help="pytest -k expression selecting a subset")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "validate_trust"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "tests", "-m", "slow", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
        if args.k:
            cmd += ["-k", args.k]
        logger.info("running: ADACORR_SLOW=1 %s", " ".join(cmd[1:]))
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "ADACORR_SLOW": "1"})
        rows = []
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    detail = (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
                    break
            else:
                detail = ""
            rows.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                         "seconds": round(float(case.get("time", 0)), 1), "detail": detail})
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "skipped", "failed", "error")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "counts": counts, "rows": rows}, indent=1))
    lines = ["# Differential suite, slow set", "", f"`python {' '.join(sys.argv)}`: " + ", ".join(f"{v} {k}" for k, v in counts.items()), "",
             "| test | outcome | s | detail |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['test']} | {r['outcome']} | {r['seconds']} | {r['detail']} |" for r in rows]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    logger.info("%s -> %s.md", counts, args.out)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
