#!/usr/bin/env bash
# Packs what benchmarks/gpu_session.sh needs beside the checkout on a lent GPU machine, which has
# torch but neither this project's other dependencies nor a network (both folders ignored by git):
#   .whl/      cp312 wheels of pydantic, pydantic-core, pydantic-settings, annotated-types,
#              typing-inspection, python-dotenv, zarr, numcodecs, donfig, google-crc32c, at the
#              versions this checkout's environment runs; .whl/site/: imagecodecs with only its
#              deflate codec (the whole wheel, 26 MB, outgrows the upload; cellseg.png needs no more)
#   .devdata/  dsb2018-train (images as lossless WebP, to fit the upload) and dsb2018
# Usage here: bash benchmarks/gpu_pack.sh, then carry [".whl", ".devdata"] with the device command.
# Environment: PYTHON (default .venv/bin/python), DATA (default ../shared/data).
set -eu
py=${PYTHON:-.venv/bin/python}
data=${DATA:-../shared/data}
rm -rf .whl .devdata
wheels=$("$py" -c '
from importlib.metadata import version
names = ["pydantic", "pydantic-core", "pydantic-settings", "annotated-types", "typing-inspection",
         "python-dotenv", "zarr", "numcodecs", "donfig", "google-crc32c"]
print(" ".join(f"{name}=={version(name)}" for name in names))')
# shellcheck disable=SC2086  # one argument per wheel
"$py" -m pip download -q --no-deps --only-binary=:all: --dest .whl --implementation cp --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 $wheels
codecs=$(mktemp -d)
"$py" -m pip download -q --no-deps --only-binary=:all: --dest "$codecs" --implementation cp --python-version 3.12 \
  --platform manylinux_2_28_x86_64 "imagecodecs==$("$py" -c 'from importlib.metadata import version; print(version("imagecodecs"))')"
(cd "$codecs" && unzip -q ./*.whl)
mkdir -p .whl/site/imagecodecs .whl/site/imagecodecs.libs
cp -r "$codecs"/imagecodecs/{__init__.py,_imagecodecs.py,imagecodecs.py,numcodecs.py,py.typed,licenses} \
  "$codecs"/imagecodecs/{_deflate,_imcd,_shared,_shared_cython}.abi3.so .whl/site/imagecodecs/
cp "$codecs"/imagecodecs.libs/libdeflate-* .whl/site/imagecodecs.libs/
rm -rf "$codecs"
mkdir -p .devdata/dsb2018-train/images
cp -r "$data/dsb2018" .devdata/
cp -r "$data/dsb2018-train/labels" .devdata/dsb2018-train/
"$py" - "$data/dsb2018-train/images" <<'PY'
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image


def webp(path: Path) -> None:
    Image.open(path).save(Path(".devdata/dsb2018-train/images") / (path.stem + ".webp"), lossless=True, method=6)


if __name__ == "__main__":
    with ProcessPoolExecutor() as pool:
        list(pool.map(webp, sorted(Path(sys.argv[1]).glob("*.png"))))
PY
ls .whl
du -sh .whl .devdata
