"""Local models: loading, chat prompts, generation and the teacher-forcing scorer.

``load`` (hub names, paths and the packaged GGUF models -> transformers models, cached as
safetensors), ``chat`` (prompt ids from the chat template, the prompt/response seam check),
``generate`` (token ids kept; transformers or vLLM), ``teacher_force`` (one response under
many prompts: cached prompt keys/values, full-vocabulary JS and KL per position).
"""

from divscope.models.load import load_model

__all__ = ["load_model"]
