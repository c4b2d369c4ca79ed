"""Ground Truth semantic segmentation output manifests: parsed as the documentation writes them, sent to the job as
S3Prefix channels with a pairing file (request fields checked), read by the container, and learned from."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BUCKET, IMAGE, ROLE
from support import TINY, run_entry, sagemaker_tree
from unetseg.client.estimator import UNetEstimator
from unetseg.contract.errors import DataError
from unetseg.contract.ground_truth import PAIRING_FILE, parse_manifest

# The colour map as Ground Truth writes it: the class index as a string key, BACKGROUND white.
COLOUR_MAP = {"0": {"class-name": "BACKGROUND", "hex-color": "#ffffff", "confidence": 0.9},
              "1": {"class-name": "buildings", "hex-color": "#2acf59", "confidence": 0.9},
              "2": {"class-name": "road", "hex-color": "#f28333", "confidence": 0.9}}
RGB = {0: (255, 255, 255), 1: (0x2a, 0xcf, 0x59), 2: (0xf2, 0x83, 0x33)}


def line(image: str, mask: str | None, attribute: str = "city-streets", job: str = "labeling-job/city-streets",
         colour_map: dict = COLOUR_MAP, **extra) -> str:
    record = {"source-ref": image, **extra}
    if mask is not None:
        record[f"{attribute}-ref"] = mask
        record[f"{attribute}-ref-metadata"] = {
            "internal-color-map": colour_map, "type": "groundtruth/semantic-segmentation", "human-annotated": "yes",
            "creation-date": "2018-10-18T22:18:13.527256", "job-name": job}
    return json.dumps(record)


def error(lines: list[str], **kwargs) -> str:
    with pytest.raises(DataError) as info:
        parse_manifest(lines, "s3://b/out/output.manifest", **kwargs)
    return str(info.value)


# --- the manifest ---------------------------------------------------------------------------------------------------

def test_a_documented_manifest_gives_its_pairs_classes_and_colours_and_skips_unlabelled_objects():
    failed = json.dumps({"source-ref": "s3://b/img/c.jpg", "city-streets-ref-metadata": {
        "failure-reason": "ClientError: worker response missing", "job-name": "labeling-job/city-streets"}})
    lines = [line("s3://b/img/a.jpg", "s3://b/out/annotations/a.png"), failed,
             json.dumps({"source-ref": "s3://b/img/d.jpg"}),  # never labelled by this job
             "", line("s3://b/img/b.jpg", "s3://b/out/annotations/b.png")]
    manifest = parse_manifest(lines, "s3://b/out/output.manifest")
    assert manifest.attribute == "city-streets-ref"
    assert [(o.line, o.image, o.mask) for o in manifest.objects] == [
        (1, "s3://b/img/a.jpg", "s3://b/out/annotations/a.png"), (5, "s3://b/img/b.jpg", "s3://b/out/annotations/b.png")]
    assert manifest.class_names == ["BACKGROUND", "buildings", "road"]
    assert manifest.class_colors == [[255, 255, 255], [42, 207, 89], [242, 131, 51]]
    assert manifest.skipped == [2, 3] and "2 object(s) without a city-streets-ref" in manifest.summary()
    assert manifest.hyperparameters()["mask_mode"] == "palette"


def test_malformed_json_names_its_line():
    message = error([line("s3://b/a.jpg", "s3://b/a.png"), line("s3://b/b.jpg", "s3://b/b.png"), '{"source-ref": '])
    assert "output.manifest line 3" in message and "not valid JSON" in message


def test_a_line_with_metadata_but_no_mask_key_names_the_line_and_the_key():
    damaged = json.loads(line("s3://b/b.jpg", "s3://b/b.png"))
    del damaged["city-streets-ref"]
    message = error([line("s3://b/a.jpg", "s3://b/a.png"), json.dumps(damaged)])
    assert "line 2" in message and "'city-streets-ref'" in message


def test_two_jobs_with_different_colour_maps_are_refused_naming_both():
    other = {**COLOUR_MAP, "2": {"class-name": "sidewalk", "hex-color": "#1f77b4", "confidence": 0.8}}
    message = error([line("s3://b/a.jpg", "s3://b/a.png", job="labeling-job/streets-may"),
                     line("s3://b/b.jpg", "s3://b/b.png", job="labeling-job/streets-june", colour_map=other)])
    assert "labeling-job/streets-may" in message and "labeling-job/streets-june" in message
    assert "line 1" in message and "line 2" in message and "sidewalk" in message


def test_several_label_attributes_need_label_attribute():
    both = json.loads(line("s3://b/a.jpg", "s3://b/a.png"))
    both.update(json.loads(line("s3://b/a.jpg", "s3://b/a-v2.png", attribute="city-streets-v2")))
    message = error([json.dumps(both)])
    assert "city-streets-ref" in message and "city-streets-v2-ref" in message and "label_attribute" in message
    manifest = parse_manifest([json.dumps(both)], "m", attribute="city-streets-v2")
    assert manifest.objects[0].mask == "s3://b/a-v2.png"


# --- fit(): the request -----------------------------------------------------------------------------------------------

def gt_pairs(count: int = 4, size: int = 32, seed: int = 0):
    """(image, colour mask, class indices) triples: a bright square (buildings) and a dark band (road) on noise."""
    rng = np.random.default_rng(seed)
    colours = np.array([RGB[i] for i in range(3)], np.uint8)
    out = []
    for _ in range(count):
        labels = np.zeros((size, size), np.uint8)
        y, x = rng.integers(2, size // 2, 2)
        labels[y:y + size // 3, x:x + size // 3] = 1
        row = rng.integers(size // 2, size - 6)
        labels[row:row + 4] = 2
        base = rng.uniform(0.3, 0.5) + rng.normal(0, 0.05, (size, size))
        gray = np.where(labels == 1, base + 0.35, np.where(labels == 2, base - 0.25, base))
        image = (np.clip(np.repeat(gray[..., None], 3, 2), 0, 1) * 255).astype(np.uint8)
        out.append((image, colours[labels], labels))
    return out


def png(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES_PREFIX = "raw/street-images/"
MASKS_PREFIX = "labels/city-streets/annotations/consolidated-annotation/output/"
MANIFEST_KEY = "labels/city-streets/manifests/output/output.manifest"


def put_gt_job(aws, count: int = 3, skip_mask: int | None = None) -> str:
    s3 = aws.boto_session.client("s3")
    lines = []
    for i, (image, mask, _) in enumerate(gt_pairs(count)):
        image_key, mask_key = f"{IMAGES_PREFIX}frame{i}.png", f"{MASKS_PREFIX}{i}_2024-01-01T00:00:00.png"
        s3.put_object(Bucket=BUCKET, Key=image_key, Body=png(image))
        if i != skip_mask:
            s3.put_object(Bucket=BUCKET, Key=mask_key, Body=png(mask))
        lines.append(line(f"s3://{BUCKET}/{image_key}", f"s3://{BUCKET}/{mask_key}"))
    s3.put_object(Bucket=BUCKET, Key=MANIFEST_KEY, Body="\n".join(lines).encode())
    aws.requests.clear()
    return f"s3://{BUCKET}/{MANIFEST_KEY}"


def make(aws, **overrides):
    return UNetEstimator(**{"image_uri": IMAGE, "role": ROLE, "instance_type": "ml.g5.xlarge",
                            "sagemaker_session": aws.session, "hyperparameters": {"encoder_weights": None},
                            **overrides})


@pytest.mark.parametrize("input_mode", ["File", "FastFile"])
def test_fit_on_a_manifest_sends_prefix_channels_a_pairing_file_and_the_colour_map(aws, input_mode):
    uri = put_gt_job(aws)
    estimator = make(aws, input_mode=input_mode)
    estimator.fit(uri, wait=False, logs=False)
    request = aws.sent("CreateTrainingJob")  # checked against botocore's model by the strict validator
    channels = {c["ChannelName"]: c for c in request["InputDataConfig"]}
    assert sorted(channels) == ["train", "train_manifest", "train_masks"]
    for c in channels.values():
        assert c["DataSource"]["S3DataSource"]["S3DataType"] == "S3Prefix" and c["InputMode"] == input_mode
    uris = {name: c["DataSource"]["S3DataSource"]["S3Uri"] for name, c in channels.items()}
    assert uris["train"] == f"s3://{BUCKET}/{IMAGES_PREFIX}" and uris["train_masks"] == f"s3://{BUCKET}/{MASKS_PREFIX}"

    bucket, key = uris["train_manifest"][len("s3://"):].split("/", 1)
    body = aws.boto_session.client("s3").get_object(Bucket=bucket, Key=key + PAIRING_FILE)["Body"].read()
    pairing = json.loads(body)
    assert pairing["roots"] == ["train", "train_masks"] and pairing["manifest"] == uri
    assert [(s["line"], s["image"], s["mask"]) for s in pairing["samples"]] == [
        (i + 1, f"frame{i}.png", f"{i}_2024-01-01T00:00:00.png") for i in range(3)]
    assert pairing["class_colors"] == [list(RGB[i]) for i in range(3)]

    hps = request["HyperParameters"]
    assert json.loads(hps["class_names"]) == ["BACKGROUND", "buildings", "road"] and hps["classes"] == "3"
    assert json.loads(hps["class_colors"]) == [list(RGB[i]) for i in range(3)] and hps["mask_mode"] == "palette"
    names = {d["Name"] for d in request["AlgorithmSpecification"]["MetricDefinitions"]}
    assert "val_iou_buildings" in names and "val_iou_road" in names


def test_a_mask_missing_from_s3_names_its_line_and_key_before_any_job(aws):
    uri = put_gt_job(aws, skip_mask=1)
    with pytest.raises(DataError) as info:
        make(aws).fit(uri, wait=False, logs=False)
    message = str(info.value)
    assert "output.manifest line 2" in message and f"{MASKS_PREFIX}1_2024-01-01T00:00:00.png" in message
    assert "CreateTrainingJob" not in aws.bodies


def test_a_class_name_set_otherwise_is_refused_not_overridden(aws):
    uri = put_gt_job(aws)
    estimator = make(aws, hyperparameters={"encoder_weights": None, "classes": 3, "class_names": ["bg", "b", "r"]})
    with pytest.raises(DataError, match=r"class_names=\['BACKGROUND', 'buildings', 'road'\].*class_names=\['bg'"):
        estimator.fit(uri, wait=False, logs=False)


def test_skipped_objects_are_counted_in_one_warning(aws):
    uri = put_gt_job(aws)
    s3 = aws.boto_session.client("s3")
    body = s3.get_object(Bucket=BUCKET, Key=MANIFEST_KEY)["Body"].read().decode()
    s3.put_object(Bucket=BUCKET, Key=MANIFEST_KEY, Body=(body + "\n" + json.dumps({"source-ref": "s3://x/y.png"})).encode())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make(aws).fit(uri, wait=False, logs=False)
    said = [str(w.message) for w in caught if "without a city-streets-ref" in str(w.message)]
    assert len(said) == 1 and "1 object(s)" in said[0] and "line 4" in said[0], said


# --- the container ------------------------------------------------------------------------------------------------

def write_job_channels(root: Path, pairs, split: str) -> dict[str, Path]:
    """An /opt/ml/input/data tree as SageMaker lays out fit()'s three channels of one manifest."""
    images, masks, manifest = root / split, root / f"{split}_masks", root / f"{split}_manifest"
    for folder in (images / "street", masks, manifest):
        folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, (image, mask, _) in enumerate(pairs):
        Image.fromarray(image).save(images / "street" / f"f{i}.png")
        Image.fromarray(mask).save(masks / f"{i}_2024.png")
        samples.append({"line": i + 1, "image": f"street/f{i}.png", "mask": f"{i}_2024.png"})
    (manifest / PAIRING_FILE).write_text(json.dumps({
        "format": "unetseg-groundtruth", "version": 1, "manifest": f"s3://b/{split}.manifest", "attribute": "x-ref",
        "jobs": ["labeling-job/x"], "skipped": 0, "class_names": ["BACKGROUND", "buildings", "road"],
        "class_colors": [list(RGB[i]) for i in range(3)], "roots": [split, f"{split}_masks"], "samples": samples}))
    return {split: images, f"{split}_masks": masks, f"{split}_manifest": manifest}


