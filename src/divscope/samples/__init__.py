"""Sample files: what a sampler writes and what the estimators read.

``records`` (the in-memory arrays) <- ``parse`` (raw records, validated) <- ``read``
(format detection, :func:`load_samples`, :func:`load_pair`); ``packed`` (the ``.npz`` layout),
``write`` (divscope JSONL), ``safe_pickle`` (the restricted unpickler for legacy files),
``errors`` (:class:`SampleFileError`, the one error type for bad input files).
"""

from divscope.samples.errors import SampleFileError
from divscope.samples.read import check_same_prompts, load_pair, load_samples
from divscope.samples.records import FORMAT, PromptSamples, Response, SampleSet, TokenScores
from divscope.samples.write import write_samples_jsonl

__all__ = [
    "FORMAT",
    "PromptSamples",
    "Response",
    "SampleFileError",
    "SampleSet",
    "TokenScores",
    "check_same_prompts",
    "load_pair",
    "load_samples",
    "write_samples_jsonl",
]
