"""Run llama.cpp's own HTTP server tests against `miaotui serve` and print a table per test file.

    python scripts/conformance/run.py [--files test_chat_completion.py,...] [--keep DIR]

The suite is fetched at run time from the `llama-cpp-python==0.3.36` source distribution (never committed), its
session fixture that downloads llama.cpp's test models is left out, and `LLAMA_SERVER_BIN_PATH` points at
llama_server.py, which starts miaotui with the matching flags. A test counts as *not applicable* only for a reason
listed in NOT_APPLICABLE, read off its failure: a llama.cpp-only feature or field, or an assertion on the exact
output of llama.cpp's 260K-parameter test model (which cannot be fetched here; miaotui serves SmolLM2-135M in its
place). Everything else that fails is a failure and is listed with its message.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
SUITE = "vendor/llama.cpp/tools/server/tests"
FILES = ("test_chat_completion.py", "test_completion.py", "test_ctx_shift.py", "test_tokenize.py",
         "test_security.py", "test_compat_oai_responses.py", "test_embedding.py")
NEEDS = ("requests", "wget", "filelock", "openai", "numpy")
CONFTEST = '''import pytest
from utils import *


@pytest.fixture(autouse=True)
def stop_server_after_each_test():
    yield
    for server in set(server_instances):
        server.stop()
'''
# The only edits made to the fetched tests: llama.cpp's fingerprint is its build number ("b6210"), OpenAI's is
# "fp_" and a hash; both are accepted, so the rest of those tests is checked on its merits.
ADAPTATIONS = [('system_fingerprint.startswith("b")', 'system_fingerprint.startswith(("b", "fp_"))'),
               ('["system_fingerprint"].startswith("b")', '["system_fingerprint"].startswith(("b", "fp_"))')]
# A test whose own code calls a llama.cpp-only endpoint or option is not applicable, pass or fail (a pass there
# would be by accident): (reason, pattern searched in the test function's source).
LLAMA_CPP_ONLY = [
    ("llama.cpp's native endpoints (/completion, /slots, /infill, /props, /apply-template, /rerank, /embedding "
     "with per-token vectors) and options (n_probs, with_pieces, cache_prompt, id_slot, return_tokens, "
     "timings_per_token, post_sampling_probs)",
     r"\"/completion\"|\"/slots|\"/infill|\"/props|\"/apply-template|\"/rerank|pooling = \"none\"|"
     r"\bn_probs\b|with_pieces|cache_prompt|id_slot|return_tokens|timings_per_token|post_sampling_probs|"
     r"__verbose|\"/embedding\"|input_tokens\"|return_progress|\"n_predict\""),
]
# Failures of these tests (name prefixes) are differences in behaviour both sides may choose, each with the reason
# miaotui chose its way; they are counted apart ("differs"), not hidden. A pass still counts as a pass.
KNOWN_DIFFERENCES = {
    "test_cors_options[": "llama.cpp answers a literal `Access-Control-Allow-Headers: *`; miaotui (Starlette) names "
                          "the headers the preflight asked for, since browsers never let `*` cover Authorization "
                          "(nor anything, with credentials)",
    "test_invalid_chat_completion_req[messages7]": "two assistant turns in a row: llama.cpp refuses them, OpenAI's "
                                                   "API and miaotui take them",
}
# Cases of a test that send a llama.cpp-only input form (outside OpenAI's API): not applicable, pass or fail, as
# the tests of LLAMA_CPP_ONLY are.
EXTENSIONS = dict.fromkeys(
    [f"test_embedding_mixed_input[{case}" for case in ("input3", "input5", "input7", "input8", "input9", "input10")]
    + ["test_embedding_content_text_same_as_string"],
    "llama.cpp's prompt extensions to OpenAI's `input` (token ids mixed with text in one prompt or one list, "
    "{prompt_string} and {content} objects)")
# Failures whose text shows such a difference: (reason, pattern searched in the failure text).
DIFFERENT = [
    ("llama.cpp's own error type for a prompt past the context (exceed_context_size_error; miaotui sends OpenAI's "
     "invalid_request_error with code context_length_exceeded)", r"exceed_context_size_error"),
    ("the first chunk of a chat stream: miaotui sends `\"content\": \"\"` beside the role, as OpenAI and vLLM do; "
     "llama.cpp sends null", r"assert '' is None"),
]
# Failures that depend on llama.cpp's test model, by test name.
MODEL_SPECIFIC = {"test_tokenize_with_bos": "the suite's test model adds a BOS token (id 1); SmolLM2's GGUF says "
                                            "add_bos_token false, so neither llama.cpp nor miaotui adds one to it"}
# Not applicable, read off the failure: (reason, pattern searched in the failure text); the first that matches.
NOT_APPLICABLE = [
    ("the test model's exact output (stories260K's text, prompt and output token counts)",
     r"match_regex\(|n_prompt\b|n_predicted\b|== n_token_output|n_tokens == |\"Suddenly\"|content == "),
    ("llama.cpp-only fields or options (timings, __verbose, n_probs, slots, cache_prompt, with_pieces, "
     "/apply-template, the native /completion body)",
     r"timings|__verbose|n_probs|id_slot|cache_prompt|with_pieces|apply-template|\"content\" in res\.body|"
     r"completion_probabilities|tokens_cached|\"tokens\" in res\.body|return_tokens|n_indent|t_max_"),
    ("a model name the server does not serve (llama.cpp answers any `model`; miaotui answers 404 as OpenAI "
     "and vLLM do)", r"model_not_found|NotFoundError|does not exist; this server serves"),
    ("llama-server flags with no miaotui counterpart (context shift, reranking, LoRA, multimodal, server tools, "
     "MCP proxy, llama.cpp's template names)", r"Server process died with return code 3"),
    ("the web UI's static files and Anthropic's X-Api-Key header (llama.cpp's own UI and Anthropic API)",
     r"/sw\.js|manifest\.webmanifest|_app/version|X-Api-Key|anthropic"),
]


def fetch(cache: Path, any_text: bool) -> Path:
    """The suite, fresh from the source distribution (fetched once), with the adaptations applied."""
    source = cache / "src" / SDIST.replace("==", "-").replace("-", "_", 2) / SUITE
    if not (source / "utils.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", str(cache), SDIST], check=True)
        archive = next(cache.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            root = tar.getnames()[0].split("/")[0]
            members = [m for m in tar.getmembers() if m.name.startswith(f"{root}/{SUITE}/")]
            tar.extractall(cache / "src", members=members, filter="data")
        source = cache / "src" / root / SUITE
    suite = cache / "tests"
    shutil.rmtree(suite, ignore_errors=True)
    shutil.copytree(source, suite)
    (suite / "conftest.py").write_text(CONFTEST)  # no session fixture downloading llama.cpp's test models
    if any_text:  # the suite's model's exact words are not checked; everything else in those tests still is
        with open(suite / "utils.py", "a") as f:
            f.write("\n\ndef match_regex(regex, text):  # miaotui's conformance run, --any-text\n"
                    "    return isinstance(text, str)\n")
    for test in (suite / "unit").glob("test_*.py"):
        text = test.read_text()
        for old, new in ADAPTATIONS:
            text = text.replace(old, new)
        test.write_text(text)
    return suite


def test_sources(suite: Path) -> dict[tuple[str, str], str]:
    """(file, test function) → the function's source, decorators left out."""
    out = {}
    for path in (suite / "unit").glob("test_*.py"):
        source = path.read_text()
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                out[(path.name, node.name)] = ast.get_source_segment(source, node) or ""
    return out


