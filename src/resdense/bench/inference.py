"""Inference speed: eager PyTorch vs the resdense inference path vs ONNX Runtime.

For each model: latency at batch 1 (median of N calls) and throughput at a large batch
(images/s from the median call), with the largest output difference from eager fp32 beside
each variant. The variants:

* ``eager``: ``model.eval()`` under ``torch.inference_mode()``, fp32, NCHW;
* ``resdense``: :func:`resdense.export.inference_model` (BN folded, channels_last, bf16 only
  where the hardware runs it fast);
* ``resdense+compile``: the same through ``torch.compile`` (only with ``compile=True``);
* ``onnxruntime``: the model exported to ONNX (unfolded: ORT fuses BN itself) on the CPU
  provider with as many threads as torch uses (CPU only; skipped if onnxruntime is missing).

BatchNorm statistics are perturbed first (:func:`perturb_bn_stats`), so folding has real work.
``max_abs_diff`` is against eager fp32 on the throughput batch; ``rel_diff`` divides it by the
largest eager logit (an untrained deep net's logits reach thousands).
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..export import export_model, inference_model, onnx_session
from ..analysis.complexity import model_info
from ..models import create_model
from ..hardware import precision_name, resolve_device, resolve_precision
from .peak import INFER_FLOPS_PER_MAC, add_share_of_peak, peaks
from ._common import (BenchOptions, Row, format_table, median, perturb_bn_stats, say, time_calls,
                      with_threads, write_rows)


@dataclass(frozen=True)
class InferenceCase:
    model: str
    input_size: tuple[int, int, int]
    batch: int  # throughput batch
    latency_repeats: int
    throughput_repeats: int


def _cases(quick: bool) -> list[InferenceCase]:
    if quick:
        return [InferenceCase("resnet20", (3, 32, 32), 8, 2, 1)]
    # resnet50's throughput batch is 32, not 256: one 256-image fp32 pass on two CPU cores takes
    # tens of seconds, and the whole benchmark has to fit in minutes.
    return [InferenceCase("resnet56", (3, 32, 32), 256, 30, 3),
            InferenceCase("resnet50", (3, 224, 224), 32, 10, 2)]


def _variants(model: nn.Module, case: InferenceCase, opts: BenchOptions, device: torch.device,
              tmp: Path) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """(name, fn) pairs; every fn maps an fp32 NCHW batch to fp32 logits."""

    def eager(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    amp = resolve_precision(opts.precision, device)
    fast = inference_model(model, dtype=amp or torch.float32)
    variants: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [("eager", eager), ("resdense", fast)]
    if opts.compile:
        variants.append(("resdense+compile", inference_model(model, dtype=amp or torch.float32, compile=True)))
    if device.type == "cpu" and importlib.util.find_spec("onnxruntime") is not None:
        example = torch.randn(2, *case.input_size)
        onnx_path = tmp / f"{case.model}.onnx"
        export_model(model, onnx_path, "onnx", example_input=example)
        session = onnx_session(onnx_path)

        def ort(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])

        variants.append(("onnxruntime", ort))
    return variants


def _measure(case: InferenceCase, opts: BenchOptions, device: torch.device) -> list[Row]:
    torch.manual_seed(0)
    model = perturb_bn_stats(create_model(case.model)).to(device).eval()
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(1, *case.input_size, generator=g).to(device)
    xb = torch.randn(case.batch, *case.input_size, generator=g).to(device)
    with torch.inference_mode():
        reference = model(xb).float()
    rows = []
    with tempfile.TemporaryDirectory(prefix="resdense-bench-") as tmp:
        for name, fn in _variants(model, case, opts, device, Path(tmp)):
            # eager and ONNX Runtime are the fp32 references; the resdense path runs the precision asked for.
            precision = precision_name(resolve_precision(opts.precision, device)) if name.startswith("resdense") else "fp32"
            row: dict[str, Any] = {"model": case.model, "input": "x".join(map(str, case.input_size)),
                                   "variant": name, "precision": precision, "batch": case.batch}
            try:
                out = fn(xb)  # also the warm-up (and the compilation, for compiled variants)
                row["max_abs_diff"] = float((out.float() - reference).abs().max())
                row["rel_diff"] = row["max_abs_diff"] / max(float(reference.abs().max()), 1e-12)
                lat = time_calls(lambda: fn(x1), case.latency_repeats, warmup=2, device=device)
                thr = time_calls(lambda: fn(xb), case.throughput_repeats, warmup=0, device=device)
                row.update(latency_ms=1e3 * median(lat), throughput_ips=case.batch / median(thr),
                           latency_times_s=lat, throughput_times_s=thr)
            except Exception as e:  # noqa: BLE001 - e.g. torch.compile without a C++ compiler
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            rows.append(row)
            say(opts, f"   {case.model} {name}: " + (row.get("error") or
                f"{row['latency_ms']:.2f} ms at batch 1, {row['throughput_ips']:.1f} img/s at batch {case.batch}"))
    eager_row = rows[0]
    for r in rows:
        if "throughput_ips" in r and "throughput_ips" in eager_row:
            r["speedup_vs_eager"] = r["throughput_ips"] / eager_row["throughput_ips"]
    return rows


COLUMNS = [("model", "model", "s"), ("input", "input", "s"), ("variant", "variant", "s"), ("precision", "prec", "s"),
           ("latency_ms", "b1 ms", ".2f"), ("batch", "batch", "d"), ("throughput_ips", "img/s", ".1f"),
           ("speedup_vs_eager", "x eager", ".2f"), ("achieved_gflops", "GFLOP/s", ".1f"),
           ("share_of_peak", "of peak", ".1%"), ("max_abs_diff", "max |diff|", ".1e"), ("rel_diff", "rel", ".0e"),
           ("error", "error", "s")]


@with_threads
def run(opts: BenchOptions) -> list[Row]:
    """Measure every case, print the table, write ``inference.json``."""
    device = resolve_device(opts.device)
    say(opts, f"== inference: eager vs resdense path vs onnxruntime, {device.type}, {torch.get_num_threads()} threads")
    rows: list[Row] = []
    flops: dict[str, float] = {}
    for case in _cases(opts.quick):
        rows += _measure(case, opts, device)
        flops[case.model] = INFER_FLOPS_PER_MAC * model_info(case.model, input_size=case.input_size).macs
    peak = peaks(device, opts.quick)
    add_share_of_peak(rows, peak, flops, "throughput_ips", "model")
    say(opts, format_table(rows, COLUMNS))
    say(opts, f"share of peak: achieved FLOP/s at the throughput batch (2 x MACs per image x img/s) over this machine's "
              f"matmul peak in the row's precision (fp32 {peak['fp32'] / 1e9:.0f}, bf16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s)")
    write_rows("inference", rows, opts, device, {"peak_flops": peak})
    return rows
