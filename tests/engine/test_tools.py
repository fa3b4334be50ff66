"""Tool-call syntaxes: the Hermes tags (Qwen2.5) and the bare JSON of Llama-style templates, parsed whole and
streamed in any chunking to the same calls with no call syntax in the content; their grammars, compiled against a
real tokenizer, allow prose and calls where the tool_choice says and nothing else; a Llama-style template given with
`chat_template=` makes SmolLM2 call tools in the JSON form."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from miaotui import LLM, SamplingParams
from miaotui.engine.structured import Grammars
from miaotui.engine.tools import CLOSE, HermesSyntax, JsonSyntax, syntax_for
from miaotui.errors import GrammarError, MiaotuiError
from miaotui.sampling import StructuredOutput

jsonschema = pytest.importorskip("jsonschema")

TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

# A Llama-3.1-style template (tools as JSON in a system turn, the reply a bare JSON call with "parameters", tool
# results in an "ipython" turn), written for SmolLM2's turn tokens.
LLAMA_STYLE = """\
{%- if tools %}<|im_start|>system
To call a function, reply with only a JSON object {"name": function name, "parameters": dictionary of arguments}.
Functions:
{% for t in tools %}{{ t | tojson }}
{% endfor %}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}\
{% endfor %}<|im_end|>
{% elif m.role == "tool" %}<|im_start|>ipython
{{ m.content }}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

HERMES_TEXT = ('Let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n'
               '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n')
JSON_TEXT = '{"name": "add", "parameters": {"a": 2, "b": 3}}; {"name": "weather", "parameters": {"city": "Oslo"}}'
EXPECTED = [("add", {"a": 2, "b": 3}), ("weather", {"city": "Oslo"})]


def calls_of(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def streamed(syntax, text: str, cuts: list[int], parallel: bool = True) -> tuple[str, list[tuple[str, dict]]]:
    stream, content, calls = syntax.stream(TOOLS, parallel), "", {}
    bounds = [0, *sorted(set(cuts)), len(text)]
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        piece, deltas = stream.feed(text[a:b], final=i == len(bounds) - 2)
        content += piece
        assert len({d["index"] for d in deltas}) == len(deltas)  # one entry per call in a chunk, as OpenAI's
        for d in deltas:
            call = calls.setdefault(d["index"], {"name": "", "arguments": ""})
            call["name"] += d.get("function", {}).get("name", "")
            call["arguments"] += d["function"]["arguments"]
    return content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


def test_hermes_and_json_replies_parse_to_the_same_calls():
    content, calls = HermesSyntax().parse(HERMES_TEXT, TOOLS)
    assert content == "Let me check." and calls_of(calls) == EXPECTED
    assert calls_of(JsonSyntax().parse(JSON_TEXT, TOOLS)[1]) == EXPECTED
    assert JsonSyntax().parse(JSON_TEXT, TOOLS)[0] is None
    assert calls_of(JsonSyntax().parse("<|python_tag|>" + JSON_TEXT, TOOLS)[1]) == EXPECTED


@pytest.mark.parametrize("text", ["Paris is sunny.", '{"name": "add", "parameters": {"a": 1', '{"x": 1}',
                                  '{"name": "add"} and then some prose'])
def test_json_replies_that_are_not_calls_are_prose(text):
    assert JsonSyntax().parse(text, TOOLS) == (text, [])
    assert streamed(JsonSyntax(), text, [3]) == (text, [])


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, len(HERMES_TEXT)), max_size=8))
def test_hermes_stream_gives_the_calls_in_any_chunking_and_never_a_tag(cuts):
    content, calls = streamed(HermesSyntax(), HERMES_TEXT, cuts)
    assert calls == EXPECTED and content.strip() == "Let me check." and "<" not in content


def test_hermes_calls_stream_their_arguments_as_they_come():
    stream, deltas = HermesSyntax().stream(TOOLS), []
    for ch in HERMES_TEXT[: HERMES_TEXT.index(CLOSE)]:  # the first call, its closing tag not yet written
        deltas += stream.feed(ch)[1]
    head, *more = deltas
    assert head["index"] == 0 and head["id"] and head["function"] == {"name": "add", "arguments": "{"}
    assert len(more) > 1 and json.loads("".join(d["function"]["arguments"] for d in deltas)) == {"a": 2, "b": 3}
    assert not stream.calls and stream.feed(CLOSE)[1] == [] and calls_of(stream.calls) == EXPECTED[:1]
    cut = HermesSyntax().stream(TOOLS)  # cut short by max_tokens: a call begun in the deltas, never text
    content, deltas = cut.feed('<tool_call>\n{"name": "weather", "arguments": {"city": "Os', final=True)
    assert content == "" and not cut.calls
    assert [d["function"] for d in deltas] == [{"name": "weather", "arguments": '{"city": "Os'}]  # one entry


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, len(JSON_TEXT)), max_size=8))
def test_json_stream_gives_the_calls_in_any_chunking_and_no_json_as_content(cuts):
    assert streamed(JsonSyntax(), JSON_TEXT, cuts) == ("", EXPECTED)


