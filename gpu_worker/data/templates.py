"""Chat templates: the named built-ins and the one renderer every tokenization path uses.

A conversation becomes text here, together with the character span of each assistant reply, so the
trainer (``encoding.py`` over a loaded tokenizer) and the torch-free token counter (``tokencount.py``
over ``tokenizer.json``) label exactly the same tokens. The renderer mirrors transformers'
``apply_chat_template`` (sandboxed Jinja with ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``,
``raise_exception``, ``tojson`` and the ``{% generation %}`` tag that marks assistant text); a test
checks the two render the same text. jinja2 and the standard library only.

Which template: ``ChatTemplate.auto`` is the tokenizer's own (ChatML when it has none, as
``loading.ensure_chat_ready`` does); a named one overrides it. The built-ins write each family's own
special tokens and wrap what the assistant says, its end-of-turn token included, in
``{% generation %}``: the model learns to stop. A template without those markers (most hub templates)
still works: a reply's span is what rendering it adds to the conversation before it.

Tool calling (OpenAI's ``tools`` / ``tool_calls`` / ``tool`` messages): a template that renders
tools itself (its source handles ``tool_calls``, as Qwen2.5's, Llama 3.1's and Mistral's hub
templates do) gets them as transformers passes them: ``tools=`` and messages with ``tool_calls``
(arguments as objects) and ``tool_call_id``. Every other template (the built-ins, and a tokenizer
template that knows nothing of tools) renders the conversation after ``lower_tools`` rewrites it
into plain turns, in the Hermes / Qwen2.5 format:

- the tool list joins the system turn (a system turn is added when there is none) as the
  ``# Tools`` block with one JSON function signature per line inside ``<tools></tools>``;
- an assistant message's calls become its text: its content (if any), then one
  ``<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`` block per call, newline-separated;
- consecutive tool results become one user turn of ``<tool_response>\n...\n</tool_response>`` blocks.

The assistant turns stay assistant turns, so the loss covers the calls and replies; the tool list
and the results are inputs.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

from gpu_worker.contract import ChatTemplate

# ChatML with generation markers: the built-in model's template (``builtin`` imports it from here,
# since this module must stay importable by the control plane's token counter without torch).
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# The end-of-turn tokens of the built-in families: a reply span that stops right before one of these
# (a template that leaves it outside its generation block) is extended to include it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>", "<eos>")

_LLAMA3 = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] | trim + '<|eot_id|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- message['content'] | trim + '<|eot_id|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# Mistral and Gemma have no system role: the system text opens the first user turn. Mistral has no
# generation prompt: a prompt ends at "[/INST]" and the model writes the space before its reply, so the
# space is part of what it learns to generate (inside the generation block: a tokenizer that keeps it
# a token of its own, as byte-level ones do before digits, trains it, and a preference completion
# after the prompt is exactly the trained span).
_MISTRAL = (
    "{{- '<s>' -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\\n\\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '[INST] ' + ns.system + message['content'] + ' [/INST]' -}}{%- set ns.system = '' -%}"
    "{%- else -%}"
    "{%- generation -%}{{- ' ' + message['content'] + '</s>' -}}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_GEMMA = (
    "{{- '<bos>' -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\\n\\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<start_of_turn>user\\n' + ns.system + message['content'] + '<end_of_turn>\\n' -}}{%- set ns.system = '' -%}"
    "{%- else -%}"
    "{{- '<start_of_turn>model\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<end_of_turn>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

# Qwen2's ChatML: a default system prompt when the conversation has none.
_QWEN = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}" + CHATML_TEMPLATE
)

_PHI3 = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}{{- message['content'] + '<|end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

BUILTIN_TEMPLATES: dict[ChatTemplate, str] = {
    ChatTemplate.chatml: CHATML_TEMPLATE,
    ChatTemplate.llama3: _LLAMA3,
    ChatTemplate.mistral: _MISTRAL,
    ChatTemplate.gemma: _GEMMA,
    ChatTemplate.qwen: _QWEN,
    ChatTemplate.phi3: _PHI3,
}


_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def renders_tools(source: str) -> bool:
    """Whether a template renders tool calls itself (else ``lower_tools`` rewrites them first)."""
    return "tool_calls" in source


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # as transformers' ``tojson``


def _arguments(call: dict[str, Any]) -> Any:
    args = call["function"]["arguments"]
    return json.loads(args) if isinstance(args, str) else args  # OpenAI's JSON string, or an object


def lower_tools(messages: list[dict[str, Any]], tools: Any = None) -> list[dict[str, Any]]:
    """The conversation with its tools, calls and results written as plain system / user /
    assistant turns (the module docstring's format); a conversation without them is unchanged."""
    if not tools and not any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        return messages
    out: list[dict[str, Any]] = []
    if tools:
        block = _TOOLS_HEAD + "".join("\n" + _dumps(t) for t in tools) + _TOOLS_TAIL
        if messages and messages[0]["role"] == "system":
            out.append({**messages[0], "content": messages[0]["content"] + "\n\n" + block})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block, "weight": 1})
    for m in messages:
        if m["role"] == "tool":
            response = "<tool_response>\n" + m["content"] + "\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "weight": 1, "_tool_results": True})
            continue
        calls = [
            "<tool_call>\n" + _dumps({"name": c["function"]["name"], "arguments": _arguments(c)}) + "\n</tool_call>"
            for c in m.get("tool_calls") or ()
        ]
        m = {k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")}
        if calls:
            m["content"] = "\n".join(([m["content"]] if m["content"] else []) + calls)
        out.append(m)
    for m in out:
        m.pop("_tool_results", None)
    return out


def resolve_template(choice: ChatTemplate | str, tokenizer_template: str | None) -> str:
    """The Jinja source to render with: a named built-in, else the tokenizer's own, else ChatML."""
    choice = ChatTemplate(choice)
    if choice != ChatTemplate.auto:
        return BUILTIN_TEMPLATES[choice]
    return tokenizer_template or CHATML_TEMPLATE


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTracker(Extension):
        """``{% generation %}...{% endgeneration %}``: records the character span it rendered."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            environment.extend(tracked=None)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

        def _track(self, caller):
            text = caller()
            if self.environment.tracked is not None:
                blocks, spans = self.environment.tracked
                start = sum(len(b) for b in blocks)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env, env.from_string(source)


class TemplateError(ValueError):
    """The chat template refused the conversation (e.g. ``raise_exception`` on a role order)."""


def render(source: str, messages: list[dict[str, Any]], *, special_tokens: dict[str, str], tools: Any = None, add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` (``{"role", "content"}``, with ``tool_calls`` / ``tool_call_id`` where
    present) and ``tools`` with template ``source``; returns the text and the character spans of its
    ``{% generation %}`` blocks, in order."""
    env, template = _compile(source)
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    if renders_tools(source):
        keep = ("role", "content", "tool_calls", "tool_call_id")
        chat = [{k: m[k] for k in keep if k in m} for m in messages]
        tools = list(tools) if tools else None
    else:
        chat = [{"role": m["role"], "content": m["content"]} for m in lower_tools(messages, tools)]
        tools = None
    env.tracked = (blocks, spans)
    try:
        for block in template.generate(messages=chat, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **special_tokens):
            blocks.append(block)
    except Exception as err:
        if type(err).__module__.startswith("jinja2"):
            raise TemplateError(f"the chat template failed: {err}") from err
        raise
    finally:
        env.tracked = None
    return "".join(blocks), spans


def assistant_spans(source: str, messages: list[dict[str, Any]], *, special_tokens: dict[str, str], tools: Any = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant message (its tool calls
    included), in order, end of turn included."""
    text, spans = render(source, messages, special_tokens=special_tokens, tools=tools)
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    if len(spans) != n_assistant:
        spans = _spans_by_prefix(source, messages, text, special_tokens, tools)
    ends = tuple(t for t in (special_tokens.get("eos_token"), *END_OF_TURN_TOKENS) if t)
    out = []
    for start, end in spans:
        for token in ends:
            if text.startswith(token, end):
                end += len(token)
                break
        out.append((start, end))
    return text, out


def _spans_by_prefix(source, messages, text, special_tokens, tools=None) -> list[tuple[int, int]]:
    """Templates without generation markers: a reply is what rendering it adds to the conversation
    before it (with the generation prompt). When a template does not render prefixes consistently
    (some drop earlier turns' details), the reply's content is searched for in order instead."""
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(source, messages[:i], special_tokens=special_tokens, tools=tools, add_generation_prompt=True)[0] if i else ""
        upto = render(source, messages[: i + 1], special_tokens=special_tokens, tools=tools)[0]
        if upto.startswith(before) and text.startswith(upto) and len(before) >= cursor:
            span = (len(before), len(upto))
        else:
            start = text.find(m["content"], cursor) if m["content"] else -1
            if start < 0:
                raise TemplateError(f"the chat template does not render assistant message {i} verbatim")
            span = (start, start + len(m["content"]))
        spans.append(span)
        cursor = span[1]
    return spans
