"""anygen: generate between text and images, and interleave them."""

__version__ = "0.1.0"
