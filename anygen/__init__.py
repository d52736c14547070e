"""anygen: generate between text and images, and interleave them."""

__version__ = "0.1.0"

__all__ = ["Story", "__version__", "generate_story", "stream_story"]


def __getattr__(name: str):
    """``anygen.Story``, ``anygen.generate_story``, ``anygen.stream_story``: imported on first
    use, so that ``import anygen`` stays light."""
    if name in ("Story", "generate_story", "stream_story"):
        from anygen.pipelines import story

        return getattr(story, name)
    raise AttributeError(f"module 'anygen' has no attribute {name!r}")
