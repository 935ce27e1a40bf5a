"""Pydantic configuration: one validated object per concern, defaults that work."""

from __future__ import annotations

import math
import os
import re
from typing import Annotated, Any, Literal, get_args

from fsspec.core import split_protocol
from fsspec.registry import known_implementations
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cellseg.io import DEFAULT_MAX_PIXELS
from cellseg.redact import credentials_in_bucket_url


def _check_url(url: str) -> str:
    """A local path or an fsspec URL with a known protocol (s3://, gs://, file://, memory://...)."""
    if not url or not url.strip():
        raise ValueError("must not be empty")
    protocol, _ = split_protocol(url)
    if protocol is not None and protocol not in known_implementations:
        raise ValueError(f"unknown storage protocol '{protocol}://' in '{url}'")
    if protocol is not None and not url.split("://", 1)[1].strip("/"):
        raise ValueError(f"'{url}' names no bucket or path")
    if problem := credentials_in_bucket_url(url):
        raise ValueError(problem)
    return url


def _path_as_text(value: Any) -> Any:
    """A pathlib path (a notebook's usual way to name a folder) as the string of a local path."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


Url = Annotated[str, BeforeValidator(_path_as_text), AfterValidator(_check_url)]
def _check_device(device: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", device):
        raise ValueError(f"{device!r} is no device cellseg runs on: give 'auto' (CUDA when present), 'cpu', 'cuda' "
                         "or 'cuda:N'")
    return device


Device = Annotated[str, AfterValidator(_check_device),
                   Field(description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'")]


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)  # inf passed gt=0 checks


class NormalizationConfig(_Config):
    """Per-image percentile intensity normalisation to [0, 1]."""

    low_percentile: float = Field(1.0, ge=0.0, lt=100.0)
    high_percentile: float = Field(99.8, gt=0.0, le=100.0)
    polarity: Literal["auto", "keep"] = Field(
        "auto",
        description=(
            "'auto' inverts images whose intensity histogram is skewed towards bright (a long dark "
            "tail, as with dark nuclei on brightfield) so that objects are bright; 'keep' never inverts"
        ),
    )

    @model_validator(mode="after")
    def _ordered(self) -> NormalizationConfig:
        if self.low_percentile >= self.high_percentile:
            raise ValueError(
                f"low_percentile ({self.low_percentile}) must be below "
                f"high_percentile ({self.high_percentile})"
            )
        return self


MAX_WIDTH = 2048  # channels of a U-Net's widest (bottleneck) layer
MAX_IO_CHANNELS = 16  # input and output channels


class ModelConfig(_Config):
    """U-Net shape and the input normalisation its weights expect.

    InstanceNorm normalises each image's feature maps by their own statistics: it behaves the same
    in training and inference at batch size 1 and learns faster here than GroupNorm, whereas
    BatchNorm's running statistics over mixed modalities swing from epoch to epoch.
    """

    # Every size a checkpoint's config gives is bounded, so that a hostile or corrupt one cannot
    # make the network allocate without limit (MAX_WIDTH keeps it under ~125 million parameters).
    in_channels: int = Field(1, ge=1, le=MAX_IO_CHANNELS)
    out_channels: int = Field(1, ge=1, le=MAX_IO_CHANNELS)
    depth: int = Field(4, ge=1, le=7, description="number of 2x down-sampling steps")
    base_width: int = Field(16, ge=1, le=MAX_WIDTH // 2,
                            description=f"channels of the first encoder block; base_width * 2**depth at most {MAX_WIDTH}")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    norm: Literal["group", "batch", "instance", "none"] = "instance"
    cell_diameter: Annotated[float, Field(gt=0.0)] | Literal["auto"] | None = Field(
        None,
        description=(
            "median cell diameter (pixels) the model works at: training images are resampled so that their "
            "cells have it, and so is every image to segment (see cellseg.scale); None: images at their own "
            "scale; 'auto': decided by training, the training images' median cell when their cell sizes "
            "differ (cellseg.scale.collection_cell_diameter), else None"
        ),
    )
    distance_map: bool = Field(
        False,
        description=(
            "a second output trained on each cell's normalised distance to its outline (1 at its centre; needs "
            "instance label masks): touching cells are split at its peaks instead of at necks of the mask"
        ),
    )
    normalization: NormalizationConfig = Field(
        NormalizationConfig(), description="input normalisation the weights expect"
    )

    @model_validator(mode="after")
    def _bounded_width(self) -> ModelConfig:
        widest = self.base_width * 2**self.depth
        if widest > MAX_WIDTH:
            raise ValueError(f"base_width {self.base_width} at depth {self.depth} gives {widest} channels in the "
                             f"bottleneck; at most {MAX_WIDTH} are supported")
        return self

    def automatic_fields(self) -> list[str]:
        """The fields left to 'auto', which training decides from its data."""
        return [name for name in AUTOMATIC_MODEL_FIELDS if getattr(self, name) == "auto"]

    def without_auto(self) -> ModelConfig:
        """This config with each 'auto' field off (no cell size): what 'auto' means where no
        training data decides it, as when a network or a checkpoint is built from the config alone."""
        return self.model_copy(update={name: AUTOMATIC_MODEL_FIELDS[name] for name in self.automatic_fields()})


AUTOMATIC_MODEL_FIELDS = {"cell_diameter": None}  # and their values when off


class AugmentationConfig(_Config):
    """Random changes to training crops (`TrainConfig.augment` switches them all off). The
    default is flips and 90-degree rotations; `strong()` adds warps and intensity changes."""

    flips: bool = Field(True, description="random flips and 90-degree rotations")
    affine_probability: float = Field(0.0, ge=0.0, le=1.0, description="chance of a small rotation + scaling")
    rotation_degrees: float = Field(30.0, ge=0.0, le=180.0)
    max_scale: float = Field(1.15, ge=1.0, le=2.0, description="scale drawn log-uniformly in [1/max, max]")
    elastic_probability: float = Field(0.0, ge=0.0, le=1.0, description="chance of an elastic deformation")
    elastic_grid: int = Field(64, ge=8, description="spacing (pixels) of the random displacement grid")
    elastic_std: float = Field(4.0, ge=0.0, description="standard deviation (pixels) of the grid displacements")
    intensity_probability: float = Field(0.0, ge=0.0, le=1.0, description="chance of contrast/brightness/gamma/noise")
    contrast: float = Field(0.2, ge=0.0, lt=1.0, description="intensity scale drawn from [1-c, 1+c]")
    brightness: float = Field(0.1, ge=0.0, le=1.0, description="offset drawn from [-b, b]")
    max_gamma: float = Field(1.4, ge=1.0, le=3.0, description="gamma drawn log-uniformly in [1/max, max]")
    noise_std: float = Field(0.03, ge=0.0, le=0.5, description="Gaussian noise std drawn from [0, this]")
    dim_cells_probability: float = Field(
        0.0, ge=0.0, le=1.0,
        description="chance that a crop has about half its cells dimmed towards the background (instance labels only)")
    min_cell_contrast: float = Field(0.2, gt=0.0, le=1.0,
                                     description="a dimmed cell keeps a share of its contrast drawn log-uniformly in [this, 1]")

    @classmethod
    def flips_only(cls) -> AugmentationConfig:
        """The default: symmetries of the square and nothing else."""
        return cls(affine_probability=0.0, elastic_probability=0.0, intensity_probability=0.0)

    @classmethod
    def strong(cls) -> AugmentationConfig:
        """Flips plus, each with probability 0.5, an affine warp, an elastic deformation and an
        intensity change. It did not beat flips alone on the reference datasets (docs/quality.md),
        so it is opt-in: for small or homogeneous datasets."""
        return cls(affine_probability=0.5, elastic_probability=0.5, intensity_probability=0.5)


FINE_TUNE_MINUTES = 15.0  # the 'auto' training budget when fine-tuning
SCRATCH_MINUTES = 25.0  # and from scratch


CompileMode = Literal["off", "default", "reduce-overhead"]  # how training steps run: `TrainConfig.compile`
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


class TrainConfig(_Config):
    """Optimisation, early stopping and data sampling for training."""

    epochs: int = Field(60, ge=1)
    batch_size: int = Field(1, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_patience: int | None = Field(
        4, ge=1, description="halve the learning rate after this many epochs without improvement; None to keep it fixed"
    )
    patch_size: int = Field(256, ge=16, description="square training crop; smaller images are padded")
    patches_per_image: int = Field(4, ge=1, description="random crops drawn from each image per epoch")
    patch_sampling: Literal["per_image", "by_area"] = Field(
        "per_image",
        description=(
            "'per_image': `patches_per_image` crops from every image; 'by_area': `patches_per_image` times the "
            "square root of the image's area in patches (at least 1, at most 4 times `patches_per_image`), so "
            "that neither large images (many cells, few crops each) nor small ones (mostly padding) dominate"
        ),
    )
    balance_appearance: float = Field(
        0.0, ge=0.0, le=0.5,
        description=(
            "the least share of an epoch's crops drawn from each kind of image in the training set: fluorescence, "
            "brightfield or stained tissue (cellseg.appearance; capped at an equal share), by repeating the crops "
            "of the rarer kinds; 0 keeps the collection's own mix"
        ),
    )
    loss: Literal["bce", "bce_dice"] = Field("bce", description="BCEWithLogits, or BCEWithLogits + soft Dice")
    border_weight: float = Field(
        0.0, ge=0.0, le=100.0,
        description="U-Net paper border weight w0: background between nearby cells weighs up to 1 + w0 in the loss (paper: 10); 0 off",
    )
    border_sigma: float = Field(5.0, gt=0.0, le=50.0, description="pixels over which the border weight decays (paper: 5)")
    init_from: Annotated[str, Field(min_length=1)] | None = Field(  # '' would start from scratch, said to fine-tune
        "auto",
        description=(
            "where training starts: 'auto' fine-tunes the default shipped model when the dataset has fewer than "
            "FINE_TUNE_MAX_IMAGES images, no other architecture is asked for and that model already reaches a "
            "Dice of FINE_TUNE_MIN_DICE on the validation images (cellseg.starting_point), else starts from "
            "scratch; a shipped model's name ('nuclei', 'general', 'bundled') or a checkpoint URL fine-tunes that "
            "(its model config is used); None: random initialisation (from scratch)"
        ),
    )
    freeze_encoder_epochs: int = Field(0, ge=0, description="with init_from: keep the encoder fixed for this many epochs")
    augment: bool = Field(True, description="augment training crops as `augmentation` says; False: none at all")
    augmentation: AugmentationConfig = AugmentationConfig()
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = 0
    patience: int = Field(15, ge=1, description="epochs without improvement before stopping")
    min_delta: float = Field(1e-3, ge=0.0, description="smallest gain that early stopping and the learning rate's "
                              "halving count as an improvement (best.pt takes any gain)")
    monitor: Literal["val_dice", "val_iou", "val_loss"] = Field(
        "val_dice", description="what best.pt, early stopping and the learning-rate halving watch; val_loss is the "
        "cell channel's plain BCE on the validation images, whatever the training objective adds")
    max_minutes: Annotated[float, Field(gt=0.0)] | Literal["auto"] | None = Field(
        "auto",
        description=(
            "wall-clock budget in minutes; 'auto': 15 when fine-tuning (a checkpoint or shipped model to start "
            "from), 25 from scratch; None (or 0) for no limit"
        ),
    )
    device: Device = "auto"
    amp: bool = Field(True, description="bf16/fp16 mixed precision on CUDA and on CPUs with native bf16")
    loader_workers: int | None = Field(
        None, ge=0, description="processes that crop and augment the training images; None: 0 on CPU (the cores "
                                "train the model), on CUDA enough to keep the GPU fed (cellseg.train.loader_workers)"
    )
    compile: CompileMode = Field(
        "off", description="torch.compile the training steps (validation stays eager): 'default' fuses their "
                           "kernels, 'reduce-overhead' also replays them as CUDA graphs (CUDA); the first steps pay "
                           "the compilation. `python -m benchmarks.training_step` measures each on a device"
    )
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="probability threshold for metrics")

    @field_validator("max_minutes", mode="before")
    @classmethod
    def _zero_is_no_limit(cls, minutes: Any) -> Any:
        # As --max-minutes 0 means, in a settings file and a CELLSEG_* variable ("0") too.
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float, str)):
            return minutes
        try:
            return None if float(minutes) == 0 else minutes
        except ValueError:  # 'auto', or a word the field refuses naming itself
            return minutes

    def time_budget(self, fine_tuning: bool) -> float | None:
        """The wall-clock budget in minutes ('auto' decided), None for none."""
        if self.max_minutes == "auto":
            return FINE_TUNE_MINUTES if fine_tuning else SCRATCH_MINUTES
        return self.max_minutes


def default_tile_overlap(tile_size: int) -> int:
    """The tile overlap when none is set: 128 pixels, or half the tile for tiles under 256."""
    return min(128, tile_size // 2)


class SelectionConfig(_Config):
    """Which 2-D plane of a multi-dimensional microscopy file is segmented (cellseg.formats).

    Unset, a dimension must have a single plane: a file with several channels, z planes or time
    points and no choice for them is refused with one line naming the file and its choices, so a
    nuclear stain is never guessed. PNG/JPEG and single-plane files have one plane of each.
    `recursive` says which files are listed, not how one is read."""

    channel: Annotated[int, Field(ge=0)] | Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        None, description="channel index (0 = first) or name as the file's metadata gives it (e.g. 'DAPI'); "
                          "None: the only channel",
    )
    z: Annotated[int, Field(ge=0)] | Literal["max"] | None = Field(
        None, description="z plane index, or 'max' for the maximum-intensity projection over z; None: the only plane"
    )
    t: Annotated[int, Field(ge=0)] | Literal["all"] | None = Field(
        None, description="time point index, or 'all': each time point is an image of its own (id <name>_t003); "
                          "None: the only time point",
    )
    recursive: bool = Field(
        False, description="also list the images in subfolders of the source folder, to 16 levels; an image in a "
                           "subfolder has their path in its id (2026-12-05/A01.tif: 2026-12-05_A01); not a result "
                           "setting",
    )

    @field_validator("channel", mode="before")
    @classmethod
    def _index_as_int(cls, value: Any) -> Any:
        """A channel given as digits (a command line's '--channel 1') is an index."""
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value


BLOCK_CHUNK_SIDE = 1024  # the store's chunk side (cellseg.store.CHUNK_SIDE): block cores are whole chunks


class BlockConfig(_Config):
    """Images bigger than memory: segmented block by block and stitched (cellseg.blocks)."""

    above_pixels: int = Field(
        8192 * 8192, ge=1,
        description="images with more pixels than this are segmented block by block when their format is read region "
                    "by region (TIFF, OME-TIFF, OME-Zarr, CZI/ND2/LIF); smaller ones, and PNG/JPEG, whole",
    )
    block_size: int = Field(
        2048, ge=128, le=16384,
        description=f"side (pixels) of each block's core, 128 to 16384; from {BLOCK_CHUNK_SIDE} up a multiple of {BLOCK_CHUNK_SIDE} "
                    "(the store's chunk side), so that a block writes whole chunks; memory per worker grows with its square; "
                    "a block no larger than tile_size is predicted in one pass of its window (block_size + 2 x overlap)",
    )
    overlap: int = Field(
        64, ge=16,
        description="pixels each block reads beyond its core on every side, for context and to see whole the cells "
                    "that cross its edges: at least the largest cell's diameter plus 32; at most half the block",
    )
    empty_level: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="a block whose core has no pixel above this normalised intensity (0: the image's low percentile, "
                    "1: its high one) is skipped as empty, without a pass of the model; 0 never skips",
    )
    max_pixels: int = Field(
        1 << 34, ge=1,
        description="block-wise images with more pixels are refused before any work (about 131k x 131k): the bound "
                    "on the block plan and the stitching tables, which grow with the image, not the block",
    )

    @model_validator(mode="after")
    def _whole_chunks(self) -> BlockConfig:
        if self.block_size > BLOCK_CHUNK_SIDE and self.block_size % BLOCK_CHUNK_SIDE:
            raise ValueError(f"block_size ({self.block_size}) must be a multiple of {BLOCK_CHUNK_SIDE} (the store's chunk "
                             f"side) when above it, e.g. {self.block_size // BLOCK_CHUNK_SIDE * BLOCK_CHUNK_SIDE}")
        if self.overlap > self.block_size // 2:
            raise ValueError(f"overlap ({self.overlap}) must be at most half of block_size ({self.block_size})")
        return self


