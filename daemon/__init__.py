"""The agentstatefs process: FUSE operations, state manager, mount lifecycle, CLI."""
