"""A store's image records: listing its images and reading their cellseg attributes, noting the
images found damaged, and the entries that lost their metadata."""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar, cast

import zarr
from zarr.core.sync import sync

from cellseg.redact import redact_url
from cellseg.store_checks import DONE, RESERVED_IDS, DamagedImage, StoreError, describe, record_problem
from cellseg.store_layout import IMAGE_FOLDERS, METADATA_ERRORS

Item = TypeVar("Item")
Result = TypeVar("Result")

READERS = 16  # image metadata documents read at once when listing a store
READ_AHEAD = 4 * READERS  # records read and not yet taken, at most


def mapped_ahead(pool: ThreadPoolExecutor, function: Callable[[Item], Result], items: Iterable[Item],
                 ahead: int = READ_AHEAD) -> Iterator[Result]:
    """`pool.map(function, items)` with at most `ahead` calls submitted past the result being
    taken: pool.map submits every call at once and holds every result until it is taken, some
    4.5 KB an image of a store read record by record (45 MB at 10,000 images, GBs at millions)."""
    following = iter(items)
    pending: deque[Future[Result]] = deque(pool.submit(function, item) for item in itertools.islice(following, ahead))
    try:
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(following, 1):
                pending.append(pool.submit(function, item))
            yield result
    finally:  # a reader that stops early (`results --limit`, an error) leaves no read queued
        for future in pending:
            future.cancel()


logger = logging.getLogger("cellseg.store")  # the store's one logger, whichever of its modules speaks


def _child_names(group: zarr.Group) -> list[str]:
    """Names of the entries under `group` in the store's listing, without reading their metadata."""
    async def names() -> list[str]:
        return [name async for name in group.store.list_dir(group.path)]

    return sorted(name for name in sync(names()) if name not in RESERVED_IDS)


def _holds_image_arrays(group: zarr.Group, name: str) -> bool:
    """Whether `name` holds what only an image of a results store holds (IMAGE_FOLDERS): a folder
    that lost its zarr.json, not a stray file or someone's other folder (.ipynb_checkpoints, qc/)."""
    async def children() -> list[str]:
        return [child async for child in group.store.list_dir(f"{group.path}/{name}" if group.path else name)]

    return bool(IMAGE_FOLDERS & set(sync(children())))


