"""The prepared GPU check of issue 21: one run of at most 8 minutes on one H100/H200.

1. Training speed, images/s summed over the runs stepped together, of resnet20, resnet56 and
   plain56 at 32x32 (batch 128, bf16 where the card has it): one run alone (``separate``),
   three seeds fused (``fused``), graph-captured (``graphs``) and both (``fused+graphs``).
   Eager modes for every net; the captured ones (each compiles first) where the time plan has room.
2. The degradation study at ``--preset`` (default ``standard``; a study without it falls back to
   ``quick``, said in the output) with 3 seeds, fused, in the time left: to the end, or stopped
   with a checkpoint (SIGTERM) at the time limit, so running the script again continues it.
   Its runs are CUDA-graph captured when the measured speed-up pays for the compilation.

Writes ``OUT/gpu_check.json`` (device, every measurement, the study's outcome and table) and
``OUT/study`` (the study folder: report.md holds its table). ``--dry-run`` checks the plan on any
machine in seconds: the nets and shapes, the steps, the time arithmetic, the preset and the data,
and one tiny eager step of each uncompiled mode on the CPU.

    python scripts/gpu_check.py --out runs/gpu-check            # on the GPU machine
    python scripts/gpu_check.py --out runs/gpu-check --dry-run  # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a checkout without an install

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

NETS = ("resnet20", "resnet56", "plain56")
MODES = ("separate", "fused", "graphs", "fused+graphs")
CAPTURED_NETS = ("resnet20", "resnet56")  # the captured modes compile: the nets the goals name
LIMIT_S = 480          # the whole check, on the GPU machine
STARTUP_S = 20         # imports, CUDA context, this script's own work
STUDY_RESERVE_S = 200  # kept at least for the study; it also gets what the measurements leave
EAGER_S = 15           # one eager measurement (build, warm-up, timed steps), conservatively
CAPTURED_S = 40        # one captured measurement: compiling forward and backward dominates
STOP_GRACE_S = 20      # from SIGTERM to the study's checkpoint and exit


@dataclass
class Measurement:
    net: str
    mode: str
    shape: tuple[int, ...]   # the input of one step: (K, N, C, H, W) fused, (N, C, H, W) alone
    estimate_s: int
    images_per_s: Optional[float] = None
    step_ms: Optional[float] = None
    first_steps_s: Optional[float] = None  # the warm-up (and compilation)
    skipped: Optional[str] = None


@dataclass
class Plan:
    limit_s: int
    batch: int
    size: int
    copies: int
    warmup: int
    steps: int
    preset: str
    preset_note: str
    data: str
    measurements: list[Measurement] = field(default_factory=list)

    def bench_budget(self) -> int:
        return self.limit_s - STARTUP_S - STUDY_RESERVE_S

    def bench_estimate(self) -> int:
        return sum(m.estimate_s for m in self.measurements)


def make_plan(args: argparse.Namespace) -> Plan:
    """The measurements in order, each with its time estimate; the preset and data actually used."""
    from resdense.studies import get_study

    presets = get_study("degradation").presets
    preset, note = args.preset, ""
    if preset not in presets:
        note = f"preset {args.preset!r} does not exist (presets: {', '.join(presets)}); using 'quick' instead"
        preset = "quick"
    plan = Plan(args.limit, args.batch, args.size, 3, 5, args.steps, preset, note, _data(args.data))
    for net in NETS:
        for mode in MODES:
            captured = "graphs" in mode
            if captured and net not in CAPTURED_NETS:
                continue
            fused = mode.startswith("fused")
            shape = ((plan.copies,) if fused else ()) + (plan.batch, 3, plan.size, plan.size)
            plan.measurements.append(Measurement(net, mode, shape, CAPTURED_S if captured else EAGER_S))
    return plan


def _data(name: str) -> str:
    from resdense.data import check_available
    from resdense.errors import UserError

    try:
        check_available(name)
        return name
    except UserError:
        return "synthetic-rgb"


def check_plan(plan: Plan) -> list[str]:
    """What is wrong with the plan (nothing: an empty list): nets that do not build, shapes,
    steps, and the time arithmetic."""
    from resdense.models import create_model

    problems = []
    for net in NETS:
        with torch.device("meta"):
            create_model(net, num_classes=10, in_chans=3)
    if plan.bench_estimate() > plan.bench_budget():
        problems.append(f"measurements need about {plan.bench_estimate()} s, more than the {plan.bench_budget()} s "
                        f"left after {STARTUP_S} s of start-up and {STUDY_RESERVE_S} s for the study")
    if plan.limit_s > LIMIT_S:
        problems.append(f"--limit {plan.limit_s} is more than the check's {LIMIT_S} s")
    if plan.warmup < 3:
        problems.append("CUDA graph trees record on the second or third call: warm up at least 3 steps")
    for m in plan.measurements:
        if m.shape[-1] != plan.size or m.shape[-4] != plan.batch:
            problems.append(f"{m.net} {m.mode}: shape {m.shape} is not batch {plan.batch} at {plan.size}px")
    return problems


def _models(net: str, copies: int, device: torch.device) -> list[torch.nn.Module]:
    from resdense.models import create_model

    out = []
    for seed in range(copies):
        torch.manual_seed(seed)
        out.append(create_model(net, num_classes=10, in_chans=3).to(device, memory_format=torch.channels_last))
    return out


def _stepper(net: str, mode: str, copies: int, device: torch.device, amp: Optional[torch.dtype]) -> Any:
    """A function doing one training step of ``mode`` on a batch (x, y)."""
    from resdense.train.engine import autocast
    from resdense.train.graphs import GraphStep
    from resdense.train.stacked import StackedNet, StackedSGD, per_copy_losses

    models = _models(net, copies if mode.startswith("fused") else 1, device)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4) for m in models]
    if mode.startswith("fused"):
        stacked = StackedNet(models, cuda_graphs="graphs" in mode)
        opt = StackedSGD(stacked, optimizers[0], models[0])

        def fused_step(x: torch.Tensor, y: torch.Tensor) -> None:
            with autocast(device, amp):
                losses = per_copy_losses(stacked(x), y, 0.0)
            for p in stacked.params.values():
                p.grad = None
            losses.sum().backward()
            opt.step([0.05] * copies)
        return fused_step
    model = GraphStep(models[0]) if "graphs" in mode else models[0]
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(device, amp):
            loss = F.cross_entropy(model(x), y)
        optimizers[0].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[0].step()
    return step


def measure(m: Measurement, plan: Plan, device: torch.device, amp: Optional[torch.dtype], steps: int) -> None:
    """Fill ``m`` with images/s over ``steps`` timed steps after the warm-up."""
    step = _stepper(m.net, m.mode, plan.copies, device, amp)
    x = torch.randn(*m.shape, device=device)
    if len(m.shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, m.shape[:-3], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(plan.warmup):
        step(x, y)
    sync()
    m.first_steps_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    sync()
    elapsed = time.perf_counter() - start
    images = plan.batch * (plan.copies if m.mode.startswith("fused") else 1) * steps
    m.images_per_s, m.step_ms = images / elapsed, 1000 * elapsed / steps


def bench(plan: Plan, device: torch.device, amp: Optional[torch.dtype], began: float) -> None:
    """Every measurement of the plan that fits in the measurements' share of the time."""
    deadline = began + STARTUP_S + plan.bench_budget()
    for m in plan.measurements:
        if time.perf_counter() + m.estimate_s > deadline:
            m.skipped = "no time left in the plan"
            continue
        try:
            measure(m, plan, device, amp, plan.steps)
        except Exception as e:  # noqa: BLE001 - a mode that fails here is a result to record, not the end
            m.skipped = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        print(f"{m.net:9} {m.mode:13} " + (f"{m.images_per_s:9.0f} img/s  {m.step_ms:7.2f} ms/step  "
              f"(first {plan.warmup} steps {m.first_steps_s:.1f} s)" if m.images_per_s else f"skipped: {m.skipped}"),
              flush=True)


