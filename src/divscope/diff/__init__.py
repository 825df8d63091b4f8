"""The model-diff pipeline: two conditions (a model, an optional LoRA adapter, a dtype, a
system prompt) on one prompt set -> exact KL both ways and JS at every position.

``conditions`` (SPEC parsing, loading, adapters merged) -> ``pipeline`` (the orchestrator:
load, generate, check the seams, score units, aggregate) -> ``score`` (the unit of work: one
prompt's samples from both sides teacher-forced under both models) -> ``aggregate`` (per-prompt
scores with CIs, the dataset summary, "what changed") -> ``outputs`` (the run directory;
``samplefiles`` builds the JSONL sample files' columns).
"""
