"""Presentation: ``plots`` (prompt rankings) and ``persona_plots`` (persona runs) take
``ax=None`` and return the figure; ``html`` builds the self-contained report (every value that
reaches HTML is escaped there)."""
