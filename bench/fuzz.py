"""Long-running fuzzing of the XML stream parser and both S2S machines (outside CI).

    python3 bench/fuzz.py [-runs=10000000] [-max_total_time=3600] [corpus_dir ...]
    python3 bench/fuzz.py --hypothesis 1000000          # without atheris

With atheris (pip install atheris; coverage-guided libFuzzer) the targets of tests/fuzzing.py
run on mutated inputs: a first byte 'P' selects the parser target (the same stream cut at
random points must give the same events, RFC 6120 4), anything else the machine target (a
random case of operations on InboundS2s or OutboundS2s with the invariants of
tests/fuzzing.py). A violated invariant or any exception stops the run with the input saved
as crash-<sha1>. libFuzzer prints "Done N runs"; record N and the result in docs/fuzzing.md.
Without atheris, --hypothesis N runs the Hypothesis state x input tests of tests/test_fuzz.py
with N examples each.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def seed_corpus(directory: Path) -> None:
    """Start from meaningful streams: the vocabulary's pieces in protocol order."""
    from tests.fuzzing import snippets

    directory.mkdir(parents=True, exist_ok=True)
    vocab = snippets()
    for i in range(len(vocab)):
        # machine target: role/policy byte, certificate byte, then "snippet i, whole"
        # (kind 0-3 = a snippet: index in the upper five bits, then how much of it)
        (directory / f"seed-m{i}").write_bytes(bytes([i % 12, 7, (i % 32) << 3, 255,
                                                      (20 % 32) << 3, 255, 6]))
    (directory / "seed-p0").write_bytes(b"P\x05\x10\x20\x40" + b"".join(vocab[7:40]))


def run_atheris(argv: list[str]) -> None:
    import atheris

    logging.disable(logging.CRITICAL)  # the machines log every refusal; that is most inputs
    with atheris.instrument_imports():
        from tests.fuzzing import Violation, fuzz_bytes, parse_all, snippets

    header = snippets()[0]

    def one_input(data: bytes) -> None:
        if data[:1] == b"P":
            stream = header + data[5:]
            splits = [b * len(stream) // 255 for b in data[1:5]]
            whole = parse_all(stream, [])
            if parse_all(stream, splits) != whole:
                raise Violation(f"split at {splits} changed the events of {stream!r}")
            return
        fuzz_bytes(data)

    corpus = [a for a in argv[1:] if not a.startswith("-")]
    if not corpus:
        default = ROOT / ".fuzz-corpus"
        seed_corpus(default)
        argv = [*argv, str(default)]
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def run_hypothesis(examples: int) -> int:
    import pytest

    os.environ["FUZZ_EXAMPLES"] = str(examples)
    return pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_fuzz.py")])


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--hypothesis":
        sys.exit(run_hypothesis(int(sys.argv[2])))
    run_atheris(sys.argv)
