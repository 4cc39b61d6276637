"""A registered version as an MLflow pyfunc model that serves raw inputs.

Every version is logged with ``mlflow.pyfunc.log_model(loader_module=
"fedround.tasks.serving", data_path=...)``: the logged model's folder holds only data and
MLflow's metadata, no code and no pickle::

    MLmodel, requirements.txt, python_env.yaml, conda.yaml
    input_example.json, serving_input_example.json
    data/fedround/weights.safetensors   the global weights (safetensors: plain tensors)
    data/fedround/model_config.json     the model factory and its keyword arguments
    data/fedround/preprocessing.json    tables: the federation's preprocessor

On load MLflow imports this module (from the installed fedround) and calls
:func:`_load_pyfunc`, which rebuilds the network with its factory (a built-in or the
user's ``package.module:function``, which must be installed where the model is loaded,
like fedround itself), reads the weights from safetensors and checks them against the
digests recorded in the MLmodel. Nothing is unpickled and nothing in the model's folder is
executed. (MLflow's "models from code" was not used: it imports a ``.py`` file from the
model's folder, and Python then writes ``__pycache__/*.pyc`` there, at logging time too,
so a registered version would carry compiled code that loading may execute.)

``mlflow.pyfunc.load_model("models:/<name>@<alias>").predict(...)``:

- arrays (the MNIST demo): a float32 ndarray ``(n, d)`` of raw features (raw 0–255
  pixels for MNIST) → a float32 ndarray of the model's **raw outputs** ``(n, k)``: logits
  for classification (``argmax(axis=1)`` is the class index), the value for regression;
- tables: a DataFrame with the declared feature columns (raw values; extra columns such as
  the label are ignored) → a DataFrame. Classification: ``prediction`` (the class label as
  the preprocessor spells it, e.g. ``"yes"`` or ``"1"``) and one ``probability_<class>``
  column per class (softmax of the logits). Regression: ``prediction`` (a float). The
  rows keep the input's index. The federation's preprocessing runs inside ``predict``.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from fedround.tasks.core.config import ModelConfig
from fedround.tasks.core.preprocessing import OTHER, Preprocessor
from fedround.tasks.core.serialization import sha256_hex

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.models import ModelSignature
    from torch import nn

log = logging.getLogger(__name__)

LOADER_MODULE = __name__
# The folder logged as the pyfunc model's data (``data/fedround/`` in the model's folder).
DATA_DIR = "fedround"
WEIGHTS_FILE = "weights.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
PREPROCESSING_FILE = "preprocessing.json"
FORMAT = 1  # the layout above; recorded in the MLmodel's pyfunc config
PROBABILITY = "probability_"
# Example rows logged with a table model (built from the preprocessor, never from data).
EXAMPLE_ROWS = 2
MNIST_FEATURES = 784
# Packages a loaded model imports (pinned to the versions installed at registration).
_RUNTIME_PACKAGES = ("fedround", "mlflow", "torch", "numpy", "pandas", "pydantic", "safetensors")


class ServingError(ValueError):
    """A registered model cannot be loaded or its input is not what it serves."""


# --- what is logged with a version -------------------------------------------------------


def array_features(model_config: ModelConfig, model: nn.Module) -> int | None:
    """How many features an arrays model takes: ``in_features`` from its config, 784 for
    the MNIST CNN, else the first linear layer's inputs; ``None`` when it cannot be told."""
    from torch import nn

    given = model_config.kwargs.get("in_features")
    if isinstance(given, int):
        return given
    if model_config.factory == "mnist_cnn":
        return MNIST_FEATURES
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return int(module.in_features)
        if any(True for _ in module.parameters(recurse=False)):
            return None  # the first layer with weights is not linear: no way to tell
    return None


