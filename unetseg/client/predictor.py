"""The client side of a unetseg endpoint: numpy images in, numpy masks out. No torch.

`UNetEstimator.deploy(...)` returns a `UNetPredictor`; one can also be made for an existing endpoint:

    predictor = UNetPredictor("my-endpoint")
    mask = predictor.predict(image)                 # (H, W) uint8 class indices
    probs = predictor.predict_proba(image)          # (C, H, W) float32 class probabilities
    summary = predictor.predict_json(image)         # {"pixel_counts": {...}, "mask": (H, W) uint8, ...}

The wire formats are unetseg.contract.codecs', the same module the server (unetseg.container.serving) decodes and
encodes with: requests go as image/png (default), image/jpeg or application/x-npy; masks come back as a palette PNG,
probabilities as application/x-npy (asked for with the custom attribute `output=probabilities`), summaries as
application/json.

An asynchronous endpoint (`deploy(..., async_inference=True)`) returns a `UNetAsyncPredictor`: images up to 1 GB through
S3, `predict_async(image)` returning a handle whose `result()` decodes as above (unetseg.client.async_inference).

A real-time endpoint carries at most 6 MB each way (sagemaker_env.REALTIME_MAX_PAYLOAD_BYTES). The predictor refuses
before sending a request body over it, and a request whose answer is known to be over it (probabilities: float16,
C x H x W; a .npy mask: H x W), saying what to use instead.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from sagemaker.deserializers import BaseDeserializer
from sagemaker.predictor import Predictor
from sagemaker.serializers import BaseSerializer
from sagemaker.transformer import Transformer

from ..contract import codecs
from ..contract.errors import UnetsegError
from ..contract.sagemaker_env import (
    ASYNC_MAX_PAYLOAD_BYTES,
    ASYNC_MAX_REQUEST_TTL_S,
    ASYNC_MAX_TIMEOUT_S,
    BATCH_MAX_PAYLOAD_MB,
    REALTIME_MAX_PAYLOAD_BYTES,
)
from . import job_rules as rules
from .local_mode import LOCAL_OUTPUT_DIR
from .quiet_sdk import quiet_v2_notice

_EXTENSION_TYPES = {".png": codecs.PNG, ".jpg": codecs.JPEG, ".jpeg": codecs.JPEG, ".npy": codecs.NPY,
                    ".tif": codecs.TIFF, ".tiff": codecs.TIFF}


class ImageSerializer(BaseSerializer):
    """A numpy image (HxW or HxWxC; uint8, uint16, or float with application/x-npy), a PIL image, or the bytes of an
    already-encoded file, as a request body of `content_type`.

    PNG (the default) is lossless and keeps 16-bit images; JPEG is smaller but changes pixels; application/x-npy
    and image/tiff send the array as it is (float images and any number of bands included: multispectral images).
    """

    def __init__(self, content_type: str = codecs.PNG):
        self.content_type = codecs.checked_type(content_type, codecs.REQUEST_TYPES, "content_type")

    @property
    def CONTENT_TYPE(self) -> str:  # noqa: N802 - the SDK's name
        return self.content_type

    def serialize(self, data: Any) -> bytes:
        if isinstance(data, (bytes, bytearray, memoryview)):
            return bytes(data)  # already encoded; it must be of CONTENT_TYPE
        if isinstance(data, (str, os.PathLike)):
            path = Path(data)
            if _EXTENSION_TYPES.get(path.suffix.lower()) == self.content_type:
                return path.read_bytes()  # already in the wire format
            data = _read_image(path)
        if hasattr(data, "mode") and hasattr(data, "convert"):  # a PIL image: palette indices are not pixels
            data = data.convert("RGB") if data.mode in ("P", "CMYK", "YCbCr") else \
                data.convert("L") if data.mode == "1" else data
        array = np.asarray(data)
        if array.dtype == object or array.ndim not in (2, 3):
            raise TypeError(f"cannot send {type(data).__name__} of shape {array.shape}: pass an HxW or HxWxC image "
                            "array, a PIL image, a file path, or encoded bytes")
        bands = array.shape[2] if array.ndim == 3 else 1
        if self.content_type in (codecs.PNG, codecs.JPEG) and bands not in (1, 3):
            raise ValueError(f"an image of {bands} bands cannot be sent as {self.content_type}, which holds grayscale "
                             f"or RGB: use UNetPredictor(..., content_type='{codecs.NPY}') or '{codecs.TIFF}'")
        if self.content_type not in (codecs.NPY, codecs.TIFF) and array.dtype.kind == "f":
            raise ValueError(f"a {array.dtype} image cannot be sent as {self.content_type}: convert it to uint8 or "
                             f"uint16, or use UNetPredictor(..., content_type='{codecs.NPY}')")
        if self.content_type == codecs.JPEG and array.dtype != np.uint8:
            raise ValueError(f"JPEG carries 8-bit images only; this one is {array.dtype}: send it as {codecs.PNG}")
        return codecs.encode_image(array, self.content_type)


def _read_image(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    return codecs.decode_image(path.read_bytes(), codecs.PNG)  # PIL (and OpenCV for 16-bit colour) sniff the format


class MaskDeserializer(BaseDeserializer):
    """A response body as numpy, decided by the response's content type (whatever was asked for):

    - image/png: the (H, W) uint8 class-index mask (the PNG's palette indices, not its colours);
    - application/x-npy: the array sent, i.e. the (H, W) uint8 mask or (C, H, W) probabilities (float32 here);
    - application/json: a dict with `shape`, `class_names`, `pixel_counts` ({class name: pixels}) and `mask`, the
      run-length encoding decoded to an (H, W) uint8 array.
    """

    def __init__(self, accept: str = codecs.PNG):
        self.accept = codecs.checked_type(accept, codecs.RESPONSE_TYPES, "accept")

    @property
    def ACCEPT(self) -> tuple[str, ...]:  # noqa: N802 - the SDK's name
        return (self.accept,)

    def deserialize(self, stream: Any, content_type: Optional[str]) -> Any:
        try:
            body = stream.read() if hasattr(stream, "read") else bytes(stream)
        finally:
            if hasattr(stream, "close"):
                stream.close()
        return decode_response(body, content_type)


def decode_response(body: bytes, content_type: Optional[str]) -> Any:
    """An /invocations response body (see MaskDeserializer) as numpy."""
    kind = codecs.media_type(content_type)
    if kind == codecs.PNG:
        from PIL import Image

        with Image.open(io.BytesIO(body)) as image:
            if image.mode not in ("P", "L"):
                raise ValueError(f"expected a class-index PNG (mode P or L), got mode {image.mode}")
            return np.array(image, dtype=np.uint8)  # mode P: the palette indices, i.e. the classes
    if kind == codecs.NPY:
        array = np.load(io.BytesIO(body), allow_pickle=False)
        return array.astype(np.float32) if array.dtype == np.float16 else array
    if kind == codecs.JSON:
        payload = json.loads(body)
        if "error" in payload and "mask" not in payload:
            raise ValueError(f"the endpoint answered with an error: {payload['error']}")
        return {**payload, "mask": codecs.decode_json_mask(payload)}
    raise ValueError(f"unexpected response content type {content_type!r}; a unetseg endpoint answers "
                     f"{', '.join(codecs.RESPONSE_TYPES)}")


class PayloadTooLarge(UnetsegError, ValueError):
    """A request, or its known answer, is over what a real-time endpoint carries."""


# The fewest classes a unetseg model has: the size of probabilities when the predictor does not know the model.
_MIN_CLASSES = 2


class UNetPredictor(Predictor):
    """Send images to a unetseg endpoint (or a local-mode one) and get numpy masks back.

    Args:
        endpoint_name: the endpoint.
        sagemaker_session: a sagemaker.Session (LocalSession for local mode); default: one from the AWS config.
        serializer / deserializer: default `ImageSerializer(content_type)` and `MaskDeserializer()`.
        content_type: how images travel: image/png (default, lossless), image/jpeg, image/tiff or application/x-npy
            (these two carry any number of bands: multispectral images).
        classes: the model's class count, for the size of `predict_proba`'s answer (deploy() sets it); default 2,
            the fewest a model has.
    """

    def __init__(self, endpoint_name: str, sagemaker_session: Any = None, serializer: Optional[BaseSerializer] = None,
                 deserializer: Optional[BaseDeserializer] = None, *, content_type: str = codecs.PNG,
                 classes: Optional[int] = None, **kwargs: Any):
        quiet_v2_notice(type(self).__name__)
        super().__init__(endpoint_name, sagemaker_session=sagemaker_session,
                         serializer=serializer or ImageSerializer(content_type),
                         deserializer=deserializer or MaskDeserializer(), **kwargs)
        self.classes = classes

    def predict(self, data: Any, initial_args: Optional[dict] = None, target_model: Optional[str] = None,
                target_variant: Optional[str] = None, inference_id: Optional[str] = None,
                custom_attributes: Optional[str] = None, component_name: Optional[str] = None, *,
                tile: Optional[int] = None, tta: Optional[str] = None) -> Any:
        """The (H, W) uint8 mask of one image (numpy array, PIL image, file path or encoded bytes).

        `tile`: have the server predict in overlapping tiles of this many pixels (large images).
        `tta`: "flip" or "d4", test-time augmentation on the server (4 or 8 forward passes averaged).
        """
        return super().predict(data, initial_args=initial_args, target_model=target_model,
                               target_variant=target_variant, inference_id=inference_id,
                               custom_attributes=request_options(custom_attributes, tile=tile, tta=tta),
                               component_name=component_name)

    def predict_proba(self, data: Any, *, tile: Optional[int] = None, tta: Optional[str] = None,
                      **kwargs: Any) -> np.ndarray:
        """(C, H, W) float32 class probabilities (sent as float16 by the server)."""
        return self._predict_as(codecs.NPY, data, kwargs, tile=tile, tta=tta, output="probabilities")

    def predict_json(self, data: Any, *, tile: Optional[int] = None, tta: Optional[str] = None,
                     **kwargs: Any) -> dict:
        """Per-class pixel counts and the mask: {"shape", "class_names", "pixel_counts", "mask"}."""
        return self._predict_as(codecs.JSON, data, kwargs, tile=tile, tta=tta)

    def delete_endpoint(self, delete_endpoint_config: bool = True) -> None:
        """Delete the endpoint (and its config); a local endpoint's stopped container goes too."""
        from .local_mode import install_serving_cleanup

        install_serving_cleanup()
        super().delete_endpoint(delete_endpoint_config)

    def predict_many(self, images: Sequence[Any], **kwargs: Any) -> list[np.ndarray]:
        """Masks for several images, one request each (an endpoint takes one image per request)."""
        return [self.predict(image, **kwargs) for image in images]

    def _create_request_args(self, data: Any, initial_args: Optional[dict] = None, *args: Any, **kwargs: Any) -> dict:
        request = super()._create_request_args(data, initial_args, *args, **kwargs)
        self._check_payloads(request)
        return request

    def _check_payloads(self, request: dict) -> None:
        body = request.get("Body")
        size = len(body) if isinstance(body, (bytes, bytearray, memoryview)) else None
        if size is not None and size > REALTIME_MAX_PAYLOAD_BYTES:
            raise PayloadTooLarge(
                f"this request is {size:,} bytes of {request.get('ContentType')}; a real-time endpoint takes at most "
                f"{REALTIME_MAX_PAYLOAD_BYTES:,} bytes (6 MiB) per request: send the image as image/jpeg "
                "(UNetPredictor(..., content_type='image/jpeg'), smaller but lossy), send a smaller image or crop, or "
                f"run a batch transform over the images in S3 (est.transformer(...).transform('s3://...'), up to "
                f"{BATCH_MAX_PAYLOAD_MB} MB per image), or deploy an asynchronous endpoint "
                "(est.deploy(..., async_inference=True): up to 1 GB per image)")
        accept = codecs.media_type(request.get("Accept"))
        if accept != codecs.NPY or size is None:
            return  # a PNG or JSON answer is compressed: its size is not known before it is made
        probabilities = "output=probabilities" in (request.get("CustomAttributes") or "").replace(" ", "")
        shape = _image_shape(bytes(body), request.get("ContentType"))
        if shape is None:
            return
        answer = self.response_bytes(shape, accept=accept, probabilities=probabilities)
        if answer > REALTIME_MAX_PAYLOAD_BYTES:
            classes = self.classes or _MIN_CLASSES
            height, width = shape
            if not probabilities:
                raise PayloadTooLarge(
                    f"the .npy mask of a {height}x{width} image is {answer:,} bytes, over the "
                    f"{REALTIME_MAX_PAYLOAD_BYTES:,}-byte (6 MiB) answer a real-time endpoint carries; ask for it as a "
                    "PNG (predict(), compressed) or run a batch transform")
            pixels = (REALTIME_MAX_PAYLOAD_BYTES - 1024) // (2 * classes)
            side = int(pixels ** 0.5)
            raise PayloadTooLarge(
                f"predict_proba of a {height}x{width} image with {classes} classes answers {answer:,} bytes "
                f"(float16 probabilities), over the {REALTIME_MAX_PAYLOAD_BYTES:,}-byte (6 MiB) answer a real-time "
                "endpoint carries; ask for the mask (predict(), a compressed PNG) or per-class pixel counts "
                f"(predict_json()), or call predict_proba on crops of at most {pixels:,} pixels (e.g. {side}x{side}); "
                "a batch transform writes masks")

    def response_bytes(self, shape: tuple[int, int], *, accept: str, probabilities: bool = False) -> int:
        """The exact size of an application/x-npy answer for an image of `shape` (H, W): float16 probabilities
        (classes x H x W) or the uint8 mask."""
        if codecs.media_type(accept) != codecs.NPY:
            raise ValueError(f"only application/x-npy answers have a size known in advance, not {accept!r}")
        full = ((self.classes or _MIN_CLASSES), *shape) if probabilities else tuple(shape)
        dtype = np.dtype(np.float16 if probabilities else np.uint8)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": full})
        return len(header.getvalue()) + int(np.prod(full)) * dtype.itemsize

    def _predict_as(self, accept: str, data: Any, kwargs: dict, *, tile: Optional[int], tta: Optional[str],
                    output: Optional[str] = None) -> Any:
        initial_args = {**(kwargs.pop("initial_args", None) or {}), "Accept": accept}
        custom = request_options(kwargs.pop("custom_attributes", None), tile=tile, tta=tta, output=output)
        return Predictor.predict(self, data, initial_args=initial_args, custom_attributes=custom, **kwargs)


def _image_shape(body: bytes, content_type: Optional[str]) -> Optional[tuple[int, int]]:
    """(H, W) of an encoded request image, from its header only; None where it cannot be told."""
    try:
        if codecs.media_type(content_type) == codecs.NPY:
            stream = io.BytesIO(body)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(stream))
            if read_header is None:
                return None
            shape, _, _ = read_header(stream)  # the header only, not the data
            return (int(shape[0]), int(shape[1])) if len(shape) >= 2 else None
        from PIL import Image

        with Image.open(io.BytesIO(body)) as image:  # reads the header; the pixels stay undecoded
            return image.height, image.width
    except Exception:  # noqa: BLE001 - not an image we can size: the server decides
        return None


