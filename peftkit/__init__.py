"""peftkit: parameter-efficient fine-tuning for any PyTorch module, with methods as plugins.

Example::

    import peftkit
    m = peftkit.wrap(model, "lora", r=8)   # backbone frozen, LoRA adapters attached
    ...train m...
    peftkit.save(m, "task.safetensors")    # adapter tensors + metadata only
    m = peftkit.load(fresh_model, "task.safetensors")
"""

from __future__ import annotations

from . import errors
from .fisher import fisher_information, fisher_mask
from .heads import multitask_loss, pinball_loss
from .hookspecs import hookimpl
from .io import AdapterHeader, load, read_header, save
from .method import Adapter, Method
from .model import AdaptedModel, wrap
from .plugins import MethodInfo, method_infos
from .recipes import anchored_loss, param_groups
from .targets import find_output_layer

__version__ = "0.1.0"


def methods() -> dict[str, MethodInfo]:
    """Every registered method: ``{name: MethodInfo(plugin, version, doc, ...)}``."""
    return method_infos()


__all__ = [
    "AdaptedModel",
    "Adapter",
    "AdapterHeader",
    "Method",
    "MethodInfo",
    "anchored_loss",
    "errors",
    "find_output_layer",
    "fisher_information",
    "fisher_mask",
    "hookimpl",
    "load",
    "methods",
    "multitask_loss",
    "param_groups",
    "pinball_loss",
    "read_header",
    "save",
    "wrap",
]
