"""A Ground Truth output manifest as fit() input: read and checked in the notebook, sent as three S3Prefix channels.

For a channel `train` given as `s3://b/labels/output.manifest`:
- `train`: the images' deepest common prefix (S3Prefix: File, FastFile and local mode all deliver it);
- `train_masks`: the masks' common prefix, when it is not the images' (Ground Truth writes masks under the labelling
  job's output prefix, usually far from the images: one prefix over both could be a whole bucket);
- `train_manifest`: the pairing file (contract/ground_truth.py), uploaded beside fit()'s other uploads.
Every image and mask is looked up in S3 (one listing per prefix) before the job starts; a missing one names its line.
In local mode a manifest may hold local paths (absolute, file://, or relative to the manifest), bound as file://.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from ..contract.errors import DataError
from ..contract.ground_truth import (
    MANIFEST_SUFFIX,
    MASKS_SUFFIX,
    PAIRING_FILE,
    Manifest,
    common_folder,
    pairing,
    parse_manifest,
)
from .job_rules import JobSettingsError, check_s3_uri, split_s3_uri
from .s3_upload import list_objects


def read_manifest(text: str, s3_client: Callable[[], Any], attribute: Optional[str]) -> Manifest:
    """The manifest at an s3:// URI or a local path, parsed."""
    if text.startswith("s3://"):
        bucket, key = split_s3_uri(text)
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # noqa: BLE001 - botocore's ClientError, or no such bucket
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
            raise DataError(f"{text}: the manifest cannot be read ({code})") from None
    else:
        path = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()
        if not path.is_file():
            raise DataError(f"{text}: no such manifest file")
        body = path.read_bytes()
    try:
        lines = body.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{text}: not UTF-8 text (byte {exc.start}); a manifest is JSON lines") from None
    return parse_manifest(lines, text, attribute)


class ManifestChannels:
    """The channels (name -> TrainingInput or file:// URI) of one manifest."""

    def __init__(self, s3_client: Callable[[], Any], upload_uri: Callable[[], str],
                 training_input: Callable[[str], Any], check_bucket: Callable[[str, str], None], local: bool):
        self.s3_client, self.upload_uri, self.training_input = s3_client, upload_uri, training_input
        self.check_bucket, self.local = check_bucket, local
        self.listed_bytes = 0  # of the prefixes sent: what File mode copies onto the volume
        self._listed: dict[str, list] = {}

    def from_s3(self, channel: str, manifest: Manifest) -> dict[str, Any]:
        images, image_prefix = self._located(manifest, "image", [o.image for o in manifest.objects])
        masks, mask_prefix = self._located(manifest, "mask", [o.mask for o in manifest.objects])
        shared = mask_prefix == image_prefix
        names = (channel, channel if shared else channel + MASKS_SUFFIX)
        content = pairing(manifest, list(zip(images, masks)), names)
        body = json.dumps(content, indent=0).encode()
        target = (f"{self.upload_uri().rstrip('/')}/groundtruth/{channel}-{hashlib.sha256(body).hexdigest()[:16]}/")
        self.check_bucket("output_path (where the manifest's pairing file is uploaded)", target)
        bucket, prefix = split_s3_uri(target)
        self.s3_client().put_object(Bucket=bucket, Key=prefix + PAIRING_FILE, Body=body,
                                    ContentType="application/json")
        channels = {channel: self.training_input(image_prefix), channel + MANIFEST_SUFFIX: self.training_input(target)}
        if not shared:
            channels[names[1]] = self.training_input(mask_prefix)
        return channels

    def _located(self, manifest: Manifest, kind: str, uris: list[str]) -> tuple[list[str], str]:
        """Keys relative to the common prefix, and the prefix; every object looked up in one listing."""
        key_of = "source-ref" if kind == "image" else manifest.attribute
        for obj, uri in zip(manifest.objects, uris):
            if not uri.startswith("s3://"):
                raise DataError(f"{manifest.where} line {obj.line}: {key_of} {uri!r} is not an s3:// URI; a manifest "
                                "in S3 must point at S3 objects")
        buckets = {split_s3_uri(uri)[0] for uri in uris}
        if len(buckets) > 1:
            first = {b: next(o.line for o, u in zip(manifest.objects, uris) if split_s3_uri(u)[0] == b)
                     for b in sorted(buckets)}
            raise DataError(f"{manifest.where}: the {kind}s are in {len(buckets)} buckets ("
                            + ", ".join(f"{b}, line {n}" for b, n in first.items())
                            + "); copy them into one bucket (one channel reads one prefix)")
        prefix = common_folder(uris)
        check_s3_uri(f"the manifest's {kind}s", prefix)
        self.check_bucket(f"the manifest's {kind}s", prefix)
        bucket, key_prefix = split_s3_uri(prefix)
        if prefix not in self._listed:  # images and masks under one prefix: listed (and counted) once
            self._listed[prefix] = list(list_objects(self.s3_client(), bucket, key_prefix))
            self.listed_bytes += sum(obj.size for obj in self._listed[prefix])
        present = {obj.key for obj in self._listed[prefix]}
        missing = [(o.line, u) for o, u in zip(manifest.objects, uris) if split_s3_uri(u)[1] not in present]
        if missing:
            more = f" ({len(missing)} {kind}s in all)" if len(missing) > 1 else ""
            line, uri = missing[0]
            raise DataError(f"{manifest.where} line {line}: {key_of} {uri} does not exist in S3{more}")
        return [uri[len(prefix):] for uri in uris], prefix

    def from_local(self, channel: str, manifest: Manifest, manifest_path: Path) -> dict[str, str]:
        """Local mode: local paths bound as file://, the pairing file in a folder of its own."""
        base = manifest_path.parent
        paths = {}
        for kind in ("image", "mask"):
            found = []
            for obj in manifest.objects:
                text = getattr(obj, kind)
                if text.startswith("s3://"):
                    raise JobSettingsError(f"{manifest.where} line {obj.line}: {text} is in S3, but the manifest is "
                                           "local; give the manifest's s3:// URI")
                path = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()
                path = (base / path if not path.is_absolute() else path).resolve()
                if not path.is_file():
                    raise DataError(f"{manifest.where} line {obj.line}: {kind} {text} does not exist")
                found.append(path)
            paths[kind] = found
        roots = {kind: Path(common_folder([p.as_posix() for p in found])) for kind, found in paths.items()}
        shared = roots["image"] == roots["mask"]
        names = (channel, channel if shared else channel + MASKS_SUFFIX)
        pairs = [(str(i.relative_to(roots["image"])), str(m.relative_to(roots["mask"])))
                 for i, m in zip(paths["image"], paths["mask"])]
        folder = Path(tempfile.mkdtemp(prefix=f"unetseg-{channel}-manifest-"))
        (folder / PAIRING_FILE).write_text(json.dumps(pairing(manifest, pairs, names), indent=0))
        channels = {channel: roots["image"].as_uri(), channel + MANIFEST_SUFFIX: folder.as_uri()}
        if not shared:
            channels[names[1]] = roots["mask"].as_uri()
        return channels


def local_samples(manifest: Manifest, manifest_path: Path) -> list:
    """(image, mask) Samples of a local manifest, for the data check before anything is sent."""
    from ..data.scan import ground_truth_samples

    folder = manifest.write_local_pairing(manifest_path, Path(tempfile.mkdtemp(prefix="unetseg-manifest-")))
    return ground_truth_samples(folder / PAIRING_FILE)
