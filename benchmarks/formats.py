"""What reading microscopy formats costs (docs/formats.md): bioio's import, and one plane read by
each path, side by side in one process, best of REPEATS.

    python -m benchmarks.formats [--side 2048] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile

from benchmarks.output import first_paragraph

REPEATS = 5


def import_seconds(modules: str) -> float:
    """Seconds to import `modules` in a fresh interpreter, best of 3 (less the bare interpreter's start)."""
    def run(code: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - started

    bare = min(run("pass") for _ in range(3))
    return min(run(f"import {modules}") for _ in range(3)) - bare


def best(read: Callable[[], object]) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        read()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--out", help="folder for the test files (default: a temporary one)")
    args = parser.parse_args()
    import zarr
    from ome_zarr.writer import write_image

    from cellseg.config import SelectionConfig
    from cellseg.formats import open_plane, read_source

    folder = Path(args.out or tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    side = args.side
    data = np.random.default_rng(0).integers(0, 4000, (1, 3, 1, side, side), dtype=np.uint16)
    ome_tiff, plain, ome_zarr = folder / "a.ome.tif", folder / "a.tif", str(folder / "a.ome.zarr")
    tifffile.imwrite(ome_tiff, data, ome=True, tile=(256, 256),
                     metadata={"axes": "TCZYX", "PhysicalSizeX": 0.5, "Channel": {"Name": ["A", "DAPI", "B"]}})
    tifffile.imwrite(plain, data[0, 1, 0])
    write_image(data, zarr.open_group(ome_zarr, mode="w"), axes="tczyx", scale_factors=None)
    dapi = SelectionConfig(channel=1)
    row = {
        "side": side,
        "import_bioio_s": round(import_seconds("bioio"), 2),
        "import_bioio_ome_zarr_s": round(import_seconds("bioio, bioio_ome_zarr"), 2),
        "import_bioio_all_plugins_s": round(import_seconds("bioio, bioio_ome_zarr, bioio_czi, bioio_nd2, bioio_lif"), 2),
        "plain_tiff_read_image_s": round(best(lambda: read_source(str(plain), SelectionConfig())), 3),
        "ome_tiff_tifffile_s": round(best(lambda: read_source(str(ome_tiff), dapi)), 3),
        "ome_zarr_bioio_s": round(best(lambda: read_source(ome_zarr, dapi)), 3),
    }
    try:
        import bioio
        import bioio_ome_tiff

        row["ome_tiff_bioio_ome_tiff_s"] = round(best(lambda: bioio.BioImage(
            str(ome_tiff), reader=bioio_ome_tiff.Reader).get_image_data("YX", C=1, T=0, Z=0)), 3)
    except ImportError:
        row["ome_tiff_bioio_ome_tiff_s"] = None  # not in the formats extra; measured where installed
    with open_plane(str(ome_tiff), dapi) as plane:
        row["ome_tiff_region_256_s"] = round(best(lambda: plane[1024:1280, 1024:1280]), 4)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
