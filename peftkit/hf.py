"""Hugging Face ``transformers.Trainer`` with adapter-only checkpoints (needs ``pip install peftkit[hf]``).

A wrapped model already trains under a plain ``Trainer`` (its ``forward`` presents the backbone's
signature, so the dataset columns it takes are kept); but a plain ``Trainer`` writes the whole
model's state into every checkpoint. :class:`AdapterTrainer` writes the adapter file instead
(``adapter.safetensors``, peftkit's format), and resuming from a checkpoint puts its values back
into the same adapter (with the optimizer, scheduler and RNG states the ``Trainer`` restores
itself)::

    m = peftkit.wrap(AutoModelForSequenceClassification.from_pretrained(...), "lora", r=8)
    trainer = peftkit.hf.AdapterTrainer(model=m, args=TrainingArguments("out"), train_dataset=ds)
    trainer.train()                                   # out/checkpoint-*/adapter.safetensors
    trainer.train(resume_from_checkpoint=True)        # the newest checkpoint's adapter and optimizer
    peftkit.load(fresh_backbone, "out/checkpoint-500/adapter.safetensors")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers

from .errors import ConfigError
from .io import hotswap, save
from .model import AdaptedModel
from .sharding import unwrap_parallel

__all__ = ["ADAPTER_FILE", "AdapterTrainer"]

ADAPTER_FILE = "adapter.safetensors"


class AdapterTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` for an :class:`~peftkit.AdaptedModel` whose checkpoints (and
    ``save_model()``) hold the active adapter's file, ``adapter.safetensors``, not the model.

    Raises:
        ConfigError: the model is not an AdaptedModel.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        adapted = unwrap_parallel(self.model)
        if not isinstance(adapted, AdaptedModel):
            raise ConfigError(f"AdapterTrainer trains an AdaptedModel (from peftkit.wrap or peftkit.load), got "
                              f"{type(self.model).__name__}; use transformers.Trainer for other models")
        # the Trainer reads the label arguments (and whether the model returns a loss) from the model's
        # class; an AdaptedModel's class forward takes (*args, **kwargs): read them from the backbone's
        backbone = type(adapted.base_model)
        if self.args.label_names is None:
            self.label_names = transformers.utils.find_labels(backbone)
        self.can_return_loss = transformers.utils.can_return_loss(backbone)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        # what Trainer.save_model and every checkpoint call: the adapter file instead of the model's state
        directory = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        directory.mkdir(parents=True, exist_ok=True)
        save(unwrap_parallel(self.model), directory / ADAPTER_FILE, writer=None)
        torch.save(self.args, directory / transformers.trainer.TRAINING_ARGS_NAME)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        # resuming: the checkpoint's adapter values into the same parameters (the optimizer's state
        # is restored by the Trainer itself and refers to them)
        file = Path(resume_from_checkpoint) / ADAPTER_FILE
        if not file.is_file():
            raise ConfigError(f"{str(resume_from_checkpoint)!r} holds no {ADAPTER_FILE}; it was not written by "
                              "AdapterTrainer (a plain Trainer checkpoint holds the whole model: load it with "
                              "transformers.Trainer instead)")
        hotswap(unwrap_parallel(model if model is not None else self.model), os.fspath(file))

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None:
            self._load_from_checkpoint(best)