def request_options(custom_attributes: Optional[str] = None, *, tile: Optional[int] = None,
                    tta: Optional[str] = None, output: Optional[str] = None) -> Optional[str]:
    """The CustomAttributes header the server reads (`output=probabilities; tile=512; tta=flip`), added to the
    caller's own."""
    parts = [custom_attributes.strip()] if custom_attributes and custom_attributes.strip() else []
    if output is not None:
        parts.append(f"output={output}")
    if tile is not None:
        if int(tile) < 32:
            raise ValueError(f"tile={tile}: use 32 pixels or more")
        parts.append(f"tile={int(tile)}")
    if tta is not None and tta != "none":
        if tta not in codecs.TTA_MODES:
            raise ValueError(f"tta={tta!r}: use one of {', '.join(codecs.TTA_MODES)}")
        parts.append(f"tta={tta}")
    return "; ".join(parts) or None


def oversized_inputs(s3: Any, prefix_uri: str, limit_mb: int) -> list[str]:
    """Each object under `prefix_uri` larger than a batch transform's MaxPayloadInMB: the job would start its instances
    and then fail on it. Found by listing the prefix (sizes come with the listing), as SageMaker reads it."""
    bucket, _, prefix = prefix_uri[len("s3://"):].partition("/")
    limit = limit_mb * 2**20
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", ()):
            if item["Size"] > limit:
                found.append(f"s3://{bucket}/{item['Key']} is {item['Size'] / 2**20:.1f} MiB, over the batch "
                             f"transform's payload limit of {limit_mb} MiB (MaxPayloadInMB, at most "
                             f"{BATCH_MAX_PAYLOAD_MB}): run "
                             "`unetseg predict --input <the file>` where it is (a notebook or processing job: it reads "
                             "TIFFs window by window), or cut the image into smaller files")
    return found


