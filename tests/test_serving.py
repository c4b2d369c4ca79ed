"""The inference server's process setup, without a model: the GPU each gunicorn worker gets, and the limits (body size,
request time) that follow the mode SageMaker runs the container in."""

from __future__ import annotations

import os

import pytest

from unetseg.container import serving
from unetseg.contract.sagemaker_env import (
    ASYNC_MAX_PAYLOAD_BYTES,
    ASYNC_TIMEOUT_S,
    BATCH_ENV,
    BATCH_MAX_PAYLOAD_MB,
    BATCH_TIMEOUT_S,
    BIND_TO_PORT_ENV,
    MAX_BODY_MB_ENV,
    MAX_IMAGE_MB_ENV,
    MAX_PAYLOAD_IN_MB_ENV,
    MAX_PIXELS_ENV,
    MODEL_SERVER_TIMEOUT_ENV,
    MODEL_SERVER_WORKERS_ENV,
    REALTIME_MAX_PAYLOAD_BYTES,
    REALTIME_TIMEOUT_S,
    SERVING_MODE_ENV,
    TTA_ENV,
)


class _Arbiter:
    """What gunicorn's Arbiter shows the hooks: WORKERS, its live workers by pid."""

    def __init__(self):
        self.WORKERS: dict[int, object] = {}


class _Worker:
    def __init__(self, age: int):
        self.age = age  # gunicorn numbers workers by spawn order, replacements included
        self.pid = None


def _spawn(arbiter: _Arbiter, hooks, age: int, pid: int) -> str:
    """As Arbiter.spawn_worker does it: pre_fork in the master, then post_fork in the child (here: in this process,
    whose environment the test restores). Returns the CUDA_VISIBLE_DEVICES the worker's torch would see."""
    pre_fork, post_fork = hooks
    worker = _Worker(age)
    pre_fork(arbiter, worker)
    worker.pid = pid
    arbiter.WORKERS[pid] = worker
    post_fork(arbiter, worker)
    return os.environ["CUDA_VISIBLE_DEVICES"]


