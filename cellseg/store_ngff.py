"""The NGFF 0.5 (OME-Zarr) metadata documents of a stored image and of its label images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cellseg.store_layout import MASK_NAME

NGFF_VERSION = "0.5"


def ngff_multiscales(name: str, pixel_size_yx_um: Sequence[float] | None = None, levels: int = 1) -> dict[str, Any]:
    """NGFF 0.5 metadata of a 2-D (y, x) image whose pixels are at "0"; with the physical pixel
    size (y, x) in micrometres, its scale and axis units say so. With `levels`, a pyramid: level k
    at "k", each half the size of the one before (a block-wise image, `cellseg.blocks`)."""
    unit = {"unit": "micrometer"} if pixel_size_yx_um else {}
    scale = [float(size) for size in pixel_size_yx_um] if pixel_size_yx_um else [1.0, 1.0]
    return {
        "version": NGFF_VERSION,
        "multiscales": [{
            "name": name,
            "axes": [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}],
            "datasets": [{"path": str(level), "coordinateTransformations": [
                {"type": "scale", "scale": [side * 2**level for side in scale]}]} for level in range(levels)],
        }],
    }


# The display colours of the mask's two values (NGFF `image-label.colors`, RGBA 0-255, which the
# spec says a label image SHOULD carry): background clear, cells opaque cyan. The cell labels carry
# none: one entry per cell would grow with the image, and viewers colour labels they do not list.
MASK_COLORS = ({"label-value": 0, "rgba": [0, 0, 0, 0]}, {"label-value": 1, "rgba": [0, 255, 255, 255]})


def ngff_label(name: str, source_image: bool, pixel_size_yx_um: Sequence[float] | None = None,
                levels: int = 1) -> dict[str, Any]:
    """NGFF 0.5 metadata of a label image under `<image>/labels/<name>`; its source is the image
    two levels up when the store keeps a copy of it, and the mask names the colours of its values."""
    meta = ngff_multiscales(name, pixel_size_yx_um, levels)
    meta["image-label"] = {"version": NGFF_VERSION, **({"source": {"image": "../../"}} if source_image else {}),
                           **({"colors": [dict(color) for color in MASK_COLORS]} if name == MASK_NAME else {})}
    return meta
