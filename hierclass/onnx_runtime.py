"""Run a frozen backbone with ONNX Runtime on the CPU: export once, check, reuse.

On CPU, ONNX Runtime runs timm's EfficientNet-Lite0 ~3x faster than eager torch (see
``benchmarks/bench_features.py``), so
feature extraction exports the backbone once to a ``.onnx`` file (dynamic batch axis) and
keeps it next to the features. The file records what it was made from in its metadata, so
a stale export is never reused for other weights or another input size.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hierclass.atomic import atomic_path
from hierclass.data.datasets import normalisation
from hierclass.errors import HierclassError

INPUT, OUTPUT = "images", "features"
METADATA_KEY = "hierclass"
OPSET = 17
TOLERANCE = 1e-4  # max |onnx - torch| relative to max |torch|, checked right after export


class OnnxExportError(HierclassError):
    """A backbone could not be exported to ONNX, or the export computes something else."""


def usable_cores() -> int:
    """The CPU cores this process may run on (what ONNX Runtime's intra-op threads should be)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: tuple[int, int, int],
    stamp: dict[str, Any],
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> Path:
    """Export ``model`` (eval, float32) behind its input normalisation to ``path``, with a dynamic batch
    axis, and check it.

    The graph takes what the datasets' collate gives, uint8 pixels, channels last ``[B, H, W, 3]``, and
    does the float conversion and the ``mean``/``std`` normalisation itself (in ONNX Runtime's
    threads, where torch's single-threaded uint8 -> float conversion cost more per image than
    decoding it). The file is written beside ``path`` and renamed into place, so a killed export
    never leaves half a file. ``stamp`` (JSON) is stored in the model's metadata and compared by
    :func:`stamp_of` before the file is reused.

    Raises:
        OnnxExportError: the exporter failed, or the exported graph disagrees with torch.
    """
    import onnx

    path = Path(path)
    model = Uint8Input(model, mean, std).eval()  # eval() on the wrapper: the exporter restores its mode on all
    c, h, w = input_size
    example = torch.randint(0, 256, (2, h, w, c), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with atomic_path(path) as tmp:  # a failed export or check below removes the temporary file
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation on every call
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    dynamo=False,  # the torch.export-based exporter needs onnxscript, which we do not depend on
                    input_names=[INPUT],
                    output_names=[OUTPUT],
                    dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                    opset_version=OPSET,
                )
            graph = onnx.load(str(tmp))
            entry = graph.metadata_props.add()
            entry.key, entry.value = METADATA_KEY, json.dumps(stamp, sort_keys=True)
            onnx.save(graph, str(tmp))
        except OSError as e:  # a full disk or a folder that cannot be written: another engine would not help
            from hierclass.outputs import os_error_message

            if e.filename is None:
                e.filename = str(path)
            raise OnnxExportError(f"ONNX export failed: {os_error_message(e)}") from None
        except Exception as e:  # the exporter raises many kinds; the user needs one line and the way out
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise OnnxExportError(f"{path}: ONNX export failed ({reason[:200]}); use --engine torch") from None
        session = OnnxBackbone(tmp)
        with torch.no_grad():
            expected = model(example).numpy()
        got = session(example.numpy())
        del session
        error = float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-6))
        if got.shape != expected.shape or error > TOLERANCE:
            raise OnnxExportError(
                f"{path}: the ONNX export disagrees with torch (relative error {error:.2e} > {TOLERANCE:g}); "
                "use --engine torch"
            )
    return path


class Uint8Input(nn.Module):
    """``model`` behind its input normalisation: uint8 ``[B, H, W, 3]`` -> ``model((x / 255 - mean) / std)``."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        scale, shift = normalisation(mean, std)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.permute(0, 3, 1, 2).float() * self.scale + self.shift)


def stamp_of(path: str | Path) -> dict[str, Any] | None:
    """The stamp an export was made with, or None if the file is missing or not ours."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        import onnx

        graph = onnx.load(str(path), load_external_data=False)
    except Exception:  # a damaged file is simply not reusable
        return None
    for entry in graph.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    return None


class OnnxBackbone:
    """An exported backbone run by ONNX Runtime on the CPU.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads; default: every usable core.
        spinning: let idle intra-op threads spin-wait for work (ONNX Runtime's default). Off by
            default: spinning threads burn the cores that image decoding (DataLoader workers) and
            other jobs need, and on a shared 2-core machine they collapsed throughput several-fold;
            on an idle machine turning it off costs little (benchmarks/README.md).
    """

    def __init__(self, path: str | Path, threads: int | None = None, *, spinning: bool = False) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or usable_cores()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Features ``[B, dim]`` (float32) of uint8 images, channels last ``[B, H, W, 3]``."""
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(images, dtype=np.uint8)})[0]