DEFAULT_CENTRE_PROMINENCE = 0.1  # PredictConfig.centre_prominence of a model that has not decided its own


class PredictConfig(_Config):
    """Inference: thresholding, batching, precision, tiling and the statistics it feeds."""

    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] | None = Field(
        None, description="probability threshold for a cell pixel; None: as the model decided at training time "
                          "from its validation images (0.5 for models trained before)"
    )
    batch_size: int | None = Field(
        None, ge=1, description="images per forward pass; None: 1 on CPU (fastest there), 8 on CUDA"
    )
    device: Device = "auto"
    amp: bool = Field(True, description="bf16 mixed precision on CUDA and on CPUs with native bf16; False for plain fp32")
    compile: bool | None = Field(
        None, description="torch.compile the model, one compilation per image size: True; None (cellseg's choice) "
                          "and False: never. On CPU the eager pass with its fused norms was faster than the "
                          "compiled one (docs/performance.md)"
    )
    tta: bool = Field(False, description="test-time augmentation: average over 8 flips/rotations (8x the compute)")
    tile_size: int = Field(1024, ge=64, description="images larger than this on a side are predicted in overlapping tiles of at most this "
                                                     "side, fitted to the image (a 2048-pixel side: three of 768); a block "
                                                     "(blocks.block_size) no larger is predicted in one pass with its overlap")
    tile_overlap: int = Field(
        None, ge=0, validate_default=True,  # None becomes the derived default: _derive_tile_overlap
        description="pixels shared by neighbouring tiles, blended linearly; unset: 128, or half the tile for tiles "
                    "under 256 px; at most three quarters of tile_size, so that tiles advance by a quarter tile or more",
    )
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads of each model pass; None: the shards that segment-images and "
                                "cellseg predict run side by side split the cores between those running (a shard "
                                "left running alone takes them all), "
                                "a large image's blocks take an equal share each, and elsewhere torch chooses")
    keep_freed_memory: bool = Field(
        True, description="on CPU with glibc, keep memory the forward pass frees for the next pass instead of "
                          "returning it to the OS, which then faults it back in page by page (process-wide, "
                          "cellseg.allocator); False leaves malloc as it is")
    postprocess_workers: int | None = Field(
        None, ge=0, le=64,
        description="worker processes that label and measure finished images while the model runs on (as many "
                    "threads write them); 0: one writer thread does it all; None: 0 on CPU (the cores run the "
                    "model), on CUDA one per spare core up to 8 (cellseg.infer.Predictor)",
    )
    min_cell_area: int = Field(10, ge=0, description="cells smaller than this (pixels) are dropped")
    cell_diameter: float | None = Field(
        None, gt=0.0,
        description=(
            "median diameter (pixels) of the cells in the images to segment, for models trained at a cell size "
            "(model cell_diameter); None: measured on each image by a first pass of the model"
        ),
    )
    cell_diameter_um: float | None = Field(
        None, gt=0.0, le=10_000.0,
        description=(
            "cell_diameter in micrometres, converted for each image with the pixel size its metadata gives "
            "(cellseg.formats); an image without a pixel size fails with that said. Not with cell_diameter"
        ),
    )
    split_touching: bool | None = Field(
        None,
        description=(
            "separate touching cells (at the distance map's peaks, else distance transform + watershed); "
            "None: as the model decided at training time from its validation images (recorded in its checkpoint)"
        ),
    )
    centre_prominence: float | None = Field(
        None, gt=0.0, lt=1.0,
        description=(
            "models with a distance map: how far a cell's centre must rise above the saddle to its neighbour "
            "(on the 0-1 distance map) to seed a cell of its own; None: as the model decided at training time "
            "from its validation images (recorded in its checkpoint; 0.1 for a model without that decision)"
        ),
    )
    split_depth: float = Field(
        0.5, gt=0.0, description="how much narrower (pixels of distance) a neck must be than both cells to split them"
    )
    measure_cells: bool = Field(
        True, description="store the per-cell measurement table (shape, position, intensity of every cell)"
    )
    store_image: bool = Field(
        True, description="keep a copy of each source image in the store, so that `<store>/<id>` opens as an "
                          "OME-Zarr image with its label layers (napari); off: labels only, smaller stores"
    )
    save_probabilities: bool = False
    selection: SelectionConfig = Field(
        SelectionConfig(), description="the channel, z plane and time point read from multi-dimensional files"
    )
    blocks: BlockConfig = Field(
        BlockConfig(), description="images bigger than memory: when they go block by block, the blocks and their overlap"
    )
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1,
        description="images with more pixels, or whose samples decode to more than max_pixels x 8 bytes, are refused "
                    "before decoding, and files too large for that before they are read (decompression-bomb guard)",
    )

    @field_validator("tile_overlap", mode="before")
    @classmethod
    def _derive_tile_overlap(cls, value: Any, info: ValidationInfo) -> Any:
        """An unset overlap follows the tile size (tile_size is validated first, being declared first)."""
        return default_tile_overlap(info.data.get("tile_size", 1024)) if value is None else value

    @model_validator(mode="after")
    def _overlap_below_tile(self) -> PredictConfig:
        if self.tile_overlap > self.tile_size * 3 // 4:
            raise ValueError(
                f"tile_overlap ({self.tile_overlap}) must be at most three quarters of tile_size ({self.tile_size}), "
                f"{self.tile_size * 3 // 4} or less, so that tiles advance by a quarter tile or more (unset, it is "
                f"{default_tile_overlap(self.tile_size)})"
            )
        return self

    @model_validator(mode="after")
    def _one_cell_size(self) -> PredictConfig:
        if self.cell_diameter is not None and self.cell_diameter_um is not None:
            raise ValueError(f"cell_diameter ({self.cell_diameter} px) and cell_diameter_um ({self.cell_diameter_um} µm) "
                             "are both set; give one")
        return self

    def result_settings(self) -> dict[str, Any]:
        """The settings that decide a result, as JSON: all but those of speed and placement
        (`RESULT_NEUTRAL`). Two runs whose result settings and model agree write the same masks."""
        return self.model_dump(mode="json", exclude=RESULT_NEUTRAL)


