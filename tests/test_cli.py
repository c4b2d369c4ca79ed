import subprocess
import sys

import pytest

from unetseg.cli import main, parse_hyperparameters
from unetseg.contract.errors import UnetsegError

TRAIN = [sys.executable, "-m", "unetseg.cli", "train"]


def test_hyperparameter_forms():
    parsed = parse_hyperparameters(["lr=0.01", "--epochs", "3", "--batch-size=2"])
    assert parsed == {"lr": "0.01", "epochs": "3", "batch_size": "2"}
    with pytest.raises(UnetsegError, match="key=value"):
        parse_hyperparameters(["lr"])


def test_bad_hyperparameter_fails_before_torch_is_imported(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--optimizer", "adamx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: hyperparameter 'optimizer' = 'adamx': allowed values: adamw, adam, sgd")


@pytest.mark.slow
def test_bad_dataset_is_one_line_error_without_traceback(tmp_path):
    (tmp_path / "images").mkdir()
    done = subprocess.run([*TRAIN, "--data", str(tmp_path), "encoder_weights=none"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "expected train/ (and validation/) or images/ + masks/ in it; found images/" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_missing_init_model_fails_before_the_data_is_read(tmp_path):
    # a broken dataset too (a channel without images): the init model's error must come first
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    done = subprocess.run([*TRAIN, "--data", str(tmp_path), "encoder_weights=none",
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


def test_a_failed_write_names_its_file_and_errno_and_other_errors_pass_through(tmp_path):
    # As root (the tests' user) no folder refuses a write, so the writer raises what the file system would.
    import errno

    from unetseg.atomic import WriteFailed, replace_atomically

    target = tmp_path / "run" / "model" / "config.json"

    def failing(error):
        def write(tmp):
            tmp.write_bytes(b"half a file")
            raise error
        return write

    cases = [(PermissionError(errno.EACCES, "Permission denied"), errno.EACCES, "permission denied writing"),
             (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT, "disk quota exceeded writing"),
             (RuntimeError("I/O error: No space left on device (os error 28)"), errno.ENOSPC, "disk full writing")]
    for error, code, headline in cases:
        with pytest.raises(WriteFailed) as info:
            replace_atomically(target, failing(error))
        assert info.value.errno == code and info.value.path == target and info.value.filename == str(target)
        assert str(info.value).startswith(f"{headline} {target}: "), str(info.value)
        assert isinstance(info.value, OSError) and isinstance(info.value, UnetsegError)
        assert list(target.parent.iterdir()) == []  # the partial temporary file is gone
    # Not a write failure (the file system takes more bytes): reported as it is, a bug, not dressed up as a full disk.
    with pytest.raises(RuntimeError, match="CUDA error: out of memory"):
        replace_atomically(target, failing(RuntimeError("CUDA error: out of memory")))
    assert list(target.parent.iterdir()) == []

