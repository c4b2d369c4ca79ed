"""SageMaker Ground Truth semantic segmentation output: the manifest read, checked, and handed to the container.

A labelling job's output manifest is JSON lines, one object per line:

    {"source-ref": "s3://b/images/a.jpg",
     "<attribute>-ref": "s3://b/out/annotations/consolidated-annotation/output/0_2024-...png",
     "<attribute>-ref-metadata": {"internal-color-map": {"0": {"class-name": "BACKGROUND", "hex-color": "#ffffff",
                                                              "confidence": 0.9}, "1": {...}},
                                  "type": "groundtruth/semantic-segmentation", "job-name": "labeling-job/x",
                                  "human-annotated": "yes", "creation-date": "..."}}

The mask PNG is coloured by `hex-color`; the class index is the colour map's key. A manifest can carry several label
attributes (chained jobs); `label_attribute` names the one to train on when there is more than one.

The container receives the data as plain S3Prefix channels (File, FastFile and local mode all deliver those): the
images' common prefix as `<channel>`, the masks' as `<channel>_masks`, and a pairing file written by the client
(`PAIRING_FILE`: each image with its mask, relative to those channels, and the colour map) as `<channel>_manifest`.
SageMaker's own manifest channels do not fit: AugmentedManifestFile is Pipe mode only, and local mode reads no
ManifestFile. This module must not import torch.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import DataError

GT_TYPE = "groundtruth/semantic-segmentation"
COLOR_MAP = "internal-color-map"
SOURCE_REF = "source-ref"
MANIFEST_SUFFIXES = (".manifest", ".jsonl")  # a fit() input or --data path ending so is read as a manifest
PAIRING_FILE = "unetseg-groundtruth.json"  # in a channel folder: its samples are these pairs, not images/ + masks/
PAIRING_FORMAT = "unetseg-groundtruth"
MASKS_SUFFIX, MANIFEST_SUFFIX = "_masks", "_manifest"  # the extra channels of a manifest's channel


def is_manifest(path: str) -> bool:
    return path.lower().rstrip("/").endswith(MANIFEST_SUFFIXES)


@dataclass(frozen=True)
class Labelled:
    line: int  # 1-based line of the manifest, for messages
    image: str  # source-ref as written (s3:// URI or path)
    mask: str  # <attribute>-ref as written


@dataclass(frozen=True)
class Manifest:
    where: str
    attribute: str  # the label attribute, ending in -ref
    objects: list[Labelled]
    class_names: list[str]
    class_colors: list[list[int]]
    jobs: list[str]
    skipped: list[int] = field(default_factory=list)  # lines without a mask (failed, or not labelled by this job)

    def summary(self) -> str:
        skipped = (f"; {len(self.skipped)} object(s) without a {self.attribute} (failed or not labelled) skipped, "
                   f"e.g. line {self.skipped[0]}" if self.skipped else "")
        return (f"{self.where}: {len(self.objects)} labelled image(s), attribute {self.attribute!r}, "
                f"{len(self.class_names)} classes ({', '.join(self.class_names)}){skipped}")

    def hyperparameters(self) -> dict:
        """The TrainConfig fields the colour map decides."""
        return {"classes": len(self.class_names), "class_names": self.class_names,
                "class_colors": self.class_colors, "mask_mode": "palette"}

    def configure(self, config):
        """`config` (a TrainConfig) with the fields the colour map decides; one the user set otherwise is refused, not
        overridden: the masks' colours are the classes."""
        fields = type(config).model_fields
        for key, value in self.hyperparameters().items():
            given = getattr(config, key)
            if given != fields[key].default and given != value:
                raise DataError(f"{self.where}: its colour map gives {key}={value}, but the hyperparameters say "
                                f"{key}={given}; leave {key} unset: the manifest decides it")
        return config.replace(**self.hyperparameters())

    def write_local_pairing(self, manifest_path: Path, folder: Path) -> Path:
        """A pairing file in `folder` for a manifest of local paths (absolute, file://, or relative to the manifest)."""
        base = Path(manifest_path).parent

        def local(text: str) -> str:
            return str((base / Path(text[len("file://"):] if text.startswith("file://") else text)).resolve())

        content = pairing(self, [(local(o.image), local(o.mask)) for o in self.objects], ("/", "/"))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PAIRING_FILE).write_text(json.dumps(content))
        return folder


