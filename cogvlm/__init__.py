"""CogVLM (v1 and v2) in plain PyTorch: loads the official checkpoints, batched generation."""

from .config import CogVLMConfig, VisionConfig, preset
from .decoder import CogVLMForCausalLM
from .generate import GenerationOutput, generate
from .grounding import Box, Grounding, parse_boxes
from .processor import Batch, CogVLMProcessor, Sample, build_prompt, collate, open_image, preprocess_image
from .weights import CheckpointError, load_model, weights_fingerprint

__version__ = "0.1.0"

__all__ = [
    "Batch", "Box", "CheckpointError", "CogVLMConfig", "CogVLMForCausalLM", "CogVLMProcessor",
    "GenerationOutput", "Grounding", "Sample", "VisionConfig", "build_prompt", "collate", "generate",
    "load_model", "open_image", "parse_boxes", "preprocess_image", "preset", "weights_fingerprint",
]
