"""Drives `layerskip serve` with the official `openai` client: completions, chat, streaming,
LayerSkip options through `extra_body`, and an error. Prints the texts as JSON for the Rust
test (crates/layerskip-cli/tests/serve.rs) to compare with `layerskip infer`.

usage: python3 scripts/openai_client_check.py http://127.0.0.1:PORT/v1 PROMPT
"""
import json
import sys

import openai

base, prompt = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="not-needed")
model = client.models.list().data[0].id
greedy = dict(model=model, prompt=prompt, max_tokens=24, temperature=0)
completion = client.completions.create(**greedy).choices[0].text
completion_stream = "".join(c.choices[0].text for c in client.completions.create(**greedy, stream=True))
self_spec = client.completions.create(
    **greedy, extra_body={"layerskip": {"strategy": "self-spec", "exit_layer": 4, "speculations": 3}}
).choices[0].text
messages = [{"role": "user", "content": "Write a function."}]
chat_args = dict(model=model, messages=messages, max_tokens=16, temperature=0)
chat = client.chat.completions.create(**chat_args).choices[0].message.content
chat_stream = "".join(
    (c.choices[0].delta.content or "") for c in client.chat.completions.create(**chat_args, stream=True) if c.choices
)
try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    bad_model_status = 200
except openai.NotFoundError as e:
    bad_model_status = e.status_code
print(json.dumps(dict(
    completion=completion, completion_stream=completion_stream, self_spec=self_spec,
    chat=chat, chat_stream=chat_stream, bad_model_status=bad_model_status,
)))