def parse_manifest(lines: Iterable[str], where: str, attribute: Optional[str] = None) -> Manifest:
    """Read a Ground Truth output manifest; one DataError naming the line (and key) for anything unusable."""
    records = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} line {number}: not valid JSON ({exc.msg}, column {exc.colno}); each line of a "
                            "Ground Truth manifest is one JSON object") from None
        if not isinstance(record, dict):
            raise DataError(f"{where} line {number}: a JSON {type(record).__name__}, not an object")
        records.append((number, record))
    if not records:
        raise DataError(f"{where}: the manifest holds no lines")
    chosen = _attribute(records, where, attribute)
    meta_key = chosen + "-metadata"
    objects, skipped, jobs = [], [], []
    first_map: Optional[tuple[int, str, dict]] = None
    for number, record in records:
        meta, mask = record.get(meta_key), record.get(chosen)
        if mask is None:
            if meta is None or (isinstance(meta, dict) and "failure-reason" in meta):
                skipped.append(number)
                continue
            raise DataError(f"{where} line {number}: has {meta_key} but no {chosen!r} key (the mask); a damaged "
                            f"line: fix or remove it")
        if not isinstance(mask, str) or not mask:
            raise DataError(f"{where} line {number}: {chosen!r} is {mask!r}, not the mask's location")
        image = record.get(SOURCE_REF)
        if not isinstance(image, str) or not image:
            raise DataError(f"{where} line {number}: no {SOURCE_REF!r} (the image) beside {chosen!r}")
        if not isinstance(meta, dict) or not isinstance(meta.get(COLOR_MAP), dict):
            raise DataError(f"{where} line {number}: {meta_key} has no {COLOR_MAP!r}; the mask's colours cannot be "
                            "read as classes without it")
        colours = _colour_map(meta[COLOR_MAP], where, number)
        job = str(meta.get("job-name", "(no job-name)"))
        if first_map is None:
            first_map = (number, job, colours)
        elif colours != first_map[2]:
            raise DataError(
                f"{where}: line {first_map[0]} (labelling job {first_map[1]!r}) and line {number} (labelling job "
                f"{job!r}) have different colour maps ({_describe(first_map[2])} against {_describe(colours)}); "
                "train on one label set: split the manifest by job, or relabel with one set of classes")
        if job not in jobs:
            jobs.append(job)
        objects.append(Labelled(number, image, mask))
    if first_map is None:
        raise DataError(f"{where}: no line has a mask ({chosen!r}); {len(skipped)} object(s) failed or were not "
                        "labelled")
    names = [first_map[2][i][0] for i in range(len(first_map[2]))]
    colours = [list(first_map[2][i][1]) for i in range(len(first_map[2]))]
    return Manifest(where, chosen, objects, names, colours, jobs, skipped)


def _attribute(records: list[tuple[int, dict]], where: str, wanted: Optional[str]) -> str:
    """The label attribute (ending in -ref) to train on: the one the manifest has, or the one named."""
    found: dict[str, int] = {}
    for number, record in records:
        for key, value in record.items():
            if key.endswith("-ref-metadata") and isinstance(value, dict) and (
                    value.get("type") == GT_TYPE or COLOR_MAP in value):
                found.setdefault(key[: -len("-metadata")], number)
    if wanted:
        name = wanted if wanted.endswith("-ref") else wanted + "-ref"
        if name not in found:
            raise DataError(f"{where}: label_attribute={wanted!r}, but no line has {name}-metadata; semantic "
                            f"segmentation attributes found: {', '.join(sorted(found)) or 'none'}")
        return name
    if not found:
        raise DataError(f"{where}: no Ground Truth semantic segmentation labels: expected '<attribute>-ref' and "
                        f"'<attribute>-ref-metadata' (type {GT_TYPE}) on its lines")
    if len(found) > 1:
        names = ", ".join(f"{name} (first on line {line})" for name, line in sorted(found.items()))
        raise DataError(f"{where}: several label attributes: {names}; say which to train on with the hyperparameter "
                        "label_attribute")
    return next(iter(found))


