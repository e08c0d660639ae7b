"""ONNX and ``torch.export`` files of a trained network, each checked against the PyTorch model once written.

``write(trained, out)`` exports ``trained.model`` (``inference.load``: float32, eval mode, on the CPU) with a
dynamic batch dimension, as ``OUT.onnx`` (``torch.onnx.export``, the dynamo exporter, which needs onnxscript) or
``OUT.pt2`` (``torch.export.export`` then ``torch.export.save``). The input is ``images``, ``N x 3 x S x S`` at
the evaluation crop side S, the output ``logits``, ``N x classes``. Normalized float32 RGB is expected, or, with
``preprocessing=True``, uint8 RGB (0-255): the conversion, /255 and the mean/std of training are then in the
graph, with the same arithmetic as the loaders' ``Normalizer``.

Right after writing, the file is loaded back (onnxruntime's ``InferenceSession``, ``torch.export.load``) and run
on a batch of another size than the one exported with (the batch dimension really is dynamic); its logits must
equal PyTorch's within ``atol + rtol * max |logit|``, else the file is removed and ``ExportCheckError`` raised.
ONNX needs the ``[export]`` extra (onnx, onnxscript, onnxruntime); without it ``MissingExporter`` says so in one line.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ddp_resnet.inference import Trained

EXPORT_HINT = 'ONNX export needs onnx, onnxscript and onnxruntime: pip install "ddp_resnet[export]"'
INPUT, OUTPUT = "images", "logits"
EXAMPLE_BATCH, CHECK_BATCH = 2, 3  # exported with one batch size, checked with another
ATOL, RTOL = 1e-4, 1e-4


class MissingExporter(ImportError):
    """The optional packages ONNX export needs are not installed; the message says how to install them."""


class ExportCheckError(RuntimeError):
    """An exported file's outputs differ from the PyTorch model's beyond the tolerance (the file was removed)."""


class Logits(nn.Module):
    """The network with a named input: normalized float32 ``images`` -> ``logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


class WithPreprocessing(nn.Module):
    """uint8 RGB ``images`` (N x 3 x S x S) -> float32, ``x * (1 / (255 std)) - mean / std`` -> the network."""

    def __init__(self, model: nn.Module, mean, std) -> None:
        super().__init__()
        self.model = model
        mean_t, std_t = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).float().view(1, -1, 1, 1))
        self.register_buffer("shift", (-mean_t / std_t).float().view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(torch.float32) * self.scale + self.shift)


def deployable(trained: Trained, preprocessing: bool = False) -> nn.Module:
    """The module to export: float32, contiguous, eval mode, on the CPU."""
    model = trained.model.to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()
    return (WithPreprocessing(model, trained.info.mean, trained.info.std) if preprocessing else Logits(model)).eval()


def sample_images(trained: Trained, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random uint8 RGB images at the network's input side (a fixed seed: the same batch every time)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, trained.size, trained.size), dtype=torch.uint8, generator=gen)


def feed(trained: Trained, images: torch.Tensor, preprocessing: bool) -> torch.Tensor:
    """What the exported file takes for these uint8 images: themselves (preprocessing inside) or normalized."""
    return images if preprocessing else trained.normalizer()(images)


def feeding(trained: Trained, preprocessing: bool) -> str:
    """How a deployer prepares an image for the exported file, in one line (the loaders' evaluation transform)."""
    t = trained.transform
    geometry = (f"resize the shorter side to {t.resize} (bilinear, antialiased), center-crop {t.size}x{t.size}"
                if t.folder else f"resize to {t.size}x{t.size} (bilinear, antialiased)")
    mean, std = (", ".join(f"{v:g}" for v in values) for values in (trained.info.mean, trained.info.std))
    if preprocessing:
        return f"RGB, {geometry}, uint8 0-255 as N x 3 x H x W (the /255 and mean/std are in the graph)"
    return f"RGB, {geometry}, x / 255, (x - mean) / std with mean ({mean}), std ({std}), float32 N x 3 x H x W"


def require_onnx() -> None:
    """Raise MissingExporter (one line, with the install command) unless onnx, onnxscript and onnxruntime import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise MissingExporter(EXPORT_HINT) from None


@contextlib.contextmanager
def _quiet():
    """The exporters' progress prints and deprecation chatter, kept off the console."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _batch_dim() -> dict:
    return {INPUT: {0: torch.export.Dim("batch", min=1)}}


def write_onnx(module: nn.Module, example: torch.Tensor, out: str, opset: int | None = None) -> None:
    """``torch.onnx.export`` (dynamo) with a dynamic batch dimension named ``batch``, weights inside the file."""
    require_onnx()
    with _quiet():
        torch.onnx.export(module, (example,), out, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_shapes=_batch_dim(), opset_version=opset, external_data=False, verbose=False)


def write_pt2(module: nn.Module, example: torch.Tensor, out: str) -> None:
    """``torch.export.export`` with a dynamic batch dimension, saved with ``torch.export.save``."""
    with _quiet():
        program = torch.export.export(module, (example,), dynamic_shapes=_batch_dim())
    torch.export.save(program, out)


def onnx_session(out: str):
    """A fresh onnxruntime CPU session of the file."""
    import onnxruntime

    return onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])


