"""The dataset layout: the folder and channel names, and one reading of a dataset root for every place that reads one.

A channel is a folder with images/ and masks/. A dataset root holds train/ (or training/, the name the SageMaker SDK
gives the one channel of a plain `fit("s3://...")`) and, optionally, validation/ (or val/); a root that holds images/
and masks/ is itself the one channel, and the container holds out `val_fraction` of it. `unetseg train --data` lists a
local folder, fit() a local folder or an S3 prefix, the container its channels (the folders under
/opt/ml/input/data): each hands the names to `read_layout`, so that a folder that passes in the notebook is read the
same way in the container, and an ambiguous one is refused everywhere, in the same words.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import DataError

IMAGES, MASKS = "images", "masks"  # a channel's two folders; an image and its mask share a file stem
TRAIN_CHANNEL, VALIDATION_CHANNEL = "train", "validation"  # the channels UNetEstimator sends
INIT_MODEL_CHANNEL = "init_model"  # a channel holding a trained unetseg model.tar.gz to fine-tune from
CHANNELS = (TRAIN_CHANNEL, VALIDATION_CHANNEL, INIT_MODEL_CHANNEL)
TRAIN_FOLDERS = (TRAIN_CHANNEL, "training")
VALIDATION_FOLDERS = (VALIDATION_CHANNEL, "val")


@dataclass(frozen=True)
class Layout:
    train: str  # the sub-folder holding the training channel; "" when the root itself is the channel
    validation: Optional[str] = None  # the sub-folder holding the validation channel, if any


def read_layout(folders: Iterable[str], where: str, files: Sequence[str] = ()) -> Layout:
    """How the root `where` (a folder, an S3 prefix, a job's channels) holds its data, from the names of its
    sub-folders; `files` (the root's files) only go into the message. Raises one DataError naming `where`, the folders
    at fault and what to do, when no reading is clear: using one reading would silently ignore data."""
    names = sorted(set(folders))
    train = [name for name in TRAIN_FOLDERS if name in names]
    validation = [name for name in VALIDATION_FOLDERS if name in names]
    channel = [name for name in (IMAGES, MASKS) if name in names]
    if len(train) > 1:
        raise DataError(f"{where}: both {train[0]}/ and {train[1]}/ are there, and either could be the training data; "
                        "keep one")
    if len(validation) > 1:
        raise DataError(f"{where}: both {validation[0]}/ and {validation[1]}/ are there; keep one, or say which is the "
                        f"validation data (unetseg train --validation <folder>; fit({{'{TRAIN_CHANNEL}': ..., "
                        f"'{VALIDATION_CHANNEL}': ...}}))")
    if train and channel:
        raise DataError(f"{where}: holds both {channel[0]}/ (a channel's files) and {train[0]}/ (a folder of "
                        f"channels), and either could be the training data; move {IMAGES}/ and {MASKS}/ into "
                        f"{train[0]}/, or give {train[0]}/ itself")
    if train:
        return Layout(train[0], validation[0] if validation else None)
    if len(channel) == 2:
        if validation:
            raise DataError(f"{where}: holds {IMAGES}/ and {MASKS}/ (one channel) and {validation[0]}/ beside them; "
                            f"move {IMAGES}/ and {MASKS}/ into {TRAIN_CHANNEL}/ to validate on {validation[0]}/, or "
                            f"move {validation[0]}/ away to hold out val_fraction of the images")
        return Layout("")
    raise DataError(f"{where}: expected {TRAIN_CHANNEL}/ (and {VALIDATION_CHANNEL}/) or {IMAGES}/ + {MASKS}/ in it; "
                    f"found {listing(names, files)}")


def folder_names(folder: Path) -> tuple[list[str], list[str]]:
    """The names of a local folder's sub-folders and of its files, for `read_layout`; hidden ones (.ipynb_checkpoints,
    .DS_Store) left out."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    return [p.name for p in entries if p.is_dir()], [p.name for p in entries if p.is_file()]


def listing(folders: Sequence[str], files: Sequence[str], limit: int = 10) -> str:
    """What a root holds, for a message: its folders (with a /) and files, the first `limit` of them."""
    names = [f + "/" for f in folders] + list(files)
    if not names:
        return "nothing (is the path right?)"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
