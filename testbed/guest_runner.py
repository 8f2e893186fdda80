"""Guest side: run the scenarios listed in ``<results>/plan.json``, one process each.

Runs as PID 1's child inside the test-bed guest (see testbed/guest/ktlsd-guest-init), read
from the read-only project share. Each scenario is a script under testbed/scenarios/ run as
``python3 SCRIPT RESULT_JSON`` with a timeout; a separate process per scenario keeps one
scenario's crash or hang from taking the others down. A scenario named ``BASE-AGENT``
(AGENT being ``tlshd`` or ``ktlsd``) runs ``BASE.py`` with ``AGENT`` in its environment, so
the same scenario compares the two agents in one boot.

Whatever a scenario does, this runner writes ``<results>/<name>.json`` with at least
``name``, ``passed``, ``seconds``, ``kernel`` and ``details``; its output goes to
``<results>/<name>.log``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
AGENTS = ("tlshd", "ktlsd")


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def resolve(name: str) -> tuple[Path, dict[str, str]]:
    """Map a scenario name to (script, extra environment)."""
    direct = SCENARIO_DIR / (name.replace("-", "_") + ".py")
    if direct.exists():
        return direct, {}
    base, _, agent = name.rpartition("-")
    script = SCENARIO_DIR / (base.replace("-", "_") + ".py")
    if agent in AGENTS and script.exists():
        return script, {"AGENT": agent}
    raise FileNotFoundError(f"no scenario script for {name!r} under {SCENARIO_DIR}")


def run_one(name: str, results: Path, timeout: float) -> dict[str, object]:
    out = results / f"{name}.json"
    log = results / f"{name}.log"
    out.unlink(missing_ok=True)
    started = time.monotonic()
    record: dict[str, object] = {"name": name, "passed": False, "figures": {}, "details": []}
    try:
        script, extra = resolve(name)
        env = dict(os.environ, **extra)
        env["PYTHONPATH"] = str(SCENARIO_DIR.parent.parent)
        # The tree is mounted read-only: keep bytecode in one writable cache for the whole
        # boot (as an installed package ships it compiled), so only the first agent start of a
        # boot compiles the sources and the agents' start-up figures are not compile time.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = "/tmp/ktlsd-pycache"
        with open(log, "wb") as f:
            proc = subprocess.run(
                [sys.executable, str(script), str(out)],
                stdout=f, stderr=subprocess.STDOUT, env=env, cwd="/tmp", timeout=timeout,
            )  # fmt: skip
        if out.exists():
            record.update(json.loads(out.read_text()))
        else:
            record["details"] = [f"scenario wrote no result (exit {proc.returncode})"]
        if proc.returncode != 0 and record.get("passed"):
            record["passed"] = False
            record["details"] = [*record.get("details", []), f"exit status {proc.returncode}"]
    except subprocess.TimeoutExpired:
        record["details"] = [f"scenario timed out after {timeout:.0f} s in the guest"]
    except Exception as exc:  # the runner must always report, whatever broke
        record["details"] = [f"runner error: {type(exc).__name__}: {exc}"]
    record["name"] = name
    record["seconds"] = round(time.monotonic() - started, 2)
    record["kernel"] = platform.release()
    try:
        text = log.read_text(errors="replace").rstrip().splitlines()
        if not record.get("passed"):
            record["log_tail"] = "\n".join(text[-40:])
    except FileNotFoundError:
        pass
    out.write_text(json.dumps(record, indent=2) + "\n")
    status = "PASS" if record.get("passed") else "FAIL"
    print(f"KTLSD-SCENARIO {status} {name} {record['seconds']} s", flush=True)
    return record


def main() -> int:
    results = Path(sys.argv[1] if len(sys.argv) > 1 else "/results")
    plan = json.loads((results / "plan.json").read_text())
    runner = {"kernel": platform.release(), "uptime_at_start": uptime(), "scenarios": []}
    ok = True
    for name in plan["scenarios"]:
        record = run_one(name, results, float(plan.get("scenario_timeout", 300)))
        runner["scenarios"].append(name)
        ok = ok and bool(record.get("passed"))
    runner["uptime_at_end"] = uptime()
    (results / "runner.json").write_text(json.dumps(runner, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
