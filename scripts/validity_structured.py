"""Validity of constrained outputs: N generated JSON schemas (nested objects, bounded arrays, enums, required and
optional keys, bounded numbers, patterned strings), one request each at temperature 1 on a model; every output that
finished must parse and validate (`jsonschema`). The schemas bound their strings: an unbounded pattern such as
`[a-z]+` lets a small model at temperature 1 write letters until max_tokens (the constraint allows it).
Usage: python scripts/validity_structured.py [MODEL ...] [--count N]"""

from __future__ import annotations

import argparse
import json
import random

import jsonschema

from miaotui import LLM, SamplingParams, StructuredOutput


def leaf(rng: random.Random) -> dict:
    kind = rng.choice(["string", "pattern", "integer", "number", "boolean", "enum", "nullable"])
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 3), "maxLength": rng.randint(4, 24)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[A-Z][a-z]{1,8}$", "^[0-9]{3}-[0-9]{4}$",
                                                         "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"])}
    if kind == "integer":
        low = rng.randint(-100, 100)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 1e6])}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "cyan", 1, 2, True, None], rng.randint(1, 4))}
    if kind == "nullable":
        return {"type": ["string", "null"], "maxLength": 12}
    return {"type": "boolean"}


def schema(rng: random.Random, depth: int = 0) -> dict:
    props = {}
    for i in range(rng.randint(1, 4 if depth else 5)):
        roll = rng.random()
        if roll < 0.2 and depth < 2:
            props[f"obj_{i}"] = schema(rng, depth + 1)
        elif roll < 0.4:
            props[f"list_{i}"] = {"type": "array", "items": leaf(rng), "minItems": rng.randint(0, 2),
                                  "maxItems": rng.randint(2, 4)}
        else:
            props[f"field_{i}"] = leaf(rng)
    required = [k for k in props if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def main(models: list[str], count: int) -> None:
    rng = random.Random(0)
    schemas = [schema(rng) for _ in range(count)]
    for model in models:
        llm = LLM(model)
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=400, structured_output=StructuredOutput(json=s))
                  for i, s in enumerate(schemas)]
        prompts = [f"Fill in this JSON record (keys: {', '.join(s['properties'])}):\n" for s in schemas]
        outs = llm.generate(prompts, params)
        valid = cut = 0
        for out, s in zip(outs, schemas):
            if out.finish_reason == "length":
                cut += 1
                continue
            jsonschema.validate(json.loads(out.text), s)  # raises on the first invalid output
            valid += 1
        print(f"{model}: {valid}/{count} valid, {cut} cut off by max_tokens, 0 invalid", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
    p.add_argument("--count", type=int, default=200)
    args = p.parse_args()
    main(args.models, args.count)
