"""Inference on the model's own blocks: sampling, the decode loop (runner), streaming text, the CLI."""

from smedjan.infer.runner import Runner, generate
from smedjan.infer.sampling import SamplingParams

__all__ = ["Runner", "SamplingParams", "generate"]
