"""The first run on a GPU machine, inside a time budget: what `benchmarks/gpu.sh` runs.

    python benchmarks/gpu_run.py [--budget SECONDS] [--out DIR] [--dry-run]

Phases, in order, each until its share of the budget is spent (time a phase leaves unused
goes to the next ones); a phase that fails or runs out of time does not stop the others:

1. setup: the CUDA device, `clasp.kernels` importable (installed, or from this source tree
   through `source_tree`), versions.
2. kernel tests, compiled on the device, with one autotune config per tuned kernel
   (CLASP_AUTOTUNE=0), every dtype they cover (bf16, fp16, fp32), in parallel shards.
3. warm: every benchmark kernel variant and kept autotune config compiled into Triton's
   cache in parallel processes (`compile_report.py --warm`), so autotuning only times.
4. kernel benchmarks at the README shapes: Triton and eager rows first, then grouped_mm,
   then torch.compile (whose warm-ups are the slow part), each op in turn.
5. training step (`bench_train_step.py`) and labelling throughput while time remains.

Every benchmark result is appended to <out>/<device>-<date>.json as soon as it is measured
(with device, driver, torch and triton versions and shapes), and each test's outcome to
<out>/kernel-tests.jsonl as soon as it is known, so a run cut off keeps what it had.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_BUDGET_S = 480
# Below this many seconds a phase is not started: pytest and CUDA take that long to start.
MIN_PHASE_S = 15
# Importing torch, triton and the package on a cold machine; later phases pay for any excess.
SETUP_S = 60
KERNEL_BENCHES = tuple(
    f"benchmarks/{name}.py"
    for name in ("bench_routing", "bench_moe", "bench_patch_text", "bench_l2norm")
)
STEP_BENCHES = ("benchmarks/bench_train_step.py", "benchmarks/bench_patch_text.py")
KERNEL_BENCH_TESTS = ("test_route", "test_moe_mlp", "test_patch_text_labels", "test_l2_normalize")
STEP_BENCH_TESTS = ("test_train_step", "test_teacher_label_throughput")
BACKEND_ORDER = ("triton", "eager", "grouped_mm", "compile")


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    share: float  # of the whole budget
    what: str


PHASES = (
    Phase("setup", 0.04, "CUDA device, clasp.kernels importable, versions"),
    Phase(
        "kernel tests",
        0.36,
        "tests/kernels compiled on the device, CLASP_AUTOTUNE=0 (one config per tuned "
        "kernel), bf16/fp16 and fp32, in parallel shards",
    ),
    Phase("warm", 0.06, "benchmark kernel variants x autotune configs into Triton's cache"),
    Phase(
        "kernel benchmarks",
        0.34,
        "route, moe_mlp, patch_text_labels, l2_normalize at the README shapes: triton and "
        "eager, then grouped_mm, then torch.compile",
    ),
    Phase("training step", 0.20, "bench_train_step (vit-s, vit-b) and labelling throughput"),
)


def plan(budget_s: float) -> list[tuple[Phase, float, float]]:
    """(phase, its budget, its deadline from the start) for a total budget."""
    rows, end = [], 0.0
    for phase in PHASES:
        seconds = round(phase.share * budget_s, 1)
        end += seconds
        rows.append((phase, seconds, round(end, 1)))
    return rows


def shard_count() -> int:
    # Compiling is CPU-bound and one process compiles serially; the GPU has room for many
    # small test processes.
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def print_plan(budget_s: float, out: str) -> None:
    print(f"gpu.sh plan: budget {budget_s:.0f} s, results in {out}")
    for i, (phase, seconds, deadline) in enumerate(plan(budget_s), 1):
        print(f"  phase {i}: {phase.name:<18} budget {seconds:6.1f} s  ends by {deadline:6.1f} s")
        print(f"           {phase.what}")
    print(f"  kernel test shards: {shard_count()}")
    print(f"  kernel benchmarks: {', '.join(KERNEL_BENCHES)}; backend order {BACKEND_ORDER}")
    print(f"  then: {', '.join(STEP_BENCH_TESTS)}")


class Runner:
    def __init__(self, budget_s: float, out: str):
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.out = os.path.abspath(out)
        os.makedirs(self.out, exist_ok=True)
        self.log_path = os.path.join(self.out, "gpu-run.log")
        self.outcomes = os.path.join(self.out, "kernel-tests.jsonl")
        self.env = dict(os.environ)
        pythonpath = [HERE, *filter(None, self.env.get("PYTHONPATH", "").split(os.pathsep))]
        self.env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        self.results_file = None
        self.bench_ids: list[str] | None = None
        self.environment: dict = {}
        self.summary: list[str] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, text: str) -> None:
        line = f"[{self.elapsed():6.1f} s] {text}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def run(self, cmd: list[str], deadline: float, env: dict | None = None) -> int | None:
        """Run cmd until the deadline (seconds from the start); output to the log.
        Returns its exit status, or None when it was stopped at the deadline."""
        timeout = deadline - self.elapsed()
        if timeout <= 1:
            return None
        with open(self.log_path, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop(proc)
                return None

    def pytest(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pytest", "-p", "gpu_pytest_plugin", "-p", "no:cacheprovider",
                *args]  # fmt: skip

    def collect(self, args: list[str], deadline: float) -> list[str]:
        try:
            out = subprocess.run(
                self.pytest("--collect-only", "-q", *args), cwd=ROOT, env=self.env,
                capture_output=True, text=True, timeout=max(1, deadline - self.elapsed()),
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            self.say(f"collecting {' '.join(args)}: out of time")
            return []
        ids = [line.strip() for line in out.stdout.splitlines() if "::" in line]
        if not ids:
            with open(self.log_path, "a") as log:
                log.write(out.stdout[-5000:] + out.stderr[-5000:])
        return ids

    # --- phases ------------------------------------------------------------------------

    def setup(self, deadline: float) -> bool:
        # CLASP_GPU_RUN_ON_CPU=1 rehearses the phases on a machine without a GPU (the
        # kernel tests then run in Triton's interpreter; no Triton row is timed).
        rehearsal = os.environ.get("CLASP_GPU_RUN_ON_CPU") == "1"
        check = (
            "import torch, triton, clasp.kernels, json\n"
            f"assert {rehearsal} or torch.cuda.is_available(), 'no CUDA device'\n"
            "import harness\n"
            "d = torch.device('cuda' if torch.cuda.is_available() else 'cpu')\n"
            "print(json.dumps({**harness.environment(d), 'results': harness.results_path(d)}))"
        )
        env = dict(self.env, CLASP_RESULTS_DIR=self.out)
        cmd = [sys.executable, "-c", f"import source_tree\n{check}"]
        try:
            out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=max(1, deadline - self.elapsed()))  # fmt: skip
        except subprocess.TimeoutExpired:
            self.say(f"setup: importing torch, triton and clasp.kernels took over {deadline:.0f} s")
            return False
        if out.returncode != 0:
            self.say(f"setup failed: {out.stderr.strip().splitlines()[-1:]}")
            return False
        info = json.loads(out.stdout.strip().splitlines()[-1])
        self.results_file = info.pop("results")
        self.environment = info
        self.env["CLASP_RESULTS_FILE"] = self.results_file
        self.say("device: " + ", ".join(f"{k} {v}" for k, v in info.items()))
        return True

    def kernel_tests(self, deadline: float) -> None:
        ids = self.collect(["tests/kernels"], deadline)
        if not ids:
            self.say("kernel tests: nothing collected (see gpu-run.log)")
            return
        shards = [ids[i :: shard_count()] for i in range(shard_count())]
        env = dict(self.env, CLASP_AUTOTUNE="0", CLASP_OUTCOMES=self.outcomes)
        self.say(f"kernel tests: {len(ids)} in {len(shards)} shards")
        with open(self.log_path, "a") as log:
            procs = [
                subprocess.Popen(
                    self.pytest("-q", "-o", "addopts=", *shard),
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
                for shard in shards
            ]
            for proc in procs:
                try:
                    proc.wait(timeout=max(0.1, deadline - self.elapsed()))
                except subprocess.TimeoutExpired:
                    stop(proc)
        summary = summarise_outcomes(self.outcomes, ids)
        if self.results_file:
            import harness

            harness.record_section(self.results_file, "kernel_tests", summary, self.environment)
        text = (
            f"kernel tests: {summary['passed']} passed, {summary['failed']} failed, "
            f"{summary['skipped']} skipped, {summary['not_run']} not run (time limit)"
        )
        self.say(text)
        self.summary.append(text)
        for failure in summary["failures"][:30]:
            self.summary.append(f"  FAILED {failure['id']}: {failure.get('message', '')}")

    def warm(self, deadline: float) -> None:
        cmd = [sys.executable, os.path.join(HERE, "compile_report.py"), "--warm",
               "--jobs", str(max(1, (os.cpu_count() or 2) - 1))]  # fmt: skip
        status = self.run(cmd, deadline)
        self.say(f"warm: {'done' if status == 0 else 'stopped' if status is None else 'failed'}")

    def benchmarks(self, files, tests, deadline: float, name: str) -> None:
        if self.bench_ids is None:  # one collection for both benchmark phases
            every = list(dict.fromkeys([*KERNEL_BENCHES, *STEP_BENCHES]))
            self.bench_ids = self.collect([*every, "-o", "python_files=bench_*.py"], deadline)
        ids = [i for i in self.bench_ids if i.split("::")[0] in files]
        ids = ordered([i for i in ids if i.split("::")[-1].split("[")[0] in tests])
        if not ids:
            self.say(f"{name}: nothing collected (see gpu-run.log)")
            return
        self.say(f"{name}: {len(ids)} rows, in order: {ids[0]} ... {ids[-1]}")
        args = ["-q", "-p", "no:xdist", "-o", "python_files=bench_*.py",
                "--benchmark-disable-gc", *ids]  # fmt: skip
        status = self.run(self.pytest(*args), deadline)
        done = "all rows ran" if status is not None else "stopped at its time limit"
        self.say(f"{name}: {done} (pytest status {status})")

    def main(self) -> int:
        deadlines = {phase.name: end for phase, _, end in plan(self.budget_s)}
        for phase, _, end in plan(self.budget_s):
            left = end - self.elapsed()
            if left < MIN_PHASE_S and phase.name != "setup":
                self.say(f"{phase.name}: skipped, {max(left, 0):.0f} s of its budget left")
                self.summary.append(f"{phase.name}: skipped (no time left)")
                continue
            self.say(f"{phase.name}: start ({left:.0f} s)")
            if phase.name == "setup":
                # Setup may borrow up to a minute: nothing runs without it.
                if not self.setup(max(deadlines["setup"], SETUP_S)):
                    print("gpu.sh: setup failed; see " + self.log_path)
                    return 2
            elif phase.name == "kernel tests":
                self.kernel_tests(end)
            elif phase.name == "warm":
                self.warm(end)
            elif phase.name == "kernel benchmarks":
                self.benchmarks(KERNEL_BENCHES, KERNEL_BENCH_TESTS, end, phase.name)
            else:
                self.benchmarks(STEP_BENCHES, STEP_BENCH_TESTS, end, phase.name)
        self.say(f"done in {self.elapsed():.0f} s")
        print("\n" + "\n".join(self.summary))
        if self.results_file and os.path.exists(self.results_file):
            subprocess.run([sys.executable, os.path.join(HERE, "report.py"), self.results_file],
                           cwd=HERE)  # fmt: skip
        failed = any("failed" in s and not s.startswith("kernel tests: 0 ") for s in self.summary)
        return 1 if failed else 0


def stop(proc: subprocess.Popen) -> None:
    """Stop a process and its children (its own session)."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def ordered(ids: list[str]) -> list[str]:
    """Benchmark rows: by backend (Triton and eager first, torch.compile last), then as
    collected (op by op, shape by shape)."""

    def backend(node_id: str) -> int:
        name = node_id.rsplit("-", 1)[-1].rstrip("]")
        return BACKEND_ORDER.index(name) if name in BACKEND_ORDER else len(BACKEND_ORDER)

    return sorted(ids, key=lambda i: (backend(i), ids.index(i)))


def summarise_outcomes(path: str, ids: list[str]) -> dict:
    seen: dict[str, dict] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                entry = json.loads(line)
                if seen.get(entry["id"], {}).get("outcome") != "failed":
                    seen[entry["id"]] = entry
    outcomes = [seen[i]["outcome"] for i in ids if i in seen]
    return {
        "date": datetime.date.today().isoformat(),
        "autotune": "one config per kernel (CLASP_AUTOTUNE=0)",
        "collected": len(ids),
        "passed": outcomes.count("passed"),
        "failed": outcomes.count("failed"),
        "skipped": outcomes.count("skipped"),
        "not_run": sum(i not in seen for i in ids),
        "failures": [seen[i] for i in ids if i in seen and seen[i]["outcome"] == "failed"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds in all")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    if args.budget < 4 * MIN_PHASE_S:
        print(f"gpu.sh: --budget must be at least {4 * MIN_PHASE_S} s, got {args.budget:g}")
        return 2
    if args.dry_run:
        print_plan(args.budget, args.out)
        return 0
    return Runner(args.budget, args.out).main()


if __name__ == "__main__":
    sys.exit(main())
