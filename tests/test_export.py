"""Export to ONNX and TorchScript, and prediction with onnxruntime: the same probabilities as torch (padding, tiles,
TTA), every architecture exported or refused with the reason, the metadata inside the file, and no torch needed."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import onnx
import pytest
import torch

from support import REPO, TINY, wsgi_call
from unetseg.cli import main as cli
from unetseg.contract.config import ARCHITECTURES, TrainConfig
from unetseg.contract.errors import ArtifactError
from unetseg.export import FP16_TOLERANCE, ExportRefused, export_model
from unetseg.model import artifact_config, build_model, load_model, save_artifact
from unetseg.runtime_onnx import CONFIG_KEY, load_onnx

PARITY = 1e-4  # max abs difference of class probabilities, onnxruntime against torch, fp32


def make_artifact(folder, seed: int = 0, **hyperparameters):
    """A model folder as training writes it, with random weights (BatchNorm statistics too: not the identity)."""
    cfg = TrainConfig(**{**TINY, "classes": 3, "class_names": ["bg", "cell", "edge"], **hyperparameters})
    torch.manual_seed(seed)
    model = build_model(cfg, pretrained=False)
    state = model.state_dict()
    for name, tensor in state.items():
        if name.endswith("running_var"):
            tensor.uniform_(0.5, 2.0)
        elif name.endswith("running_mean"):
            tensor.normal_(0, 0.2)
    save_artifact(folder, state, artifact_config(cfg, "index"), [{"epoch": 1}])
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model_dir = make_artifact(root / "model")
    onnx_path = export_model(model_dir, root / "model.onnx")
    return model_dir, onnx_path, load_model(model_dir, device="cpu"), load_onnx(onnx_path)


def image(height: int, width: int, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.uint16:
        return rng.integers(0, 65536, (height, width, 3), dtype=np.uint16)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("tta", ["none", "flip", "d4"])
@pytest.mark.parametrize("size", [(33, 47), (64, 64), (100, 37)])
def test_onnxruntime_gives_torchs_probabilities(exported, size, tta):
    _, _, torch_model, onnx_model = exported
    picture = image(*size, seed=size[0])
    theirs, ours = torch_model.predict_proba(picture, tta=tta), onnx_model.predict_proba(picture, tta=tta)
    assert ours.shape == (3, *size)
    assert np.abs(ours - theirs).max() < PARITY
    assert np.array_equal(onnx_model.predict(picture, tta=tta), torch_model.predict(picture, tta=tta))


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_tiles_blend_alike_on_both_runtimes(exported, tta):
    """An image above the tile size: tiles, their overlap and the blend, and the uint16 scaling of each crop."""
    _, _, torch_model, onnx_model = exported
    picture = image(150, 131, seed=3, dtype=np.uint16)
    theirs = torch_model.predict_proba(picture, tile=64, tta=tta)
    ours = onnx_model.predict_proba(picture, tile=64, tta=tta)
    assert np.abs(ours - theirs).max() < PARITY
    bands = [band for _, band in onnx_model.blended_bands(picture, tile=64, tta=tta)]
    assert np.abs(np.concatenate(bands, 1) - theirs).max() < PARITY


def test_batches_and_per_image_normalization_agree(tmp_path):
    model_dir = make_artifact(tmp_path / "model", seed=1, normalize="per_image", in_channels=1)
    torch_model = load_model(model_dir, device="cpu")
    onnx_model = load_onnx(export_model(model_dir, tmp_path / "m.onnx"))
    batch = [image(40, 56, seed=s)[..., :1] for s in range(3)]
    theirs, ours = torch_model.predict_proba_batch(batch, "flip"), onnx_model.predict_proba_batch(batch, "flip")
    assert np.abs(ours - theirs).max() < PARITY
    assert np.array_equal(onnx_model.predict_batch(batch), torch_model.predict_batch(batch))


def test_the_file_carries_what_prediction_needs_and_what_made_it(exported, tmp_path):
    model_dir, onnx_path, torch_model, _ = exported
    proto = onnx.load(str(onnx_path))
    props = {p.key: p.value for p in proto.metadata_props}
    config = json.loads(props[CONFIG_KEY])
    assert config == json.loads((model_dir / "config.json").read_text())  # the artifact's config, whole
    assert json.loads(props["unetseg.class_names"]) == ["bg", "cell", "edge"]
    assert json.loads(props["unetseg.class_colors"]) == torch_model.class_colors
    assert json.loads(props["unetseg.normalization"]) == config["normalization"]
    assert (props["unetseg.stride"], props["unetseg.in_channels"], props["unetseg.classes"]) == ("8", "3", "3")
    assert props["unetseg.exported_by"] == props["unetseg.trained_with"] == __import__("unetseg").__version__
    # Dynamic batch, height and width in the graph itself.
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    # The model id follows the weights: the same weights give the same id, others another.
    again = {p.key: p.value for p in onnx.load(str(export_model(model_dir, tmp_path / "again.onnx"))).metadata_props}
    other_dir = make_artifact(tmp_path / "other", seed=5)
    other = {p.key: p.value for p in onnx.load(str(export_model(other_dir, tmp_path / "other.onnx"))).metadata_props}
    assert again["unetseg.model_id"] == props["unetseg.model_id"] != other["unetseg.model_id"]


def test_fp16_runs_on_onnxruntime_cpu_within_its_tolerance(exported, tmp_path):
    model_dir, _, torch_model, _ = exported
    half = load_onnx(export_model(model_dir, tmp_path / "half.onnx", fp16=True))
    assert half.metadata["unetseg.precision"] == "fp16"
    initializers = onnx.load(str(tmp_path / "half.onnx")).graph.initializer
    assert {onnx.TensorProto.FLOAT16} <= {t.data_type for t in initializers}  # the weights are fp16
    for size in [(33, 47), (64, 64)]:
        picture = image(*size, seed=7)
        assert np.abs(half.predict_proba(picture) - torch_model.predict_proba(picture)).max() < FP16_TOLERANCE


def test_torchscript_export_carries_its_config(exported, tmp_path):
    from unetseg.runtime import load_model as load_any

    model_dir, _, torch_model, _ = exported
    path = export_model(model_dir, tmp_path / "model.torchscript", "torchscript")
    files = {"unetseg_config.json": "", "unetseg_metadata.json": ""}
    with pytest.warns(FutureWarning):  # torch.jit is deprecated in favour of torch.export; it still loads
        torch.jit.load(str(path), _extra_files=files)
    assert json.loads(files["unetseg_config.json"])["class_names"] == ["bg", "cell", "edge"]
    assert len(json.loads(files["unetseg_metadata.json"])["unetseg.model_id"]) == 16
    scripted = load_any(path, device="cpu")
    picture = image(45, 70, seed=2)
    assert np.abs(scripted.predict_proba(picture, tta="flip") - torch_model.predict_proba(picture, tta="flip")).max() \
        < 1e-5


# What torch 2.14's TorchScript-based ONNX exporter can give a dynamic height and width (export.py says why).
EXPORTABLE = {"Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "DeepLabV3", "DeepLabV3Plus", "PAN", "Segformer"}


@pytest.mark.slow  # 12 exports of full-depth models: about 10 s each on 2 cores
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_exports_or_is_refused_with_the_reason(arch, tmp_path):
    encoder = "tu-vit_tiny_patch16_224" if arch == "DPT" else "resnet18"
    hps = {"arch": arch, "encoder": encoder, "encoder_depth": 5, "decoder_channels": None, "image_size": 128,
           "classes": 2, "class_names": None}
    if arch == "DPT":
        hps.update(encoder_depth=4, image_size=224)
    model_dir = make_artifact(tmp_path / "model", **hps)
    if arch not in EXPORTABLE:
        with pytest.raises(ExportRefused, match=rf"cannot export {arch} .*dynamic image size: .*") as refused:
            export_model(model_dir, tmp_path / "m.onnx")
        assert "\n" not in str(refused.value) and not (tmp_path / "m.onnx").exists()
        return
    onnx_model = load_onnx(export_model(model_dir, tmp_path / "m.onnx"))
    picture = image(150, 140, seed=1)  # PAN takes no side under 128 (its pooling), in torch too
    difference = np.abs(onnx_model.predict_proba(picture) - load_model(model_dir, device="cpu").predict_proba(picture))
    assert difference.max() < PARITY


def test_export_command_writes_the_file_or_says_why_not(exported, tmp_path, capsys):
    model_dir = exported[0]
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # as `tar -czf model.tar.gz -C model .` makes it, without a process
        tar.add(model_dir, arcname=".")
    assert cli(["export", "--model", str(archive), "--output", str(tmp_path / "out.onnx")]) == 0
    assert "wrote" in capsys.readouterr().out and load_onnx(tmp_path / "out.onnx").class_names == ["bg", "cell", "edge"]

    refused = make_artifact(tmp_path / "psp", arch="PSPNet", encoder_depth=5, decoder_channels=None, image_size=64)
    assert cli(["export", "--model", str(refused), "--output", str(tmp_path / "psp.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot export PSPNet") and "adaptive_avg_pool2d" in err and "Traceback" not in err


def test_a_file_that_is_not_an_exported_model_is_named(tmp_path, exported):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="junk.onnx: not a readable ONNX model"):
        load_onnx(junk)
    bare = onnx.load(str(exported[1]))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ArtifactError, match="bare.onnx: an ONNX model without unetseg's metadata"):
        load_onnx(tmp_path / "bare.onnx")
    with pytest.raises(ArtifactError, match="missing.onnx: no such ONNX model"):
        load_onnx(tmp_path / "missing.onnx")


BLOCK_TORCH = """
import sys

