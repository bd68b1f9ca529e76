"""peftkit: parameter-efficient fine-tuning for any PyTorch module, with methods as plugins.

Example::

    import peftkit
    m = peftkit.wrap(model, "lora", r=8)   # backbone frozen, LoRA adapters attached
    ...train m...
    peftkit.save(m, "task.safetensors")    # adapter tensors + metadata only
    m = peftkit.load(fresh_model, "task.safetensors")
"""

from __future__ import annotations

from typing import Any

from . import distributed, errors
from .composition import Average, Parallel, Stack
from .domain import (
    DomainAdaptation,
    GradientReversal,
    augment_features,
    coral_loss,
    dann_coefficient,
    grad_reverse,
    mmd_loss,
)
from .fisher import fisher_information, fisher_mask
from .formats import Format, export, import_adapter
from .heads import multitask_loss, pinball_loss
from .hookspecs import hookimpl
from .io import AdapterHeader, load, read_header, save
from .method import Adapter, Method, Plan, PlanContext
from .model import AdaptedModel, HeldAdapter, wrap
from .plugins import MethodInfo, method_infos
from .quantization import QuantizationReport, quantize
from .recipes import anchored_loss, param_groups
from .targets import find_output_layer

__version__ = "0.1.0"


def export_peft(model: AdaptedModel, directory: str, adapter: str | None = None) -> Any:
    """Write a LoRA adapter as a Hugging Face PEFT directory (``peft.PeftModel.from_pretrained``
    loads it with the same outputs). Provided by the ``peft`` format plugin."""
    return export(model, directory, format="peft", adapter=adapter)


def import_peft(model: Any, directory: str, name: str = "default") -> AdaptedModel:
    """Load a Hugging Face PEFT LoRA directory onto ``model`` (``peftkit.load`` detects them too)."""
    return import_adapter(model, directory, format="peft", name=name)


def methods() -> dict[str, MethodInfo]:
    """Every registered method: ``{name: MethodInfo(plugin, version, doc, ...)}``."""
    return method_infos()


__all__ = [
    "AdaptedModel",
    "Adapter",
    "AdapterHeader",
    "Average",
    "DomainAdaptation",
    "GradientReversal",
    "Format",
    "HeldAdapter",
    "Method",
    "MethodInfo",
    "Plan",
    "Parallel",
    "PlanContext",
    "QuantizationReport",
    "Stack",
    "anchored_loss",
    "augment_features",
    "coral_loss",
    "dann_coefficient",
    "distributed",
    "errors",
    "export",
    "export_peft",
    "find_output_layer",
    "fisher_information",
    "fisher_mask",
    "grad_reverse",
    "hookimpl",
    "import_adapter",
    "import_peft",
    "load",
    "methods",
    "mmd_loss",
    "multitask_loss",
    "param_groups",
    "pinball_loss",
    "quantize",
    "read_header",
    "save",
    "wrap",
]
