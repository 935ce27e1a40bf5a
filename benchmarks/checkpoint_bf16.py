"""A checkpoint's weights in bf16 and back, for bringing a checkpoint too large for a transfer limit
(a lent GPU machine returns files of under 16 MiB, 64 MiB in all) home at half the size:

    python -m benchmarks.checkpoint_bf16 CHECKPOINT.pt HALF.pt             # on the GPU machine
    python -m benchmarks.checkpoint_bf16 --restore HALF.pt CHECKPOINT.pt   # here: fp32 weights again
    python -m benchmarks.checkpoint_bf16 --restore --keep-bf16 HALF.pt CHECKPOINT.pt

The restored checkpoint holds the bf16-rounded weights (in fp32, or stored as bf16 with
--keep-bf16: the same values in half the bytes; loading widens them), with every other field as it
was and a new digest of its contents; what is measured with it is what ships.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch

from benchmarks.output import first_paragraph
from cellseg.checkpoint import DIGEST_KEY, load_checkpoint_bytes, save_checkpoint


def _with_weights(payload: dict, dtype: torch.dtype) -> dict:
    payload = dict(payload)
    payload.pop(DIGEST_KEY, None)  # the contents change; save_checkpoint writes the new digest
    payload["state_dict"] = {name: weight.to(dtype) if weight.is_floating_point() else weight
                             for name, weight in payload["state_dict"].items()}
    return payload


def halve(source: Path, target: Path) -> None:
    payload = torch.load(source, map_location="cpu", weights_only=True)
    torch.save(_with_weights(payload, torch.bfloat16), target)


def restore(source: Path, target: Path, dtype: torch.dtype = torch.float32) -> None:
    """A cellseg checkpoint again, its weights in `dtype`, checked and written as every one is."""
    if target.exists():
        raise SystemExit(f"'{target}' exists; not overwriting it")
    buffer = io.BytesIO()
    torch.save(_with_weights(torch.load(source, map_location="cpu", weights_only=True), dtype), buffer)
    save_checkpoint(load_checkpoint_bytes(buffer.getvalue(), str(source), file_checked=True), str(target))


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--restore", action="store_true", help="bf16 weights back to an fp32 checkpoint")
    parser.add_argument("--keep-bf16", action="store_true", help="with --restore: weights stored as bf16")
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    if args.restore:
        restore(args.source, args.target, torch.bfloat16 if args.keep_bf16 else torch.float32)
    else:
        halve(args.source, args.target)


if __name__ == "__main__":
    main()
