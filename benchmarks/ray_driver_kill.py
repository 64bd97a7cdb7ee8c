"""What a SIGKILLed Ray driver leaves behind, and for how long.

Starts a driver process that calls ``ray.init()`` (a local cluster, as ``rl train`` with the Ray
backend does) and holds one actor, SIGKILLs the driver, then watches every process the driver had
started (by pid, so no other Ray on the machine is touched) until each is gone or ``--watch``
seconds have passed; survivors are then killed. Prints one row per process and writes JSON.

    python benchmarks/ray_driver_kill.py [--watch 120] [--out benchmarks/results/ray_driver_kill.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time

import psutil

DRIVER = """
import os, time, ray
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)

@ray.remote(num_cpus=0.5)
class Actor:
    def pid(self):
        return os.getpid()

actor = Actor.remote()
ray.get(actor.pid.remote())
print("READY", flush=True)
time.sleep(3600)
"""


def _name(process: psutil.Process) -> str:
    """The process name, or for a Python process the script it runs (``dashboard.py``, ``log_monitor.py``)."""
    name = process.name()
    if name.startswith("python"):
        name = os.path.basename(next((a for a in process.cmdline()[1:] if a.endswith(".py")), name))
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watch", type=float, default=120.0, help="seconds to watch the survivors")
    parser.add_argument("--out", default="benchmarks/results/ray_driver_kill.json")
    args = parser.parse_args()
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    for line in driver.stdout:
        if line.startswith("READY"):
            break
    time.sleep(1.0)
    started = {p.pid: _name(p) for p in psutil.Process(driver.pid).children(recursive=True)}
    killed_at = time.monotonic()
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    gone: dict[int, float] = {}
    while len(gone) < len(started) and time.monotonic() - killed_at < args.watch:
        for pid in started.keys() - gone.keys():
            try:
                alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                gone[pid] = round(time.monotonic() - killed_at, 1)
        time.sleep(0.1)
    for pid in started.keys() - gone.keys():
        os.kill(pid, signal.SIGKILL)
    rows = [{"process": name, "gone_after_s": gone.get(pid)} for pid, name in started.items()]
    for row in rows:
        seconds = "alive" if row["gone_after_s"] is None else f"{row['gone_after_s']:.1f} s"
        print(f"{seconds:>12}  {row['process']}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "ray": __import__("ray").__version__,
                   "watch_s": args.watch, "processes": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
