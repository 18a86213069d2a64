"""crossroute: measure, explain and repair cross-domain forgetting in sequential multi-domain RL."""

import os

# No code path may reach a model hub: every load is from a local path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from crossroute.core.envelope import CROSSROUTE_VERSION as __version__  # noqa: E402, F401