class UNetTransformer(Transformer):
    """A batch transform with defaults that fit a folder of images (made by `UNetEstimator.transformer`).

    `transform(data)` sends each object under `data` as one request of `content_type` (default image/png; use
    image/jpeg for JPEGs) and writes `<output_path>/<object name>.out` in the transformer's `accept` type. In local
    mode `data` may be a local folder and the output defaults to ./unetseg-output/<job name>/.
    """

    def transform(self, data: Any, data_type: str = "S3Prefix", content_type: Optional[str] = codecs.PNG,
                  compression_type: Optional[str] = None, split_type: Optional[str] = None,
                  job_name: Optional[str] = None, **kwargs: Any) -> Any:
        if content_type is not None and codecs.media_type(content_type) not in codecs.REQUEST_TYPES:
            raise ValueError(f"content_type={content_type!r}: a unetseg model reads "
                             f"{', '.join(codecs.REQUEST_TYPES)}")
        if split_type not in (None, "None"):
            raise ValueError(f"split_type={split_type!r}: an image is one record and cannot be split")
        rules.raise_if([rules.job_name_problem("job_name", job_name)])
        if data_type == "S3Prefix" and isinstance(data, str) and data.startswith("s3://"):
            rules.raise_if(oversized_inputs(self.sagemaker_session.boto_session.client("s3"), data,
                                            self.max_payload or BATCH_MAX_PAYLOAD_MB))
        local_output = False
        if self.sagemaker_session.local_mode:
            # The local client runs the whole job before CreateTransformJob returns; waiting would only sleep.
            kwargs["wait"] = False
            if isinstance(data, (str, os.PathLike)) and "://" not in str(data):
                data = Path(data).resolve().as_uri()  # the SDK's local mode reads file:// or s3:// only
            if self.output_path is None or getattr(self, "_reset_output_path", False):
                from sagemaker.utils import name_from_base

                job_name = job_name or name_from_base(self.base_transform_job_name or self._retrieve_base_name())
                self.output_path = (Path.cwd() / LOCAL_OUTPUT_DIR / job_name).as_uri() + "/"
                self._reset_output_path = False  # the SDK would replace a path it did not choose with S3
                local_output = True
        try:
            return super().transform(data, data_type=data_type, content_type=content_type,
                                     compression_type=compression_type, split_type=split_type, job_name=job_name,
                                     **kwargs)
        finally:
            if local_output:
                self._reset_output_path = True  # a new folder for the next job, as the SDK does on S3

    def _retrieve_base_name(self) -> str:
        # The SDK names transform jobs after the model's image repository, which may hold `_` or `.`.
        image_uri = self._retrieve_image_uri()
        return rules.base_name_from_image(image_uri) if image_uri else self.model_name

    def wait(self, logs: bool = True) -> None:
        """Wait for the latest transform job. A local one has already run inside `transform()` (its container's
        output was printed): the SDK's wait would sleep a poll interval first, and its log tailing would ask
        CloudWatch (AWS credentials, network) for logs that do not exist."""
        if self.sagemaker_session.local_mode:
            self._ensure_last_transform_job()
            name = self.latest_transform_job.name
            if self.sagemaker_session.describe_transform_job(name)["TransformJobStatus"] == "Completed":
                return
            logs = False
        super().wait(logs=logs)