def run_session(session, inputs: torch.Tensor) -> torch.Tensor:
    """An onnxruntime session's logits for ``inputs``."""
    return torch.from_numpy(session.run([OUTPUT], {INPUT: inputs.numpy()})[0])


def run_program(program, inputs: torch.Tensor) -> torch.Tensor:
    """A (reloaded) ``torch.export`` program's logits for ``inputs``."""
    with torch.no_grad():
        return program.module()(inputs)


@dataclass
class Written:
    """What was written and how well it agrees: format details for the deployer and the check's numbers."""

    path: str
    kind: str  # onnx | pt2
    details: str  # opset (onnx), input and output names, shapes and dtypes
    max_diff: float
    tolerance: float
    ref_max: float


def _dims(shape) -> str:
    return "[" + ", ".join(d if isinstance(d, str) else str(d) for d in shape) + "]"


def _ort_dtype(name: str) -> str:
    """onnxruntime's ``tensor(float)`` / ``tensor(uint8)`` as ``float32`` / ``uint8``."""
    name = name.removeprefix("tensor(").removesuffix(")")
    return "float32" if name == "float" else name


def describe_onnx(out: str, session) -> str:
    """The ONNX file's opset and its input and output names, shapes and dtypes (as its session reads them)."""
    import onnx

    imports = onnx.load(out, load_external_data=False).opset_import
    opset = next(o.version for o in imports if o.domain in ("", "ai.onnx"))
    (i,), (o,) = session.get_inputs(), session.get_outputs()
    return (f"opset {opset}, input '{i.name}' {_dims(i.shape)} {_ort_dtype(i.type)}, "
            f"output '{o.name}' {_dims(o.shape)} {_ort_dtype(o.type)}")


def describe_program(program) -> str:
    """The program's input and output names, shapes (symbolic sizes as ``batch``) and dtypes."""
    user_in, user_out = program.graph_signature.user_inputs, program.graph_signature.user_outputs
    nodes = {n.name: n for n in program.graph.nodes}
    vals = [nodes[user_in[0]].meta["val"], nodes[user_out[0]].meta["val"]]
    shapes = [_dims("batch" if isinstance(d, torch.SymInt) else int(d) for d in v.shape) for v in vals]
    dtypes = [str(v.dtype).removeprefix("torch.") for v in vals]
    return (f"torch {torch.__version__.split('+')[0]} program, input '{INPUT}' {shapes[0]} {dtypes[0]}, "
            f"output '{OUTPUT}' {shapes[1]} {dtypes[1]}")


def _remove(out: str) -> None:
    for path in (out, out + ".data"):
        with contextlib.suppress(OSError):
            os.unlink(path)


def check(out: str, kind: str, reference: torch.Tensor, got: torch.Tensor, atol: float, rtol: float
          ) -> tuple[float, float]:
    """``(max |diff|, tolerance)``; removes the file and raises ``ExportCheckError`` when the logits disagree."""
    ref_max = float(reference.abs().max())
    tolerance = atol + rtol * ref_max
    if got.shape != reference.shape:
        _remove(out)
        raise ExportCheckError(f"{out}: the {kind} file gives logits of shape {tuple(got.shape)} for a batch of "
                               f"{reference.shape[0]}, PyTorch {tuple(reference.shape)}; the file was removed")
    diff = float((got.float() - reference).abs().max())
    if not diff <= tolerance:  # also NaN
        _remove(out)
        raise ExportCheckError(f"{out}: the {kind} file's logits differ from PyTorch's by up to {diff:.3g} "
                               f"(tolerance {tolerance:.3g} = {atol:g} + {rtol:g} x max |logit| {ref_max:.3g}); "
                               f"the file was removed")
    return diff, tolerance


def write(trained: Trained, out: str, preprocessing: bool = False, opset: int | None = None, atol: float = ATOL,
          rtol: float = RTOL) -> Written:
    """Export to ``out`` (``.onnx`` or ``.pt2``), load it back, compare it with the PyTorch model on a batch."""
    kind = Path(out).suffix.lower().lstrip(".")
    if kind not in ("onnx", "pt2"):
        raise ValueError(f"{out}: the format is told by the extension, .onnx or .pt2")
    if kind == "onnx":
        require_onnx()
    module = deployable(trained, preprocessing)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    example = feed(trained, sample_images(trained, EXAMPLE_BATCH, seed=1), preprocessing)
    try:
        if kind == "onnx":
            write_onnx(module, example, out, opset)
        else:
            write_pt2(module, example, out)
    except BaseException:
        _remove(out)
        raise
    images = sample_images(trained, CHECK_BATCH)
    with torch.no_grad():  # the reference is the PyTorch model on the loaders' normalization, as predict runs it
        reference = module.model(trained.normalizer()(images)).float()
    inputs = feed(trained, images, preprocessing)
    if kind == "onnx":
        session = onnx_session(out)
        got, details = run_session(session, inputs), describe_onnx(out, session)
    else:
        program = torch.export.load(out)
        got, details = run_program(program, inputs), describe_program(program)
    diff, tolerance = check(out, "ONNX" if kind == "onnx" else "torch.export", reference, got, atol, rtol)
    return Written(out, kind, details, diff, tolerance, float(reference.abs().max()))