def table_example(preprocessor: Preprocessor, rows: int = EXAMPLE_ROWS) -> pd.DataFrame:
    """Raw example rows with the declared feature columns, from the preprocessor's metadata
    only: the federated mean of each numeric column, the first vocabulary value of each
    categorical one (``__other__`` when every value was rare). No site's data."""
    import pandas as pd

    columns: dict[str, list[Any]] = {}
    for column in preprocessor.features:
        if column in preprocessor.vocabularies:
            vocabulary = preprocessor.vocabularies[column]
            columns[column] = [vocabulary[0] if vocabulary else OTHER] * rows
        else:
            columns[column] = [float(preprocessor.means[column])] * rows
    return pd.DataFrame(columns)


def table_signature(preprocessor: Preprocessor) -> ModelSignature:
    """Inputs: every feature as any type: a category may be spelled 3, 3.0 or "3" in a
    site's files, and a numeric column may hold ints (MLflow refuses int64 values such as
    ages or counts for a "double" column); ``predict`` checks that numeric columns hold
    numbers. Outputs: see the module docstring."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    inputs = Schema([ColSpec(AnyType(), c) for c in preprocessor.features])
    if preprocessor.task == "classification":
        outputs = Schema(
            [
                ColSpec("string", "prediction"),
                *[ColSpec("double", f"{PROBABILITY}{c}") for c in preprocessor.classes],
            ]
        )
    else:
        outputs = Schema([ColSpec("double", "prediction")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def array_signature(
    model: nn.Module, features: int | None
) -> tuple[ModelSignature, npt.NDArray[np.float32] | None]:
    """The signature of an arrays model and its input example (zeros, two rows: one row
    would not show that the batch size may vary), the outputs from running the network on
    it. Without a known feature count, or when the network does not take the zeros: the
    inputs only, and no example."""
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    if features is None:
        inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, -1))])
        return ModelSignature(inputs=inputs), None
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, features))])
    example = np.zeros((EXAMPLE_ROWS, features), dtype=np.float32)
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(example)).numpy()
    except Exception as exc:  # the user's network: register it all the same, without example
        log.warning("the model does not take a (%d, %d) input: %s", *example.shape, exc)
        return ModelSignature(inputs=inputs), None
    outputs = Schema([TensorSpec(out.dtype, (-1, *out.shape[1:]))])
    return ModelSignature(inputs=inputs, outputs=outputs), example


def pip_requirements(model_config: ModelConfig) -> list[str]:
    """What loading a version needs, pinned to the versions installed now (without local
    build tags: ``torch==2.13.0``, not ``2.13.0+cpu``), plus the distribution that provides
    a user's model factory, when it can be told."""
    names = list(_RUNTIME_PACKAGES)
    top = model_config.import_path.partition(":")[0].split(".")[0]
    if top != "fedround":
        names += importlib.metadata.packages_distributions().get(top, [])
    pinned: list[str] = []
    for name in dict.fromkeys(names):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            log.debug("%s is not installed: not pinned in the model's requirements", name)
            continue
        pinned.append(f"{name}=={version.split('+')[0]}")
    return pinned


# --- the pyfunc model --------------------------------------------------------------------


def write_model_data(
    folder: Path,
    weights: bytes,
    model_config: ModelConfig,
    preprocessor: Preprocessor | None,
) -> tuple[Path, dict[str, Any]]:
    """Write a version's data folder (``folder/fedround``) and the pyfunc config that
    records its digests (checked on every load)."""
    data = folder / DATA_DIR
    data.mkdir(parents=True)
    (data / WEIGHTS_FILE).write_bytes(weights)
    (data / MODEL_CONFIG_FILE).write_text(model_config.model_dump_json())
    settings: dict[str, Any] = {"fedround_format": FORMAT, "weights_sha256": sha256_hex(weights)}
    if preprocessor is not None:
        (data / PREPROCESSING_FILE).write_text(preprocessor.model_dump_json())
        settings["preprocessing_sha256"] = preprocessor.sha256()
    return data, settings


def read_preprocessor(path: Path) -> Preprocessor:
    return Preprocessor.model_validate_json(path.read_bytes())


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> FedroundModel:
    """MLflow's entry point (``loader_module``): the model in ``data_path``."""
    return FedroundModel.load(Path(data_path), dict(model_config or {}))