def test_json_stream_lets_prose_through_at_once():
    stream = JsonSyntax().stream(TOOLS)
    assert stream.feed("The weather") == ("The weather", [])
    assert stream.feed(" is fine.", final=True) == (" is fine.", [])


# How Qwen2.5-Coder 0.5B and 1.5B answered weather questions with tools and a free ("auto") choice: no tags, the
# call object alone, fenced or bare.
FENCED_TEXT = ('```json\n{\n  "name": "add",\n  "arguments": {"a": 2, "b": 3}\n}\n```\n'
               '```json\n{"name": "weather", "arguments": {"city": "Oslo"}}\n```')
BARE_TEXT = '{"name": "add", "arguments": {"a": 2, "b": 3}}\n{"name": "weather", "arguments": {"city": "Oslo"}}'
# Qwen2.5-Coder-1.5B's template prints its call format in doubled braces, `{{"name": <function-name>, ...}}`, and
# the model writes its calls so: bare, or (tool_choice "auto", tag tokens free) inside the tags.
DOUBLED_TEXT = BARE_TEXT.replace('{"name"', '{{"name"').replace("}}", "}}}")
DOUBLED_TAGS = HERMES_TEXT.replace('{"name"', '{{"name"').replace("}}\n", "}}}\n")


@pytest.mark.parametrize("syntax", [HermesSyntax(), JsonSyntax()])
@pytest.mark.parametrize("text", [FENCED_TEXT, BARE_TEXT, DOUBLED_TEXT])
def test_a_reply_of_bare_or_fenced_calls_is_those_calls(syntax, text):
    content, calls = syntax.parse(text, TOOLS)
    assert content is None and calls_of(calls) == EXPECTED
    assert streamed(syntax, text, [1, 2, 11]) == ("", EXPECTED)


def test_arguments_written_as_a_string_of_json_are_read_as_the_object():
    text = '{"name": "add", "arguments": "{\\"a\\": 2, \\"b\\": 3}"}'
    for syntax in (HermesSyntax(), JsonSyntax()):
        assert calls_of(syntax.parse(text, TOOLS)[1]) == EXPECTED[:1]


def test_calls_in_doubled_braces_inside_the_tags_are_read():
    assert DOUBLED_TAGS.count("{{") == 2
    content, calls = HermesSyntax().parse(DOUBLED_TAGS, TOOLS)
    assert content.strip() == "Let me check." and calls_of(calls) == EXPECTED
    assert streamed(HermesSyntax(), DOUBLED_TAGS, [20, 30]) == ("Let me check.\n", EXPECTED)


@pytest.mark.parametrize("syntax", [HermesSyntax(), JsonSyntax()])
@pytest.mark.parametrize("text", [
    FENCED_TEXT.replace('"weather"', '"sub"'),  # a tool the request did not give
    '```python\nprint({"name": "add"})\n```', '```json\n{"name": "add", "arguments": {}}',  # code; no closing fence
    'Call it like this: {"name": "add", "arguments": {"a": 2, "b": 3}}', '{"name": "Ada", "age": 36}',
    '{{"name": "add", "arguments": {}}', '{{"name": "add", "arguments": {}}}}',  # unbalanced doubling
    '{"name": "add", "arguments": "2 and 3"}', '{"name": "add", "arguments": [2, 3]}'])  # arguments not an object
def test_other_replies_stay_prose(syntax, text):
    assert syntax.parse(text, TOOLS) == (text, [])
    assert streamed(syntax, text, [2, 9]) == (text, [])


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, len(FENCED_TEXT)), max_size=8), syntax=st.sampled_from([HermesSyntax(),
                                                                                             JsonSyntax()]))
def test_fenced_calls_stream_whole_in_any_chunking(cuts, syntax):
    assert streamed(syntax, FENCED_TEXT, cuts) == ("", EXPECTED)


@pytest.mark.parametrize("syntax, text", [(HermesSyntax(), HERMES_TEXT), (HermesSyntax(), FENCED_TEXT),
                                          (JsonSyntax(), JSON_TEXT), (JsonSyntax(), BARE_TEXT)])
def test_without_parallel_calls_the_first_call_only(syntax, text):
    assert calls_of(syntax.parse(text, TOOLS, parallel=False)[1]) == EXPECTED[:1]
    assert streamed(syntax, text, [5, 40], parallel=False)[1] == EXPECTED[:1]


@pytest.mark.parametrize("syntax", [HermesSyntax(), JsonSyntax()])
def test_prose_and_code_stream_at_once(syntax):
    for text in ("The weather", "```python\n"):
        stream = syntax.stream(TOOLS)
        assert stream.feed(" " + text) == (" " + text, [])


@pytest.fixture(scope="module")
def grammars(smollm2_engine):
    return Grammars(smollm2_engine.tokenizer, smollm2_engine.model_config.vocab_size)


def follows(grammars, spec: StructuredOutput, text: str) -> bool:
    """Whether the grammar lets the model write `text` and stop there."""
    matcher = grammars.compile(spec)
    return all(matcher.consume_token(t) for t in grammars.tokenizer.encode(text)) and matcher.is_accepting()


