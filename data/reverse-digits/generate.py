"""Writes the synthetic sequence-to-sequence task of examples/reverse-transformer.toml.

Each line is `source<TAB>target`: a random string of 1 to 12 digits and the same digits
reversed. Seeded, so running it again gives the same files:

    python3 data/reverse-digits/generate.py
"""
import pathlib
import random

HERE = pathlib.Path(__file__).parent


def pairs(n, rng):
    for _ in range(n):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12)))
        yield f"{digits}\t{digits[::-1]}\n"


def main():
    rng = random.Random(2026)
    for name, n in [("train.tsv", 20000), ("test.tsv", 2000)]:
        (HERE / name).write_text("".join(pairs(n, rng)))


if __name__ == "__main__":
    main()
