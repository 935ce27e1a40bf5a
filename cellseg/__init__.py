"""cellseg: U-Net segmentation of grayscale microscopy images into cell and background.

Where to start from Python (README.md, "Python"):

- `cellseg.model_source.shipped_predictor("nuclei")`, `cellseg.infer.Predictor.from_checkpoint(path)`:
  a model loaded once, as a `Predictor`;
- `cellseg.segment.segment_arrays(predictor, [image])`: (H, W) numpy images to cell labels, the
  image's statistics and the per-cell table (`pandas.DataFrame(result.cells)`);
- `cellseg.jobs.run_training(TrainJob(...), out_dir)`, `cellseg.jobs.run_segmentation(SegmentJob(...))`:
  what `cellseg train` and `cellseg predict` run;
- `cellseg.store.ResultStore.open(url, mode="r")`: the masks, labels, statistics and cell tables
  a segmentation run stored (docs/store.md).

Importing cellseg's modules adds no logging handlers or warnings filters and sets no thread counts;
building a Predictor does what its docstring says.
"""

__version__ = "0.1.0"
