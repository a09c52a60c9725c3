"""What pinning adds to a certificate check (issue 15 part 2): process CPU time per
`identity.verify_certificate` call without pins (the baseline, as on main), with a matching pin
(chain + name + pin), with trust = "pin" (pin + name, no chain), and the edge's bookkeeping of
the partner's current certificate per check (`fingerprint_sha256`, the comparison that finds it
unchanged). Rounds are interleaved so a noisy machine hits every variant alike.

    python bench/pinning.py [--rounds 7] [--n 2000]

Prints µs per call (median of the rounds) and the ratio to the baseline, with the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from edgeproxy.devcerts import CertificateAuthority
from edgeproxy.identity import TrustStore, fingerprint_sha256, spki_sha256, verify_certificate

DOMAIN = "fabrikam.test"


def per_call(fn: Callable[[], object], n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    ca = CertificateAuthority("Bench")
    trust = TrustStore([ca.root.cert])
    leaf = ca.issue(DOMAIN)
    self_signed = ca.issue(DOMAIN, self_signed=True)
    pins = [spki_sha256(leaf.cert), spki_sha256(ca.issue(DOMAIN).cert)]
    own = [spki_sha256(self_signed.cert)]
    known = fingerprint_sha256(leaf.cert)
    variants: dict[str, Callable[[], object]] = {
        "chain + name (no pins, baseline)": lambda: verify_certificate(
            leaf.cert, leaf.chain, DOMAIN, trust),
        "chain + name + pin (2 pins)": lambda: verify_certificate(
            leaf.cert, leaf.chain, DOMAIN, trust, pins=pins),
        'trust = "pin": pin + name, no chain': lambda: verify_certificate(
            self_signed.cert, [], DOMAIN, trust, pins=own, pin_only=True),
        "current-certificate bookkeeping": lambda: fingerprint_sha256(leaf.cert) == known,
    }
    results: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            results[name].append(per_call(fn, args.n))
    base = statistics.median(results["chain + name (no pins, baseline)"])
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{args.rounds} interleaved rounds of {args.n} calls; process CPU time per call")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"  {name:40} {med:8.1f} µs  ({med / base:.2f}x baseline; "
              f"min {min(values):.1f}, max {max(values):.1f})")


if __name__ == "__main__":
    main()
