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
