"""The task -> model class map: which `ResMemWrapper` subclass serves each `config.task`.

Kept in its own module because it imports both task modules, which themselves import `modeling_resmem`.
"""

from __future__ import annotations

from .configuration_resmem import (
    TASK_AUDIO_CLASSIFICATION,
    TASK_CAUSAL_LM,
    TASK_IMAGE_CLASSIFICATION,
    TASK_TEXT_CLASSIFICATION,
)
from .modeling_audio import ResMemForAudioClassification
from .modeling_causal_lm import ResMemForCausalLM
from .modeling_image import ResMemForImageClassification
from .modeling_text import ResMemForSequenceClassification

TASK_TO_RESMEM_MODEL_MAPPING = {
    TASK_IMAGE_CLASSIFICATION: ResMemForImageClassification,
    TASK_CAUSAL_LM: ResMemForCausalLM,
    TASK_TEXT_CLASSIFICATION: ResMemForSequenceClassification,
    TASK_AUDIO_CLASSIFICATION: ResMemForAudioClassification,
}


def task_class(task: str):
    """The `ResMemWrapper` subclass for a task name (a key of `TASK_TO_RESMEM_MODEL_MAPPING`)."""
    if task not in TASK_TO_RESMEM_MODEL_MAPPING:
        raise ValueError(f"Unsupported task {task!r}; supported: {sorted(TASK_TO_RESMEM_MODEL_MAPPING)}.")
    return TASK_TO_RESMEM_MODEL_MAPPING[task]