def _colour_map(value: dict, where: str, line: int) -> dict[int, tuple[str, tuple[int, int, int]]]:
    """{class index: (name, (r, g, b))}, with indices 0..K-1 and distinct colours, or a DataError naming the line."""
    out = {}
    for key, entry in value.items():
        try:
            index = int(key)
            name, hexcode = entry["class-name"], entry["hex-color"]
            text = hexcode.lstrip("#")
            if len(text) != 6:
                raise ValueError(hexcode)
            rgb = (int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))
        except (ValueError, TypeError, KeyError, AttributeError):
            raise DataError(f"{where} line {line}: {COLOR_MAP} entry {key!r}: {entry!r} is not "
                            "{'class-name': ..., 'hex-color': '#rrggbb'} under a class index") from None
        out[index] = (str(name), rgb)
    if sorted(out) != list(range(len(out))) or len(out) < 2:
        raise DataError(f"{where} line {line}: {COLOR_MAP} has class indices {sorted(out)}; expected 0..K-1 with "
                        "K >= 2 (BACKGROUND and at least one label)")
    if len({rgb for _, rgb in out.values()}) != len(out):
        raise DataError(f"{where} line {line}: {COLOR_MAP} gives two classes one colour; their pixels cannot be told "
                        "apart")
    return out


def _describe(colours: dict) -> str:
    return ", ".join(f"{i}: {name} #{r:02x}{g:02x}{b:02x}" for i, (name, (r, g, b)) in sorted(colours.items()))


# --- the pairing file: what the container reads -------------------------------------------------------------------

def pairing(manifest: Manifest, pairs: list[tuple[str, str]], roots: tuple[str, str]) -> dict:
    """The pairing file's content: each (image, mask) relative to `roots` (the image and mask channels' names, or
    folders), with the line it came from, and the colour map."""
    return {
        "format": PAIRING_FORMAT, "version": 1, "manifest": manifest.where, "attribute": manifest.attribute,
        "jobs": manifest.jobs, "skipped": len(manifest.skipped),
        "class_names": manifest.class_names, "class_colors": manifest.class_colors, "roots": list(roots),
        "samples": [{"line": obj.line, "image": image, "mask": mask}
                    for obj, (image, mask) in zip(manifest.objects, pairs)],
    }


def read_pairing(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable pairing file ({exc})") from None
    if not isinstance(content, dict) or content.get("format") != PAIRING_FORMAT:
        raise DataError(f"{path}: not a unetseg Ground Truth pairing file")
    return content


def common_folder(locations: list[str]) -> str:
    """The deepest folder ('/'-separated, ending in '/') holding every location."""
    folders = [loc.rsplit("/", 1)[0] + "/" for loc in locations]
    common = posixpath.commonprefix(folders)
    return common[: common.rfind("/") + 1]


def check_pairing_config(content: dict, config) -> None:
    """The class map that reached the container is the one the hyperparameters decode masks with: a job started
    other than through fit() (a hand-made request, a changed hyperparameter) must not read colours as other classes."""
    expected = {"class_names": content["class_names"], "class_colors": content["class_colors"]}
    actual = {"class_names": config.resolved_class_names, "class_colors": config.class_colors}
    for key, value in expected.items():
        if actual[key] != value:
            raise DataError(f"{content.get('manifest')}: its colour map gives {key}={value}, but the hyperparameters "
                            f"say {actual[key]}; leave {key} unset (fit() sets it from the manifest) or match it")
    if config.mask_mode not in ("palette", "auto"):
        raise DataError(f"{content.get('manifest')}: Ground Truth masks are colour masks; mask_mode={config.mask_mode} "
                        "would not read them (leave it auto, or palette)")
