"""A small synthetic instruction task the base model cannot do from the prompt alone.

Each input is a sentence about a person (one of several phrasings); two instructions ask for
an exact output format:
  record    "Rewrite the person's details as a record."  → "Lopez, Maria | 34 | Lisbon"
  initials  "Give the person's initials."                → "M. L."
Exact match is then a clean measure of whether the adapter learned the task. Some names and
cities appear only in the test split, so the held-out score measures copying unseen values,
not memorisation. Generated deterministically from a seed.

    python -m training.synthetic --out DIR [--train 300] [--test 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST = ["Maria", "James", "Aisha", "Chen", "Olga", "Pedro", "Fatima", "Liam", "Yuki", "Noah",
         "Elena", "Omar", "Sofia", "Ivan", "Grace", "Mateo", "Hannah", "Ravi", "Clara", "Jonas",
         "Amara", "Lucas", "Nina", "Tomas", "Leila", "Hugo", "Ingrid", "Kofi", "Mei", "Diego",
         "Anna", "Samir", "Zoe", "Felix", "Rosa", "Arjun", "Lena", "Marco", "Sara", "Emil"]
LAST = ["Lopez", "Smith", "Khan", "Wang", "Petrova", "Silva", "Haddad", "Murphy", "Tanaka", "Brown",
        "Rossi", "Nasser", "Garcia", "Volkov", "Kim", "Fernandez", "Schmidt", "Patel", "Dubois", "Berg",
        "Okafor", "Martin", "Novak", "Costa", "Ahmadi", "Laurent", "Larsen", "Mensah", "Chen", "Morales",
        "Meyer", "Farah", "Walsh", "Weber", "Torres", "Singh", "Fischer", "Bianchi", "Jensen", "Lindqvist"]
CITIES = ["Lisbon", "Boston", "Lahore", "Shanghai", "Moscow", "Recife", "Beirut", "Dublin", "Osaka",
          "Denver", "Milan", "Cairo", "Seville", "Kazan", "Busan", "Madrid", "Hamburg", "Pune", "Lyon",
          "Bergen", "Lagos", "Quebec", "Prague", "Porto", "Tehran", "Nice", "Oslo", "Accra", "Kyoto",
          "Lima", "Vienna", "Nairobi", "Leeds", "Zurich", "Valencia", "Delhi", "Munich", "Turin",
          "Aarhus", "Uppsala"]
PHRASINGS = [
    "{first} {last} is {age} years old and lives in {city}.",
    "{city} is home to {first} {last}, aged {age}.",
    "Meet {first} {last} ({age}), who lives in {city}.",
    "At {age}, {first} {last} has settled in {city}.",
]
TASKS = {
    "record": ("Rewrite the person's details as a record.", "{last}, {first} | {age} | {city}"),
    "initials": ("Give the person's initials.", "{fi}. {li}."),
}
HELD_OUT_SHARE = 4   # every 4th name/city is reserved for the test split


def _split(pool: list[str]) -> tuple[list[str], list[str]]:
    return ([x for i, x in enumerate(pool) if i % HELD_OUT_SHARE],
            [x for i, x in enumerate(pool) if i % HELD_OUT_SHARE == 0])


def _example(rng: random.Random, first: list[str], last: list[str], cities: list[str], task: str) -> dict:
    person = {"first": rng.choice(first), "last": rng.choice(last), "city": rng.choice(cities),
              "age": rng.randint(18, 89)}
    person.update(fi=person["first"][0], li=person["last"][0])
    instruction, answer = TASKS[task]
    return {"instruction": instruction, "input": rng.choice(PHRASINGS).format(**person),
            "output": answer.format(**person), "task": task}


def generate(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train examples use only the training pools; test examples use at least one held-out value."""
    rng = random.Random(seed)
    pools = [_split(p) for p in (FIRST, LAST, CITIES)]
    train_pools = [p[0] for p in pools]
    tasks = sorted(TASKS)
    train = [_example(rng, *train_pools, tasks[i % len(tasks)]) for i in range(n_train)]
    test = []
    while len(test) < n_test:
        # Per slot: a held-out value half of the time; reject draws made of training values only.
        parts = [p[1] if rng.random() < 0.5 else p[0] for p in pools]
        if parts == train_pools:
            continue
        test.append(_example(rng, *parts, tasks[len(test) % len(tasks)]))
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for train.jsonl and test.jsonl")
    p.add_argument("--train", type=int, default=300)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    train, test = generate(args.train, args.test, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    print(f"wrote {len(train)} train / {len(test)} test examples to {args.out}")


if __name__ == "__main__":
    main()