@pytest.mark.parametrize("syntax, good, bad_name", [
    (HermesSyntax(tag_tokens=False), HERMES_TEXT.split("\n", 1)[1], HERMES_TEXT.replace('"add"', '"sub"')),
    (JsonSyntax(), JSON_TEXT, JSON_TEXT.replace('"weather"', '"sub"')),
])
def test_grammars_follow_the_tool_choice(grammars, syntax, good, bad_name):
    required, auto = syntax.grammar(TOOLS, "required", True), syntax.grammar(TOOLS, "auto", True)
    single = syntax.grammar(TOOLS, "required", False)
    named = syntax.grammar(TOOLS, {"type": "function", "function": {"name": "weather"}}, True)
    assert syntax.grammar(TOOLS, "none", True) is None
    assert follows(grammars, required, good) and follows(grammars, auto, good)
    assert not follows(grammars, required, "Sure, here you go.")
    assert follows(grammars, auto, "Sure, here you go.")
    assert not follows(grammars, required, bad_name) and not follows(grammars, auto, bad_name)
    assert not follows(grammars, single, good)  # two calls where parallel calls are off
    assert not follows(grammars, named, good)  # "add" is not the named function
    wrong_args = good.replace('"a": 2', '"a": "two"')
    assert not follows(grammars, required, wrong_args)


def test_auto_checks_a_call_that_follows_prose(grammars):
    auto = HermesSyntax(tag_tokens=False).grammar(TOOLS, "auto", True)
    assert follows(grammars, auto, HERMES_TEXT)
    assert not follows(grammars, auto, HERMES_TEXT.replace('"b": 3', '"c": 3'))
    assert not follows(grammars, auto, HERMES_TEXT + "and prose after the calls")


def test_the_template_picks_the_syntax(smollm2_engine):
    tok = smollm2_engine.tokenizer
    from dataclasses import replace

    assert syntax_for(replace(tok, chat_template=LLAMA_STYLE)) == JsonSyntax(key="parameters")
    assert syntax_for(replace(tok, chat_template="{{ '<tool_call>' }}{{ tools }}")) == HermesSyntax(tag_tokens=False)


@pytest.fixture(scope="module")
def llama_style(smollm2_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "llama_style.jinja"
    path.write_text(LLAMA_STYLE)
    return LLM(str(smollm2_path), chat_template=str(path), dtype="float32", quantization="none",
               kv_cache_memory=128 * 2**20)


def test_a_llama_style_template_gets_json_calls_that_validate(llama_style):
    questions = ["What is 2 plus 40?", "How is the weather in Lima?", "Add 7 and 8.", "Weather in Rome?"]
    outs = llama_style.chat([[{"role": "user", "content": q}] for q in questions],
                            [SamplingParams(temperature=1.0, seed=i, max_tokens=60) for i in range(len(questions))],
                            tools=TOOLS, tool_choice="required", use_tqdm=False)
    for out in outs:
        assert out.finish_reason == "tool_calls" and out.text == "", out
        for name, args in calls_of(out.tool_calls):
            jsonschema.validate(args, SCHEMAS[name])


def test_a_tool_result_goes_back_through_the_given_template(llama_style):
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 40}}}
    rendered = llama_style.tokenizer.render_chat([
        {"role": "user", "content": "What is 2 plus 40?"}, {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"}], tools=TOOLS)
    assert '{"name": "add", "parameters": {"a": 2, "b": 40}}' in rendered and "ipython\n42" in rendered


def test_a_bad_chat_template_is_refused_at_start(smollm2_path, tmp_path):
    with pytest.raises(MiaotuiError, match="no such file"):
        LLM(str(smollm2_path), chat_template=str(tmp_path / "missing.jinja"))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(MiaotuiError, match="broken.jinja: line 1"):
        LLM(str(smollm2_path), chat_template=str(broken))


def test_an_uncompilable_tool_schema_names_the_grammar(grammars):
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "(unclosed"}}}}}]
    with pytest.raises(GrammarError):
        grammars.compile(JsonSyntax().grammar(bad, "required", True))


def test_qwen_tags_are_tokens_and_auto_checks_a_call_after_prose():
    """Qwen2.5's tags are tokens of their own: the grammar names the tokens, and a call after prose is checked."""
    from miaotui.loader.gguf_file import GGUFFile
    from miaotui.tokenizer import Tokenizer
    from tests.conftest import model_path

    f = GGUFFile(model_path("qwen2.5-coder-0.5b"))
    tok = Tokenizer.from_gguf(f.metadata, f.path)
    syntax = syntax_for(tok)
    assert syntax == HermesSyntax(tag_tokens=True)
    qwen = Grammars(tok, 151936)
    auto = syntax.grammar(TOOLS, "auto", True)
    assert follows(qwen, auto, HERMES_TEXT) and follows(qwen, auto, "Just prose.")
    assert not follows(qwen, auto, HERMES_TEXT.replace('"b": 3', '"c": 3'))
    assert follows(qwen, syntax.grammar(TOOLS, "required", True), HERMES_TEXT.split("\n", 1)[1])
