import subprocess
import sys

import pytest

from unetseg.cli import main, parse_hyperparameters
from unetseg.contract.errors import UnetsegError


def test_hyperparameter_forms():
    assert parse_hyperparameters(["lr=0.01", "--epochs", "3", "--batch-size=2"]) == {"lr": "0.01", "epochs": "3", "batch_size": "2"}
    with pytest.raises(UnetsegError, match="key=value"):
        parse_hyperparameters(["lr"])


def test_bad_hyperparameter_fails_before_torch_is_imported(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--optimizer", "adamx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: hyperparameter 'optimizer' = 'adamx': allowed values: adamw, adam, sgd")


def test_bad_dataset_is_one_line_error_without_traceback(tmp_path):
    (tmp_path / "images").mkdir()
    done = subprocess.run([sys.executable, "-m", "unetseg.cli", "train", "--data", str(tmp_path), "encoder_weights=none"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "expected train/ (and validation/) or images/ + masks/ in it; found images/" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_init_model_fails_before_the_data_is_read(tmp_path):
    # a broken dataset too (a channel without images): the init model's error must come first
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    done = subprocess.run([sys.executable, "-m", "unetseg.cli", "train", "--data", str(tmp_path), "encoder_weights=none",
                           "--init-model", str(tmp_path / "old" / "model.tar.gz")], capture_output=True, text=True)
    assert done.returncode == 2
    assert f"{tmp_path / 'old' / 'model.tar.gz'}: no such model folder or model.tar.gz" in done.stderr
    assert "no images" not in done.stderr and "Traceback" not in done.stderr


def test_demo_data_and_hyperparameter_listing(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "d"), "--kind", "multiclass", "--train", "3", "--validation", "2"]) == 0
    assert len(list((tmp_path / "d" / "train" / "images").iterdir())) == 3
    assert "unetseg train --data" in capsys.readouterr().out
    assert main(["hyperparameters"]) == 0
    out = capsys.readouterr().out
    assert "optimizer" in out and "adamw|adam|sgd" in out


def test_a_failed_write_is_described_by_its_file_and_errno(tmp_path):
    import errno

    from unetseg.cli import describe_write_failure

    run = tmp_path / "run"
    target = run / "model" / "config.json"
    denied = PermissionError(errno.EACCES, "Permission denied", str(target))
    assert describe_write_failure(denied, run) == f"could not write {target}: permission denied"
    quota = OSError(errno.EDQUOT, "Disk quota exceeded", str(run / "checkpoints" / "last.pt"))
    assert describe_write_failure(quota, run).endswith("last.pt: disk quota exceeded")
    # Not a write of the run: reported as it is (a bug or someone else's file), not dressed up as one.
    assert describe_write_failure(PermissionError(errno.EACCES, "Permission denied", "/etc/shadow"), run) is None
    assert describe_write_failure(RuntimeError("CUDA error: out of memory"), run) is None