def graphs_pay(plan: Plan, study_steps: int) -> bool:
    """Whether capturing the study's runs saves more than its compilation costs (resnet56, fused)."""
    got = {m.mode: m for m in plan.measurements if m.net == "resnet56" and m.images_per_s}
    if "fused" not in got or "fused+graphs" not in got:
        return False
    saved = study_steps * (got["fused"].step_ms - got["fused+graphs"].step_ms) / 1000
    return saved > (got["fused+graphs"].first_steps_s or 0)


def study_command(plan: Plan, out: Path, graphs: bool) -> list[str]:
    return [sys.executable, "-m", "resdense", "study", "degradation", "--preset", plan.preset, "--seeds", "0,1,2",
            "--data", plan.data, "--fuse-seeds", "--out", str(out / "study"),
            *(["--set", "cuda_graphs=True"] if graphs else [])]


def run_study(plan: Plan, out: Path, graphs: bool, seconds: float) -> dict[str, Any]:
    """The study in a subprocess, stopped by SIGTERM (with checkpoints) if it is not done in ``seconds``."""
    cmd = study_command(plan, out, graphs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    with open(out / "study.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            text, _ = proc.communicate(timeout=max(seconds, 1))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                text, _ = proc.communicate(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                text, _ = proc.communicate()
        log.write(text)
    table = [ln for ln in text.splitlines() if ln.startswith(("group ", "plain-", "resnet-"))]
    return {"command": " ".join(cmd), "exit_code": proc.returncode, "complete": proc.returncode == 0 and bool(table),
            "wall_s": round(time.perf_counter() - start, 1), "cuda_graphs": graphs, "table": table,
            "last_lines": text.splitlines()[-12:]}


def dry_run(plan: Plan) -> int:
    """Check the plan and step each uncompiled mode once on the CPU at a tiny batch."""
    problems = check_plan(plan)
    print(f"plan: {len(plan.measurements)} measurements, about {plan.bench_estimate()} s of {plan.bench_budget()} s; "
          f"then the degradation study (preset {plan.preset}, data {plan.data}) in the time left of {plan.limit_s} s")
    if plan.preset_note:
        print(plan.preset_note)
    for m in plan.measurements:
        print(f"  {m.net:9} {m.mode:13} input {'x'.join(map(str, m.shape))}  {plan.warmup} + {plan.steps} steps  "
              f"~{m.estimate_s} s")
    tiny = Plan(**{**asdict(plan), "batch": 2, "warmup": 1, "measurements": []})
    for m in plan.measurements:
        if "graphs" not in m.mode and m.net == "resnet20":
            small = Measurement(m.net, m.mode, ((plan.copies,) if m.mode == "fused" else ()) + (2, 3, plan.size, plan.size), 0)
            measure(small, tiny, torch.device("cpu"), None, steps=1)
            print(f"  cpu step of {m.net} {m.mode}: ok")
    for p in problems:
        print(f"plan problem: {p}")
    return 1 if problems else 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where gpu_check.json and the study go")
    p.add_argument("--preset", default="standard", help="the degradation study's preset (default standard)")
    p.add_argument("--data", default="fashion-mnist", help="the study's data (synthetic-rgb where it is missing)")
    p.add_argument("--limit", type=int, default=LIMIT_S, help=f"seconds for the whole check (at most {LIMIT_S})")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32, help="image size of the speed measurements")
    p.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    p.add_argument("--dry-run", action="store_true", help="check the plan in seconds, on any machine")
    args = p.parse_args(argv)
    began = time.perf_counter()
    plan = make_plan(args)
    if args.dry_run:
        return dry_run(plan)
    from resdense.hardware import resolve_precision
    from resdense.outputs import OUTPUT, claim

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on the GPU machine, or use --dry-run", file=sys.stderr)
        return 2
    problems = check_plan(plan)
    if problems:
        print("gpu_check: " + "; ".join(problems), file=sys.stderr)
        return 2
    out = claim(args.out, OUTPUT)
    device = torch.device("cuda")
    amp = resolve_precision("auto", device)
    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}, {'bf16' if amp else 'fp32'}", flush=True)
    bench(plan, device, amp, began)
    from resdense.studies import StudyConfig, get_study
    from resdense.studies.engine import _total_steps

    spec = get_study("degradation")
    runs = spec.runs(StudyConfig(study="degradation", preset=plan.preset, seeds=[0]))
    graphs = graphs_pay(plan, max(_total_steps(r) for r in runs))
    left = plan.limit_s - (time.perf_counter() - began) - STOP_GRACE_S
    study = run_study(plan, out, graphs, left)
    print("\n".join(study["table"]) or "\n".join(study["last_lines"]))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "precision": "bf16" if amp else "fp32",
              "plan": {k: v for k, v in asdict(plan).items() if k != "measurements"},
              "measurements": [asdict(m) for m in plan.measurements], "study": study,
              "wall_s": round(time.perf_counter() - began, 1)}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(f"gpu_check: {out / 'gpu_check.json'}; study {'complete' if study['complete'] else 'not complete'} "
          f"in {study['wall_s']} s; total {result['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
