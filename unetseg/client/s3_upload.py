"""Mirror a local dataset folder to an S3 prefix, read what lies under a prefix, and find where a bucket is.

The prefix is a mirror that unetseg owns (`<output_path>/datasets/<name>/`): files unchanged since the last upload
are skipped (same size and MD5 as the object's ETag), and objects that no longer exist locally are deleted, because a
stale image left under the prefix would become part of the training channel. Uploads run in parallel threads
(a dataset is thousands of small files, and one PUT at a time is slow), with a tqdm bar in a terminal or notebook.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

UPLOAD_THREADS = 8
_MULTIPART_THRESHOLD = 8 * 1024**2  # boto3's default: larger files get a multipart ETag, which is not an MD5


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str


@dataclass(frozen=True)
class UploadReport:
    uploaded: int
    skipped: int
    deleted: int
    total_bytes: int


@dataclass(frozen=True)
class BucketFacts:
    exists: bool
    region: Optional[str]  # None where S3 did not say (a bucket this account may not list)


def bucket_facts(s3_client: Any, bucket: str) -> BucketFacts:
    """Whether `bucket` exists and its region, in one HeadBucket request. S3 names the region in the
    x-amz-bucket-region header also when it answers 301 (another region) or 403 (not ours to list)."""
    from botocore.exceptions import ClientError

    try:
        answer = s3_client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        meta = exc.response.get("ResponseMetadata", {})
        status, code = meta.get("HTTPStatusCode"), exc.response.get("Error", {}).get("Code")
        if status == 404 or code in ("404", "NoSuchBucket", "NotFound"):
            return BucketFacts(False, None)
        if status in (301, 400, 403):
            return BucketFacts(True, meta.get("HTTPHeaders", {}).get("x-amz-bucket-region"))
        raise
    return BucketFacts(True, answer.get("BucketRegion")
                       or answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region"))


def is_object(s3_client: Any, bucket: str, key: str) -> bool:
    """Whether `key` is an object (a file), as opposed to a prefix or nothing; asked by listing, which the caller's
    other requests need permission for anyway."""
    if not key or key.endswith("/"):
        return False
    found = s3_client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("Contents", ())
    return bool(found) and found[0]["Key"] == key


def list_objects(s3_client: Any, bucket: str, prefix: str) -> Iterator[S3Object]:
    paginator = s3_client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", ()):
            yield S3Object(item["Key"], int(item["Size"]), item.get("ETag", "").strip('"'))


def list_children(s3_client: Any, bucket: str, prefix: str) -> tuple[list[str], list[str]]:
    """The sub-folder names and file names directly under `prefix` (which ends with '/'), like `ls`."""
    folders: list[str] = []
    files: list[str] = []
    paginator = s3_client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        folders += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", ())]
        files += [item["Key"][len(prefix):] for item in page.get("Contents", ()) if item["Key"] != prefix]
    return folders, files


def prefix_size(s3_client: Any, bucket: str, prefix: str) -> int:
    return sum(obj.size for obj in list_objects(s3_client, bucket, prefix))


def local_files(folder: Path) -> list[Path]:
    """Every file under `folder` except hidden ones (.DS_Store, ._x, editor swap files), which pairing ignores too."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def sync_folder(s3_client: Any, folder: Path, bucket: str, prefix: str, *,
                subfolders: Optional[Sequence[str]] = None, progress: bool = True) -> UploadReport:
    """Make s3://bucket/prefix a mirror of `folder` (or of only its `subfolders`). `prefix` ends with '/'."""
    folder = Path(folder)
    roots = [folder / name for name in subfolders] if subfolders else [folder]
    wanted = {prefix + path.relative_to(folder).as_posix(): path for root in roots for path in local_files(root)}
    existing = {obj.key: obj for obj in list_objects(s3_client, bucket, prefix)}

    to_upload = [(key, path) for key, path in wanted.items() if not _unchanged(path, existing.get(key))]
    stale = sorted(existing.keys() - wanted.keys())
    upload_bytes = sum(path.stat().st_size for _, path in to_upload)
    logger.info("s3://%s/%s: uploading %d file(s) (%.1f MB), %d unchanged, %d stale to delete",
                bucket, prefix, len(to_upload), upload_bytes / 1e6, len(wanted) - len(to_upload), len(stale))

    if to_upload:
        bar = progress_bar(upload_bytes, f"upload to s3://{bucket}/{prefix}", progress)
        with bar, ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            futures = [pool.submit(s3_client.upload_file, str(path), bucket, key, Callback=bar.update)
                       for key, path in to_upload]
            for future in as_completed(futures):
                future.result()  # the first failed upload raises here
    for start in range(0, len(stale), 1000):  # DeleteObjects takes up to 1000 keys
        batch = stale[start:start + 1000]
        s3_client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
    return UploadReport(len(to_upload), len(wanted) - len(to_upload), len(stale),
                        sum(p.stat().st_size for p in wanted.values()))


def _unchanged(path: Path, remote: Optional[S3Object]) -> bool:
    if remote is None or remote.size != path.stat().st_size or remote.size >= _MULTIPART_THRESHOLD:
        return False
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest() == remote.etag


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress_bar(total: int, description: str, enabled: bool, *, unit: str = "B", delay: float = 0.0) -> Any:
    """A tqdm bar of `total` bytes (unit "B") or items; `delay`: seconds before it shows (a quick task shows none)."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the SageMaker SDK
        return _NoBar()
    # Shown in a terminal or a Jupyter kernel (tqdm.auto draws a widget there when ipywidgets is installed, text
    # otherwise); hidden in CI logs, where a bar redrawn with \r is noise.
    shown = sys.stderr.isatty() or "ipykernel" in sys.modules
    scale = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    return tqdm(total=total, unit=unit, desc=description, disable=not shown, leave=True, delay=delay, **scale)
