"""Drives a running edgelorad with the official `openai` package, unmodified.

Usage: python openai_client.py BASE_URL MODEL ADAPTER PROMPT_IDS_JSON
Prints one JSON object with what each call returned; the Rust test checks it.
"""
import json
import sys

import openai

base_url, model, adapter = sys.argv[1], sys.argv[2], sys.argv[3]
prompt_ids = json.loads(sys.argv[4])
client = openai.OpenAI(base_url=base_url, api_key="unused")
out = {"version": openai.__version__}

# Models listing.
out["models"] = sorted(m.id for m in client.models.list().data)

# A completion with token ids, greedy, with the vLLM extension passed through extra_body.
c = client.completions.create(
    model=adapter,
    prompt=prompt_ids,
    max_tokens=8,
    temperature=0,
    logprobs=2,
    extra_body={"return_token_ids": True, "ignore_eos": True},
)
out["completion"] = {
    "text": c.choices[0].text,
    "finish_reason": c.choices[0].finish_reason,
    "token_ids": c.choices[0].model_extra.get("token_ids"),
    "n_logprobs": len(c.choices[0].logprobs.token_logprobs),
    "usage": c.usage.model_dump(),
}

# Chat, not streamed.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Hello there"}],
    max_tokens=6,
    temperature=0,
)
out["chat"] = {
    "role": r.choices[0].message.role,
    "content": r.choices[0].message.content,
    "usage": r.usage.model_dump(),
}

# Chat, streamed, with the usage chunk.
stream = client.chat.completions.create(
    model=adapter,
    messages=[{"role": "user", "content": "Hello there"}],
    max_tokens=6,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for ch in chunk.choices:
        if ch.delta.content:
            pieces.append(ch.delta.content)
        if ch.finish_reason:
            finish = ch.finish_reason
out["chat_stream"] = {"content": "".join(pieces), "usage": usage, "finish_reason": finish}

# An unknown model is an OpenAI NotFoundError with the server's message.
try:
    client.completions.create(model="no-such-skill", prompt="x", max_tokens=1)
    out["unknown_model"] = None
except openai.NotFoundError as e:
    out["unknown_model"] = {"status": e.status_code, "code": e.code}

print(json.dumps(out))
