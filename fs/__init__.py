"""The agentstatefs store: names, validation, git persistence, journal, RAM layers.

Nothing in this package imports FUSE; it is usable and tested in-process.
"""