def classify(name: str, source: str, failure: str | None) -> tuple[str, str] | None:
    """("not applicable" or "differs", why) for a test that does not count as passed or failed; else None."""
    for reason, pattern in LLAMA_CPP_ONLY:
        if re.search(pattern, source):
            return "not applicable", reason
    for prefix, reason in EXTENSIONS.items():
        if name.startswith(prefix):
            return "not applicable", reason
    if failure is None:
        return None
    for prefix, reason in KNOWN_DIFFERENCES.items():
        if name.startswith(prefix):
            return "differs", reason
    for reason, pattern in DIFFERENT:
        if re.search(pattern, failure):
            return "differs", reason
    if name in MODEL_SPECIFIC:
        return "not applicable", MODEL_SPECIFIC[name]
    for reason, pattern in NOT_APPLICABLE:
        if re.search(pattern, failure):
            return "not applicable", reason
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", default=",".join(FILES), help="test files of the suite's unit/ folder")
    ap.add_argument("--keep", default=None, help="where the fetched suite is kept (default: the miaotui cache)")
    ap.add_argument("--table-only", action="store_true", help="print the table of the last run again")
    ap.add_argument("--any-text", action="store_true", help="accept any text where a test checks the exact words "
                    "of llama.cpp's test model (which miaotui cannot load here), so the rest of those tests is "
                    "judged on its merits")
    args = ap.parse_args()
    missing = [m for m in NEEDS if shutil.which(sys.executable) and not _importable(m)]
    if missing:
        print(f"the suite needs: pip install {' '.join(missing)}", file=sys.stderr)
        return 2
    cache = Path(args.keep or Path(os.environ.get("MIAOTUI_HOME", Path.home() / ".cache" / "miaotui")) /
                 "conformance")
    if args.table_only:
        return print_table(cache / "report.xml", test_sources(cache / "tests"))
    suite = fetch(cache, args.any_text)
    shim = cache / "llama-server"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).with_name('llama_server.py')} \"$@\"\n")
    shim.chmod(0o755)
    report = cache / "report.xml"
    files = [f"unit/{f}" for f in args.files.split(",")]
    env = {**os.environ, "LLAMA_SERVER_BIN_PATH": str(shim)}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *files],
                   cwd=suite, env=env, stdout=subprocess.DEVNULL)
    return print_table(report, test_sources(suite))


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def print_table(report: Path, sources: dict[tuple[str, str], str]) -> int:
    kinds = ("passed", "differs", "failed", "not applicable")
    rows: dict[str, dict[str, int]] = {}
    reasons: dict[tuple[str, str], int] = {}
    failures: list[tuple[str, str]] = []
    for case in ET.parse(report).iter("testcase"):
        if case.find("skipped") is not None:
            continue
        file = case.get("classname", "").split(".")[-1] + ".py"
        row = rows.setdefault(file, dict.fromkeys(kinds, 0))
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        text = None if bad is None else f"{bad.get('message', '')}\n{bad.text or ''}"
        name = case.get("name", "")
        found = classify(name, sources.get((file, name.split("[")[0]), ""), text)
        if found is not None:
            row[found[0]] += 1
            reasons[found] = reasons.get(found, 0) + 1
        elif bad is None:
            row["passed"] += 1
        else:
            row["failed"] += 1
            failures.append((f"{file}::{name}", (bad.get("message") or "").splitlines()[0][:160]))
    print("| file | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
    for file, r in sorted(rows.items()):
        print(f"| {file} | " + " | ".join(str(r[k]) for k in kinds) + " |")
    total = {k: sum(r[k] for r in rows.values()) for k in kinds}
    applicable = total["passed"] + total["failed"] + total["differs"]
    print(f"\napplicable: {applicable}; passed {total['passed']} "
          f"({100 * total['passed'] / max(1, applicable):.0f}%), differs on purpose {total['differs']}, failed "
          f"{total['failed']}; not applicable {total['not applicable']}")
    for kind in ("differs", "not applicable"):
        print(f"\n{kind}, by reason:")
        for (k, reason), n in sorted(reasons.items(), key=lambda x: -x[1]):
            if k == kind:
                print(f"  {n:>3}  {reason}")
    if failures:
        print("\nfailures:")
        for name, message in failures:
            print(f"  {name}: {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