# --- asynchronous endpoints ----------------------------------------------------------------------------------------

# Files an async request sends as they are (the server reads each of these formats), by extension; and back.
_ASYNC_FILE_TYPES = {**_EXTENSION_TYPES, ".tif": codecs.TIFF, ".tiff": codecs.TIFF}
_TYPE_EXTENSIONS = {codecs.PNG: ".png", codecs.JPEG: ".jpg", codecs.TIFF: ".tif", codecs.NPY: ".npy"}
# predict_async(output=...) -> (Accept, the `output` custom attribute)
_ASYNC_OUTPUTS = {"mask": (codecs.PNG, None), "probabilities": (codecs.NPY, "probabilities"),
                  "json": (codecs.JSON, None)}


class UNetAsyncPredictor(UNetPredictor):
    """An asynchronous unetseg endpoint (`UNetEstimator.deploy(..., async_inference=True)`): images of up to 1 GB,
    requests of up to an hour, through S3 (see unetseg.client.async_inference).

        handle = predictor.predict_async(image)                # or an s3:// URI of an image already there
        mask = handle.result(timeout=1800)                     # (H, W) uint8, as UNetPredictor.predict gives
        probs = predictor.predict_async(image, output="probabilities").result()
        mask = predictor.predict(image)                        # predict_async(image).result()

    An image is uploaded to `input_path` (deploy() sets <job prefix>/async-input/; default s3://<session's default
    bucket>/unetseg/async-input/<endpoint>/): a .png, .jpg, .tif or .npy file as it is (streamed, with the content type
    of its extension), an array, PIL image or bytes as `content_type`. An s3:// URI is sent as it is, with the content
    type of its extension, else `content_type`.

    A local endpoint (instance_type='local') has no asynchronous inference: it answers each request at once, and
    predict_async returns a handle that is already done.
    """

    def __init__(self, endpoint_name: str, sagemaker_session: Any = None, serializer: Optional[BaseSerializer] = None,
                 deserializer: Optional[BaseDeserializer] = None, *, content_type: str = codecs.PNG,
                 classes: Optional[int] = None, input_path: Optional[str] = None, **kwargs: Any):
        super().__init__(endpoint_name, sagemaker_session, serializer, deserializer, content_type=content_type,
                         classes=classes, **kwargs)
        if input_path is not None:
            rules.check_s3_uri("input_path", input_path)
        self.input_path = input_path
        self.scale_to_zero = None  # what enable_scale_to_zero() set up

    def predict_async(self, data: Any, *, output: Optional[str] = None, tile: Optional[int] = None,
                      tta: Optional[str] = None, inference_id: Optional[str] = None,
                      invocation_timeout_s: Optional[int] = None, request_ttl_s: Optional[int] = None,
                      custom_attributes: Optional[str] = None) -> Any:
        """Queue one image (or an s3:// URI of one) and return its `AsyncInference` handle.

        `output`: "mask" (a PNG, decoded to (H, W) uint8), "probabilities" ((C, H, W) float32) or "json" (pixel counts
        and the mask); default: what the deserializer accepts (the mask). `tile`, `tta`: as UNetPredictor.predict.
        `invocation_timeout_s`: the request's time limit on the endpoint (SageMaker's default 900 s, at most 3600; the
        server's own is SAGEMAKER_MODEL_SERVER_TIMEOUT, set at deploy). `request_ttl_s`: how long it may wait in the
        queue (default 6 hours).
        """
        from .async_inference import AsyncInference

        if output is not None and output not in _ASYNC_OUTPUTS:
            raise ValueError(f"output={output!r}: use one of {', '.join(_ASYNC_OUTPUTS)}")
        accept, option = _ASYNC_OUTPUTS[output] if output else (self.accept[0], None)
        custom = request_options(custom_attributes, tile=tile, tta=tta, output=option)
        problems = [_seconds_problem("invocation_timeout_s", invocation_timeout_s, 1, ASYNC_MAX_TIMEOUT_S),
                    _seconds_problem("request_ttl_s", request_ttl_s, 60, ASYNC_MAX_REQUEST_TTL_S)]
        rules.raise_if(problems)
        if self.sagemaker_session.local_mode:
            return AsyncInference.completed(self._answer_now(data, accept, custom), inference_id=inference_id)
        input_location, content_type = self._input_location(data)
        request = {"EndpointName": self.endpoint_name, "InputLocation": input_location, "ContentType": content_type,
                   "Accept": accept}
        for name, value in (("CustomAttributes", custom), ("InferenceId", inference_id),
                            ("InvocationTimeoutSeconds", invocation_timeout_s), ("RequestTTLSeconds", request_ttl_s)):
            if value is not None:
                request[name] = value
        response = self.sagemaker_session.sagemaker_runtime_client.invoke_endpoint_async(**request)
        return AsyncInference(self._s3(), output_location=response["OutputLocation"],
                              failure_location=response.get("FailureLocation"),
                              inference_id=response.get("InferenceId"), input_location=input_location,
                              decode=self._decode)

    def predict(self, data: Any, *, tile: Optional[int] = None, tta: Optional[str] = None,  # type: ignore[override]
                timeout: Optional[float] = None, **kwargs: Any) -> Any:
        """The mask of one image: predict_async(...).result(timeout) (default: async_inference.DEFAULT_WAIT_S)."""
        return self._wait(self.predict_async(data, tile=tile, tta=tta, **kwargs), timeout)

    def predict_proba(self, data: Any, *, tile: Optional[int] = None, tta: Optional[str] = None,
                      timeout: Optional[float] = None, **kwargs: Any) -> np.ndarray:
        """(C, H, W) float32 class probabilities, of any size: no 6 MB limit here."""
        return self._wait(self.predict_async(data, output="probabilities", tile=tile, tta=tta, **kwargs), timeout)

    def predict_json(self, data: Any, *, tile: Optional[int] = None, tta: Optional[str] = None,
                     timeout: Optional[float] = None, **kwargs: Any) -> dict:
        return self._wait(self.predict_async(data, output="json", tile=tile, tta=tta, **kwargs), timeout)

    def enable_scale_to_zero(self, max_instances: int = 1, **kwargs: Any) -> Any:
        """Let this endpoint go to 0 instances while its queue is empty, and up to `max_instances` under load; see
        unetseg.client.autoscaling.enable_scale_to_zero for the policies and their settings."""
        from .autoscaling import enable_scale_to_zero

        self.scale_to_zero = enable_scale_to_zero(self.sagemaker_session, self.endpoint_name,
                                                  max_instances=max_instances, **kwargs)
        return self.scale_to_zero

    def disable_scale_to_zero(self) -> None:
        from .autoscaling import disable_scale_to_zero

        disable_scale_to_zero(self.sagemaker_session, self.endpoint_name, setup=self.scale_to_zero)
        self.scale_to_zero = None

    def delete_endpoint(self, delete_endpoint_config: bool = True) -> None:
        """Delete the endpoint (and its config), and the scale-to-zero alarm and target this predictor set up."""
        if self.scale_to_zero is not None:
            self.disable_scale_to_zero()
        super().delete_endpoint(delete_endpoint_config)

    # --- helpers ---
    @staticmethod
    def _wait(handle: Any, timeout: Optional[float]) -> Any:
        from .async_inference import DEFAULT_WAIT_S

        return handle.result(DEFAULT_WAIT_S if timeout is None else timeout)

    def _decode(self, body: bytes, content_type: Optional[str]) -> Any:
        from .async_inference import answer_type

        return self.deserializer.deserialize(io.BytesIO(body), answer_type(body, content_type) or content_type)

    def _s3(self) -> Any:
        session = self.sagemaker_session
        return session.s3_client or session.boto_session.client("s3", region_name=session.boto_region_name)

    def _input_location(self, data: Any) -> tuple[str, str]:
        """Where the request's image is in S3, and its content type: an s3:// URI as it is, else uploaded."""
        import uuid

        if isinstance(data, str) and data.startswith("s3://"):
            rules.check_s3_uri("data", data)
            return data, _ASYNC_FILE_TYPES.get(Path(data).suffix.lower(), self.content_type)
        bucket, key_prefix = rules.split_s3_uri(self.input_path or self._default_input_path())
        s3 = self._s3()
        path = Path(data) if isinstance(data, (str, os.PathLike)) else None
        kind = _ASYNC_FILE_TYPES.get(path.suffix.lower()) if path is not None else None
        if kind is not None:  # a file the server reads as it is: streamed to S3, never decoded here
            key = f"{key_prefix.rstrip('/')}/{uuid.uuid4()}{path.suffix.lower()}".lstrip("/")
            _check_async_size(path.stat().st_size, kind)
            s3.upload_file(str(path), bucket, key, ExtraArgs={"ContentType": kind})
            return f"s3://{bucket}/{key}", kind
        key = f"{key_prefix.rstrip('/')}/{uuid.uuid4()}{_TYPE_EXTENSIONS[self.content_type]}".lstrip("/")
        body = self.serializer.serialize(data)
        _check_async_size(len(body), self.content_type)
        s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=self.content_type)
        return f"s3://{bucket}/{key}", self.content_type

    def _default_input_path(self) -> str:
        session = self.sagemaker_session
        parts = [session.default_bucket(), session.default_bucket_prefix, "unetseg", "async-input", self.endpoint_name]
        return "s3://" + "/".join(part.strip("/") for part in parts if part) + "/"

    def _answer_now(self, data: Any, accept: str, custom: Optional[str]) -> Any:
        """Local mode: the same request, sent to the local endpoint at once."""
        initial_args = {"Accept": accept}
        if isinstance(data, str) and data.startswith("s3://"):
            bucket, key = rules.split_s3_uri(rules.check_s3_uri("data", data))
            data = self._s3().get_object(Bucket=bucket, Key=key)["Body"].read()
            initial_args["ContentType"] = _ASYNC_FILE_TYPES.get(Path(key).suffix.lower(), self.content_type)
        return Predictor.predict(self, data, initial_args=initial_args, custom_attributes=custom)

    def _check_payloads(self, request: dict) -> None:
        # Local mode's only requests: the local server runs with the async limits (deploy sets them), not 6 MB.
        body = request.get("Body")
        if isinstance(body, (bytes, bytearray, memoryview)):
            _check_async_size(len(body), request.get("ContentType"))


def _check_async_size(size: int, content_type: Optional[str]) -> None:
    if size > ASYNC_MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(f"this image is {size:,} bytes of {content_type}; an asynchronous endpoint takes at most "
                              f"{ASYNC_MAX_PAYLOAD_BYTES:,} bytes (1 GiB) per request: send it as image/jpeg, or "
                              "split it into crops")


def _seconds_problem(name: str, value: Any, low: int, high: int) -> Optional[str]:
    if value is None or (rules.is_whole(value, minimum=low) and value <= high):
        return None
    return f"{name}={value!r}: use a whole number of seconds from {low} to {high}"