GT_HPS = {**TINY, "classes": 3, "class_names": ["BACKGROUND", "buildings", "road"], "mask_mode": "palette",
          "class_colors": [list(RGB[i]) for i in range(3)], "epochs": 6, "seed": 0, "num_workers": 2}


@pytest.mark.slow
def test_the_container_trains_from_a_manifests_channels_and_learns(tmp_path):
    data = tmp_path / "data"
    channels = {**write_job_channels(data, gt_pairs(32, seed=1), "train"),
                **write_job_channels(data, gt_pairs(8, seed=2), "validation")}
    env = sagemaker_tree(tmp_path / "ml", GT_HPS, channels)
    done = run_entry(env)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((tmp_path / "ml" / "model" / "config.json").read_text())
    assert config["class_names"] == ["BACKGROUND", "buildings", "road"]  # the colour map reached the model exactly
    assert config["class_colors"] == [list(RGB[i]) for i in range(3)] and config["mask_mode"] == "palette"
    assert config["best"]["val_miou"] >= 0.6, done.stdout[-2000:]


@pytest.mark.slow  # runs entry/train.py in a child process
def test_the_container_refuses_hyperparameters_that_contradict_the_pairing_file(tmp_path):
    channels = write_job_channels(tmp_path / "data", gt_pairs(2), "train")
    swapped = [list(RGB[0]), list(RGB[2]), list(RGB[1])]  # buildings read as road
    env = sagemaker_tree(tmp_path / "ml", {**GT_HPS, "class_colors": swapped}, channels)
    done = run_entry(env)
    failure = (tmp_path / "ml" / "output" / "failure").read_text()
    assert done.returncode != 0 and "train.manifest" in failure and "class_colors" in failure


