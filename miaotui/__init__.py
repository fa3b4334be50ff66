"""miaotui (秒推): a fast, readable LLM inference engine."""

import logging

from miaotui.engine.sequence import RequestOutput
from miaotui.llm import LLM
from miaotui.sampling import SamplingParams, StructuredOutput

__all__ = ["LLM", "RequestOutput", "SamplingParams", "StructuredOutput"]
__version__ = "0.1.0"

# Like vLLM, say what the engine decided (KV cache size, load time) on stderr; the CLI sets the level.
_log = logging.getLogger("miaotui")
if not _log.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False
