"""Hugging Face transformers: experts adapters per layout family, the
``experts_implementation="moeq_*"`` registration, expert-parallel checks and tiny models.
Nothing here imports transformers at module import."""
