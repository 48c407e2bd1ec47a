"""Go's text/template, the subset Ollama Modelfile templates use, rendered as Ollama renders a chat.

Supported: text; actions `{{ .Field }}`, `{{ range .List }}...{{ end }}`, `{{ if .Field }}...{{ else }}...{{ end }}`;
Go's trim markers (`{{- ` removes the white space before the action, ` -}}` the white space after it); fields of the
current element (`.Role`, `.Content`) and of the top level (`$.System`). Anything else raises ValueError instead of
rendering something plausible. Ollama's rule for SYSTEM: with a `.Messages` template, the Modelfile's SYSTEM becomes
a first system message when the conversation has none.
"""

from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)


def _tokens(src: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        pos = m.end()
        if m.group(3):
            rest = src[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    out.append(("text", src[pos:]))
    return out


def _parse(tokens: list[tuple[str, str]], i: int = 0, stop: tuple[str, ...] = ()) -> tuple[list, int, str]:
    nodes: list = []
    while i < len(tokens):
        kind, value = tokens[i]
        i += 1
        if kind == "text":
            if value:
                nodes.append(("text", value))
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in stop:
            return nodes, i, word
        if word in ("range", "if"):
            arg = value.split(None, 1)[1] if " " in value else ""
            body, i, ended = _parse(tokens, i, ("end", "else"))
            other: list = []
            if ended == "else":
                other, i, ended = _parse(tokens, i, ("end",))
            if ended != "end":
                raise ValueError(f"{{{{ {value} }}}} has no {{{{ end }}}}")
            nodes.append((word, arg, body, other))
        elif re.fullmatch(r"\$?\.[A-Za-z_][A-Za-z0-9_]*|\.", value):
            nodes.append(("field", value))
        else:
            raise ValueError(f"unsupported template action {{{{ {value} }}}}")
    if stop:
        raise ValueError(f"template ends inside a block (expected {' or '.join(stop)})")
    return nodes, i, ""


def _lookup(name: str, dot, root) -> object:
    if name == ".":
        return dot
    scope, key = (root, name[2:]) if name.startswith("$.") else (dot, name[1:])
    if isinstance(scope, dict) and key in scope:
        return scope[key]
    if isinstance(scope, dict) and key.lower() in scope:  # Ollama's messages are {role, content}; Go fields are capitalised
        return scope[key.lower()]
    raise ValueError(f"template field {name} not available here")


def _truthy(v) -> bool:
    return bool(v)


def _render(nodes: list, dot, root) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            v = _lookup(node[1], dot, root)
            out.append("" if v is None else str(v))
        elif node[0] == "if":
            out.append(_render(node[2] if _truthy(_lookup(node[1], dot, root)) else node[3], dot, root))
        elif node[0] == "range":
            items = _lookup(node[1], dot, root) or []
            out.append("".join(_render(node[2], item, root) for item in items) if items else _render(node[3], dot, root))
    return "".join(out)


def render(template: str, data: dict) -> str:
    nodes, _, _ = _parse(_tokens(template))
    return _render(nodes, data, data)


def ollama_chat_prompt(template: str, system: str | None, messages: list[dict]) -> str:
    """The prompt Ollama builds for `messages` from a Modelfile's TEMPLATE and SYSTEM."""
    msgs = list(messages)
    if system and not any(m["role"] == "system" for m in msgs):
        msgs = [{"role": "system", "content": system}] + msgs
    return render(template, {"Messages": msgs, "System": system or "", "Prompt": "", "Response": ""})