# Settings that change how fast and where an image is segmented, and which path reads it, not its result.
RESULT_NEUTRAL: dict[str, Any] = {"threads": True, "batch_size": True, "compile": True, "device": True, "max_pixels": True,
                                  "blocks": {"above_pixels", "max_pixels"}, "selection": {"recursive"}}


class SearchSpace(_Config):
    """Values a hyper-parameter search tries; trials are points of the grid they span."""

    learning_rate: list[Annotated[float, Field(gt=0.0)]] = Field([3e-4, 1e-3, 3e-3], min_length=1)
    base_width: list[Annotated[int, Field(ge=1, le=MAX_WIDTH // 2)]] = Field([16, 32], min_length=1)
    depth: list[Annotated[int, Field(ge=1, le=7)]] = Field([3, 4, 5], min_length=1)
    dropout: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field([0.0, 0.1, 0.3], min_length=1)
    loss: list[Literal["bce", "bce_dice"]] = Field(["bce", "bce_dice"], min_length=1)
    augmentation: list[Literal["flips", "strong"]] = Field(
        ["flips", "strong"], min_length=1, description="'flips': flips and rotations; 'strong': plus warps and intensity"
    )
    border_weight: list[Annotated[float, Field(ge=0.0, le=100.0)]] = Field([0.0], min_length=1)

    @field_validator("*", mode="after")
    @classmethod
    def _distinct(cls, values: list[Any]) -> list[Any]:
        # `--lr 1e-3 0.001` is one value: a repeat would be a grid point trained twice.
        return list(dict.fromkeys(values))

    def size(self) -> int:
        """Number of points in the grid."""
        return math.prod(len(getattr(self, name)) for name in type(self).model_fields)
