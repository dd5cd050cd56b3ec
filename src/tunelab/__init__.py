"""tunelab: compare learning-rate schedules and freezing strategies for fine-tuning image classifiers."""

__version__ = "0.1.0"
