"""The quickstart notebook, executed top to bottom with nbclient against moto_server (AWS) on a loopback port.

The kernel gets AWS_ENDPOINT_URL, so every boto3 call in the notebook (the SageMaker SDK's included) goes to the
simulator: the dataset upload and CreateTrainingJob are real requests, and the notebook's "simulated" path trains the
same configuration in-process and puts model.tar.gz where the job would have. The test then asks the simulator what
the notebook sent, and reads the notebook's own results from a cell appended for the purpose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REGION
from support import free_port
from unetseg.contract.sagemaker_env import IMAGE_URI_ENV

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
IMAGE = "111122223333.dkr.ecr.us-east-1.amazonaws.com/unetseg:quickstart"

# Appended to the notebook before it runs: what the test checks, as one JSON line.
REPORT_CELL = """
import json as _json
print("QUICKSTART-REPORT " + _json.dumps({
    "mode": MODE, "final_val_miou": FINAL_VAL_MIOU, "job": est.latest_training_job.name,
    "model_data": est.model_data, "data_dir": str(DATA_DIR.resolve()), "classes": model.class_names,
}))
"""


@pytest.fixture
def moto_server(tmp_path):
    """`moto_server` on 127.0.0.1:<free port>; yields its URL."""
    executable = Path(sys.executable).with_name("moto_server")
    if not executable.exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    log = (tmp_path / "moto_server.log").open("w")
    server = subprocess.Popen([str(executable), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
                break
            except OSError as exc:
                if server.poll() is not None or time.monotonic() > deadline:
                    log = (tmp_path / "moto_server.log").read_text()
                    raise RuntimeError(f"moto_server did not start: {log}") from exc
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def kernel_environment(endpoint: str, sdk_config: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SAGEMAKER_", "UNETSEG_", "MLFLOW_"))
           and k.upper() not in ("MPLBACKEND", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")}
    env.update({
        "AWS_ENDPOINT_URL": endpoint,  # boto3 and botocore send every service here
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "SAGEMAKER_SUPPRESS_V2_WARNING": "1",
        # The SDK's telemetry opt-out (conftest's config file): otherwise fit() calls an S3 bucket and STS.
        "SAGEMAKER_ADMIN_CONFIG_OVERRIDE": sdk_config, "SAGEMAKER_USER_CONFIG_OVERRIDE": sdk_config,
        IMAGE_URI_ENV: IMAGE,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": str(os.cpu_count() or 1),
        "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations asks PyPI for a newer version on import
        # A dead loopback proxy for everything but loopback: a call that ignores AWS_ENDPOINT_URL fails at once,
        # without even a DNS lookup, instead of leaving this machine.
        "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost",
    })
    return env


def test_notebook_is_committed_clean():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code), "strip the outputs"
    assert nb.cells[0].cell_type == "markdown"
    settings = next(cell.source for cell in code)
    for name in ("DATA_DIR", "RUN_ON_SAGEMAKER", "IMAGE_URI", "ROLE", "INSTANCE_TYPE", "USE_SPOT", "HYPERPARAMETERS"):
        assert f"\n{name} = " in f"\n{settings}", f"{name} belongs in the first code cell"
    assert "docker" not in "".join(cell.source for cell in code).lower()


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom_against_moto(moto_server, tmp_path, _sdk_config_file):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")
    pytest.importorskip("torch")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(REPORT_CELL.strip()))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    started = time.monotonic()
    client.execute(env=kernel_environment(moto_server, _sdk_config_file))  # raises CellExecutionError on a failure
    seconds = time.monotonic() - started
    print(f"quickstart notebook ran in {seconds:.0f} s")

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    report = json.loads(text.split("QUICKSTART-REPORT ", 1)[1].splitlines()[0])
    assert report["mode"] == "simulated"
    assert isinstance(report["final_val_miou"], float) and report["final_val_miou"] > 0.6, report
    assert report["classes"] == ["background", "object"]
    tta_lines = [line for line in text.splitlines() if " with tta=" in line]
    assert [line.split(" with ")[1].split(":")[0] for line in tta_lines] == ["tta='none'", "tta='flip'"], text[-2000:]
    print(*tta_lines, sep="\n")
    # Every plotting cell drew: the data, the curves, the predictions.
    plot_cells = [cell for cell in nb.cells if cell.cell_type == "code" and "plt.show()" in cell.source]
    assert len(plot_cells) == 3
    for cell in plot_cells:
        assert any("image/png" in out.get("data", {}) for out in cell.outputs), cell.source[:80]

    # What the notebook sent to the simulator: the job as configured, the dataset uploaded, the artifact in place.
    import boto3

    kwargs = dict(endpoint_url=moto_server, region_name=REGION, aws_access_key_id="testing",
                  aws_secret_access_key="testing")
    job = boto3.client("sagemaker", **kwargs).describe_training_job(TrainingJobName=report["job"])
    assert job["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    assert job["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"
    assert job["EnableManagedSpotTraining"] is True
    assert job["HyperParameters"]["encoder"] == "resnet18" and job["HyperParameters"]["epochs"] == "8"
    s3 = boto3.client("s3", **kwargs)
    bucket, key = report["model_data"][len("s3://"):].split("/", 1)
    assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 1000
    uploaded = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for item in page.get("Contents", ())]
    data_dir = Path(report["data_dir"])
    local = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file())
    prefix = f"/datasets/{data_dir.name}/"
    mirrored = sorted(k.split(prefix, 1)[1] for k in uploaded if prefix in k)
    assert len(local) == 128 and mirrored == local
