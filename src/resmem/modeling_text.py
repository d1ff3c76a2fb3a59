"""`ResMemForSequenceClassification`: ResMem over any `AutoModelForSequenceClassification` (text) base.

Everything but reading inputs is the image classifier's: this class subclasses
[`ResMemForImageClassification`] (memory build, `tune`, `sigma_scale`, `resmem.evaluate`, the forward's residual
math, save/load) and overrides only the input hooks `_batch_reader` / `_base_inputs` and the forward's signature.
[`ResMemForAudioClassification`] (modeling_audio.py) does the same through [`InputsClassifier`].
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from transformers import AutoModelForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import can_return_tuple

from .data_classifiers import refuse_arguments, text_batches
from .modeling_image import ResMemForImageClassification, ResMemImageClassifierOutput


@dataclass
class ResMemSequenceClassifierOutput(ResMemImageClassifierOutput, SequenceClassifierOutput):
    """Output of [`ResMemForSequenceClassification`] and [`ResMemForAudioClassification`]: transformers'
    `SequenceClassifierOutput` (what its text and audio classifiers return) plus ResMem's fields.

    Args:
        loss: negative log-likelihood of `labels` under `logits` (when labels are given).
        logits: `(B, C)` `log(renormalise(clamp(scores, score_floor)))`; its argmax is the scores' argmax.
        hidden_states, attentions: passed through from the base model when requested.
        scores: `(B, C)` paper eq. 3, `softmax(base_logits / T) + residual`.
        base_logits: `(B, C)` the base model's logits.
        residual: `(B, C)` the weighted residual of the k nearest memory entries.

    It is also a `ResMemImageClassifierOutput` (same fields), so code written for the image wrapper's output
    reads it unchanged.
    """


class InputsClassifier(ResMemForImageClassification):
    """What the text and audio wrappers share: base inputs read as a dict of tensors (`InputBatch.inputs`),
    passed on to the base model's forward, and a `SequenceClassifierOutput` subclass as output."""

    model_kind = "a classifier"  # for error messages, e.g. "a text classifier"
    input_fix = ""  # what to pass instead of image arguments

    def _refuse_image_arguments(self, image_column, image_processor, transform) -> None:
        refuse_arguments(
            {"image_column": image_column, "image_processor": image_processor, "transform": transform},
            self.model_kind, self.input_fix,
        )

    def _base_inputs(self, batch) -> dict:
        """`batch.inputs` on the model's device, floats in the model's dtype, keeping only the names the base
        model's forward takes (a tokenizer's `token_type_ids` for a DistilBERT, say)."""
        params = inspect.signature(self.base.forward).parameters
        return {
            name: value.to(self.device, self.dtype if value.is_floating_point() else None)
            for name, value in batch.inputs.items()
            if name in params
        }

    def _classify(self, inputs: dict, labels, output_hidden_states, output_attentions, kwargs: dict):
        """The image wrapper's forward (key capture, neighbours, eq. 3) on these inputs, as this task's output."""
        given = {name: value for name, value in inputs.items() if value is not None}
        kwargs.pop("return_dict", None)  # `can_return_tuple` on the caller turns the output into a tuple
        out = super().forward(
            labels=labels, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            return_dict=True, **given, **kwargs,
        )
        return ResMemSequenceClassifierOutput(**out)


class ResMemForSequenceClassification(InputsClassifier):
    """ResMem over any `AutoModelForSequenceClassification` base (BERT, DistilBERT, RoBERTa, ...).

    The key defaults to the classifier head's input (the pooled or CLS feature), found as for images: the
    input of the one `nn.Linear` with `num_labels` outputs (`classifier:input` for BERT / DistilBERT,
    `classifier.out_proj:input` for RoBERTa).

    Example:

    ```python
    >>> import resmem
    >>> from resmem import ResMemWrapper
    >>> model = ResMemWrapper.from_base(text_classifier, k=20, sigma=1.0)     # a ResMemForSequenceClassification
    >>> model.build_memory(train_ds, tokenizer=tokenizer, text_column="text")
    >>> model.tune(val_ds, tokenizer=tokenizer, k=[5, 10, 20], sigma="auto", temperature=[1.0, 2.0])
    >>> resmem.evaluate(model, test_ds, split="test", tokenizer=tokenizer)
    >>> out = model(**tokenizer(["a fine film"], return_tensors="pt"))         # out.scores, out.logits, ...
    ```
    """

    main_input_name = "input_ids"
    model_kind = "a text classifier"
    input_fix = ("pass texts with `tokenizer=` (and `text_column=`, `text_pair_column=`, `max_length=`), or an "
                 "`input_ids` column.")

    @classmethod
    def auto_class_for_base(cls):
        return AutoModelForSequenceClassification

    def _batch_reader(
        self, batch_size: int, label_column: str = "label", image_column=None, image_processor=None, transform=None,
        tokenizer=None, text_column: str = "text", text_pair_column: str | None = None, max_length: int | None = None,
        feature_extractor=None, audio_column=None,
    ):
        """`dataset -> iterator of InputBatch` via [`resmem.data_classifiers.text_batches`]."""
        self._refuse_image_arguments(image_column, image_processor, transform)
        refuse_arguments({"feature_extractor": feature_extractor, "audio_column": audio_column}, self.model_kind,
                         self.input_fix)
        pad = getattr(self.base.config, "pad_token_id", None)
        return functools.partial(
            text_batches, batch_size=batch_size, label_column=label_column, tokenizer=tokenizer,
            text_column=text_column, text_pair_column=text_pair_column, max_length=max_length,
            pad_token_id=0 if pad is None else pad,
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> ResMemSequenceClassifierOutput:
        """
        Args:
            input_ids, attention_mask, token_type_ids: `(B, L)` as the base model's tokenizer gives them.
            labels: `(B,)` optional class ids; then `loss` is their NLL under `logits`.
            return_dict: `False` returns `to_tuple()` (default `config.return_dict`).
        Returns:
            [`ResMemSequenceClassifierOutput`] with `scores`, `logits`, `base_logits`, `residual` `(B, C)`.
        """
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                  "position_ids": position_ids, "inputs_embeds": inputs_embeds}
        return self._classify(inputs, labels, output_hidden_states, output_attentions, kwargs)


__all__ = ["InputsClassifier", "ResMemForSequenceClassification", "ResMemSequenceClassifierOutput"]
