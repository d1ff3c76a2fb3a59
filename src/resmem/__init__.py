"""ResMem for Hugging Face: learn what you can, memorize the rest (Yang et al.).

`import resmem` registers the `resmem` model type with the Auto classes, so
`AutoModelForImageClassification.from_pretrained(folder)` (or `AutoModelForCausalLM...`,
`AutoModelForSequenceClassification...`, `AutoModelForAudioClassification...`) returns a ResMem model.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
)

from .configuration_resmem import ResMemConfig
from .evaluation import evaluate
from .memory import MemoryFileError, ResidualMemory
from .memory_lm import TokenResidualMemory
from .modeling_audio import ResMemForAudioClassification
from .modeling_causal_lm import ResMemCausalLMOutput, ResMemForCausalLM
from .modeling_image import ResMemForImageClassification, ResMemImageClassifierOutput
from .modeling_resmem import ResMemWrapper
from .modeling_text import ResMemForSequenceClassification, ResMemSequenceClassifierOutput

__version__ = "0.1.0"

AutoConfig.register(ResMemConfig.model_type, ResMemConfig, exist_ok=True)
AutoModelForImageClassification.register(ResMemConfig, ResMemForImageClassification, exist_ok=True)
AutoModelForCausalLM.register(ResMemConfig, ResMemForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(ResMemConfig, ResMemForSequenceClassification, exist_ok=True)
AutoModelForAudioClassification.register(ResMemConfig, ResMemForAudioClassification, exist_ok=True)
AutoModel.register(ResMemConfig, ResMemWrapper, exist_ok=True)

__all__ = [
    "MemoryFileError",
    "ResMemCausalLMOutput",
    "ResMemForAudioClassification",
    "ResMemForCausalLM",
    "ResMemConfig",
    "ResMemForImageClassification",
    "ResMemForSequenceClassification",
    "ResMemImageClassifierOutput",
    "ResMemSequenceClassifierOutput",
    "ResMemWrapper",
    "ResidualMemory",
    "TokenResidualMemory",
    "__version__",
    "evaluate",
]

from . import models  # noqa: E402,F401  registers the bundled CIFAR ResNets with the Auto classes
