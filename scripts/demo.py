"""`make demo`: the whole pipeline end to end on the embedded defaults, on a laptop.

Brings up the local stack (Redis, MLflow, a trained and promoted `small` model, a worker, the
API), submits a job over HTTP, streams its tokens, shows the job record, then stops the stack
unless asked to keep it. It only drives the public interfaces; it must not reach into internals.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from lmcore.mlflow_client import TrackingError
from services.common.settings import Settings
from services.stack import Stack, StackConfig, StackError, StackState, banner

PROMPTS = ("ROMEO:", "First Citizen:\nWe are accounted poor citizens,")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true",
                        help="leave the stack running (stop it later with `lmctl stack down`)")
    parser.add_argument("--root", type=Path, default=Path(".stack"),
                        help="where the stack keeps its data, logs and state")
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--model-uri", help="serve this model dir instead of training one "
                        "(the stack then runs without MLflow)")  # fmt: skip
    return parser.parse_args(argv)


def sse_events(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """(event, data) pairs from a text/event-stream response."""
    event, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def stream_job(client: httpx.Client, prompt: str, max_new_tokens: int, seed: int) -> dict:
    """POST /jobs, print tokens as they stream, return the final job record."""
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0.8,
            "top_k": 50, "seed": seed}
    created = client.post("/jobs", json=body)
    created.raise_for_status()
    job = created.json()
    print(f"\n== job {job['id']} ({job['status']}), streaming {created.headers['Location']}/events")
    print(prompt, end="", flush=True)
    record: dict = {}
    with client.stream("GET", f"/jobs/{job['id']}/events", timeout=120) as response:
        response.raise_for_status()
        for event, data in sse_events(response):
            if event == "token":
                print(json.loads(data)["text"], end="", flush=True)
            elif event == "reset":  # a redelivered job's text replaces what was printed
                print(f"\n[reset]\n{prompt}{json.loads(data)['text']}", end="", flush=True)
            elif event == "done":
                record = json.loads(data)
                break
    print()
    return record or client.get(f"/jobs/{job['id']}").json()


def show_record(record: dict) -> None:
    print("== job record (GET /jobs/{id})")
    print(json.dumps(record, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (StackError, TrackingError, httpx.HTTPError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    stack = Stack(StackConfig(root=args.root, train_overrides=["model=small", "train=cpu"],
                              model_uri=args.model_uri, mlflow=args.model_uri is None))
    state: StackState = stack.up(detach=True, echo=False)
    try:
        keys = Settings().api_keys  # as the API reads LLM_API_KEYS; it accepts any of them
        print(banner(state, detached=True, api_keys=",".join(keys)))
        headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
        with httpx.Client(base_url=state.api_url, timeout=30, headers=headers) as client:
            for seed, prompt in enumerate(PROMPTS, start=1):
                record = stream_job(client, prompt, args.max_new_tokens, seed)
            show_record(record)
            seed_style = client.post(
                "/generate_text", json={"prompt": "JULIET:", "num_of_token_generated": 30}
            )
            seed_style.raise_for_status()
            print("== the seed's endpoint: POST /generate_text")
            print(json.dumps(seed_style.json(), indent=2))
        if state.mlflow_url:
            print(f"\nMLflow UI (runs, metrics, the registered model `llm`): {state.mlflow_url}")
        print(f"demo finished in {time.monotonic() - started:.0f} s")
    finally:
        if args.keep:
            print("the stack keeps running; stop it with: .venv/bin/lmctl stack down")
        else:
            stack.down()
            print("stack stopped (run `make demo KEEP=1` to leave it running)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
