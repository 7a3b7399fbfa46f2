"""Where an agent lives in the git tree: two-level fan-out by xxh64 of its id.

Root tree: ``FORMAT`` plus up to 256 directories ``ab/``, each with up to 256
``cd/`` directories, each holding agent trees ``<id>/{meta.json, config.json,
memory.json}``. A commit rewrites three small trees plus the root no matter how many
agents exist, which keeps commit cost flat from 10 to 100,000 agents.
"""

import xxhash

FORMAT_NAME = "FORMAT"
FORMAT_BLOB = b"agentstatefs tree format 1\n"


def fanout(agent: str) -> tuple[str, str]:
    h = xxhash.xxh64_hexdigest(agent.encode())
    return h[0:2], h[2:4]


def agent_path(agent: str) -> str:
    a, b = fanout(agent)
    return f"{a}/{b}/{agent}"
