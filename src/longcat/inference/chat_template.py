"""LongCat's chat format, as a Jinja template for tokenizer_config.json and as plain Python.

The format is LongCat-Flash-Chat's (its tokenizer_config.json is the authority; its README shows the
tool headings one level deeper): with tools, a `# Tools` block lists each function's name,
description and JSON schema, explains the call syntax, and `# Messages` follows; then `SYSTEM:{text}`,
user rounds `[Round i] USER:{text}` (a space before every round but a conversation's first message),
assistant turns ` ASSISTANT:{text}{calls}</longcat_s>` with each call as
`<longcat_tool_call>\\n{"name": ..., "arguments": ...}\\n</longcat_tool_call>`, tool results
` TOOL:{"name": ..., "content": ...}`, and ` ASSISTANT:` to ask for the next answer.

`LONGCAT_CHAT_TEMPLATE` is what `data prepare` and training write into checkpoints, so transformers'
`apply_chat_template` renders conversations the way our server does; `longcat_chat_prompt` is the
same format in Python, the reference the tests hold the template to and the fallback without jinja2.
Only `function` tools are rendered (the released template also knows a built-in code interpreter).
"""

from __future__ import annotations

import json

END_OF_TURN = "</longcat_s>"

TOOLS_NOTE = (
    "**Note**: For each function call, return a json object with function name and arguments within "
    "<longcat_tool_call></longcat_tool_call> XML tags as follows:\n"
    '<longcat_tool_call>\n{"name": <function-name>, "arguments": <args-dict>}\n</longcat_tool_call>\n'
    "When multiple functions need to be called simultaneously, each function call should be wrapped in its "
    "own <longcat_tool_call> tag and placed consecutively. For example:\n"
    '<longcat_tool_call>\n{"name": <function-name>, "arguments": <args-dict>}\n</longcat_tool_call>'
    '<longcat_tool_call>\n{"name": <function-name>, "arguments": <args-dict>}\n</longcat_tool_call>\n\n'
)

# Whitespace control: every tag strips around itself, so only the quoted strings reach the output.
LONGCAT_CHAT_TEMPLATE = (
    "{%- set tool_choice = tool_choice | default('auto') -%}\n"
    "{%- set ns = namespace(rounds=0) -%}\n"
    "{%- if tools and tool_choice != 'none' -%}\n"
    "{{- '# Tools\\nYou have access to the following tools: \\n\\n## Tool namespace: function\\n\\n' -}}\n"
    "{%- for tool in tools if tool.type == 'function' -%}\n"
    "{{- '### Tool name: ' ~ tool.function.name ~ '\\n\\nDescription: ' ~ (tool.function.description or '')"
    " ~ '\\n\\nInputSchema: \\n' ~ (tool.function.parameters or {}) | tojson(indent=2) ~ '\\n\\n' -}}\n"
    "{%- endfor -%}\n"
    "{{- " + json.dumps(TOOLS_NOTE) + " ~ '# Messages\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message.role == 'system' -%}\n"
    "{{- 'SYSTEM:' ~ message.content -}}\n"
    "{%- elif message.role == 'user' -%}\n"
    "{{- ('' if loop.first else ' ') ~ '[Round ' ~ ns.rounds ~ '] USER:' ~ message.content -}}\n"
    "{%- set ns.rounds = ns.rounds + 1 -%}\n"
    "{%- elif message.role == 'assistant' -%}\n"
    "{{- ' ASSISTANT:' ~ (message.content or '') -}}\n"
    "{%- for call in message.tool_calls or [] -%}\n"
    "{%- set arguments = call.function.arguments -%}\n"
    '{{- \'<longcat_tool_call>\\n{"name": "\' ~ call.function.name ~ \'", "arguments": \''
    " ~ (arguments if arguments is string else arguments | tojson) ~ '}\\n</longcat_tool_call>' -}}\n"
    "{%- endfor -%}\n"
    "{{- '" + END_OF_TURN + "' -}}\n"
    "{%- elif message.role == 'tool' -%}\n"
    "{%- if message.name -%}\n"
    "{{- ' TOOL:{\"name\": ' ~ message.name | tojson ~ ', \"content\": ' ~ message.content | tojson ~ '}' -}}\n"
    "{%- else -%}\n"
    "{{- ' TOOL:{\"content\": ' ~ message.content | tojson ~ '}' -}}\n"
    "{%- endif -%}\n"
    "{%- else -%}\n"
    "{{- raise_exception('unknown chat role ' ~ message.role ~ '; use system, user, assistant or tool') -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}\n"
)


def longcat_chat_prompt(
    messages: list[dict], tools: list[dict] | None = None, tool_choice: str = "auto", generation_prompt: bool = True
) -> str:
    """messages: [{"role": "system" | "user" | "assistant" | "tool", "content": ..., "tool_calls": [...],
    "name": ...}, ...]; tools: OpenAI tool definitions ({"type": "function", "function": {...}})."""
    out = []
    if tools and tool_choice != "none":
        out.append("# Tools\nYou have access to the following tools: \n\n## Tool namespace: function\n\n")
        for tool in tools:
            if tool.get("type") != "function":
                continue
            function = tool["function"]
            schema = json.dumps(function.get("parameters") or {}, ensure_ascii=False, indent=2)
            out.append(
                f"### Tool name: {function['name']}\n\nDescription: {function.get('description') or ''}\n\n"
                f"InputSchema: \n{schema}\n\n"
            )
        out.append(TOOLS_NOTE + "# Messages\n")
    rounds = 0
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            out.append(f"SYSTEM:{message['content']}")
        elif role == "user":
            out.append(f"{'' if index == 0 else ' '}[Round {rounds}] USER:{message['content']}")
            rounds += 1
        elif role == "assistant":
            out.append(f" ASSISTANT:{message.get('content') or ''}")
            for call in message.get("tool_calls") or []:
                arguments = call["function"]["arguments"]
                if not isinstance(arguments, str):
                    arguments = json.dumps(arguments, ensure_ascii=False)
                out.append(
                    f'<longcat_tool_call>\n{{"name": "{call["function"]["name"]}", "arguments": {arguments}}}\n'
                    "</longcat_tool_call>"
                )
            out.append(END_OF_TURN)
        elif role == "tool":
            content = json.dumps(message["content"], ensure_ascii=False)
            name = f'"name": {json.dumps(message["name"], ensure_ascii=False)}, ' if message.get("name") else ""
            out.append(f' TOOL:{{{name}"content": {content}}}')
        else:
            raise ValueError(f"unknown chat role {role!r}; use system, user, assistant or tool")
    if generation_prompt:
        out.append(" ASSISTANT:")
    return "".join(out)
