"""API sampling: responses with logprobs from OpenAI-compatible servers, and cross-scores.

``config`` (the YAML run config, validated before any request) -> ``sampler`` (prompts,
requests per prompt, the seam check of cross-scoring, resumable JSONL output) over ``client``
(HTTP, retries, backoff, Retry-After). ``templates`` and ``gguf_meta`` render conversations for
cross-scoring with a model's chat template; ``llama_server`` runs llama.cpp's server with a
fast top-k.
"""
