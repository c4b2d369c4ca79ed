"""Asynchronous inference: a request through S3, for images that a real-time endpoint cannot take. No torch.

A real-time endpoint carries at most 6 MB each way and answers within 60 s. An asynchronous endpoint (the same image,
deployed with `UNetEstimator.deploy(..., async_inference=True)`) reads its input from S3 (up to 1 GB), runs each
request for up to an hour (InvocationTimeoutSeconds, default 15 minutes), queues requests while it is busy or scaled
to zero, and writes each answer to S3:

- the answer: <S3OutputPath>/<inference id>.out, the container's response body as it is (its Content-Type kept);
- a failure: <S3FailurePath>/<inference id>-error.out, the container's error body (unetseg's server answers
  {"error": "<reason>"}) or the service's own message.

InvokeEndpointAsync returns both locations at once; `AsyncInference.result()` polls S3 for whichever appears first,
decodes an answer with the real-time predictor's decoder (predictor.decode_response), and raises AsyncInferenceFailed
with the server's reason for a failure.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Optional

from ..contract import codecs
from ..contract.errors import UnetsegError
from ..contract.sagemaker_env import ASYNC_TIMEOUT_S
from . import job_rules as rules

logger = logging.getLogger(__name__)

DEFAULT_POLL_S = 5.0  # S3 is asked this often whether the answer (or the failure) is there
DEFAULT_WAIT_S = ASYNC_TIMEOUT_S  # result() waits this long by default: one request's default time limit
# Under the estimator's job prefix (<output_path>/<job>/): where a deployed async endpoint's objects go by default.
ASYNC_INPUT_FOLDER, ASYNC_OUTPUT_FOLDER, ASYNC_FAILURE_FOLDER = "async-input", "async-output", "async-failures"
# Requests one instance works on at a time, by default: the server runs one model per GPU and the requests of one worker
# take turns, each on its own deadline; a request SageMaker keeps queued does not spend its time limit waiting.
DEFAULT_MAX_CONCURRENT_INVOCATIONS = 1
_FAILURE_TEXT_LIMIT = 2000  # characters of a failure object quoted in the error


class AsyncInferenceFailed(UnetsegError, RuntimeError):
    """The endpoint wrote a failure for the request: the message carries its reason."""

    def __init__(self, message: str, *, reason: str, failure_location: Optional[str] = None):
        super().__init__(message)
        self.reason, self.failure_location = reason, failure_location


class AsyncResultTimeout(UnetsegError, TimeoutError):
    """No answer and no failure yet: the request may still be queued or running (call result() again later)."""


class AsyncInference:
    """The handle of one asynchronous request: where its answer and its failure will appear, and how to decode them.

        handle = predictor.predict_async(image)       # returns once the request is queued
        mask = handle.result(timeout=1800)              # polls S3; decoded as predict() decodes it
    """

    def __init__(self, s3_client: Any, *, output_location: Optional[str], failure_location: Optional[str],
                 inference_id: Optional[str] = None, input_location: Optional[str] = None,
                 decode: Optional[Callable[[bytes, Optional[str]], Any]] = None):
        self.s3_client = s3_client
        self.output_location, self.failure_location = output_location, failure_location
        self.inference_id, self.input_location = inference_id, input_location
        self._decode = decode or _decode_answer
        self._done, self._value, self._error = False, None, None

    @classmethod
    def completed(cls, value: Any, **details: Any) -> AsyncInference:
        """A handle whose answer is already there (local mode answers at once)."""
        handle = cls(None, output_location=None, failure_location=None, **details)
        handle._done, handle._value = True, value
        return handle

    def done(self) -> bool:
        """Whether the answer or the failure is there (one look at S3, no waiting)."""
        if not self._done:
            self._look()
        return self._done

    def result(self, timeout: Optional[float] = DEFAULT_WAIT_S, poll_s: float = DEFAULT_POLL_S,
               waiter_config: Any = None) -> Any:
        """The decoded answer, waiting up to `timeout` seconds (None: for ever) for it to appear, and looking every
        `poll_s` seconds (or as the SDK's `sagemaker.async_inference.WaiterConfig(max_attempts, delay)` says).
        AsyncInferenceFailed if the endpoint wrote a failure; AsyncResultTimeout if neither appeared in time (the
        handle stays usable: call result() again)."""
        if waiter_config is not None:
            poll_s, timeout = waiter_config.delay, waiter_config.delay * max(0, waiter_config.max_attempts - 1)
        if poll_s <= 0:
            raise ValueError(f"poll_s={poll_s!r}: use a number of seconds above 0")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            self._look()
            if self._done:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise AsyncResultTimeout(
                    f"no answer for async request {self.inference_id or self.input_location} after {timeout:g} s: "
                    f"neither {self.output_location} nor {self.failure_location} exists yet. The request may still be "
                    "queued (an endpoint scaled to zero takes minutes to start an instance) or running: call "
                    "result() again to keep waiting")
            time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))
        if self._error is not None:
            raise self._error
        return self._value

    def _look(self) -> None:
        """One look at S3: the answer first (an answer written wins), then the failure. A missing object means not
        ready yet; any other S3 error is raised."""
        answer = _get_if_exists(self.s3_client, self.output_location)
        if answer is not None:
            body, content_type = answer
            self._value, self._done = self._decode(body, content_type), True
            return
        failure = _get_if_exists(self.s3_client, self.failure_location) if self.failure_location else None
        if failure is not None:
            reason = failure_reason(*failure)
            request = f"async request {self.inference_id}" if self.inference_id else "the async request"
            self._error = AsyncInferenceFailed(
                f"{request} failed on the endpoint: {reason} (input {self.input_location}; failure object "
                f"{self.failure_location})", reason=reason, failure_location=self.failure_location)
            self._done = True

    def __repr__(self) -> str:
        state = "done" if self._done else "pending"
        return f"AsyncInference({self.inference_id!r}, {state}, output={self.output_location!r})"


def _get_if_exists(s3_client: Any, uri: Optional[str]) -> Optional[tuple[bytes, Optional[str]]]:
    from botocore.exceptions import ClientError

    if not uri:
        return None
    bucket, key = rules.split_s3_uri(uri)
    try:
        response = s3_client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    with response["Body"] as stream:
        return stream.read(), response.get("ContentType")


def failure_reason(body: bytes, content_type: Optional[str] = None) -> str:
    """The reason in a failure object: the server's {"error": ...} answer, else the text as it is."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        for key in ("error", "message", "Message", "ErrorMessage"):
            if isinstance(payload.get(key), str):
                return payload[key]
    if not text:
        return "the failure object is empty (see the endpoint's CloudWatch log /aws/sagemaker/Endpoints/<endpoint>)"
    return text if len(text) <= _FAILURE_TEXT_LIMIT else f"{text[:_FAILURE_TEXT_LIMIT]}... ({len(text)} characters)"


# The first bytes of each answer type: S3 keeps the container's Content-Type on the output object, but an object copied
# or written by other tools may carry none (binary/octet-stream); the magic numbers cannot be mistaken for each other.
_MAGIC = ((b"\x89PNG\r\n\x1a\n", codecs.PNG), (b"\x93NUMPY", codecs.NPY), (b"{", codecs.JSON))


def answer_type(body: bytes, content_type: Optional[str]) -> Optional[str]:
    """The answer's media type: its Content-Type when it is one a unetseg endpoint answers, else told by its first
    bytes; None when neither says."""
    kind = codecs.media_type(content_type) if content_type else None
    if kind in codecs.RESPONSE_TYPES:
        return kind
    head = bytes(body[:8]).lstrip()
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


def _decode_answer(body: bytes, content_type: Optional[str]) -> Any:
    from .predictor import decode_response

    return decode_response(body, answer_type(body, content_type) or content_type)


def job_prefix(output_path: str, job_name: str) -> str:
    """<output_path>/<job>/: where SageMaker put the job's model.tar.gz (under output/), and its async objects go."""
    return f"{output_path.rstrip('/')}/{job_name}/"


def default_config(prefix: str, *, config: Any = None, max_concurrent_invocations: Optional[int] = None) -> Any:
    """An AsyncInferenceConfig with the output and failure paths under `prefix` (the job's) where `config` names none,
    and a MaxConcurrentInvocationsPerInstance (see DEFAULT_MAX_CONCURRENT_INVOCATIONS) where it names none."""
    from sagemaker.async_inference import AsyncInferenceConfig

    if config is None:
        config = AsyncInferenceConfig()
    elif not isinstance(config, AsyncInferenceConfig):
        raise rules.JobSettingsError(f"async_inference_config={config!r}: pass a "
                                     "sagemaker.async_inference.AsyncInferenceConfig")
    for name in ("output_path", "failure_path"):
        value = getattr(config, name)
        if value is not None:
            rules.raise_if([rules.s3_uri_problem(f"async_inference_config.{name}", value)])
    config.output_path = config.output_path or prefix + ASYNC_OUTPUT_FOLDER + "/"
    config.failure_path = config.failure_path or prefix + ASYNC_FAILURE_FOLDER + "/"
    concurrent = config.max_concurrent_invocations_per_instance or max_concurrent_invocations \
        or DEFAULT_MAX_CONCURRENT_INVOCATIONS
    if not rules.is_whole(concurrent, minimum=1):
        raise rules.JobSettingsError(f"max_concurrent_invocations_per_instance={concurrent!r}: use a whole number, "
                                     "1 or more (the requests one instance works on at a time)")
    config.max_concurrent_invocations_per_instance = int(concurrent)
    return config
