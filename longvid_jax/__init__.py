"""longvid_jax: long-video multimodal LLMs in JAX/Flax (see DESIGN.md in the docs)."""

__version__ = "0.1.0"