class NoTorch:  # as on a machine without torch: importing it fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "segmentation_models_pytorch", "timm"):
            raise ImportError(f"no {name} here")

sys.meta_path.insert(0, NoTorch())
"""


@pytest.mark.slow
def test_the_onnx_path_runs_without_torch(exported, tmp_path):
    """unetseg.load_model and `unetseg predict --model model.onnx` in a fresh interpreter where torch cannot load."""
    _, onnx_path, torch_model, _ = exported
    from PIL import Image

    picture = image(50, 70, seed=4)
    Image.fromarray(picture).save(tmp_path / "a.png")
    script = BLOCK_TORCH + f"""
import numpy as np
import unetseg
from unetseg.cli import main
model = unetseg.load_model({str(onnx_path)!r})
np.save({str(tmp_path / 'p.npy')!r}, model.predict_proba(np.load({str(tmp_path / 'a.npy')!r}), tta="flip"))
assert main(["predict", "--model", {str(onnx_path)!r}, "--input", {str(tmp_path / 'a.png')!r},
             "--output", {str(tmp_path / 'out')!r}, "--probabilities"]) == 0
assert not [m for m in sys.modules if m.split(".")[0] == "torch"], "torch was imported"
print("ok")
"""
    np.save(tmp_path / "a.npy", picture)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
    expected = torch_model.predict_proba(picture, tta="flip")
    assert np.abs(np.load(tmp_path / "p.npy") - expected).max() < PARITY
    written = np.load(tmp_path / "out" / "a.npy").astype(np.float32)  # float16 on disk
    assert np.abs(written - torch_model.predict_proba(picture)).max() < 1e-3


# --- the server: UNETSEG_RUNTIME ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    """A model dir as export_onnx=true leaves it: model.onnx beside the weights."""
    import shutil

    from unetseg.runtime_onnx import ONNX_FILE

    model_dir = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(exported[0], model_dir)
    shutil.copy(exported[1], model_dir / ONNX_FILE)
    return model_dir


def server_app(model_dir, monkeypatch, runtime: str):
    from unetseg.container.serving import InferenceApp
    from unetseg.contract.sagemaker_env import RUNTIME_ENV

    monkeypatch.setenv(RUNTIME_ENV, runtime)
    return InferenceApp(str(model_dir), device="cpu")


def test_the_onnx_server_answers_as_the_torch_server(served, monkeypatch):
    from unetseg.contract import codecs
    from unetseg.runtime_onnx import OnnxSegmenter

    apps = {runtime: server_app(served, monkeypatch, runtime) for runtime in ("torch", "onnx")}
    assert isinstance(apps["onnx"].model, OnnxSegmenter) and not isinstance(apps["torch"].model, OnnxSegmenter)
    picture = image(70, 45, seed=11)
    body = codecs.encode_image(picture, codecs.PNG)
    for accept, attrs in [(codecs.PNG, ""), (codecs.JSON, "tta=d4"), (codecs.NPY, "tile=32"),
                          (codecs.NPY, "output=probabilities; tta=flip")]:
        (s1, _, torch_answer), (s2, _, onnx_answer) = (
            wsgi_call(app, body=body, content_type=codecs.PNG, accept=accept, attrs=attrs or None)
            for app in apps.values())
        assert s1 == s2 == 200, (accept, attrs, onnx_answer[:200])
        if "probabilities" in attrs:
            theirs = np.load(io.BytesIO(torch_answer)).astype(np.float32)
            ours = np.load(io.BytesIO(onnx_answer)).astype(np.float32)
            assert np.abs(ours - theirs).max() <= 1e-3  # float16 on the wire: one step of it at most
        else:
            assert onnx_answer == torch_answer, (accept, attrs)


def test_auto_takes_onnx_on_a_cpu_when_the_model_has_it(served, exported, monkeypatch):
    from unetseg.runtime_onnx import OnnxSegmenter

    assert isinstance(server_app(served, monkeypatch, "auto").model, OnnxSegmenter)
    assert not isinstance(server_app(exported[0], monkeypatch, "auto").model, OnnxSegmenter)  # no model.onnx


def test_a_bad_runtime_or_a_missing_model_onnx_fails_ping_with_the_reason(exported, monkeypatch):
    status, _, payload = wsgi_call(server_app(exported[0], monkeypatch, "tensorrt"), "/ping", method="GET")
    assert status == 500 and "UNETSEG_RUNTIME='tensorrt': use auto, torch, onnx" in json.loads(payload)["error"]
    status, _, payload = wsgi_call(server_app(exported[0], monkeypatch, "onnx"), "/ping", method="GET")
    error = json.loads(payload)["error"]
    assert status == 500 and "model.onnx: no such ONNX model" in error and "export_onnx=true" in error


@pytest.mark.slow
def test_gunicorn_serves_the_onnx_model(served, exported):
    from readiness import first_answer
    from support import free_port
    from unetseg.contract import codecs

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNETSEG_RUNTIME": "onnx", "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "unetseg.container.serving", "--model-dir", str(served), "--host",
                             "127.0.0.1", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        status, body, _ = first_answer(f"http://127.0.0.1:{port}/ping", timeout=120,
                                       alive=lambda: proc.poll() is None)
        assert status == 200, body
        import urllib.request

        picture = image(66, 90, seed=12)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", codecs.encode_image(picture),
                                         {"Content-Type": codecs.PNG, "Accept": codecs.NPY})
        with urllib.request.urlopen(request, timeout=60) as response:
            mask = np.load(io.BytesIO(response.read()))
        assert np.array_equal(mask, exported[2].predict(picture))
    finally:
        proc.terminate()
        log = proc.communicate(timeout=60)[0]
    assert "onnx runtime: UNETSEG_RUNTIME=onnx" in log, log[-2000:]


@pytest.mark.slow
def test_training_with_export_onnx_leaves_model_onnx_in_the_model(tmp_path):
    """export_onnx=true: model.onnx beside the weights (so in model.tar.gz), predicting as the trained torch model."""
    from support import make_channel
    from unetseg.runtime_onnx import ONNX_FILE
    from unetseg.training import RunPaths, train

    data = make_channel(tmp_path / "train", count=8, size=32, classes=3)
    cfg = TrainConfig(**{**TINY, "classes": 3, "epochs": 1, "num_workers": 0, "export_onnx": True})
    paths = RunPaths(data, None, tmp_path / "model", tmp_path / "ckpt", tmp_path / "out")
    train(cfg, paths, progress=False)
    onnx_model, torch_model = load_onnx(tmp_path / "model" / ONNX_FILE), load_model(tmp_path / "model", device="cpu")
    picture = image(41, 29, seed=8)
    assert np.abs(onnx_model.predict_proba(picture) - torch_model.predict_proba(picture)).max() < PARITY
    assert onnx_model.metadata["unetseg.source"] == str(tmp_path / "model")
