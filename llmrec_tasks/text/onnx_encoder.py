"""ONNX Runtime backends of the text encoder: ``encoder_backend=onnx`` (float32, the default)
and ``onnx-int8`` (dynamically quantised).

The Hugging Face model is exported once with ``torch.onnx.export`` (output: last hidden state)
and cached on local disk, keyed by the encoder identity, so each worker pays the export (a few
seconds) once. ONNX Runtime runs the float32 graph with its own fusions: the same vectors as
torch float32 (cosine >= 0.99999) at about twice the speed, because one fused graph replaces
torch's per-operator dispatch on these small batches.

The int8 model is the float32 graph fused by onnxruntime's transformer optimizer (bias+GELU,
skip+LayerNorm) and quantised with ``onnxruntime.quantization.quantize_dynamic``. Accuracy
choices (cosine to fp32, 200 texts, MiniLM-L6): per-tensor int8 weights give min 0.91;
per-channel 0.979 (mean 0.993); per-channel with the feed-forward down-projections (the MatMuls
fed by GELU, whose outputs int8 represents badly) left in fp32 0.985 (mean 0.996), at ~30% less
speed than quantising everything. We keep the latter.

Pooling and normalisation stay in :mod:`llmrec_tasks.text.embed`, shared with the torch backend.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmrec_tasks.core.errors import ModelLoadError

log = logging.getLogger(__name__)

ONNX_CACHE_ENV = "LLMREC_ONNX_CACHE"
ONNX_OPSET = 17
FP32_FILE = "model.onnx"
QUANTIZED_FILE = "model.int8.onnx"

# Loads (tokenizer, torch model): only called when the cache lacks the exported graph.
ModelLoader = Callable[[], tuple[Any, Any]]


def cache_dir(identity: str) -> Path:
    """Local folder of the exported models: ``$LLMREC_ONNX_CACHE`` or ``~/.cache/llmrec/onnx``."""
    root = Path(os.environ.get(ONNX_CACHE_ENV, Path.home() / ".cache" / "llmrec" / "onnx"))
    return root / hashlib.sha256(identity.encode()).hexdigest()[:16]


def _last_hidden_module(model: Any, input_names: list[str]) -> Any:
    """Wrap a transformers model so the export has positional tensor inputs and one output."""
    import torch

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(input_names, tensors, strict=True))).last_hidden_state

    return LastHidden()


def _import_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(
            "the ONNX encoder backends need the packages onnxruntime and onnx "
            "(pip install -r requirements.txt), or set encoder_backend=torch"
        ) from exc


def export_fp32(load_model: ModelLoader, identity: str) -> Path:
    """Export the model to a float32 ONNX graph unless the cache has it; returns its path."""
    import torch

    target = cache_dir(identity) / FP32_FILE
    if target.is_file():
        return target
    _import_onnx()
    tokenizer, model = load_model()
    input_names = list(tokenizer.model_input_names)
    sample = tokenizer(
        ["an example text", "a second, slightly longer example text"], padding=True, return_tensors="pt"
    )
    args = tuple(sample[name] for name in input_names)
    axes = {name: {0: "batch", 1: "sequence"} for name in [*input_names, "last_hidden_state"]}
    target.parent.mkdir(parents=True, exist_ok=True)
    # Export into a private folder and move the result in: concurrent workers never see half a file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        exported = Path(tmp) / FP32_FILE
        log.info("exporting %s to ONNX (one-off, cached in %s)", identity, target.parent)
        try:
            # The tracing exporter leaves the model it traced changed: export a private copy.
            with torch.inference_mode():
                torch.onnx.export(
                    _last_hidden_module(copy.deepcopy(model), input_names),
                    args,
                    str(exported),
                    input_names=input_names,
                    output_names=["last_hidden_state"],
                    dynamic_axes=axes,
                    opset_version=ONNX_OPSET,
                    dynamo=False,
                )
        except Exception as exc:  # the exporter raises many types; all mean "this model does not export"
            raise ModelLoadError(
                f"cannot export encoder {identity} to ONNX ({type(exc).__name__}: {exc}); "
                "set encoder_backend=torch for this model"
            ) from exc
        os.replace(exported, target)
    return target


def export_int8(load_model: ModelLoader, identity: str) -> Path:
    """Fuse and quantise the float32 graph unless the cache has the result; returns its path."""
    target = cache_dir(identity) / QUANTIZED_FILE
    if target.is_file():
        return target
    fp32 = export_fp32(load_model, identity)
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    _, model = load_model()
    config = model.config
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        fused = Path(tmp) / "model.fused.onnx"
        optimizer.optimize_model(
            str(fp32), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
        ).save_model_to_file(str(fused))
        quantized = Path(tmp) / QUANTIZED_FILE
        quantize_dynamic(
            str(fused),
            str(quantized),
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=_after_gelu(onnx.load(str(fused))),
            # Fused ops have no inferred output types; they are all float.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        os.replace(quantized, target)
    return target


def _after_gelu(model: Any) -> list[str]:
    """Names of the MatMul nodes whose input comes from a GELU (the feed-forward down-projections)."""
    producer = {out: node.op_type for node in model.graph.node for out in node.output}
    gelus = {"Gelu", "BiasGelu", "FastGelu"}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and producer.get(n.input[0]) in gelus]


class OnnxEncoder:
    """An onnxruntime session over the exported (float32 or int8) model; returns the last hidden state."""

    def __init__(self, load_model: ModelLoader, identity: str, threads: int, *, quantized: bool) -> None:
        _import_onnx()
        import onnxruntime as ort

        path = (export_int8 if quantized else export_fp32)(load_model, identity)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        # The exporter drops inputs the model ignores (e.g. token type ids a tokenizer adds).
        self.input_names = [node.name for node in self.session.get_inputs()]

    def last_hidden(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {name: inputs[name] for name in self.input_names}
        return self.session.run(["last_hidden_state"], feed)[0]
