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
from ..contract.sagemaker_env import BATCH_MAX_PAYLOAD_MB, REALTIME_MAX_PAYLOAD_BYTES
from . import job_rules as rules
from .local_mode import LOCAL_OUTPUT_DIR
from .quiet_sdk import quiet_v2_notice

_EXTENSION_TYPES = {".png": codecs.PNG, ".jpg": codecs.JPEG, ".jpeg": codecs.JPEG, ".npy": codecs.NPY}


class ImageSerializer(BaseSerializer):
    """A numpy image (HxW or HxWxC; uint8, uint16, or float with application/x-npy), a PIL image, or the bytes of an
    already-encoded file, as a request body of `content_type`.

    PNG (the default) is lossless and keeps 16-bit images; JPEG is smaller but changes pixels; application/x-npy
    sends the array as it is (float images included).
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
        if self.content_type != codecs.NPY and array.dtype.kind == "f":
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
        content_type: how images travel: image/png (default, lossless), image/jpeg, or application/x-npy.
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
                f"{BATCH_MAX_PAYLOAD_MB} MB per image)")
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
