"""divscope: where language-model output distributions differ (KL/JS, in nats)."""

__version__ = "0.1.0"
