"""One reading of a dataset root for the CLI, fit() and the container.

`unetseg train --data`, fit() of a local folder, fit() of an S3 prefix and the container's channels each decide which
sub-folder is the training data and which the validation data. They must decide alike: a folder that one of them
trains on and another refuses, or reads differently, is a job that passes in the notebook and fails (or trains on
something else) in the container. Every layout below goes through all four, which must agree with each other and with
the expected reading, or all refuse it naming the same folders.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import BUCKET, IMAGE, ROLE
from support import make_channel
from unetseg.client.estimator import UNetEstimator
from unetseg.contract.errors import UnetsegError

# sub-folders of the root -> (training folder, validation folder; "" is the root itself), or what a refusal names
LAYOUTS = {
    "train and validation": (["train", "validation"], ("train", "validation")),
    "train and val": (["train", "val"], ("train", "val")),
    "train alone": (["train"], ("train", None)),
    "the root is one channel": (["images", "masks"], ("", None)),
    "training, the SDK's channel name": (["training", "validation"], ("training", "validation")),
    "a channel and a folder of channels": (["images", "masks", "train"], ["images/", "train/"]),
    "a channel with validation beside it": (["images", "masks", "validation"], ["images/", "validation/"]),
    "two training folders": (["train", "training"], ["train/", "training/"]),
    "two validation folders": (["train", "validation", "val"], ["validation/", "val/"]),
    "no dataset": (["photos"], ["expected train/", "found photos/"]),
    "images without masks": (["images"], ["expected train/", "found images/"]),
}
Outcome = tuple  # ("reads", train, validation) or ("refuses", message)


def local_root(tmp_path: Path, folders: list[str]) -> Path:
    root = tmp_path / "ds"
    for name in folders:
        if name in ("images", "masks"):
            make_channel(root, count=4, size=16)
        elif name == "photos":
            (root / name).mkdir(parents=True)
        else:
            make_channel(root / name, count=4, size=16)
    if "masks" not in folders and "images" in folders:
        for path in (root / "masks").iterdir():
            path.unlink()
        (root / "masks").rmdir()
    return root


def relative(path: Path, root: Path) -> str:
    return "" if Path(path) == root else Path(path).relative_to(root).as_posix()


def by_cli(root: Path) -> Outcome:
    from unetseg.cli import _split_layout

    try:
        train, validation = _split_layout(root, None)
    except UnetsegError as exc:
        return ("refuses", str(exc))
    return ("reads", relative(train, root), None if validation is None else relative(validation, root))


def by_container(root: Path, folders: list[str]) -> Outcome:
    # The job's channels are the folders under /opt/ml/input/data, named as the sub-folders here.
    from unetseg.container.training_job import pick_channels

    try:
        train, validation = pick_channels({name: root / name for name in folders})
    except UnetsegError as exc:
        return ("refuses", str(exc))
    return ("reads", relative(train, root), None if validation is None else relative(validation, root))


def by_fit(aws, data: str, sent_under: str) -> Outcome:
    estimator = UNetEstimator(image_uri=IMAGE, role=ROLE, instance_type="ml.g5.xlarge", sagemaker_session=aws.session)
    try:
        estimator.fit(data, wait=False, logs=False)
    except UnetsegError as exc:
        assert "CreateTrainingJob" not in aws.bodies
        return ("refuses", str(exc))
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
                for c in aws.sent("CreateTrainingJob")["InputDataConfig"]}
    sub = {name: uri.split(sent_under, 1)[1].rstrip("/") for name, uri in channels.items()}
    return ("reads", sub["train"], sub.get("validation"))


def put_prefix(aws, folders: list[str]) -> None:
    s3 = aws.boto_session.client("s3")
    for name in folders:
        keys = [f"ds/{name}/a.png"] if name in ("images", "masks", "photos") else \
            [f"ds/{name}/{part}/a.png" for part in ("images", "masks")]
        for key in keys:
            s3.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    aws.requests.clear()


@pytest.mark.parametrize("case", LAYOUTS)
def test_the_cli_fit_and_the_container_read_a_dataset_root_alike(aws, tmp_path, case):
    folders, expected = LAYOUTS[case]
    root = local_root(tmp_path, folders)
    outcomes = {
        "unetseg train --data": by_cli(root),
        "fit(local folder)": by_fit(aws, str(root), f"/datasets/{root.name}/"),
        "the container": by_container(root, folders),
    }
    aws.bodies.clear()
    put_prefix(aws, folders)
    outcomes["fit(s3 prefix)"] = by_fit(aws, f"s3://{BUCKET}/ds/", f"s3://{BUCKET}/ds/")
    if isinstance(expected, tuple):
        assert outcomes == {who: ("reads", *expected) for who in outcomes}, outcomes
    else:
        wrong = {who: outcome for who, outcome in outcomes.items()
                 if outcome[0] != "refuses" or not all(name in outcome[1] for name in expected)}
        assert not wrong, f"each must refuse naming {expected}: {wrong}"