class FedroundModel:
    """The pyfunc model of a registered version (see the module docstring)."""

    def __init__(
        self, model: nn.Module, model_config: ModelConfig, preprocessor: Preprocessor | None
    ) -> None:
        self.model = model.eval()
        self.model_config = model_config
        self.preprocessor = preprocessor

    @classmethod
    def load(cls, data: Path, settings: dict[str, Any]) -> FedroundModel:
        from fedround.tasks.core.models import build_model
        from fedround.tasks.core.serialization import weights_from_bytes
        from fedround.tasks.core.usercode import load_weights

        payload = (data / WEIGHTS_FILE).read_bytes()
        expected = settings.get("weights_sha256")
        if expected and sha256_hex(payload) != expected:
            raise ServingError(
                f"{data / WEIGHTS_FILE} has sha256 {sha256_hex(payload)[:12]}…, the model's "
                f"MLmodel records {str(expected)[:12]}…: the weights were altered; not loading"
            )
        model_config = ModelConfig.model_validate_json((data / MODEL_CONFIG_FILE).read_bytes())
        preprocessor = None
        if (data / PREPROCESSING_FILE).exists():
            preprocessor = read_preprocessor(data / PREPROCESSING_FILE)
            wanted = settings.get("preprocessing_sha256")
            if wanted and preprocessor.sha256() != wanted:
                raise ServingError(
                    f"{data / PREPROCESSING_FILE} does not match the preprocessor digest the "
                    "model's MLmodel records: it was altered; not loading"
                )
        elif settings.get("preprocessing_sha256"):
            raise ServingError(f"{data} lacks {PREPROCESSING_FILE}, which the model needs")
        model = build_model(model_config, seed=0)
        load_weights(model, weights_from_bytes(payload), model_config.import_path)
        return cls(model, model_config, preprocessor)

    def get_raw_model(self) -> nn.Module:
        """The torch module (``PyFuncModel.get_raw_model()``)."""
        return self.model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """Raw inputs → predictions (see the module docstring)."""
        if self.preprocessor is None:
            return self._predict_arrays(model_input)
        return self._predict_table(model_input)

    def _outputs(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        import torch

        from fedround.tasks.core.evaluation import predict

        out = predict(self.model, torch.from_numpy(np.ascontiguousarray(features)))
        return out.numpy().astype(np.float32, copy=False)

    def _predict_arrays(self, model_input: Any) -> npt.NDArray[np.float32]:
        import pandas as pd

        values = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else model_input
        features = np.asarray(values, dtype=np.float32)
        if features.ndim == 1:
            features = features[None, :]
        return self._outputs(features.reshape(len(features), -1))

    def _predict_table(self, model_input: Any) -> pd.DataFrame:
        import pandas as pd

        preprocessor = self.preprocessor
        assert preprocessor is not None
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        numeric = [c for c in preprocessor.features if c not in preprocessor.vocabularies]
        for column in (c for c in numeric if c in frame.columns):
            values = frame[column]
            bad = int((pd.to_numeric(values, errors="coerce").isna() & values.notna()).sum())
            if bad:
                raise ServingError(f"column {column!r} has {bad} values that are not numbers")
        try:
            features = preprocessor.transform_features(frame)
        except ValueError as exc:
            raise ServingError(f"{exc}; the model takes columns {preprocessor.features}") from None
        outputs = self._outputs(features)
        if preprocessor.task == "regression":
            values = outputs.reshape(len(frame), -1)[:, 0]
            return pd.DataFrame({"prediction": values}, index=frame.index)
        logits = outputs.reshape(len(frame), -1).astype(np.float64)
        if logits.shape[1] != len(preprocessor.classes):
            raise ServingError(
                f"the model gives {logits.shape[1]} outputs for "
                f"{len(preprocessor.classes)} classes {preprocessor.classes}"
            )
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        classes = np.asarray(preprocessor.classes, dtype=object)
        result = pd.DataFrame(
            {"prediction": classes[probabilities.argmax(axis=1)]}, index=frame.index
        )
        for i, name in enumerate(preprocessor.classes):
            result[f"{PROBABILITY}{name}"] = probabilities[:, i]
        return result
