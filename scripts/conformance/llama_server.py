"""Stands in for `llama-server` in llama.cpp's server test suite: takes its flags, starts `miaotui serve` instead.

llama.cpp's tests start `$LLAMA_SERVER_BIN_PATH --port ... --hf-repo ... --alias ...`; this maps each flag to
miaotui's, or to nothing where it only tunes llama.cpp (batch sizes, slots, jinja), and refuses (exit 3, with the
flag named) a feature miaotui does not have, so the run.py table can call that test not applicable. Every model the
suite names is served by one of miaotui's (MIAOTUI_CONFORMANCE_MODEL, default smollm2-135m); a preset with
`--embedding` serves the embedding model (MIAOTUI_CONFORMANCE_EMBEDDING_MODEL) beside it. llama-server answers to any
`model` a request names, miaotui (like OpenAI and vLLM) only to the names it serves: the model is served under the
preset's alias and the OpenAI model names the suite's requests use (SUITE_MODEL_NAMES)."""

from __future__ import annotations

import os
import sys

SUITE_MODEL_NAMES = ("llama-test-model", "gpt-3.5-turbo", "gpt-3.5-turbo-instruct", "gpt-4.1", "davinci-002")
VALUE = {"--port": "--port", "--host": "--host", "--api-key": "--api-key",
         "--ctx-size": "--max-model-len", "--parallel": "--max-num-seqs", "--cors-origins": "--allowed-origins",
         "--chat-template-file": "--chat-template", "--threads": "--threads", "--n-predict": "--default-max-tokens"}
IGNORED_VALUE = {"--temp", "--seed", "--batch-size", "--ubatch-size", "--hf-repo", "--hf-file", "--model",
                 "--n-gpu-layers", "-fa", "--reasoning-format", "--tags"}
IGNORED_FLAG = {"--no-slots", "--jinja", "--no-jinja", "--cont-batching", "--metrics", "--offline", "--no-ui",
                "--kv-unified", "--swa-full", "--verbose"}


def translate(argv: list[str]) -> list[str]:
    model = os.environ.get("MIAOTUI_CONFORMANCE_MODEL", "smollm2-135m")
    out = ["--model", model, "--dtype", "float32", "--kv-cache-memory", str(64 * 2**20)]
    # llama-server's CORS answers: credentials allowed, its method list, every origin unless told otherwise
    out += ["--allow-credentials", "--allowed-methods", "GET,POST,DELETE,OPTIONS"]
    if "--cors-origins" not in argv:
        out += ["--allowed-origins", "*"]
    i = 0
    while i < len(argv):
        flag = argv[i]
        if flag == "--alias":  # llama-server answers to any model name; the suite's clients use these
            out += ["--served-model-name", argv[i + 1], *SUITE_MODEL_NAMES]
            i += 2
        elif flag in VALUE:
            value = argv[i + 1]
            if flag == "--n-predict" and int(value) < 0:  # llama.cpp's "no limit": miaotui's default
                i += 2
                continue
            out += [VALUE[flag], value]
            i += 2
        elif flag in IGNORED_VALUE:
            i += 2
        elif flag in IGNORED_FLAG:
            i += 1
        elif flag == "--embedding":
            out += ["--embedding-model", os.environ.get("MIAOTUI_CONFORMANCE_EMBEDDING_MODEL", "nomic-embed-text-v1.5")]
            i += 1
        elif flag == "--pooling" and argv[i + 1] in ("mean", "cls", "last"):  # "none", "rank": no counterpart
            out += ["--embedding-pooling", argv[i + 1]]
            i += 2
        elif flag == "--chat-template":
            raise SystemExit(f"not applicable: --chat-template {argv[i + 1]} (llama.cpp's built-in template names)")
        else:
            raise SystemExit(f"not applicable: llama-server flag {flag} has no miaotui counterpart")
    return out


if __name__ == "__main__":
    try:
        args = translate(sys.argv[1:])
    except SystemExit as e:
        print(e, file=sys.stderr)
        sys.exit(3)
    os.execv(sys.executable, [sys.executable, "-m", "miaotui.cli", "serve", *args])