@pytest.mark.parametrize("workers", [2, 4])
def test_a_replacement_worker_takes_the_gpu_of_the_one_it_replaces(monkeypatch, workers):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    arbiter, hooks, gpus = _Arbiter(), serving.worker_hooks(gpus=2, workers=workers, cpus=8), 2
    placed = {pid: _spawn(arbiter, hooks, age=pid, pid=pid) for pid in range(1, workers + 1)}
    assert sorted(placed.values()) == sorted(str(i % gpus) for i in range(workers))  # spread evenly

    # Workers die (OOM, a crash, gunicorn's timeout) and gunicorn spawns each a replacement, younger than all: the
    # one on GPU 0 twice in a row (a request that keeps failing there), then one on GPU 1.
    age = workers
    for device in ("0", "0", "1"):
        victim = next(pid for pid, gpu in placed.items() if gpu == device)
        del placed[victim], arbiter.WORKERS[victim]
        age += 1
        placed[age] = _spawn(arbiter, hooks, age=age, pid=age)
        assert placed[age] == device, f"worker {victim} ran on GPU {device}; its replacement went to {placed[age]}"
        per_gpu = [list(placed.values()).count(str(g)) for g in range(gpus)]
        assert per_gpu == [workers // gpus] * gpus, per_gpu  # never two workers' worth on one GPU, one idle
    assert os.environ["OMP_NUM_THREADS"] == str(8 // workers)  # the CPU cores shared among the workers


SETTINGS = (BATCH_ENV, MAX_PAYLOAD_IN_MB_ENV, MAX_BODY_MB_ENV, SERVING_MODE_ENV,
            MODEL_SERVER_TIMEOUT_ENV, MODEL_SERVER_WORKERS_ENV, BIND_TO_PORT_ENV, TTA_ENV,
            MAX_PIXELS_ENV, MAX_IMAGE_MB_ENV)


@pytest.fixture
def environ(monkeypatch):
    """The server's settings unset, and a function that sets some."""
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return lambda values: [monkeypatch.setenv(name, value) for name, value in values.items()]


@pytest.mark.parametrize("values, mode, body, timeout", [
    ({}, "realtime", REALTIME_MAX_PAYLOAD_BYTES, REALTIME_TIMEOUT_S),
    ({BATCH_ENV: "true"}, "batch", BATCH_MAX_PAYLOAD_MB * 2**20, BATCH_TIMEOUT_S),
    ({BATCH_ENV: "True", MAX_PAYLOAD_IN_MB_ENV: "20"}, "batch", 20 * 2**20, BATCH_TIMEOUT_S),
    ({BATCH_ENV: "true", MAX_PAYLOAD_IN_MB_ENV: "0"}, "batch", BATCH_MAX_PAYLOAD_MB * 2**20,
     BATCH_TIMEOUT_S),  # 0: the job set no limit of its own; the service's 100 MB still holds
    ({SERVING_MODE_ENV: "async"}, "async", ASYNC_MAX_PAYLOAD_BYTES, ASYNC_TIMEOUT_S),
    ({MODEL_SERVER_TIMEOUT_ENV: "300", MAX_BODY_MB_ENV: "50"}, "realtime", 50 * 2**20, 300),
])
def test_limits_follow_the_mode(environ, values, mode, body, timeout):
    environ(values)
    settings = serving.read_settings()
    assert (settings.mode, settings.max_body_bytes, settings.timeout_s, settings.problems) == (mode, body, timeout, ())


@pytest.mark.parametrize("values, fragment", [
    ({SERVING_MODE_ENV: "streaming"}, "UNETSEG_SERVING_MODE='streaming': use realtime, batch or async"),
    ({MODEL_SERVER_TIMEOUT_ENV: "1m"}, "SAGEMAKER_MODEL_SERVER_TIMEOUT='1m': a whole number of seconds"),
    ({MODEL_SERVER_TIMEOUT_ENV: "0"}, "SAGEMAKER_MODEL_SERVER_TIMEOUT='0': a whole number of seconds"),
    ({MAX_BODY_MB_ENV: "-1"}, "UNETSEG_MAX_BODY_MB='-1': a positive number of megabytes"),
    ({BATCH_ENV: "true", MAX_PAYLOAD_IN_MB_ENV: "101"},
     "SAGEMAKER_MAX_PAYLOAD_IN_MB='101': 0 to 100"),
    ({BIND_TO_PORT_ENV: "http"}, "SAGEMAKER_BIND_TO_PORT='http': a port number"),
])
def test_a_bad_setting_is_named_and_its_default_used(environ, values, fragment):
    environ(values)
    settings = serving.read_settings()
    assert len(settings.problems) == 1 and settings.problems[0].startswith(fragment), settings.problems
    assert "\n" not in settings.problems[0]
    defaults = serving.ServerSettings("batch" if BATCH_ENV in values else "realtime",
                                      BATCH_MAX_PAYLOAD_MB * 2**20 if BATCH_ENV in values else
                                      REALTIME_MAX_PAYLOAD_BYTES,
                                      BATCH_TIMEOUT_S if BATCH_ENV in values else REALTIME_TIMEOUT_S,
                                      serving.DEFAULT_MAX_PIXELS, "none", None, serving.DEFAULT_PORT, settings.problems)
    assert settings == defaults


def test_every_bad_setting_is_named_at_once(environ):
    environ({SERVING_MODE_ENV: "x", MAX_BODY_MB_ENV: "y", MAX_IMAGE_MB_ENV: "z",
             MODEL_SERVER_WORKERS_ENV: "w"})
    names = [problem.split("=")[0] for problem in serving.read_settings().problems]
    assert names == [SERVING_MODE_ENV, MAX_BODY_MB_ENV, MODEL_SERVER_WORKERS_ENV,
                     MAX_IMAGE_MB_ENV]


def test_the_port_comes_from_sagemaker_bind_to_port(environ):
    assert serving.read_settings().port == 8080
    environ({BIND_TO_PORT_ENV: "9123"})
    assert serving.read_settings().port == 9123  # an inference pipeline's container (serve's --port wins)
