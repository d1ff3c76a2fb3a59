"""`ResMemForAudioClassification`: ResMem over any `AutoModelForAudioClassification` base.

Like the text wrapper, a subclass of the image classifier that overrides only input reading (see
`modeling_text.InputsClassifier`): audio goes through the base model's feature extractor.
"""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForAudioClassification
from transformers.utils import can_return_tuple

from .data_classifiers import audio_batches, refuse_arguments
from .modeling_text import InputsClassifier, ResMemSequenceClassifierOutput


class ResMemForAudioClassification(InputsClassifier):
    """ResMem over any `AutoModelForAudioClassification` base (Wav2Vec2, HuBERT, AST, Whisper encoder, ...).

    The key defaults to the classifier head's input, found as for images (the input of the one `nn.Linear`
    with `num_labels` outputs): the mean-pooled projection for Wav2Vec2 (`classifier:input`), the pooled
    feature after the head's LayerNorm for AST (`classifier.dense:input`).

    Example:

    ```python
    >>> import resmem
    >>> from resmem import ResMemWrapper
    >>> model = ResMemWrapper.from_base(audio_classifier, k=20, sigma=1.0)    # a ResMemForAudioClassification
    >>> model.build_memory(train_ds, feature_extractor=feature_extractor, audio_column="audio")
    >>> model.tune(val_ds, feature_extractor=feature_extractor, k=[5, 10, 20], sigma="auto")
    >>> resmem.evaluate(model, test_ds, split="test", feature_extractor=feature_extractor)
    ```
    """

    main_input_name = "input_values"
    model_kind = "an audio classifier"
    input_fix = ("pass audio with `feature_extractor=` (and `audio_column=`), or an `input_values` / "
                 "`input_features` column; texts go to a text classifier (ResMemForSequenceClassification).")

    def __init__(self, config, base_model=None):
        super().__init__(config, base_model)
        # Whisper's encoder reads `input_features`, Wav2Vec2 and AST `input_values`: the pipeline reads this name.
        self.main_input_name = getattr(self.base, "main_input_name", "input_values")

    @classmethod
    def auto_class_for_base(cls):
        return AutoModelForAudioClassification

    def _batch_reader(
        self, batch_size: int, label_column: str = "label", image_column=None, image_processor=None, transform=None,
        feature_extractor=None, audio_column: str | None = None, tokenizer=None, text_column=None,
        text_pair_column=None, max_length=None,
    ):
        """`dataset -> iterator of InputBatch` via [`resmem.data_classifiers.audio_batches`]."""
        self._refuse_image_arguments(image_column, image_processor, transform)
        refuse_arguments(
            {"tokenizer": tokenizer, "text_column": text_column, "text_pair_column": text_pair_column,
             "max_length": max_length},
            self.model_kind, self.input_fix,
        )
        return functools.partial(
            audio_batches, batch_size=batch_size, label_column=label_column, feature_extractor=feature_extractor,
            audio_column=audio_column,
        )

    @can_return_tuple
    def forward(
        self,
        input_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> ResMemSequenceClassifierOutput:
        """
        Args:
            input_values: `(B, S)` waveforms (Wav2Vec2) or `(B, frames, bins)` filter banks (AST), as the base
                model's feature extractor gives them; Whisper-style bases take `input_features` instead.
            attention_mask: as the feature extractor gives it, if it does.
            labels: `(B,)` optional class ids; then `loss` is their NLL under `logits`.
            return_dict: `False` returns `to_tuple()` (default `config.return_dict`).
        Returns:
            [`ResMemSequenceClassifierOutput`] with `scores`, `logits`, `base_logits`, `residual` `(B, C)`.
        """
        inputs = {"input_values": input_values, "attention_mask": attention_mask, "input_features": input_features}
        return self._classify(inputs, labels, output_hidden_states, output_attentions, kwargs)


__all__ = ["ResMemForAudioClassification"]