class StoreRecords:
    """The records of the images in a zarr results store (`cellseg.store.ResultStore`)."""

    def __init__(self, root: zarr.Group, url: str):
        self.root = root
        self.url = url
        self.damaged: dict[str, str] = {}  # image id -> problem, of the images found damaged so far

    def records(self, on_record: Callable[[str], None] | None = None, among: Collection[str] | None = None,
                ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(image id, cellseg attrs) for every image entry (or those of `among`), in id order;
        `on_record(image id)` is called as each image's metadata is read (a progress bar for large stores).

        An image whose metadata cannot be read (or is not a cellseg record) is left out with a
        warning and noted in `damaged`: one broken image never hides the others."""
        for image_id, record, problem in self.entries(on_record, among):
            if problem is not None:
                self.note_damage(image_id, problem)
            elif record is not None:
                yield image_id, record

    def entries(self, on_record: Callable[[str], None] | None = None, among: Collection[str] | None = None,
                ) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
        """(name, cellseg attrs, problem) for every entry under the store, in name order, its
        metadata read by READERS threads at once (`scan`). With `among`, only the entries of those
        names are read: one listing of the store, then a read per image asked about, not per image
        held (on object storage each read is a request, and a store grows by every night's images)."""
        names = _child_names(self.root)
        if among is not None:
            wanted = set(among)
            names = [name for name in names if name in wanted]
        with ThreadPoolExecutor(max_workers=min(READERS, max(1, len(names)))) as pool:
            for name, (record, problem) in zip(names, mapped_ahead(pool, self.scan, names), strict=True):
                if on_record:
                    on_record(name)
                yield name, record, problem

    def scan(self, name: str) -> tuple[dict[str, Any] | None, str | None]:
        """(cellseg attrs, None) of the entry `name`, or (None, what is wrong with it); (None, None)
        for a stray object that is no image."""
        try:
            node = self.root.get(name)
        except METADATA_ERRORS as error:
            return None, f"its metadata '{name}/zarr.json' cannot be read ({describe(error)})"
        if node is None:  # a stray object, or a group another run is creating right now
            return None, None
        if not isinstance(node, zarr.Group):
            return None, f"'{name}' is an array, not an image group"
        record = node.attrs.get("cellseg", {})
        if problem := record_problem(record):
            return None, problem
        return dict(cast("dict[str, Any]", record)), None

    def note_damage(self, image_id: str, problem: str) -> None:
        """Remember and log an image that cannot be used."""
        if self.damaged.get(image_id) != problem:
            # Said as found; each reader says what it does about it (export leaves it out, evaluate gives no score)
            logger.warning("image '%s' in '%s' is damaged: %s", image_id, redact_url(self.url), problem)
        self.damaged[image_id] = problem

    def done_ids(self, on_record: Callable[[str], None] | None = None) -> set[str]:
        """Ids of images whose mask and statistics are completely written."""
        return set(self.done_records(on_record))

    def done_records(self, on_record: Callable[[str], None] | None = None, among: Collection[str] | None = None,
                     ) -> dict[str, dict[str, Any]]:
        """The records of the images (of those of `among`) whose mask and statistics are completely
        written, by id."""
        return {image_id: record for image_id, record in self.records(on_record, among)
                if record.get("status") == DONE}

    def record(self, image_id: str) -> dict[str, Any]:
        """The cellseg attrs of one image; DamagedImage when they cannot be read."""
        try:
            node = self.root[image_id]
        except KeyError as error:
            raise StoreError(f"store '{self.url}' has no image '{image_id}'") from error
        except METADATA_ERRORS as error:
            raise DamagedImage(self.url, image_id, f"its metadata '{image_id}/zarr.json' cannot be read "
                                                   f"({describe(error)})") from error
        record = node.attrs.get("cellseg", {}) if isinstance(node, zarr.Group) else None
        if problem := ("it is an array, not an image group" if record is None else record_problem(record)):
            raise DamagedImage(self.url, image_id, problem)
        return dict(cast("dict[str, Any]", record))

    def is_done(self, image_id: str) -> bool:
        """Whether one image is completely written; reads only that image's metadata."""
        try:
            return self.record(image_id).get("status") == DONE
        except StoreError:
            return False

    def done_among(self, image_ids: Sequence[str]) -> set[str]:
        """Those of `image_ids` completely written, their metadata read by READERS threads at once
        (on object storage each read is a round trip)."""
        if len(image_ids) <= 1:
            return {image_id for image_id in image_ids if self.is_done(image_id)}
        with ThreadPoolExecutor(max_workers=min(READERS, len(image_ids))) as pool:
            return {image_id for image_id, done in zip(image_ids, pool.map(self.is_done, image_ids), strict=True) if done}

    def _done_record(self, image_id: str) -> dict[str, Any]:
        """The record of a done image; StoreError when it is not done, DamagedImage when unreadable."""
        record = self.record(image_id)
        if record.get("status") != DONE:
            raise StoreError(f"image '{image_id}' in '{self.url}' is not completely written")
        return record

    def orphans(self) -> list[str]:
        """Entries under the store that hold an image's arrays but no zarr.json (an image group whose
        metadata was lost). Other folders are left alone: they are no image."""
        def lost(name: str) -> bool:
            try:
                return self.root.get(name) is None and _holds_image_arrays(self.root, name)
            except METADATA_ERRORS:  # unreadable, not lost: `records` reports it
                return False

        return [name for name in _child_names(self.root) if lost(name)]
