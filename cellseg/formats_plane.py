"""The plane that each reader of `cellseg.formats` returns (`Plane`: one 2-D plane of a file, read
region by region), the choice of that plane among a file's time points, channels and z planes,
its pixel size, and a reader's error in one line."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellseg.config import SelectionConfig
from cellseg.io import ImageReadError

MAX_PLANES = 1_000_000  # channels x z x t a file's metadata may declare before it is refused


@dataclass
class Plane:
    """One 2-D (H, W) plane of an image file, read region by region.

    `plane[y0:y1, x0:x1]` returns that region as a numpy array of `dtype`, reading only the
    tiles or chunks it covers (a maximum projection reads them on every z plane).
    `pixel_size_um` is the physical size of a pixel (the geometric mean of y and x when they
    differ; `pixel_size_yx_um` keeps both), None when the file does not say. `selection`
    records what was chosen (format, channel index and name, z, t, the file's sizes).
    """

    shape: tuple[int, int]
    dtype: np.dtype
    pixel_size_um: float | None
    selection: dict[str, Any]
    read_region: Callable[[slice, slice], np.ndarray] = field(repr=False)
    pixel_size_yx_um: tuple[float, float] | None = None
    warnings: list[str] = field(default_factory=list)
    close: Callable[[], None] = field(default=lambda: None, repr=False)
    chunk_bytes: int = 0  # decoded bytes of the largest chunk or tile a read decodes at once; 0: checked elsewhere

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(part, slice) for part in key)):
            raise TypeError(f"a Plane is read by 2-D slices, plane[y0:y1, x0:x1]; got {key!r}")
        rows, columns = (slice(*part.indices(side)) for part, side in zip(key, self.shape, strict=True))
        if rows.step != 1 or columns.step != 1:
            raise ValueError("a Plane is read by contiguous slices (step 1)")
        return np.asarray(self.read_region(rows, columns))

    def read(self) -> np.ndarray:
        """The whole (H, W) plane."""
        return self[:, :]

    def __enter__(self) -> Plane:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass(frozen=True)
class PlaneChoice:
    t: int
    channel: int
    z: int | None  # None: maximum projection
    record: dict[str, Any]


def choose_plane(url: str, sizes: dict[str, int], channel_names: Sequence[str], selection: SelectionConfig,
            time_point: int | None, kind: str) -> PlaneChoice:
    """Resolve `selection` against a file's sizes (T, C, Z) and channel names; ImageReadError
    names the file and its choices when a choice does not fit or is missing."""
    n_t, n_c, n_z = sizes.get("T", 1), sizes.get("C", 1), sizes.get("Z", 1)
    if n_t * n_c * n_z > MAX_PLANES:
        raise ImageReadError(f"'{url}': {n_t} time points x {n_c} channels x {n_z} z planes is more than "
                             f"{MAX_PLANES} planes")
    names = [str(name) for name in channel_names] if len(channel_names) == n_c else [str(i) for i in range(n_c)]
    listed = ", ".join(f"{i} {name!r}" for i, name in enumerate(names[:32])) + (" ..." if n_c > 32 else "")
    channel = selection.channel
    if channel is None:
        if n_c > 1:
            raise ImageReadError(f"'{url}' has {n_c} channels ({listed}): choose one with --channel INDEX or NAME")
        channel = 0
    elif isinstance(channel, str):
        if channel not in names:
            raise ImageReadError(f"'{url}': no channel named {channel!r}; its channels are {listed}")
        channel = names.index(channel)
    elif channel >= n_c:
        raise ImageReadError(f"'{url}': channel {channel} is out of range; its channels are {listed}")
    z = selection.z
    if z is None:
        if n_z > 1:
            raise ImageReadError(f"'{url}' has {n_z} z planes: choose one with --z 0..{n_z - 1} or project with --z max")
        z = 0
    elif z != "max" and z >= n_z:
        raise ImageReadError(f"'{url}': z {z} is out of range; it has {n_z} z plane{'s' * (n_z != 1)} "
                             f"(--z 0..{n_z - 1} or --z max)")
    t = selection.t if time_point is None else time_point
    if t is None or t == "all":
        if n_t > 1 and t is None:
            raise ImageReadError(f"'{url}' has {n_t} time points: choose one with --t 0..{n_t - 1} or every one "
                                 "with --t all")
        if n_t > 1:
            raise ImageReadError(f"'{url}' has {n_t} time points: list it with cellseg.formats.list_sources to "
                                 "address each one")
        t = 0
    elif t >= n_t:
        raise ImageReadError(f"'{url}': time point {t} is out of range; it has {n_t} (--t 0..{n_t - 1} or --t all)")
    record = {"format": kind, "channel": channel, "channel_name": names[channel], "z": z, "t": t,
              "sizes": {"T": n_t, "C": n_c, "Z": n_z}}
    return PlaneChoice(t, channel, None if z == "max" else z, record)


def project_z(read_z: Callable[[int], np.ndarray], choice: PlaneChoice, n_z: int) -> np.ndarray:
    """The chosen z plane, or the maximum over z read one plane at a time (memory: two planes)."""
    if choice.z is not None:
        return read_z(choice.z)
    result = np.array(read_z(0))
    for z in range(1, n_z):
        np.maximum(result, read_z(z), out=result)
    return result


def pixel_sizes(y: float | None, x: float | None) -> tuple[float | None, tuple[float, float] | None, list[str]]:
    """(pixel size, (y, x) sizes, notes) from physical sizes in µm; a missing or unusable size is None."""
    usable = [size for size in (y, x) if size is not None and np.isfinite(size) and 0 < size < 1e6]
    if not usable:
        return None, None, []
    sy, sx = (float(usable[0]), float(usable[0])) if len(usable) == 1 else (float(usable[0]), float(usable[1]))
    notes = [] if abs(sy - sx) <= 0.01 * max(sy, sx) else [
        f"pixels are {sy:g} x {sx:g} µm (y x): areas in µm² use both, cell sizes their geometric mean"]
    return float(np.sqrt(sy * sx)), (sy, sx), notes


def array_plane(image: np.ndarray, url: str, selection: SelectionConfig, time_point: int | None, kind: str) -> Plane:
    """A decoded image as a plane: a 2-D one has one channel, z plane and time point; a colour one
    (H, W, 3: `cellseg.io.decode_colour_image`) its red, green and blue samples as channels 0-2."""
    channels = image.shape[2] if image.ndim == 3 else 1
    choice = choose_plane(url, {"C": channels}, [], selection, time_point, kind)
    if image.ndim == 3:
        return Plane(image.shape[:2], image.dtype, None, choice.record,
                     lambda rows, columns: image[rows, columns, choice.channel])
    return Plane(image.shape, image.dtype, None, choice.record, lambda rows, columns: image[rows, columns])


def one_line(error: BaseException, limit: int = 300) -> str:
    """A reader's error as part of a one-line message: its type and first words (readers' messages
    run over several lines)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