def test_train_and_validation_manifests_send_their_own_channels_and_must_share_a_colour_map(aws):
    uri = put_gt_job(aws)
    s3 = aws.boto_session.client("s3")
    body = s3.get_object(Bucket=BUCKET, Key=MANIFEST_KEY)["Body"].read().decode()
    s3.put_object(Bucket=BUCKET, Key="labels/val.manifest", Body=body.encode())
    make(aws).fit({"train": uri, "validation": f"s3://{BUCKET}/labels/val.manifest"}, wait=False, logs=False)
    sent = {c["ChannelName"] for c in aws.sent("CreateTrainingJob")["InputDataConfig"]}
    assert sent == {"train", "train_masks", "train_manifest", "validation", "validation_masks", "validation_manifest"}

    other = body.replace('"road"', '"sidewalk"')
    s3.put_object(Bucket=BUCKET, Key="labels/val.manifest", Body=other.encode())
    with pytest.raises(DataError, match=r"'train' manifest .* and the 'validation' manifest .*different colour maps"):
        make(aws).fit({"train": uri, "validation": f"s3://{BUCKET}/labels/val.manifest"}, wait=False, logs=False)


@pytest.mark.slow
def test_unetseg_train_on_a_local_manifest(tmp_path):
    """`unetseg train --data output.manifest`: paths relative to the manifest, the colour map as the classes."""
    import subprocess
    import sys

    from support import REPO

    lines = []
    for i, (image, mask, _) in enumerate(gt_pairs(8, seed=5)):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "gt" / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "img" / f"f{i}.png")
        Image.fromarray(mask).save(tmp_path / "gt" / "masks" / f"{i}.png")
        lines.append(line(f"../img/f{i}.png", f"masks/{i}.png"))
    (tmp_path / "gt" / "output.manifest").write_text("\n".join(lines))
    hps = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in {**TINY, "epochs": 1}.items()]
    done = subprocess.run([sys.executable, "-m", "unetseg.cli", "train", "--data",
                           str(tmp_path / "gt" / "output.manifest"), "--output", str(tmp_path / "run"), *hps],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["class_names"] == ["BACKGROUND", "buildings", "road"] and config["mask_mode"] == "palette"
    assert "8 labelled image(s)" in done.stdout


def test_images_and_masks_in_one_folder_travel_in_one_channel(aws):
    s3 = aws.boto_session.client("s3")
    lines = []
    for i, (image, mask, _) in enumerate(gt_pairs(2)):
        s3.put_object(Bucket=BUCKET, Key=f"job/data/{i}.png", Body=png(image))
        s3.put_object(Bucket=BUCKET, Key=f"job/data/{i}-mask.png", Body=png(mask))
        lines.append(line(f"s3://{BUCKET}/job/data/{i}.png", f"s3://{BUCKET}/job/data/{i}-mask.png"))
    s3.put_object(Bucket=BUCKET, Key="job/output.manifest", Body="\n".join(lines).encode())
    make(aws).fit(f"s3://{BUCKET}/job/output.manifest", wait=False, logs=False)
    sent = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
            for c in aws.sent("CreateTrainingJob")["InputDataConfig"]}
    assert sent["train"] == f"s3://{BUCKET}/job/data/" and set(sent) == {"train", "train_manifest"}
