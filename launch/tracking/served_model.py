"""The registered model as MLflow serves it: an MLflow "model from code" (this file is logged with the model and
run to load it; no pickle), over two artifacts that `python -m launch export` writes: the torch.export
program (`model.pt2`) and its description (`model.json`: input size, crop ratio, mean, std, class names).

Input, any of:
- uint8 RGB images as an integer array: [N, H, W, 3] of any H and W (or one [H, W, 3] image); JSON clients
  send nested lists, `{"inputs": [...]}`, of integers 0..255;
- encoded JPEG or PNG files: bytes, or base64 strings from JSON clients, as a list or array of them, or a
  DataFrame column `image`.
Each image is cropped and resized as the run's evaluation did (the centred square of crop ratio x the shorter
side, resized to S x S; PIL bilinear, as the baseline loader), normalised, and classified. Floats are refused
rather than cast (0..1 values cast to uint8 would all become 0 or 1): send 0..255 integers or encoded files.

Output: a DataFrame, one row per image: class_id, class_name, probability, and the top-k (param `top_k`,
default 5) as lists top_k_ids, top_k_names, top_k_probabilities.

Self-contained on purpose: a serving environment needs torch, numpy, pillow, pandas and mlflow, not this
project.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image, UnidentifiedImageError


# MLflow asks for type hints on `predict` to validate inputs by them; this model checks its inputs itself.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method", category=UserWarning)


def _refuse(message: str) -> MlflowException:
    """An error the scoring server answers with 400 and this message."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class ImageClassifierModel(PythonModel):
    """Images in any of the accepted forms -> class ids, names and probabilities (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        self.program = torch.export.load(context.artifacts["program"]).module()
        self.metadata = json.loads(open(context.artifacts["metadata"]).read())
        self.size = int(self.metadata["input"]["size"])
        self.crop_ratio = float(self.metadata["input"]["crop_ratio"])
        self.mean = torch.tensor(self.metadata["input"]["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(self.metadata["input"]["std"]).view(1, 3, 1, 1)
        self.classes = self.metadata.get("classes") or [str(i) for i in range(self.metadata["num_classes"])]

    # No type hints on the arguments: MLflow would take them as an input schema to convert requests to.
    def predict(self, context, model_input, params=None) -> pd.DataFrame:  # type: ignore[no-untyped-def]
        top_k = int((params or {}).get("top_k", 5))
        if top_k < 1:
            raise _refuse(f"top_k={top_k}: must be >= 1")
        images = [self._prepare(image) for image in self._images(model_input)]
        if not images:
            raise _refuse("no images given")
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            probabilities = torch.softmax(self.program((pixels - self.mean) / self.std), dim=1)
        top = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
        ids = top.indices.tolist()
        return pd.DataFrame({
            "class_id": [row[0] for row in ids],
            "class_name": [self.classes[row[0]] for row in ids],
            "probability": top.values[:, 0].tolist(),
            "top_k_ids": ids,
            "top_k_names": [[self.classes[i] for i in row] for row in ids],
            "top_k_probabilities": top.values.tolist(),
        })

    def _images(self, model_input: Any) -> list[Any]:
        """The images of a request, each an HxWx3 uint8 array or encoded bytes."""
        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise _refuse(f"a DataFrame input needs an 'image' column (got columns {list(model_input.columns)})")
            return list(model_input["image"])
        if isinstance(model_input, dict):
            if "image" not in model_input:
                raise _refuse(f"a named input must be 'image' (got {list(model_input)})")
            model_input = model_input["image"]
        if isinstance(model_input, (bytes, str)):
            return [model_input]
        array = np.asarray(model_input) if not isinstance(model_input, np.ndarray) else model_input
        if array.dtype.kind in "SUO":  # encoded files (bytes, base64 strings)
            return list(array.reshape(-1))
        if array.dtype.kind == "f":
            raise _refuse(f"got {array.dtype} pixel values: send uint8 RGB values 0..255 (integers), or encoded "
                          "JPEG/PNG files; floats are not cast (0..1 values would all become 0 or 1)")
        if array.dtype.kind not in "iu":
            raise _refuse(f"got an array of {array.dtype}: expected uint8 RGB images or encoded JPEG/PNG files")
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] != 3:
            raise _refuse(f"got an array of shape {list(array.shape)}: expected uint8 RGB images [N, H, W, 3] or "
                          "[H, W, 3]")
        if array.size and (array.min() < 0 or array.max() > 255):
            raise _refuse(f"pixel values {array.min()}..{array.max()}: expected uint8 RGB values 0..255")
        return list(array.astype(np.uint8))

    def _prepare(self, image: Any) -> np.ndarray:
        """One image, resized and centre-cropped to the model's input: a [S, S, 3] uint8 array."""
        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
            picture = Image.fromarray(image, "RGB")
        else:
            if isinstance(image, str):
                try:
                    image = base64.b64decode(image, validate=True)
                except (binascii.Error, ValueError):
                    raise _refuse("a string input must be a base64-encoded JPEG or PNG file") from None
            if not isinstance(image, (bytes, bytearray)):
                raise _refuse(f"got {type(image).__name__}: expected an encoded JPEG/PNG file or a uint8 array")
            try:
                picture = Image.open(io.BytesIO(image))
                picture.load()
            except (UnidentifiedImageError, OSError) as error:
                raise _refuse(f"an input of {len(image)} bytes is not a decodable JPEG/PNG image: {error}") from None
            picture = picture.convert("RGB")
        # The run's evaluation crop (data_pipeline.augment.val_crop): the centred square of crop ratio x the
        # shorter side, resized to S x S in one bilinear resampling.
        width, height = picture.size
        side = max(1, round(min(width, height) * self.crop_ratio))
        left, top = (width - side) // 2, (height - side) // 2
        resized = picture.resize((self.size, self.size), Image.Resampling.BILINEAR,
                                 box=(left, top, left + side, top + side))
        return np.asarray(resized, dtype=np.uint8)


mlflow.models.set_model(ImageClassifierModel())
