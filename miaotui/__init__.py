"""miaotui (秒推): a fast, readable LLM inference engine."""

from miaotui.engine.sequence import RequestOutput
from miaotui.llm import LLM
from miaotui.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
