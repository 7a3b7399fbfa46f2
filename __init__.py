"""agentstatefs: durable, versioned, crash-safe agent state as plain files (FUSE)."""

__version__ = "0.1.0"
