"""longctx: exact, fast long-context attention and tools to train and compare models."""

__version__ = "0.1.0"
