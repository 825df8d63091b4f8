"""The persona pipeline: one model, N personas (system prompts), Q questions -> N x N matrices.

``data`` (personas and questions files) -> ``pipeline`` (the orchestrator: generate, check the
seam, score units, aggregate, check, write) -> ``units`` (the unit of work: one question's
responses under every persona, and its content-addressed cache) -> ``matrices`` (aggregation,
consistency checks, cosine); ``explain`` says what changed between two personas, token by token.
"""
