"""A chat template that renders tool definitions and calls, shared by the data, GRPO and chat tests."""

# MiniMind's way with tools: the definitions open the system turn, a reply's calls follow its content.
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\n' + messages[0]['content'] + '\\n<tools>' }}"
    "{% for t in tools %}{{ '\\n' + (t | tojson) }}{% endfor %}{{ '\\n</tools><|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{% if not (tools and loop.first) %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}{% set f = c.function or c %}"
    "{{ '<tool_call>' + f.name + ' ' + f.arguments + '</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"city": "string"}}}

# A template that refuses system messages through transformers' raise_exception, as Gemma's does.
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# MiniMind-3's layout of tool use (Qwen's): the definitions in the system turn, each call a JSON object in
# <tool_call> tags after the reply's content, tool results as <tool_response> blocks of one user turn.
CALLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\n' + (messages[0]['content'] if messages[0]['role'] == 'system' else '')"
    " + '\\n<tools>' }}{% for t in tools %}{{ '\\n' + (t | tojson) }}{% endfor %}{{ '\\n</tools><|im_end|>\\n' }}"
    "{% elif messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '<|im_start|>user\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' + m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}{% set f = c.function or c %}"
    "{{ ('\\n' if m['content'] or not loop.first else '') + '<tool_call>\\n{\"name\": \"' + f.name"
    " + '\", \"arguments\": ' + (f.arguments if f.arguments is string else f.arguments | tojson)"
    " + '}\\n</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% elif m['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' + m['content'] + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
