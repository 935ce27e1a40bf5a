"""Export a checkpoint for other imaging software: TorchScript (any image size) or ONNX.

The exported network maps normalised images, float32 (N, 1, H, W), to cell probabilities of the
same shape (sigmoid included), with a second channel for a model with a distance map. A JSON file
beside it (`<out>.json`) says how to normalise the input (per-image percentiles, polarity), at
which cell size the model works (if it was trained at one: `cellseg.scale`), which threshold gives
the mask, and where the model came from, so that a mask computed elsewhere is the mask
`cellseg predict` computes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from fsspec.core import split_protocol
from torch import nn

from cellseg import __version__
from cellseg.checkpoint import Checkpoint
from cellseg.io import file_replaced_atomically, os_error_reason, write_file_atomic
from cellseg.model import UNet
from cellseg.redact import redact_url

ExportFormat = Literal["torchscript", "onnx"]


class ExportableUNet(nn.Module):
    """The U-Net's layers with a forward pass that TorchScript compiles and ONNX exports.

    It pads and crops like `UNet.forward`, so the TorchScript model takes any image size. For
    ONNX (`branch_free`), the padding is a fixed formula the exporter can keep symbolic: reflect
    padding to the next multiple of 2**depth, which equals `UNet.forward` for images whose sides
    exceed 2**depth (the minimum the ONNX model accepts).
    """

    def __init__(self, unet: UNet, branch_free: bool = False):
        super().__init__()
        self.stem, self.encoder, self.bottleneck = unet.stem, unet.encoder, unet.bottleneck
        self.decoder, self.head = unet.decoder, unet.head
        self.multiple = int(unet.size_multiple)
        self.branch_free = branch_free

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        pad_h = (self.multiple - height % self.multiple) % self.multiple
        pad_w = (self.multiple - width % self.multiple) % self.multiple
        if self.branch_free:
            x = F.pad(x, [0, pad_w, 0, pad_h], mode="reflect")
        else:
            if height + pad_h == self.multiple and width + pad_w == self.multiple:
                pad_h += self.multiple  # as UNet.forward: no 1x1 bottleneck for instance norm
            if pad_h > 0 or pad_w > 0:
                if pad_h < height and pad_w < width:
                    x = F.pad(x, [0, pad_w, 0, pad_h], mode="reflect")
                else:
                    x = F.pad(x, [0, pad_w, 0, pad_h], mode="replicate")
        skips = [self.stem(x)]
        for down in self.encoder:
            skips.append(down(skips[-1]))
        x = self.bottleneck(skips[-1])
        level = len(skips) - 1
        for up in self.decoder:
            x = up(x, skips[level])
            level -= 1
        return torch.sigmoid(self.head(x)[:, :, :height, :width])


def export_model(
    checkpoint: Checkpoint, out: str | Path, export_format: ExportFormat = "torchscript",
    model_version: str = "", threshold: float | None = None, overwrite: bool = False,
) -> dict[str, Any]:
    """Write the model to `out` in `export_format` and its description to `<out>.json`; returns it.
    The threshold recorded is `threshold`, else the one `predict` uses with this checkpoint (decided
    when it was trained). Files already there are refused (ValueError) unless `overwrite`. `out` is
    a local file (a file:// URL names one): a URL of any other storage is refused."""
    protocol, local = split_protocol(str(out))
    if protocol not in (None, "file", "local"):
        raise ValueError(f"cannot export to '{redact_url(str(out))}': models export writes a local file; export to a "
                         "local path, then copy it and its .json to the storage")
    out = Path(local)
    if out.is_dir():
        raise ValueError(f"'{out}' is a folder; name the file to write")
    if not overwrite and (existing := [str(path) for path in (out, Path(f"{out}.json")) if path.exists()]):
        raise ValueError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; replace "
                         f"{'it' if len(existing) == 1 else 'them'} (--overwrite) or choose another file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        blocking = next((folder for folder in (out.parent, *out.parent.parents) if folder.is_file()), out.parent)
        raise ValueError(f"cannot write '{out}': '{blocking}' is a file, not a folder") from error
    if export_format not in ("torchscript", "onnx"):
        raise ValueError(f"unknown export format {export_format!r}: use 'torchscript' or 'onnx'")
    unet = checkpoint.build_model().eval()
    multiple = int(unet.size_multiple)
    min_side = 1 if export_format == "torchscript" else multiple + 1
    try:  # beside `out`, then renamed over it: a file replaced (--overwrite) is never left half-written
        with file_replaced_atomically(out) as temporary:
            if export_format == "torchscript":
                with open(temporary, "wb") as file:  # a file, not its name: torch names the archive after it
                    torch.jit.save(torch.jit.script(ExportableUNet(unet)), file)
            else:
                _export_onnx(ExportableUNet(unet, branch_free=True).eval(), Path(temporary), multiple)
    except OSError as error:  # a folder it may not write, a full disk
        raise _write_failure(out, error) from error
    normalization = checkpoint.model_config.normalization
    description = {
        "format": export_format,
        "file": out.name,
        "model_version": model_version,
        "input": {
            "name": "image", "dtype": "float32", "shape": ["N", 1, "H", "W"], "min_side": min_side,
            "normalization": {
                **normalization.model_dump(mode="json"),
                "how": "per image: clip to [low, high] percentiles, scale to [0, 1]; with polarity 'auto', "
                       "invert (1 - x) when the image's intensity skewness is negative",
            },
        },
        "cell_diameter": checkpoint.model_config.cell_diameter,
        **({"cell_diameter_how": (
            "the model works at this median cell diameter (pixels): resample each normalised image by "
            "cell_diameter / (its median cell diameter), bilinear, predict, resample the probabilities back"
        )} if checkpoint.model_config.cell_diameter else {}),
        "output": {"name": "probability", "dtype": "float32", "shape": ["N", unet.output_channels, "H", "W"],
                   "meaning": "cell probability" + (
                       " (channel 0); channel 1: each cell's distance to its outline as the model predicts it, "
                       "divided by the cell's largest (1 at its centre), whose peaks split touching cells"
                       if checkpoint.model_config.distance_map else "")},
        "threshold": checkpoint.threshold if threshold is None else threshold,
        "architecture": checkpoint.model_config.model_dump(mode="json"),
        "metrics": checkpoint.metrics,
        "cellseg_version": __version__,
    }
    try:
        write_file_atomic(f"{out}.json", (json.dumps(description, indent=1) + "\n").encode())
    except OSError as error:
        raise _write_failure(Path(f"{out}.json"), error) from error
    return description


def _write_failure(path: Path, error: OSError) -> ValueError:
    return ValueError(f"cannot write '{path}': {os_error_reason(error)}")


def _export_onnx(model: ExportableUNet, out: Path, multiple: int) -> None:
    try:
        import onnx  # noqa: F401  (the exporter needs both)
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ValueError(
            f"ONNX export needs the onnx and onnxscript packages ({error.name} is missing): "
            "pip install 'cellseg[export]'"
        ) from error
    side = torch.export.Dim("height", min=multiple + 1), torch.export.Dim("width", min=multiple + 1)
    example = torch.rand(1, 1, 4 * multiple, 3 * multiple)
    with torch.no_grad():
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["image"], output_names=["probability"],
            dynamic_shapes=({0: torch.export.Dim("batch"), 2: side[0], 3: side[1]},),
        )
    assert program is not None  # the dynamo exporter always returns its program
    program.save(str(out))
