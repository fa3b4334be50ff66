"""The shim that starts `miaotui serve` in place of llama-server for llama.cpp's test suite
(scripts/conformance/): every flag is translated, deliberately dropped, or refused by name — never passed through."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "llama_server", Path(__file__).parents[2] / "scripts" / "conformance" / "llama_server.py")
shim = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shim)


def test_flags_are_translated():
    out = shim.translate(["--port", "8080", "--temp", "0.8", "--host", "127.0.0.1", "--alias", "tinyllama-2",
                          "--ctx-size", "512", "--parallel", "2", "--n-predict", "64", "--no-slots", "--no-jinja",
                          "--api-key", "k", "--embedding", "--pooling", "last"])
    def value(flag: str) -> str:
        return out[out.index(flag) + 1]

    assert value("--port") == "8080" and value("--max-model-len") == "512" and value("--max-num-seqs") == "2"
    assert value("--default-max-tokens") == "64" and value("--api-key") == "k"
    assert value("--allowed-origins") == "*" and "--allow-credentials" in out  # llama-server's defaults
    assert value("--allowed-methods") == "GET,POST,DELETE,OPTIONS"
    assert value("--served-model-name") == "tinyllama-2"
    assert "--embedding-model" in out and value("--embedding-pooling") == "last" and "--temp" not in out
    assert "--default-max-tokens" not in shim.translate(["--n-predict", "-1"])  # llama.cpp's "no limit"
    assert "--allowed-origins" in shim.translate(["--cors-origins", "localhost"])


@pytest.mark.parametrize("argv", [["--lora", "x.gguf"], ["--pooling", "none"], ["--reranking"],
                                  ["--chat-template", "chatml"], ["--context-shift"]])
def test_features_miaotui_lacks_are_refused_by_name(argv):
    with pytest.raises(SystemExit, match=argv[0]):
        shim.translate(argv)
