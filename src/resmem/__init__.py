"""ResMem for Hugging Face: learn what you can, memorize the rest (Yang et al.).

`import resmem` registers the `resmem` model type with the Auto classes, so
`AutoModelForImageClassification.from_pretrained(folder)` (or `AutoModelForCausalLM...`) returns a ResMem model.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

from .configuration_resmem import ResMemConfig
from .evaluation import evaluate
from .memory import MemoryFileError, ResidualMemory
from .memory_lm import TokenResidualMemory
from .modeling_causal_lm import ResMemCausalLMOutput, ResMemForCausalLM
from .modeling_image import ResMemForImageClassification, ResMemImageClassifierOutput
from .modeling_resmem import ResMemWrapper

__version__ = "0.1.0"

AutoConfig.register(ResMemConfig.model_type, ResMemConfig, exist_ok=True)
AutoModelForImageClassification.register(ResMemConfig, ResMemForImageClassification, exist_ok=True)
AutoModelForCausalLM.register(ResMemConfig, ResMemForCausalLM, exist_ok=True)
AutoModel.register(ResMemConfig, ResMemWrapper, exist_ok=True)

__all__ = [
    "MemoryFileError",
    "ResMemCausalLMOutput",
    "ResMemForCausalLM",
    "ResMemConfig",
    "ResMemForImageClassification",
    "ResMemImageClassifierOutput",
    "ResMemWrapper",
    "ResidualMemory",
    "TokenResidualMemory",
    "__version__",
    "evaluate",
]

from . import models  # noqa: E402,F401  registers the bundled CIFAR ResNets with the Auto classes
