"""aiotranscribe: a self-hosted speech-to-text server for NVIDIA NeMo ASR models."""

__version__ = "0.1.0"
