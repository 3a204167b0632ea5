"""Structured output on the default model through the OpenAI SDK's `parse`: 20 different prompts,
each answered with an object of the requested Pydantic model (greedy, small schemas)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from pydantic import BaseModel, Field

from http_harness import live_server


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)


class Answer(BaseModel):
    answer: str = Field(max_length=32)
    confident: bool


CITY_PROMPTS = ["the capital of France", "the capital of Japan", "the largest city in the USA",
                "the capital of Italy", "a city in Brazil", "the capital of Egypt", "a city in Canada",
                "the capital of Germany", "a port city in Spain", "the capital of Kenya"]
QUESTIONS = ["What colour is the sky?", "What is 2 + 3?", "Which animal barks?", "What do bees make?",
             "What is frozen water called?", "How many days are in a week?", "What is the opposite of hot?",
             "Which planet is red?", "What do cows drink?", "What is the first letter of the alphabet?"]


@pytest.mark.slow
def test_openai_parse_returns_objects_for_20_prompts(default_model, tmp_path):
    jobs = [(City, f"Name {p}. Reply in JSON.") for p in CITY_PROMPTS] + \
           [(Answer, f"{q} Reply in JSON.") for q in QUESTIONS]
    with live_server(default_model, tmp_path / "store", max_batch=20, max_seq_len=512,
                     max_tokens_per_step=1024) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        model_id = server.app.state.ctx.model_id

        def ask(job):
            schema, prompt = job
            return schema, client.chat.completions.parse(
                model=model_id, messages=[{"role": "user", "content": prompt}], response_format=schema,
                temperature=0, max_tokens=64)

        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
    for schema, completion in answers:
        message = completion.choices[0].message
        assert isinstance(message.parsed, schema), message.content
        assert completion.choices[0].finish_reason == "stop"
    assert len({c.choices[0].message.content for _, c in answers}) > 10    # really 20 different answers
